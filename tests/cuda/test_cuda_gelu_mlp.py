"""gelu_mlp on CUDA: the fused GEMM + GELU (+ residual epilogue) kernels at ViT widths."""
import pytest
import torch

import vit_fast

from cuda_helpers import (BF16, DTYPES, F32, RESIDUAL_CASES, RESIDUAL_IDS, VIT,
                          assert_backward_deterministic, assert_kernel_chosen, check, dtype_id)

pytestmark = pytest.mark.cuda
B = 2
GRADS_PLAIN = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
GRADS_FULL = GRADS_PLAIN + ["residual", "layer_scale"]


def _inputs(device, n, C, dtype, full):
    hidden = 4 * C
    t = {"x": torch.randn(B, n, C, device=device),
         "fc1_weight": torch.randn(hidden, C, device=device) * C ** -0.5,
         "fc1_bias": torch.randn(hidden, device=device) * 0.5,
         "fc2_weight": torch.randn(C, hidden, device=device) * hidden ** -0.5,
         "fc2_bias": torch.randn(C, device=device) * 0.5}
    if full:  # the Block's MLP: residual + LayerScale + drop-path (sample 1 dropped)
        t["residual"] = torch.randn(B, n, C, device=device)
        t["layer_scale"] = torch.rand(C, device=device) + 0.1
        t["sample_scale"] = torch.tensor([1.25, 0.0], device=device)
    return {k: v.to(dtype) for k, v in t.items()}


def _mlp(approximate="none"):
    def fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None, layer_scale=None,
           sample_scale=None):
        return vit_fast.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate,
                                 residual=residual, layer_scale=layer_scale, sample_scale=sample_scale)
    return fn


@pytest.mark.parametrize("shape,n,dtype,full", RESIDUAL_CASES, ids=RESIDUAL_IDS)
def test_forward_backward(device, shape, n, dtype, full):
    t = _inputs(device, n, VIT[shape][0], dtype, full)
    assert_kernel_chosen("gelu_mlp", list(t.values()))
    check(_mlp(), t, GRADS_FULL if full else GRADS_PLAIN)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_tanh_gelu(device, dtype):
    check(_mlp("tanh"), _inputs(device, 197, VIT["S"][0], dtype, True), GRADS_FULL)


@pytest.mark.parametrize("dtype", (BF16, torch.float16), ids=dtype_id)
def test_autocast(device, dtype):
    t = _inputs(device, 197, VIT["B"][0], F32, False)
    outs, grads = check(_mlp(), t, GRADS_PLAIN, autocast=dtype)
    assert outs[0].dtype == dtype and grads["fc1_weight"].dtype == F32


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_bitwise_deterministic_over_10_runs(device, dtype):
    assert_backward_deterministic(_mlp(), _inputs(device, 577, VIT["B"][0], dtype, True), GRADS_FULL)
