"""The one place that decides which backend runs a call, and says why the others did not.

Backends: ``reference`` (eager PyTorch, vit_fast/reference.py), ``triton`` (the Triton kernels of
attention, layer norm and the MLP) and ``extension`` (the compiled vit_fast._C patch embed).
The user picks a policy: ``auto`` (default), ``reference`` or ``triton`` — through the environment
variable VIT_FAST_BACKEND or the context manager :func:`use_backend`. ``triton`` means "use the
kernels": for patch_embed that is the extension.

Policy, per call (xformers style: each kernel lists what it does not support):
- ``reference``: always the reference.
- ``auto``: the kernel when :func:`not_supported_reasons` is empty, else the reference. Triton
  kernels only on CUDA tensors here (the interpreter is for tests, not for work); the extension
  on CPU too, where its OpenMP gather + one GEMM beats Conv2d.
- ``triton``: the kernel when supported. An option the kernel does not cover (a dtype, a head
  dim, a size) falls back to the reference: never a wrong answer. A device the kernel cannot run
  on at all (CPU without the Triton interpreter, a GPU the builds were not made for: ROCm,
  below sm_80 for Triton, an architecture vit_fast._C was not compiled for) raises, because the
  user asked for kernels explicitly.

The rules themselves live in vit_fast/support.py, one entry per kernel. A kernel that fails to
compile or launch on the device falls back to the reference (:func:`run`), once per key.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import torch

from . import support
from .fallback import FELL_BACK, remember, warn_once
from .kernels._device import LAUNCH_FAILURES, SIMULATION, interpreting, is_build_failure
from .support import KERNELS

POLICIES = ("auto", "reference", "triton", "cublas")  # cublas: see vit_fast/tuning.py
KERNEL_BACKEND = {op: k.backend for op, k in KERNELS.items()}
KERNEL_DTYPES = support.KERNEL_DTYPES
MAX_HEAD_DIM = support.MAX_HEAD_DIM
MAX_LAYER_NORM_DIM = support.MAX_LAYER_NORM_DIM


class _PolicyStack(threading.local):
    def __init__(self):
        self.stack = []  # innermost use_backend() last


# One stack per thread: another thread's use_backend() is never seen. A backward, which autograd
# runs on its own per-device thread on CUDA, needs none: each op keeps its forward's policy (its
# autograd context), and a checkpoint's recomputation reruns the forward under the policies that
# forward saw (vit_fast/checkpoint_replay.py: policy_scope() then in_scope()).
_local = _PolicyStack()
# VIT_FAST_BACKEND, read once on first use (not on every call); reload_env() reads it again.
_ENV: list = []


def _check_policy(name):
    if name not in POLICIES:
        raise ValueError(f"backend must be one of {POLICIES}, got {name!r}")
    return name


def _env_policy() -> str:
    env = os.environ.get("VIT_FAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in POLICIES:
        raise ValueError(f"VIT_FAST_BACKEND must be one of {POLICIES}, got {env!r}")
    return env


def reload_env():
    """Read VIT_FAST_BACKEND again (it is read once, when first needed: switch backends at run
    time with use_backend())."""
    _ENV.clear()


def current_policy() -> str:
    """The policy in force: the innermost use_backend() of this thread, else VIT_FAST_BACKEND,
    else 'auto'."""
    stack = _local.stack
    if stack:
        return stack[-1]
    if torch.compiler.is_compiling():
        return _env_policy()  # traced: a graph guards on the variable it read
    if not _ENV:
        _ENV.append(_env_policy())
    return _ENV[0]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed calls with backend policy ``name`` ('auto', 'reference' or 'triton'),
    their backward and any recomputation of their forward (activation checkpointing) included."""
    _check_policy(name)
    # Each thread's stack exists from its first access (_PolicyStack.__init__): older Dynamo
    # (torch 2.11's) cannot trace setdefault on a threading.local's __dict__.
    stack = _local.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def policy_scope() -> tuple:
    """This thread's open use_backend() policies, innermost last: what a recomputation of the
    code running now must see again (:func:`in_scope`). The default policy is not in it: it is
    read where the recomputation runs, as it was read here."""
    return tuple(_local.stack)


@contextlib.contextmanager
def in_scope(scope: tuple):
    """Run the enclosed code under exactly the policies of ``scope`` (from :func:`policy_scope`),
    whatever this thread has open: the contexts open around a recomputation (a backward called
    inside another use_backend(), say) belong to other code."""
    saved = _local.stack
    _local.stack = list(scope)
    try:
        yield
    finally:
        _local.stack = saved


_TRITON_MISSING = []  # the one cached answer of triton_missing_reason


# Cached by hand, not with lru_cache: torch.compile warns when it traces through lru_cache, and
# assume_constant_result makes it take the answer as a constant instead of tracing the import.
@torch.compiler.assume_constant_result
def triton_missing_reason():
    if not _TRITON_MISSING:
        try:
            import triton  # noqa: F401
            _TRITON_MISSING.append(None)
        except Exception as exc:  # pragma: no cover - depends on the install
            _TRITON_MISSING.append(f"triton is not importable ({exc})")
    return _TRITON_MISSING[0]


