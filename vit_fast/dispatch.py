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
  on at all (CPU without the Triton interpreter) raises, because the user asked for kernels
  explicitly.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field

import torch

POLICIES = ("auto", "reference", "triton", "cublas")  # cublas: see vit_fast/tuning.py
KERNEL_BACKEND = {
    "fused_qkv_attention": "triton",
    "residual_layer_norm": "triton",
    "gelu_mlp": "triton",
    "patch_embed": "extension",
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MAX_LAYER_NORM_DIM = 8192

_local = threading.local()


def _check_policy(name):
    if name not in POLICIES:
        raise ValueError(f"backend must be one of {POLICIES}, got {name!r}")
    return name


def current_policy() -> str:
    """The policy in force: the innermost use_backend(), else VIT_FAST_BACKEND, else 'auto'."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("VIT_FAST_BACKEND", "auto").strip().lower() or "auto"
    if env not in POLICIES:
        raise ValueError(f"VIT_FAST_BACKEND must be one of {POLICIES}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed calls with backend policy ``name`` ('auto', 'reference' or 'triton')."""
    _check_policy(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def device_reasons(backend, tensors, policy="auto"):
    """Reasons the kernel backend cannot run on these tensors' device under ``policy``."""
    devices = {t.device.type for t in tensors if t is not None}
    device = devices.pop() if len(devices) == 1 else "cpu"
    if backend == "extension":
        reason = extension_missing_reason(device)
        return [reason] if reason else []
    reasons = []
    missing = triton_missing_reason()
    if missing:
        reasons.append(missing)
    if device == "cpu" and policy == "auto":
        reasons.append("CPU tensors: the Triton kernels run on CUDA (the interpreter is used only "
                       "when the 'triton' backend is forced)")
    elif device == "cpu" and not interpreting():
        reasons.append("CPU tensors: the Triton kernels need CUDA, or TRITON_INTERPRET=1 set "
                       "before triton is imported to run them under the interpreter")
    elif device not in ("cpu", "cuda"):
        reasons.append(f"tensors on {device}: the Triton kernels run on CUDA only")
    return reasons


def not_supported_reasons(op: str, tensors, **options) -> list:
    """Why the kernel of ``op`` cannot take this call (inputs, dtypes, options); [] if it can."""
    backend = KERNEL_BACKEND[op]
    reasons = []
    present = [t for t in tensors if t is not None]
    floats = [t for t in present if t.is_floating_point()]
    dtypes = {t.dtype for t in floats}
    if any(d not in KERNEL_DTYPES for d in dtypes):
        reasons.append(f"dtype {sorted(map(str, dtypes))}: kernels take float32/float16/bfloat16")
    if len(dtypes) > 1:
        reasons.append(f"mixed dtypes {sorted(map(str, dtypes))}: kernels take one dtype")
    if op == "fused_qkv_attention":
        if options.get("head_dim", 0) > MAX_HEAD_DIM:
            reasons.append(f"head_dim {options['head_dim']} > {MAX_HEAD_DIM}")
        if torch.float32 in dtypes and any(t.device.type == "cuda" for t in floats):
            # IEEE fp32 dots spill at every tile shape on sm_80/sm_90 and tf32 misses the
            # tolerance rule: no fp32 attention build is shipped (fp32 runs in the interpreter).
            reasons.append("float32 attention on CUDA: no spill-free fp32 build is shipped")
    elif op == "residual_layer_norm":
        if options.get("dim", 0) > MAX_LAYER_NORM_DIM:
            reasons.append(f"normalized dim {options['dim']} > {MAX_LAYER_NORM_DIM}")
    return reasons


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
    return Choice(backend, [])
