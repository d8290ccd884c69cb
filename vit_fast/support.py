"""What each kernel backend supports, kernel by kernel (xformers' ``not_supported_reasons``).

Two kinds of rule, both returning reasons (a list of strings; empty means supported):
- per op (:data:`KERNELS`): dtypes, sizes and options one kernel covers;
- per device (:func:`triton_device_reason`, :func:`extension_device_reason`): the GPUs a backend's
  builds were made and checked for. Answers are cached per device and are constants to
  torch.compile (``assume_constant_result``), so the gates cost nothing in a compiled graph.

vit_fast.dispatch combines them with the user's policy. Nothing here imports triton.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .kernels._device import SIMULATION

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Limits the kernels state (tests/test_dispatch.py checks these against kernels/*.py).
MAX_HEAD_DIM = 256  # the largest head-dim bucket of kernels/attention.py's config table
MAX_LAYER_NORM_DIM = 8192  # kernels/layer_norm.py MAX_C

# The GPUs the Triton builds are compiled and checked for (python -m vit_fast.bench compile-check):
# sm_80 and newer, with at least the 99 KB of shared memory per block that sm_86/sm_89/sm_120
# let a block opt in to. The attention forward picks a tile that fits the device's limit
# (kernels/attention.py fwd_config: 112 KB on sm_80/sm_90, 72 KB below that), and every build the
# launchers pick at this limit is checked to fit it on sm_80 and sm_86 (tests/test_aot_attention.py);
# sm_75 (T4) allows 64 KB, where the attention backward fails to launch.
MIN_TRITON_CAPABILITY = (8, 0)
MIN_TRITON_SHARED_BYTES = 99 * 1024

# Written by setup.py next to the extension: the SASS and PTX architectures _C was built with.
EXTENSION_BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.json")


# --- per op -----------------------------------------------------------------------------------

def _dtype_reasons(floats):
    dtypes = {t.dtype for t in floats}
    reasons = []
    if any(d not in KERNEL_DTYPES for d in dtypes):
        reasons.append(f"dtype {sorted(map(str, dtypes))}: kernels take float32/float16/bfloat16")
    if len(dtypes) > 1:
        reasons.append(f"mixed dtypes {sorted(map(str, dtypes))}: kernels take one dtype")
    return reasons


@dataclass(frozen=True)
class Kernel:
    """One op's kernel: its backend and the rule that says which calls it takes."""
    op: str
    backend: str  # "triton" or "extension"
    # Modules of vit_fast.kernels whose launches this op makes (a failed launch disables the op).
    launchers: tuple = ()

    def not_supported_reasons(self, tensors, **options) -> list:
        floats = [t for t in tensors if t is not None and t.is_floating_point()]
        return _dtype_reasons(floats) + self.option_reasons(floats, **options)

    def option_reasons(self, floats, **options) -> list:
        return []


def _on_gpu(t) -> bool:
    """A CUDA tensor, or a CPU tensor standing in for one while the host benchmark takes the
    path a GPU takes (kernels/_device.simulate_gpu)."""
    return t.device.type == "cuda" or SIMULATION.target is not None


class AttentionKernel(Kernel):
    def option_reasons(self, floats, head_dim=0, **options):
        # segmented=True (segment_ids given) is supported by every build: no reason for it.
        reasons = []
        if head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
        if any(t.dtype == torch.float32 and _on_gpu(t) for t in floats):
            # IEEE fp32 dots spill at every tile shape on sm_80/sm_90 and tf32 misses the
            # tolerance rule: no fp32 attention build is shipped (fp32 runs in the interpreter).
            reasons.append("float32 attention on CUDA: no spill-free fp32 build is shipped")
        return reasons


class LayerNormKernel(Kernel):
    def option_reasons(self, floats, dim=0, **options):
        return [f"normalized dim {dim} > {MAX_LAYER_NORM_DIM}"] if dim > MAX_LAYER_NORM_DIM else []


class QkNormKernel(Kernel):
    """qkv in a kernel dtype; the weights and biases share one dtype, qkv's or float32 (autocast:
    fp32 parameters with a half qkv, the affine computed in fp32 either way)."""

    def not_supported_reasons(self, tensors, head_dim=0, **options):
        qkv, params = tensors[0], [t for t in tensors[1:] if t is not None]
        reasons = _dtype_reasons([qkv])
        dtypes = {t.dtype for t in params}
        if len(dtypes) > 1:
            reasons.append(f"q/k norm parameters of mixed dtypes {sorted(map(str, dtypes))}")
        elif dtypes and dtypes != {qkv.dtype} and dtypes != {torch.float32}:
            reasons.append(f"q/k norm parameters are {dtypes.pop()}: the kernel takes qkv's dtype "
                           "or float32")
        if head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
        return reasons


class RopeKernel(Kernel):
    """qkv in a kernel dtype; sin/cos are read as fp32 whatever their float dtype."""

    def not_supported_reasons(self, tensors, head_dim=0, **options):
        reasons = _dtype_reasons(tensors[:1])
        if head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {head_dim} > {MAX_HEAD_DIM}")
        return reasons


