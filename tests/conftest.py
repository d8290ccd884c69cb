import os
import random

# The triton backend runs its kernels under the interpreter on CPU; triton reads this variable when
# a kernel is defined, so it must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter runs tile products through numpy; OpenBLAS going multi-threaded on them made
# interpreter tests up to 10x slower on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter truncates fp32 -> bf16; compiled kernels round to nearest even: make the
    # emulator round as the GPU does (tests/interpreter_rounding.py says why and how).
    from interpreter_rounding import patch_interpreter_bf16_rounding  # noqa: E402
    patch_interpreter_bf16_rounding()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield


@pytest.fixture
def op_calls(monkeypatch):
    """Counts of fused functional op calls (converted modules look the ops up at call time)."""
    from vit_fast import functional
    calls = {}
    for op in ("fused_qkv_attention", "residual_layer_norm", "gelu_mlp"):
        real = getattr(functional, op)

        def counted(*args, _real=real, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(functional, op, counted)
    return calls


@pytest.fixture(scope="session")
def aot_builds():
    """The session's AOT compiler (tests/aot_builds.py): one pool of worker processes for every
    tests/test_aot_*.py file, each build made once. Skips where triton cannot compile for NVIDIA."""
    from vit_fast.aot import nvidia_backend_missing_reason
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    from aot_builds import AotBuilds
    builds = AotBuilds()
    yield builds
    builds.close()
