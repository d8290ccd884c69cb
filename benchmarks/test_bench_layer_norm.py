"""residual_layer_norm with a residual and LayerScale (the LN2 position of a block): eager =
PyTorch's mul, add and F.layer_norm; vit_fast = the fused Triton kernel.
Model bytes/FLOPs: roofline.residual_layer_norm_ops (vit_fast's kernels for both providers'
useful work would understate eager, so each provider is charged its own op sequence)."""
import torch
import torch.nn.functional as F

import vit_fast
from vit_fast.bench import roofline

from conftest import DEVICE  # noqa: E402


def eager(t):
    s = t["res"] + t["x"] * t["ls"]
    return F.layer_norm(s, s.shape[-1:], t["w"], t["b"], 1e-6)


def fast(t):
    return vit_fast.residual_layer_norm(t["x"], t["w"], t["b"], 1e-6, residual=t["res"],
                                        layer_scale=t["ls"])[0]


def test_layer_norm(case, run_case):
    C, _H, N = case.dims
    B, dt, e = case.batch, case.torch_dtype, torch.finfo(case.torch_dtype).bits // 8

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dt).requires_grad_(case.backward)

    t = {"x": rand(B, N, C), "res": rand(B, N, C), "ls": rand(C, scale=0.1), "w": rand(C),
         "b": rand(C)}
    impl = "eager" if case.provider == "eager" else "vit_fast"
    ops = roofline.residual_layer_norm_ops(impl, B * N, C, e, layer_scale=True, backward=case.backward)
    run_case(case, t, eager, fast, ops)