class GluMlpKernel(Kernel):
    """The GEMM operands in one kernel dtype; the hidden LayerNorm's parameters in it or fp32
    (autocast), its width within the LayerNorm kernel's."""

    def not_supported_reasons(self, tensors, norm=(), hidden=0, **options):
        reasons = _dtype_reasons([t for t in tensors if t is not None])
        dtypes = {t.dtype for t in norm if t is not None}
        if dtypes - {tensors[0].dtype, torch.float32}:
            reasons.append(f"hidden LayerNorm parameters of {sorted(map(str, dtypes))}: the "
                           "kernel takes x's dtype or float32")
        if hidden > MAX_LAYER_NORM_DIM:
            reasons.append(f"hidden LayerNorm over {hidden} > {MAX_LAYER_NORM_DIM} units")
        return reasons


KERNELS = {
    "fused_qkv_attention": AttentionKernel("fused_qkv_attention", "triton", ("attention",)),
    "qk_norm": QkNormKernel("qk_norm", "triton", ("qk_norm",)),
    "residual_layer_norm": LayerNormKernel("residual_layer_norm", "triton", ("layer_norm",)),
    "gelu_mlp": Kernel("gelu_mlp", "triton", ("gelu_mlp", "matmul")),
    "rotary_qk": RopeKernel("rotary_qk", "triton", ("rope",)),
    "glu_mlp": GluMlpKernel("glu_mlp", "triton", ("glu_mlp", "matmul", "glu_elementwise", "layer_norm")),
    "patch_embed": Kernel("patch_embed", "extension"),
}


# --- per device -------------------------------------------------------------------------------

_TRITON_DEVICE = {}  # device index -> reason or None
_EXTENSION_DEVICE = {}


def _hip_reason(what):
    return (f"ROCm/HIP build of torch: {what} are built and checked for NVIDIA GPUs only"
            if torch.version.hip else None)


def triton_reason_for(capability, name="this GPU", shared_optin=None):
    """Why the Triton builds cannot run on a GPU of ``capability`` (major, minor); None if they can."""
    hip = _hip_reason("the Triton kernels")
    if hip:
        return hip
    major, minor = capability
    if (major, minor) < MIN_TRITON_CAPABILITY:
        return (f"{name} is sm_{major}{minor}: the Triton kernels are built and checked for sm_80 "
                f"and newer (their largest build needs {MIN_TRITON_SHARED_BYTES // 1024} KB of "
                "shared memory per block)")
    if shared_optin is not None and shared_optin < MIN_TRITON_SHARED_BYTES:
        return (f"{name} allows {shared_optin} B of shared memory per block; the Triton kernels "
                f"need {MIN_TRITON_SHARED_BYTES} B")
    return None


# Cached by hand (torch.compile warns on lru_cache); assume_constant_result makes the answer a
# constant of the compiled graph instead of tracing the device queries.
@torch.compiler.assume_constant_result
def triton_device_reason(index: int):
    """Why the Triton kernels cannot run on cuda:``index``; None when they can. Cached."""
    if not torch.cuda.is_available():  # fake CUDA tensors (FakeTensorMode) on a machine without one
        return None
    if index not in _TRITON_DEVICE:
        props = torch.cuda.get_device_properties(index)
        _TRITON_DEVICE[index] = triton_reason_for(
            (props.major, props.minor), f"cuda:{index} ({props.name})",
            getattr(props, "shared_memory_per_block_optin", None))
    return _TRITON_DEVICE[index]


def extension_build_info():
    """{"sass": [80, 90], "ptx": [90], ...} as setup.py recorded it, or None when not recorded."""
    try:
        with open(EXTENSION_BUILD_INFO) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def extension_reason_for(capability, info, name="this GPU"):
    """Why an extension built as ``info`` cannot run on ``capability``; None if it can. SASS runs
    on its own major version at the same or a later minor; PTX is JIT-compiled by the driver for
    any later GPU. Unknown builds (no record) are let through: a launch failure falls back."""
    hip = _hip_reason("vit_fast._C's CUDA kernels")
    if hip:
        return hip
    if info is None:
        return None
    sm = capability[0] * 10 + capability[1]
    sass, ptx = info.get("sass", []), info.get("ptx", [])
    if any(s // 10 == sm // 10 and s <= sm for s in sass) or any(p <= sm for p in ptx):
        return None
    built = ", ".join([f"sm_{s}" for s in sass] + [f"compute_{p} (PTX)" for p in ptx]) or "no GPU"
    return (f"vit_fast._C was built for {built}, which cannot run on {name} (sm_{sm}); rebuild "
            f"with TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\"")


@torch.compiler.assume_constant_result
def extension_device_reason(index: int):
    """Why vit_fast._C's CUDA kernels cannot run on cuda:``index``; None when they can. Cached."""
    if not torch.cuda.is_available():  # fake CUDA tensors: nothing launches
        return None
    if index not in _EXTENSION_DEVICE:
        props = torch.cuda.get_device_properties(index)
        _EXTENSION_DEVICE[index] = extension_reason_for(
            (props.major, props.minor), extension_build_info(), f"cuda:{index} ({props.name})")
    return _EXTENSION_DEVICE[index]
