"""What every launcher shares about the device it runs on. Imports only torch (not triton), so
vit_fast.dispatch can read it without importing triton.

- :func:`interpreting`: whether Triton runs its kernels under the CPU interpreter.
- :func:`on_tensor_device`: a launcher decorator. Triton launches on the *current* CUDA device and
  stream, not on the tensors' device: with tensors on cuda:1 and cuda:0 current a launch fails or
  reads another GPU's memory. The decorator enters the device guard of the launcher's first
  tensor argument, as every torch op does for itself. A launch that fails because the device
  cannot run the build (:func:`is_build_failure`) is recorded in LAUNCH_FAILURES and raised as
  :class:`KernelLaunchError`: vit_fast.dispatch answers a failed forward with the reference and
  sends later calls of that op on that device there; a failed backward op is recomputed by the
  reference from its saved inputs (vit_fast/fallback.py).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import typing

import torch

# (launcher module stem, device str) -> why its launch failed. Read by vit_fast.dispatch.
LAUNCH_FAILURES: dict = {}


class _Failures:
    """A counter that moves whenever a kernel failure is recorded or forgotten (here or in
    vit_fast.fallback): decisions cached per configuration hold it and are remade when it moves."""
    generation = 0


FAILURES = _Failures()


def failure_recorded():
    FAILURES.generation += 1


class _Trial(threading.local):
    depth = 0


_TRIAL = _Trial()


@contextlib.contextmanager
def trial():
    """Launches tried as candidates of a measured selection (vit_fast.tuning): a build failure is
    raised to the tuner, which skips that candidate, but is not recorded as the op's failure (one
    tile config or one pass structure that cannot build must not send the op to the reference
    while its other candidates run; sm_100/sm_120 are never compiled ahead of time)."""
    _TRIAL.depth += 1
    try:
        yield
    finally:
        _TRIAL.depth -= 1

# Messages of errors that say "this build cannot run on this GPU" (a missing SASS/PTX, a driver too
# old for the PTX, too many registers or too much shared memory). Errors that leave the CUDA
# context broken (illegal address, ...) are not among them: a fallback could not recover those.
_BUILD_FAILURE_MESSAGES = ("no kernel image is available", "invalid device function",
                           "unsupported toolchain", "unsupported ptx version", "ptx jit",
                           "too many resources requested", "out of resources")

# triton's own exception classes for the same (matched by name: this file does not import triton).
_TRITON_BUILD_ERRORS = ("OutOfResources", "CompilationError", "PTXASError")


# Read once: triton reads it once too, when it is imported (it decides whether @triton.jit makes a
# compiled or an interpreted function), so a later change of the variable changes nothing.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class _Simulation:
    """The GPU that CPU tensors stand in for while the host benchmark runs (vit_fast/bench/host.py):
    the launchers then take their CUDA decisions for ``target`` (and launch nothing real)."""
    target = None


SIMULATION = _Simulation()


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton runs the kernels on CPU tensors through numpy."""
    return _INTERPRET and SIMULATION.target is None


@contextlib.contextmanager
def simulate_gpu(target):
    """Take CPU tensors as tensors on a GPU of ``target`` (a Target): the host benchmark's view of
    the path a GPU takes. Nothing here launches anything; the caller replaces the launches."""
    old, SIMULATION.target = SIMULATION.target, target
    try:
        yield
    finally:
        SIMULATION.target = old


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids and tile counts. triton.cdiv is a ConstexprFunction since
    triton 3.8 and costs microseconds per host call; this costs a division."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0, as triton.next_power_of_2)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class KernelLaunchError(RuntimeError):
    """A launcher's kernel cannot be compiled or launched on this device (the cause is chained)."""


def is_build_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the compiled kernel cannot run on this GPU (compile error, resources,
    missing image), as opposed to a bug or a broken CUDA context."""
    if isinstance(exc, KernelLaunchError):
        return True
    if any(c.__module__.startswith("triton") and c.__name__ in _TRITON_BUILD_ERRORS
           for c in type(exc).__mro__):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(m in text for m in _BUILD_FAILURE_MESSAGES)
    return False


def _first_device(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def on_tensor_device(launcher):
    """Run ``launcher`` under the device guard of its first tensor argument's CUDA device (no
    guard on CPU -- the interpreter -- nor when that device is already current: the usual case
    costs one comparison), and turn a build failure of its launch into a recorded
    :class:`KernelLaunchError` (not recorded while a measured selection tries candidates)."""
    stem = launcher.__module__.rsplit(".", 1)[-1]

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        device = first.device if first is not None else _first_device(args, kwargs)
        try:
            if device is None or device.type != "cuda" or device.index is None or (
                    torch.cuda.is_initialized() and device.index == torch._C._cuda_getDevice()):
                return launcher(*args, **kwargs)
            with torch.cuda.device(device.index):
                return launcher(*args, **kwargs)
        except Exception as exc:
            if not is_build_failure(exc) or isinstance(exc, KernelLaunchError):
                raise
            where = str(device)
            if not _TRIAL.depth:
                LAUNCH_FAILURES.setdefault((stem, where), f"{type(exc).__name__}: {exc}")
                failure_recorded()
            error = KernelLaunchError(
                f"vit_fast: {launcher.__name__} cannot run on {where} ({type(exc).__name__}: "
                f"{exc}); later calls of its op on {where} use the reference backend")
            error.launch = (launcher.__name__, where)  # one warning per failing launcher
            raise error from exc

    guarded.on_tensor_device = True
    return guarded


class Target(typing.NamedTuple):
    """The GPU a launch compiles for, as the launchers' config functions read it: the SM count
    (tile-count rules) and the compute capability (e.g. 90)."""
    sms: int
    arch: int


_TARGETS: dict = {}


def gpu_target(device):
    """Target of the CUDA device a launch runs on (cached: launches ask on every call); None when
    the kernels run under the interpreter, where the config functions use their CPU table."""
    if SIMULATION.target is not None:
        return SIMULATION.target
    if _INTERPRET or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TARGETS:
        props = torch.cuda.get_device_properties(index)
        _TARGETS[index] = Target(props.multi_processor_count, props.major * 10 + props.minor)
    return _TARGETS[index]
