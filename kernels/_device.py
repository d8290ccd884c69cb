"""What every launcher shares about the device it runs on. Imports only torch (not triton), so
vit_fast.dispatch can read it without importing triton.

- :func:`interpreting`: whether Triton runs its kernels under the CPU interpreter.
- :func:`on_tensor_device`: a launcher decorator. Triton launches on the *current* CUDA device and
  stream, not on the tensors' device: with tensors on cuda:1 and cuda:0 current a launch fails or
  reads another GPU's memory. The decorator enters the device guard of the launcher's first CUDA
  tensor argument, as every torch op does for itself. It also records a launch that fails because
  the GPU cannot run the build (see :func:`is_build_failure`), so that vit_fast.dispatch sends
  later calls of that op on that device to the reference.
"""
from __future__ import annotations

import functools
import os

import torch

# (launcher module stem, device str) -> why its launch failed. Read by vit_fast.dispatch.
LAUNCH_FAILURES: dict = {}

# Messages of errors that say "this build cannot run on this GPU" (a missing SASS/PTX, a driver too
# old for the PTX, too many registers or too much shared memory). Errors that leave the CUDA
# context broken (illegal address, ...) are not among them: a fallback could not recover those.
_BUILD_FAILURE_MESSAGES = ("no kernel image is available", "invalid device function",
                           "unsupported toolchain", "unsupported ptx version", "ptx jit",
                           "too many resources requested", "out of resources")


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton runs the kernels on CPU tensors through numpy."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_build_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the compiled kernel cannot run on this GPU (compile error, resources,
    missing image), as opposed to a bug or a broken CUDA context."""
    name = type(exc).__name__
    if name in ("OutOfResources", "CompilationError", "PTXASError") and "triton" in type(exc).__module__:
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(m in text for m in _BUILD_FAILURE_MESSAGES)
    return False


def _first_cuda_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device
    return None


def on_tensor_device(launcher):
    """Run ``launcher`` under the device guard of its first CUDA tensor argument (no guard when
    there is none: CPU tensors under the interpreter), and record a build failure of its launch."""
    stem = launcher.__module__.rsplit(".", 1)[-1]

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        device = _first_cuda_device(args, kwargs)
        if device is None:
            return launcher(*args, **kwargs)
        try:
            # index None (a bare "cuda" tensor device never occurs, but) means the current device
            with torch.cuda.device(device.index if device.index is not None else -1):
                return launcher(*args, **kwargs)
        except Exception as exc:
            if is_build_failure(exc):
                LAUNCH_FAILURES.setdefault((stem, str(device)), f"{type(exc).__name__}: {exc}")
            raise

    guarded.on_tensor_device = True
    return guarded
