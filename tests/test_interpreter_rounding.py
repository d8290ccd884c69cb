"""The interpreter's fp32 -> bf16 casts round to nearest even, as compiled kernels and torch do
(tests/interpreter_rounding.py, applied by tests/conftest.py)."""
import os

import pytest
import torch

from interpreter_rounding import round_fp32_to_bf16_bits

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def _values():
    torch.manual_seed(0)
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 255.5, 3.3895e38],
                        dtype=torch.float32)  # exact halfway cases (even down / up), overflow edge
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, -3e-39, 2 ** -133])
    return torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-30, 30, (4000,)), ties, special])


def test_bit_pattern_helper_matches_torch():
    x = torch.cat([_values(), torch.tensor([float("nan")])])
    got = torch.from_numpy(round_fp32_to_bf16_bits(x.numpy()).view("int16")).view(torch.bfloat16)
    want = x.to(torch.bfloat16)
    assert torch.equal(got[:-1], want[:-1]) and torch.isnan(got[-1])


def test_kernel_casts_and_stores_round_like_torch():
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(X, Y, Z, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask)
        tl.store(Y + offs, x.to(tl.bfloat16), mask=mask)  # explicit cast
        tl.store(Z + offs, x * 1.0, mask=mask)  # fp32 value stored to a bf16 pointer
    x = _values()
    y, z = (torch.empty(x.numel(), dtype=torch.bfloat16) for _ in range(2))
    cast_kernel[(1,)](x, y, z, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    assert torch.equal(z.view(torch.int16), want.view(torch.int16))
