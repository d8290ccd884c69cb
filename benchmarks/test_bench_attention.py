"""fused_qkv_attention: eager = PyTorch's SDPA on timm's q/k/v views (timm's Attention core);
vit_fast = the Triton kernel. Model bytes/FLOPs: roofline.attention_fwd / attention_bwd."""
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast.bench import roofline

from conftest import DEVICE  # noqa: E402  (benchmarks/ is on sys.path as the rootdir of its conftest)


def eager(t):
    qkv, H = t["qkv"], t["H"]
    B, N, three_c = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, H, three_c // (3 * H)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, three_c // 3)


def fast(t):
    return vit_fast.fused_qkv_attention(t["qkv"], t["H"])


def test_attention(case, run_case):
    C, H, N = case.dims
    B, e = case.batch, torch.finfo(case.torch_dtype).bits // 8
    qkv = torch.randn(B, N, 3 * C, device=DEVICE).to(case.torch_dtype).requires_grad_(case.backward)
    ops = [roofline.attention_fwd(B, N, H, C // H, e)]
    if case.backward:
        ops += roofline.attention_bwd(B, N, H, C // H, e)
    run_case(case, {"qkv": qkv, "H": H}, eager, fast, ops)
