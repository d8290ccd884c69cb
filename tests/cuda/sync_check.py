"""Host syncs after warm-up (issue 27, item 8): with VIT_FAST_SYNC_CHECK=1 (the GPU kit sets it)
each kernel step of a cuda test -- the kernels' forward and backward it checks -- runs twice: once
to warm up (Triton compiles, the tuner measures with events it waits for, first-call caches
fill), with torch's generators restored afterwards so the second run draws what the first drew,
then under torch.cuda.set_sync_debug_mode("error"), which raises at any host synchronization (a
blocking copy, .item(), bool() of a CUDA tensor). A sync there fails the test with a message that
starts with MESSAGE and names where it happened; every test that ran a checked step carries the
junit property PROPERTY. vit_fast/bench/gpu_check_setup.parse_junit counts both for the kit's
"host syncs" line. Without the variable (and on CPU) a kernel step runs once, unchecked.
"""
import contextlib
import os
import traceback

import torch

ENV = "VIT_FAST_SYNC_CHECK"
PROPERTY = "sync_checked"
MESSAGE = "host sync after warm-up"
TORCH_MESSAGE = "synchronizing CUDA operation"  # what sync-debug mode 'error' raises
RUNNING = []  # the running test's pytest item (tests/cuda/conftest.py's autouse fixture)


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _where(exc):
    """file:line of the innermost frame of vit_fast's (else of the caller's) that the sync
    came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/vit_fast/" in f.filename or "/kernels/" in f.filename]
    f = (ours or [f for f in frames if "/torch/" not in f.filename] or frames)[-1]
    path = f.filename.replace("\\", "/")
    for root in ("/vit_fast/", "/kernels/", "/tests/"):
        if root in path:
            path = root[1:] + path.rsplit(root, 1)[1]
            break
    return f"{path}:{f.lineno} ({f.name})"


@contextlib.contextmanager
def no_host_sync():
    """Raise AssertionError(MESSAGE ...) at any host synchronization inside; marks the running
    test as checked."""
    if RUNNING and (PROPERTY, "1") not in RUNNING[-1].user_properties:
        RUNNING[-1].user_properties.append((PROPERTY, "1"))
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as exc:
        if TORCH_MESSAGE not in str(exc):
            raise
        raise AssertionError(f"{MESSAGE} at {_where(exc)}: {str(exc).splitlines()[0]}") from exc
    finally:
        torch.cuda.set_sync_debug_mode(before)


def kernel_step(fn, device):
    """fn(): a test's kernel step on ``device``. Under VIT_FAST_SYNC_CHECK=1 on CUDA: warmed up
    once, then run under no_host_sync(); that run's result is returned."""
    device = torch.device(device)
    if not enabled() or device.type != "cuda":
        return fn()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index], device_type="cuda"):
        fn()
    with no_host_sync():
        return fn()
