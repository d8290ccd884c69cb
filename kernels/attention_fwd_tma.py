"""sm_90 attention forward that reads Q, K and V through TMA tensor descriptors (UTMALDG).

Same math, outputs and 1-D grid as kernels/attention.attention_fwd_kernel (its _fwd_fold does
the online softmax, its _fwd_finish stores out and lse); only the loads differ. The descriptors
view timm's packed qkv [B, N, 3·H·D] as 4-D [B, N, 3·H, D] with blocks [1, rows, 1, BLOCK_D]:
  - the sequence is its own dimension, so rows past N of batch b are zero-filled by the TMA
    unit, never read from batch b + 1 (and the last key tile still gets the -inf key mask);
  - the head dim is its own dimension, so a padded BLOCK_D > D (D = 80, 96, 112) zero-fills
    the padding columns instead of reading the next head's.
No address arithmetic or load masks are left in the key loop. Plain calls only: dropout and
segment ids keep the pointer kernel (their per-score work, not the loads, dominates there).

A candidate of the measured selection (ops/attention_sdpa.attention_forward, name
"triton_tma") only where :func:`not_supported_reasons` is empty: sm_90, the installed triton
has host-side tensor descriptors, fp16/bf16, and :func:`tensor_reasons` (TMA's 16-byte rules).
It is never the fixed table's choice. Under the interpreter the descriptors run too (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, on_tensor_device
from .tma_rules import packed_qkv_reasons
from .attention import _config, _dot_args, _fwd_finish, _fwd_fold
from vit_fast.kernels.attention_config import _SHORT_N, _block_d
from .attention_tiles import LOG2E, _tile_of_head

try:  # triton >= 3.4 (host-side descriptors, launched as kernel arguments)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None


@triton.jit
def attention_fwd_tma_kernel(
    q_desc,   # qkv as [B, N, 3·H, D], block [1, BLOCK_M, 1, BLOCK_D]
    kv_desc,  # the same view, block [1, BLOCK_N, 1, BLOCK_D]
    O, LSE, N, H, stride_o_b, stride_o_n, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """attention_fwd_kernel without dropout or segments, its tiles loaded by TMA."""
    b, h, bh, start_m = _tile_of_head(N, H, BLOCK_M)
    q = q_desc.load([b, start_m, h, 0]).reshape(BLOCK_M, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        k = kv_desc.load([b, start_n, H + h, 0]).reshape(BLOCK_N, BLOCK_D)
        v = kv_desc.load([b, start_n, 2 * H + h, 0]).reshape(BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _fwd_fold(acc, l_i, m_i, q, k, v, start_m, start_n, N, bh, qk_scale, 0, 0,
                                  None, 0, BLOCK_M, BLOCK_N, False, False, DOT_FP32, DOT_PRECISION)
    _fwd_finish(acc, l_i, m_i, O, LSE, b, h, bh, start_m, N, stride_o_b, stride_o_n, 0.0,
                HEAD_DIM, BLOCK_D, BLOCK_M, False, False)


_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def not_supported_reasons(dtype, target, *, triton_has_descriptors=None) -> list:
    """Why the TMA forward is not offered for ``dtype`` on ``target``; empty when it is."""
    has = TensorDescriptor is not None if triton_has_descriptors is None else triton_has_descriptors
    arch = None if target is None else target.arch
    checks = ((has, f"triton {triton.__version__} has no triton.tools.tensor_descriptor"),
              (arch == 90, "TMA descriptors and wgmma: sm_90 only"
               + ("" if arch is None else f" (device is sm_{arch})")),
              (dtype in _SUPPORTED_DTYPES, f"qkv is {dtype}; the TMA forward takes fp16/bf16"))
    return [why for ok, why in checks if not ok]


tensor_reasons = packed_qkv_reasons  # kernels/tma_rules.py


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim bucket, long sequences (N > _SHORT_N),
# from the SASS study (README, `python -m vit_fast.bench.attention_fwd_study`): the 64 bucket
# keeps the pointer kernel's tile (TMA alone takes 190 registers where it took 224, 0.78
# integer instructions per score where it took 1.14, 48 KB of shared memory where 64); the 128
# bucket takes 128 x 128 over 8 warps (1 CTA/SM as the pointer kernel's 128 x 64: a third fewer
# HGMMA per score, FFMA+FMUL+FADD 3.12 per score where 4.25). Short sequences (one key tile) and
# the 256 bucket keep the pointer kernel.
_TMA_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 128, 8, 2)}


def tma_config(head_dim: int, n: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the TMA forward for this shape on sm_90, None
    where it is not offered; the interpreter's small tiles off GPU."""
    if interpreting():
        return _config("fwd", n, head_dim, None)
    if n <= _SHORT_N:
        return None
    return _TMA_CONFIGS.get(max(64, _block_d(head_dim)))


