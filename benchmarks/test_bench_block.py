"""One ViT block: eager = timm's Block; vit_fast = the same weights through vit_fast.convert.
Model bytes/FLOPs: roofline.block_ops for each provider."""
import copy

import torch
from torch.func import functional_call
from timm.models.vision_transformer import Block

import vit_fast
from vit_fast.bench import roofline

from conftest import DEVICE  # noqa: E402


def test_block(case, run_case):
    C, H, N = case.dims
    B, dt, e = case.batch, case.torch_dtype, torch.finfo(case.torch_dtype).bits // 8
    torch.manual_seed(0)
    timm_blk = torch.nn.Sequential(Block(C, H, qkv_bias=True)).to(DEVICE)
    fast_blk = vit_fast.convert(copy.deepcopy(timm_blk))
    params = {k: v.detach().to(dt).requires_grad_(case.backward) for k, v in timm_blk.named_parameters()}
    t = {"x": torch.randn(B, N, C, device=DEVICE).to(dt).requires_grad_(case.backward), **params}

    def call(module):
        def f(t):
            return functional_call(module, {k: v for k, v in t.items() if k != "x"}, (t["x"],))
        return f

    impl = "eager" if case.provider == "eager" else "vit_fast"
    ops = roofline.block_ops(impl, B, N, C, H, e, backward=case.backward)
    run_case(case, t, call(timm_blk), call(fast_blk), ops)
