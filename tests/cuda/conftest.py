"""The `cuda` tests: the compiled Triton kernels and the CUDA extension on a real GPU.

They check what the interpreter tests cannot: the kernels as compiled for the device (bf16 dots
on the tensor cores, the shipped tile configs at ViT sizes), against vit_fast.reference with
tests/tolerance.py's rule. Run them with

    TRITON_INTERPRET=0 python -m pytest -m cuda tests/cuda -q -p no:cacheprovider

(`python -m vit_fast.bench gpu-check` does). tests/conftest.py sets TRITON_INTERPRET=1 when it is
unset, and triton decides at kernel definition whether it interprets, so a run without the
explicit 0 would check the interpreter again: those runs skip, saying so.

VIT_FAST_CUDA_TESTS_DEVICE=cpu runs the same tests on CPU under the interpreter, to check the
tests themselves (slow: select a few with -k). The interpreter (triton 3.8) converts fp32 to bf16
by truncation, not round-to-nearest-even as compiled kernels do, which made bf16 results of whole
Blocks at ViT widths miss the rule by a little (2026-11-25: Block S/16 bf16 dfc2.weight 0.816 vs
bound 0.803; AMP bf16 output 1.15e-2 vs 9.2e-3; gelu_mlp AMP bf16 dfc2_weight 2.0 vs 1.16);
tests/conftest.py now patches that cast to round to nearest even (tests/interpreter_rounding.py).

VIT_FAST_SYNC_CHECK=1 (the GPU kit sets it) runs each test's kernel step again after its warm-up
under torch.cuda.set_sync_debug_mode("error"): a host sync fails the test (tests/cuda/sync_check.py).
"""
import os

import pytest
import torch

import sync_check

DEVICE = os.environ.get("VIT_FAST_CUDA_TESTS_DEVICE", "cuda")


def skip_reason():
    """Why the cuda tests cannot run here, or None."""
    if DEVICE == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "VIT_FAST_CUDA_TESTS_DEVICE=cpu needs TRITON_INTERPRET=1"
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False): these tests check the "
                "compiled kernels on a GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 would run the kernels under the interpreter; run "
                "`TRITON_INTERPRET=0 python -m pytest -m cuda tests/cuda`")
    return None


@pytest.fixture(autouse=True)
def _needs_cuda():
    why = skip_reason()
    if why:
        pytest.skip(why)
    yield


@pytest.fixture
def device():
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _sync_check(request):
    """Tells tests/cuda/sync_check.py which test runs: under VIT_FAST_SYNC_CHECK=1 its kernel
    steps (sync_check.kernel_step: cuda_helpers.run for the kernels, the Block's and the model's
    runs) warm up, then run under sync-debug mode 'error', and the test is marked checked."""
    sync_check.RUNNING[:] = [request.node]
    yield
    sync_check.RUNNING.clear()
