"""gelu_mlp with the residual add of a block: eager = timm's Mlp (fc1, GELU, fc2) + residual;
vit_fast = the Triton GEMMs with fused epilogues. Model bytes/FLOPs from roofline (each provider
charged its own sequence)."""
import torch
from timm.layers import Mlp

import vit_fast
from vit_fast.bench import roofline

from conftest import DEVICE  # noqa: E402


def test_gelu_mlp(case, run_case):
    C, _H, N = case.dims
    B, dt, e, Hd = case.batch, case.torch_dtype, torch.finfo(case.torch_dtype).bits // 8, 4 * C
    torch.manual_seed(0)
    mlp32 = Mlp(C, Hd).to(DEVICE)
    p = {k: v.detach().to(dt).requires_grad_(case.backward) for k, v in mlp32.named_parameters()}
    t = {"x": torch.randn(B, N, C, device=DEVICE).to(dt).requires_grad_(case.backward),
         "res": torch.randn(B, N, C, device=DEVICE).to(dt).requires_grad_(case.backward),
         **{k.replace(".", "_"): v for k, v in p.items()}}

    def eager(t):
        h = torch.nn.functional.gelu(torch.nn.functional.linear(t["x"], t["fc1_weight"], t["fc1_bias"]))
        return t["res"] + torch.nn.functional.linear(h, t["fc2_weight"], t["fc2_bias"])

    def fast(t):
        return vit_fast.gelu_mlp(t["x"], t["fc1_weight"], t["fc1_bias"], t["fc2_weight"],
                                 t["fc2_bias"], residual=t["res"])

    M = B * N
    if case.provider == "eager":
        ops = [roofline.eager_linear(M, Hd, C, e, "fc1"), roofline.elementwise("gelu", M * Hd, e, 1),
               roofline.eager_linear(M, C, Hd, e, "fc2"), roofline.elementwise("add", M * C, e, 2)]
        if case.backward:
            ops += [*roofline.eager_linear_bwd(M, C, Hd, e, "fc2"),
                    roofline.elementwise("gelu_bwd", M * Hd, e, 2),
                    *roofline.eager_linear_bwd(M, Hd, C, e, "fc1")]
    else:
        ops = roofline.gelu_mlp_fwd(M, C, Hd, e, train=case.backward)
        if case.backward:
            ops += roofline.gelu_mlp_bwd(M, C, Hd, e)
    run_case(case, t, eager, fast, ops)
