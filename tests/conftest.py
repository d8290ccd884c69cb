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


@pytest.fixture(autouse=True)
def _env_read_afresh():
    """VIT_FAST_BACKEND is read once (vit_fast.dispatch): a test that sets it (monkeypatch)
    calls dispatch.reload_env(); afterwards the next test reads the restored environment."""
    yield
    from vit_fast import dispatch
    dispatch.reload_env()


@pytest.fixture
def vit_fast_imports():
    """A context manager yielding the list of modules that vit_fast's own code imports while it
    is open (torch's own imports inside autograd.grad and manual_seed are not counted)."""
    import builtins
    import contextlib
    import sys

    @contextlib.contextmanager
    def counting():
        imports, real = [], builtins.__import__

        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("vit_fast"):
                imports.append(args[0])
            return real(*args, **kwargs)
        builtins.__import__ = counted
        try:
            yield imports
        finally:
            builtins.__import__ = real
    return counting


@pytest.fixture
def no_interpreter(monkeypatch):
    """As if TRITON_INTERPRET were unset when triton was imported (it is read once, then)."""
    from vit_fast.kernels import _device
    monkeypatch.setattr(_device, "_INTERPRET", False)


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


# --- ahead-of-time compile tests (tests/aot_builds.py) ----------------------------------------
_AOT = {}  # "builds": the session's AotBuilds, made at collection when triton can compile


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """Run the tests that need AOT builds last, and start their builds now in the background
    (each such test module lists them as AOT_JOBS = (kernels module, [(spec, arch)])): the
    compile workers then work while the interpreter tests run on the other core."""
    aot = [item for item in items if "aot_builds" in getattr(item, "fixturenames", ())]
    if not aot:
        return
    later = set(aot)
    items[:] = [item for item in items if item not in later] + aot
    from vit_fast.aot import nvidia_backend_missing_reason
    if config.option.collectonly or nvidia_backend_missing_reason():
        return
    from aot_builds import AotBuilds
    _AOT["builds"] = AotBuilds()
    for module in dict.fromkeys(item.module for item in aot):
        if hasattr(module, "AOT_JOBS"):
            _AOT["builds"].submit(*module.AOT_JOBS)


def pytest_sessionfinish(session):
    if "builds" in _AOT:
        _AOT.pop("builds").close()


@pytest.fixture(scope="session")
def aot_builds():
    """The session's AOT compiler (tests/aot_builds.py): one pool of worker processes for every
    test that compiles, each build made once. Skips where triton cannot compile for NVIDIA."""
    from vit_fast.aot import nvidia_backend_missing_reason
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    if "builds" not in _AOT:  # a test collected without the hook (pytest's own plugins)
        from aot_builds import AotBuilds
        _AOT["builds"] = AotBuilds()
    return _AOT["builds"]


@pytest.fixture(scope="module")
def compiled(request, aot_builds):
    """{(spec name, arch): AotResult, or the error text} for the test module's
    ``AOT_JOBS = (kernels module, [(spec name, arch)])``, the builds started at collection."""
    return aot_builds.build(*request.module.AOT_JOBS)