def extension_missing_reason(device_type: str):
    try:
        from .ops import patch_embed as pe
    except ImportError as exc:
        return f"the vit_fast._C extension is not available ({exc})"
    if not pe.extension_available():
        return f"the vit_fast._C extension is not available ({pe.extension_error()})"
    if device_type == "cuda" and not pe.extension_has_cuda():
        return "vit_fast._C was built without CUDA (no nvcc or a CPU-only torch at build time)"
    return None


@dataclass
class Choice:
    backend: str
    reasons: list = field(default_factory=list)  # why the kernel backend was not chosen
    key: tuple = ()  # what a failed launch is remembered by: op, device, dtypes, options


def _device_of(tensors):
    devices = {t.device for t in tensors if t is not None}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def device_reasons(backend, tensors, policy="auto"):
    """Reasons the kernel backend cannot run on these tensors' device under ``policy``: the
    backend missing, CPU without the interpreter, a GPU the builds were not made for."""
    device = _device_of(tensors)
    kind = device.type
    if backend == "extension":
        reason = extension_missing_reason(kind)
        if reason is None and kind == "cuda":
            reason = support.extension_device_reason(device.index or 0)
        return [reason] if reason else []
    if SIMULATION.target is not None:  # the host benchmark: CPU tensors stand in for a GPU's
        return []
    reasons = []
    missing = triton_missing_reason()
    if missing:
        reasons.append(missing)
    if kind == "cpu" and policy == "auto":
        reasons.append("CPU tensors: the Triton kernels run on CUDA (the interpreter is used only "
                       "when the 'triton' backend is forced)")
    elif kind == "cpu" and not interpreting():
        reasons.append("CPU tensors: the Triton kernels need CUDA, or TRITON_INTERPRET=1 set "
                       "before triton is imported to run them under the interpreter")
    elif kind == "cuda" and not interpreting():
        gate = support.triton_device_reason(device.index or 0)
        if gate:
            reasons.append(gate)
    elif kind not in ("cpu", "cuda"):
        reasons.append(f"tensors on {kind}: the Triton kernels run on CUDA only")
    return reasons


def not_supported_reasons(op: str, tensors, **options) -> list:
    """Why the kernel of ``op`` cannot take this call (inputs, dtypes, options); [] if it can.
    The rules live with each kernel's entry in vit_fast.support.KERNELS."""
    return KERNELS[op].not_supported_reasons(tensors, **options)


# --- failed launches --------------------------------------------------------------------------
# A kernel that compiles or launches badly on this GPU (OutOfResources, a CompilationError, "no
# kernel image") is not a wrong answer waiting to happen: run() answers that call with the
# reference and remembers the key (vit_fast/fallback.py: one table, one warning per failing
# launch), so choose() sends later calls there directly. A failed backward launch cannot be
# redone here (autograd holds the kernel's saved tensors): the backward op recomputes its
# gradient with the reference from those tensors (fallback.reference_on_failure); the launcher
# guard (kernels/_device.py) has recorded the failure, so choose() sends later calls of the op on
# that device to the reference.


def _failure_key(op, tensors, options):
    device = _device_of(tensors)
    dtypes = tuple(sorted({str(t.dtype) for t in tensors if t is not None}))
    return (op, str(device), dtypes, tuple(sorted(options.items())))


def failure_reason(op, key):
    """Why earlier launches of ``op`` with ``key`` (or any launch of its kernels on that device)
    failed, or None."""
    if key in FELL_BACK:
        return FELL_BACK[key]
    device = key[1] if len(key) > 1 else None
    for stem in KERNELS[op].launchers:
        if (stem, device) in LAUNCH_FAILURES:
            return f"an earlier {stem} launch failed on {device}: {LAUNCH_FAILURES[(stem, device)]}"
    return None


def run(op: str, choice: Choice, kernel, reference):
    """``kernel()`` when ``choice`` picked a kernel backend, else ``reference()``. A build failure
    of the kernel (see kernels/_device.is_build_failure) answers with ``reference()`` instead,
    with one warning; anything else (a bug, a broken CUDA context) propagates. In a compiled
    graph the kernel runs as is: the failure then surfaces from the compiled step."""
    if choice.backend == "reference":
        return reference()
    if torch.compiler.is_compiling():
        return kernel()
    try:
        return kernel()
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if not is_build_failure(exc):
            raise
        failure = exc
        remember(choice.key, failure)
    warn_once(choice.key, failure, stacklevel=3)  # pointing at the functional op's caller
    return reference()


def choose(op: str, tensors, **options) -> Choice:
    """Pick the backend for one call of ``op``. Raises where the user forced kernels that cannot run."""
    policy = current_policy()
    if policy == "reference":
        return Choice("reference", ["backend policy is 'reference'"])
    backend = KERNEL_BACKEND[op]
    device = device_reasons(backend, tensors, policy)
    if device:
        if policy in ("triton", "cublas"):  # cublas = Triton kernels, GEMMs on cuBLAS
            raise RuntimeError(f"vit_fast.{op}: backend {policy!r} was requested but cannot run: "
                               + "; ".join(device))
        return Choice("reference", device)
    reasons = not_supported_reasons(op, tensors, **options)
    if reasons:
        return Choice("reference", reasons)
    if torch.compiler.is_compiling():
        return Choice(backend, [])
    key = _failure_key(op, tensors, options)
    failed = failure_reason(op, key)
    if failed:
        return Choice("reference", [failed], key)
    return Choice(backend, [], key)
