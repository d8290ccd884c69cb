"""Triton backend of ``fused_qkv_attention``: custom ops vit_fast::fused_qkv_attention and
vit_fast::fused_qkv_attention_backward with fake and autograd registrations.

The forward op returns (out, lse); autograd saves exactly qkv, out and the fp32 lse [B, H, N]
(no N×N matrix), plus, with dropout, the 1-element int64 seed from which the backward op
regenerates the dropout mask along with the probabilities, and, for packed batches, the int
segment_ids [B, N] from which both ops rebuild the segment mask tile by tile.
:data:`AttentionFn` is the eager twin (vit_fast/ops/autograd_twin.py). The policy in force at
the forward (which implementations may run: SDPA only under ``auto``) is kept for the backward,
whichever thread autograd runs it on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vit_fast.dispatch import MAX_HEAD_DIM  # the largest head dim the kernels are built for
from vit_fast.dispatch import current_policy, use_backend

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import attention_sdpa, checks
from .autograd_twin import twin

_SEGMENT_DTYPES = (torch.int32, torch.int64)


def check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids=None,
                   op="fused_qkv_attention"):
    """qkv [B, N, 3·H·D] with H = num_heads dividing it, a finite scale, dropout_p in [0, 1),
    when dropping, seed int64 [1] on qkv's device, and segment_ids None or int32/int64 [B, N]
    on qkv's device."""
    checks.tensor(op, "qkv", qkv, ndim=3)
    checks.value(op, isinstance(num_heads, int) and num_heads > 0,
                 f"num_heads must be a positive int, got {num_heads!r}")
    three_c = qkv.shape[-1]
    checks.value(op, three_c % (3 * num_heads) == 0,
                 f"qkv's last dim ({three_c}) must be 3*num_heads*head_dim (num_heads={num_heads})")
    head_dim = three_c // (3 * num_heads)
    checks.value(op, head_dim > 0, f"head_dim must be positive, got qkv {tuple(qkv.shape)}")
    checks.value(op, head_dim <= MAX_HEAD_DIM,
                 f"head_dim {head_dim} is above the kernels' maximum {MAX_HEAD_DIM}")
    checks.value(op, math.isfinite(scale), f"scale must be finite, got {scale!r}")
    checks.value(op, 0.0 <= dropout_p < 1.0, f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0:
        checks.tensor(op, "seed", seed, like=qkv, shape=(1,), dtype=torch.int64)
    if segment_ids is not None:
        torch._check_type(isinstance(segment_ids, Tensor) and segment_ids.dtype in _SEGMENT_DTYPES,
                          lambda: f"vit_fast::{op}: segment_ids must be an int32 or int64 tensor, "
                                  f"got {getattr(segment_ids, 'dtype', type(segment_ids).__name__)}")
        checks.tensor(op, "segment_ids", segment_ids, like=qkv, shape=qkv.shape[:2],
                      dtype=segment_ids.dtype)


def _check_bwd_args(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids):
    op = "fused_qkv_attention_backward"
    check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids, op=op)
    B, N, three_c = qkv.shape
    checks.tensor(op, "dout", dout, like=qkv, shape=(B, N, three_c // 3))
    checks.tensor(op, "out", out, like=qkv, shape=(B, N, three_c // 3))
    checks.tensor(op, "lse", lse, like=qkv, shape=(B, num_heads, N), dtype=torch.float32)


_check_fwd_once = checks.once_per_signature(check_fwd_args)
_check_bwd_once = checks.once_per_signature(_check_bwd_args)


def forward(qkv: Tensor, num_heads: int, scale: float, dropout_p: float = 0.0,
            seed: Optional[Tensor] = None,
            segment_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out, lse) from the kernel, or PyTorch's flash SDPA where eligible and measured faster
    (attention_sdpa.py); segment_ids is a kernel-only argument: with it the kernel always runs."""
    return attention_sdpa.attention_forward(qkv, num_heads, scale, dropout_p=dropout_p,
                                            seed=seed, segment_ids=segment_ids)


@torch.library.custom_op("vit_fast::fused_qkv_attention", mutates_args=())
def fused_qkv_attention_op(qkv: Tensor, num_heads: int, scale: float, dropout_p: float = 0.0,
                           seed: Optional[Tensor] = None,
                           segment_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3·H·D] -> out [B, N, H·D] (qkv's dtype), lse [B, H, N] (fp32).

    dropout_p > 0 needs seed (int64 [1] on qkv's device): the op is a pure function of it.
    segment_ids (int32/int64 [B, N]) restricts each query to the keys of its own segment; rows
    of padding (negative id) are 0 in out.
    """
    _check_fwd_once(qkv, num_heads, scale, dropout_p, seed, segment_ids)
    return forward(qkv, num_heads, scale, dropout_p, seed, segment_ids)


@fused_qkv_attention_op.register_fake
def _(qkv, num_heads, scale, dropout_p=0.0, seed=None, segment_ids=None):
    check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids)
    B, N, three_c = qkv.shape
    out = qkv.new_empty(B, N, three_c // 3)
    lse = qkv.new_empty(B, num_heads, N, dtype=torch.float32)
    return out, lse


@reference_on_failure("fused_qkv_attention", reference_grad.fused_qkv_attention_backward)
def backward_kernels(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                     scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                     segment_ids: Optional[Tensor] = None, policy: Optional[str] = None) -> Tensor:
    """dqkv [B, N, 3·H·D] from dout [B, N, H·D] and the forward's qkv, out, lse, dropout_p,
    seed and segment_ids; policy: the forward's (default: the one in force)."""
    return attention_sdpa.attention_backward(dout, qkv, out, lse, num_heads, scale,
                                             dropout_p=dropout_p, seed=seed,
                                             segment_ids=segment_ids, policy=policy)


@torch.library.custom_op("vit_fast::fused_qkv_attention_backward", mutates_args=())
def fused_qkv_attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor,
                                    num_heads: int, scale: float, dropout_p: float = 0.0,
                                    seed: Optional[Tensor] = None,
                                    segment_ids: Optional[Tensor] = None) -> Tensor:
    """dqkv [B, N, 3·H·D] from dout [B, N, H·D] and the forward's qkv, out, lse, dropout_p,
    seed and segment_ids."""
    _check_bwd_once(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids)
    return backward_kernels(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids)


@fused_qkv_attention_backward_op.register_fake
def _(dout, qkv, out, lse, num_heads, scale, dropout_p=0.0, seed=None, segment_ids=None):
    _check_bwd_args(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, dropout_p, seed, segment_ids = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed, segment_ids)
    ctx.num_heads, ctx.scale, ctx.dropout_p = num_heads, scale, dropout_p
    ctx.policy = current_policy()  # the backward picks its implementation under the forward's
    # lse is an internal by-product; declaring it non-differentiable means its gradient is never
    # asked for, so the backward need not handle one.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled lse gradient for the backward to ignore


def _backward(ctx, dout, _dlse):
    """The traced backward: the registered op, under the forward's policy."""
    if dout is None:  # out took no part in the loss
        return None, None, None, None, None, None
    qkv, out, lse, seed, segment_ids = ctx.saved_tensors
    with use_backend(ctx.policy):
        dqkv = fused_qkv_attention_backward_op(dout, qkv, out, lse, ctx.num_heads, ctx.scale,
                                               ctx.dropout_p, seed, segment_ids)
    return dqkv, None, None, None, None, None


def _eager_backward(ctx, dout, _dlse):
    """The eager twin's backward: the kernels, given the forward's policy."""
    if dout is None:
        return None, None, None, None, None, None
    qkv, out, lse, seed, segment_ids = ctx.saved_tensors
    dqkv = backward_kernels(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.dropout_p, seed,
                            segment_ids, ctx.policy)
    return dqkv, None, None, None, None, None


fused_qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)
AttentionFn = twin("AttentionFn", forward, _setup_context, _eager_backward)


def dropout_seed(device: torch.device) -> Tensor:
    """One int64 Philox key drawn from torch's generator of ``device``, so torch.manual_seed
    makes dropout reproducible; it stays on the device (no host sync, CUDA-graph safe)."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=device)


def fused_qkv_attention(qkv: Tensor, num_heads: int, scale: float, dropout_p: float = 0.0,
                        segment_ids: Optional[Tensor] = None, *, op=None) -> Tensor:
    """softmax(q kᵀ·scale) v per head from timm's packed qkv [B, N, 3·H·D] -> [B, N, H·D],
    the probabilities dropped with probability dropout_p (a fresh mask per call), each query
    restricted to its own segment when segment_ids [B, N] is given.

    Inputs are validated, and scale resolved to a float, by vit_fast.functional.
    op: the custom op (default) or AttentionFn.apply (eager, plain tensors).
    """
    dropout_p = float(dropout_p)
    seed = dropout_seed(qkv.device) if dropout_p > 0.0 else None
    return (op or fused_qkv_attention_op)(qkv, num_heads, float(scale), dropout_p, seed,
                                          segment_ids)[0]