def descriptors(qkv: torch.Tensor, num_heads: int, block_m: int, block_n: int):
    """(q_desc, kv_desc) over qkv viewed as [B, N, 3·H, D]."""
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    shape = [B, N, 3 * num_heads, head_dim]
    strides = [qkv.stride(0), qkv.stride(1), head_dim, 1]
    block_d = _block_d(head_dim)
    return (TensorDescriptor(qkv, shape, strides, [1, block_m, 1, block_d]),
            TensorDescriptor(qkv, shape, strides, [1, block_n, 1, block_d]))


@on_tensor_device
def attention_fwd_tma(qkv: torch.Tensor, num_heads: int, scale: float, *, config=None):
    """kernels/attention.attention_fwd's contract for a plain call (no dropout, no segment ids)
    with scale > 0, on the TMA kernel. Raises ValueError with the reasons where it cannot run."""
    target = gpu_target(qkv.device)
    reasons = ([] if target is None else not_supported_reasons(qkv.dtype, target)) + \
        tensor_reasons(qkv, num_heads)
    if TensorDescriptor is None and target is None:
        reasons += not_supported_reasons(qkv.dtype, None)[:1]
    if not scale > 0:
        reasons.append(f"scale must be > 0, got {scale!r}")
    if reasons:
        raise ValueError("attention_fwd_tma: " + "; ".join(reasons))
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    config = config or tma_config(head_dim, N)
    if config is None:
        raise ValueError(f"attention_fwd_tma: no TMA build for head dim {head_dim} at N = {N} "
                         f"(head dims up to 128, N > {_SHORT_N})")
    block_m, block_n, warps, stages = config
    out = torch.empty(B, N, num_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    q_desc, kv_desc = descriptors(qkv, num_heads, block_m, block_n)
    attention_fwd_tma_kernel[(cdiv(N, block_m) * B * num_heads,)](
        q_desc, kv_desc, out, lse, N, num_heads, out.stride(0), out.stride(1),
        float(scale) * LOG2E, HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=warps, num_stages=stages, **_dot_args(qkv.dtype))
    return out, lse


_OFFERED = {}  # (dtype, N, 3·H·D, H, target, ...) -> whether a build is offered at all


def tma_offered(qkv: torch.Tensor, num_heads: int, scale: float, dropout: bool,
                segments: bool) -> bool:
    """Whether the TMA forward is a candidate for this call: what depends on the shape and
    device is decided once (memoized); TMA's alignment rules on this qkv are checked every call
    (a view of another tensor may break them)."""
    if dropout or segments or not scale > 0:
        return False
    target = gpu_target(qkv.device)
    if target is None or target.arch != 90 or qkv.dim() != 3:
        return False
    key = (qkv.dtype, qkv.shape[1], qkv.shape[-1], num_heads, target, interpreting(),
           TensorDescriptor is None)
    ok = _OFFERED.get(key)
    if ok is None:
        ok = _OFFERED[key] = (not key[-2] and not not_supported_reasons(qkv.dtype, target)
                              and qkv.shape[-1] % (3 * num_heads) == 0
                              and tma_config(qkv.shape[-1] // (3 * num_heads),
                                             qkv.shape[1]) is not None)
    return ok and not tensor_reasons(qkv, num_heads)


def tma_alternative(qkv: torch.Tensor, num_heads: int, scale: float, dropout: bool,
                    segments: bool):
    """A zero-argument launch of the TMA forward for this call where it is offered
    (:func:`tma_offered`: sm_90, descriptors, 16-bit, TMA-aligned qkv, plain call), else None."""
    if not tma_offered(qkv, num_heads, scale, dropout, segments):
        return None
    return lambda: attention_fwd_tma(qkv, num_heads, scale)
