"""GEMM and column-sum offsets past 2^31 elements (large-batch inference: ViT-B's hidden 3072 at
~700k rows) must not wrap.

No 2^31-element tensor is materialized: a few rows are viewed with a row stride of 2^26 over a
virtual allocation of 2^32 + 2^27 fp16 elements (8.25 GiB of address space, of which only the touched
pages -- a few MiB -- are ever backed by memory). The view starts in the middle of the
allocation, so a 32-bit offset that wraps lands inside it (on zero pages) and shows up as a
wrong value instead of a crash.
"""
import pytest
import torch

from vit_fast.kernels.matmul import colsum, matmul

ROW_STRIDE = 1 << 26
ROWS = 34  # rows 32 and 33 start 2^31 elements and more past the view's first element


@pytest.fixture(scope="module")
def big_storage():
    try:
        base = torch.empty((1 << 32) + (1 << 27), dtype=torch.float16)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine's overcommit policy
        pytest.skip(f"cannot reserve 8 GiB of address space here: {exc}")
    yield base
    del base


def _far_rows(base, cols, values, start=0):
    """[ROWS, cols] view of base with row stride 2^26, starting 2^31 (+ start) elements in,
    holding values."""
    view = base.as_strided((ROWS, cols), (ROW_STRIDE, 1), storage_offset=(1 << 31) + start)
    view.copy_(values)
    return view


def test_gemm_a_and_residual_rows_past_2_31(big_storage):
    torch.manual_seed(0)
    K, N = 32, 16
    a_vals = torch.randn(ROWS, K).half()
    a = _far_rows(big_storage, K, a_vals)
    b = torch.randn(K, N).half()
    want = a_vals.float() @ b.float()
    got, _, _ = matmul(a, b, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # the residual epilogue reads its rows with their own stride
    res_vals = torch.randn(ROWS, N).half()
    res = _far_rows(big_storage, N, res_vals, start=4096)
    got, _, _ = matmul(a, b, torch.float32, residual=res)
    torch.testing.assert_close(got, want + res_vals.float(), rtol=1e-3, atol=1e-3)


def test_colsum_rows_past_2_31(big_storage):
    vals = torch.randn(ROWS, 8).half()
    x = _far_rows(big_storage, 8, vals)
    torch.testing.assert_close(colsum(x), vals.float().sum(0), rtol=1e-3, atol=1e-3)
