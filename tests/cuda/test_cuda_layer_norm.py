"""residual_layer_norm on CUDA: the compiled kernel at ViT widths and token counts."""
import pytest
import torch

import vit_fast

from cuda_helpers import (BF16, DTYPES, F32, RESIDUAL_CASES, RESIDUAL_IDS, VIT,
                          assert_backward_deterministic, assert_kernel_chosen, check, dtype_id)

pytestmark = pytest.mark.cuda
B = 2
GRADS_PLAIN = ["x", "weight", "bias"]
GRADS_FULL = ["x", "weight", "bias", "residual", "layer_scale"]


def _inputs(device, n, C, dtype, full):
    t = {"x": torch.randn(B, n, C, device=device),
         "weight": torch.rand(C, device=device) + 0.5,
         "bias": torch.randn(C, device=device) * 0.5}
    if full:  # the Block's second LayerNorm: residual + LayerScale + drop-path (sample 1 dropped)
        t["residual"] = torch.randn(B, n, C, device=device)
        t["layer_scale"] = torch.rand(C, device=device) + 0.1
        t["sample_scale"] = torch.tensor([1.25, 0.0], device=device)
    return {k: v.to(dtype) for k, v in t.items()}


def _layer_norm(x, weight, bias, residual=None, layer_scale=None, sample_scale=None):
    return vit_fast.residual_layer_norm(x, weight, bias, 1e-6, residual=residual,
                                       layer_scale=layer_scale, sample_scale=sample_scale)


@pytest.mark.parametrize("shape,n,dtype,full", RESIDUAL_CASES, ids=RESIDUAL_IDS)
def test_forward_backward(device, shape, n, dtype, full):
    C = VIT[shape][0]
    t = _inputs(device, n, C, dtype, full)
    assert_kernel_chosen("residual_layer_norm", list(t.values()), dim=C)
    check(_layer_norm, t, GRADS_FULL if full else GRADS_PLAIN)


@pytest.mark.parametrize("dtype", (BF16, torch.float16), ids=dtype_id)
def test_autocast_runs_in_float32(device, dtype):
    outs, _ = check(_layer_norm, _inputs(device, 197, VIT["B"][0], F32, True), GRADS_FULL,
                    autocast=dtype)
    assert all(o.dtype == F32 for o in outs)  # autocast's layer_norm policy: fp32


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_bitwise_deterministic_over_10_runs(device, dtype):
    # 2·1025 rows: the weight/bias gradients go through the two-stage partial-sum reduction.
    assert_backward_deterministic(_layer_norm, _inputs(device, 1025, VIT["L"][0], dtype, True),
                                  GRADS_FULL)
