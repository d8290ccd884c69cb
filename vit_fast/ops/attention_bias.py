"""Triton backend of ``fused_qkv_attention(..., bias=)``: custom ops vit_fast::biased_qkv_attention
and vit_fast::biased_qkv_attention_backward, with fake and autograd registrations.

softmax(q kᵀ·scale + bias) v per head, bias [H, N, N] shared by the batch (BEiT's relative
position bias) or [1 or B, H, N, N]. Autograd saves what the unbiased op saves -- qkv, out, the
fp32 lse [B, H, N], the dropout seed, segment_ids -- plus the bias itself (a parameter-derived
[H, N, N], no per-batch N×N tensor); the backward gives the bias its gradient Σ_b dS from the
kernels' deterministic reduction (no atomics). :data:`BiasedAttentionFn` is the eager twin.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.attention import attention_bwd, attention_fwd

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from .attention import check_fwd_args as _check_attention_args
from .attention import dropout_seed
from .autograd_twin import twin


def check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias,
                   op="biased_qkv_attention"):
    """fused_qkv_attention's arguments, and bias: a float tensor on qkv's device of shape
    [H, N, N] or [1 or B, H, N, N]."""
    _check_attention_args(qkv, num_heads, scale, dropout_p, seed, segment_ids, op=op)
    B, N = qkv.shape[0], qkv.shape[1]
    checks.tensor(op, "bias", bias, like=qkv, dtype=bias.dtype if isinstance(bias, Tensor) else None)
    checks.value(op, bias.is_floating_point(), f"bias must be a float tensor, got {bias.dtype}")
    shape = tuple(bias.shape)
    checks.value(op, shape == (num_heads, N, N) or (
        len(shape) == 4 and shape[0] in (1, B) and shape[1:] == (num_heads, N, N)),
        f"bias must be [H, N, N] = [{num_heads}, {N}, {N}] or [1 or B, H, N, N], got {list(shape)}")


_check_fwd_once = checks.once_per_signature(check_fwd_args)


def forward(qkv: Tensor, num_heads: int, scale: float, dropout_p: float, seed: Optional[Tensor],
            segment_ids: Optional[Tensor], bias: Tensor) -> tuple[Tensor, Tensor]:
    """(out [B, N, H·D], lse [B, H, N] fp32) from the attention kernel with the bias added to
    the scaled logits."""
    return attention_fwd(qkv, num_heads, scale, dropout_p=dropout_p, seed=seed,
                         segment_ids=segment_ids, bias=bias)


@torch.library.custom_op("vit_fast::biased_qkv_attention", mutates_args=())
def biased_qkv_attention_op(qkv: Tensor, num_heads: int, scale: float, dropout_p: float,
                            seed: Optional[Tensor], segment_ids: Optional[Tensor],
                            bias: Tensor) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3·H·D], bias [H, N, N] or [1 or B, H, N, N] -> out [B, N, H·D], lse [B, H, N]
    (fp32, the bias included)."""
    _check_fwd_once(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias)
    return forward(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias)


@biased_qkv_attention_op.register_fake
def _(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias):
    check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias)
    B, N, three_c = qkv.shape
    return qkv.new_empty(B, N, three_c // 3), qkv.new_empty(B, num_heads, N, dtype=torch.float32)


def _reference_backward(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids,
                        bias_grad):
    grads = reference_grad.biased_qkv_attention_backward(
        dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids, bias_grad)
    return list(grads) if bias_grad else [grads, qkv.new_empty(0)]


@reference_on_failure("fused_qkv_attention", _reference_backward)
def backward_kernels(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, bias: Tensor,
                     num_heads: int, scale: float, dropout_p: float, seed: Optional[Tensor],
                     segment_ids: Optional[Tensor], bias_grad: bool) -> list[Tensor]:
    """[dqkv, dbias] (dbias in bias's shape and dtype with bias_grad, else an empty tensor)."""
    grads = attention_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p=dropout_p, seed=seed,
                          segment_ids=segment_ids, bias=bias, bias_grad=bias_grad)
    return list(grads) if bias_grad else [grads, qkv.new_empty(0)]


@torch.library.custom_op("vit_fast::biased_qkv_attention_backward", mutates_args=())
def biased_qkv_attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor,
                                     bias: Tensor, num_heads: int, scale: float, dropout_p: float,
                                     seed: Optional[Tensor], segment_ids: Optional[Tensor],
                                     bias_grad: bool) -> list[Tensor]:
    """backward_kernels as a registered op (its arguments checked)."""
    _check_bwd_once(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids)
    return backward_kernels(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed,
                            segment_ids, bias_grad)


def _check_bwd_args(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids):
    op = "biased_qkv_attention_backward"
    check_fwd_args(qkv, num_heads, scale, dropout_p, seed, segment_ids, bias, op=op)
    B, N, three_c = qkv.shape
    checks.tensor(op, "dout", dout, like=qkv, shape=(B, N, three_c // 3))
    checks.tensor(op, "out", out, like=qkv, shape=(B, N, three_c // 3))
    checks.tensor(op, "lse", lse, like=qkv, shape=(B, num_heads, N), dtype=torch.float32)


_check_bwd_once = checks.once_per_signature(_check_bwd_args)


@biased_qkv_attention_backward_op.register_fake
def _(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids, bias_grad):
    _check_bwd_args(dout, qkv, out, lse, bias, num_heads, scale, dropout_p, seed, segment_ids)
    return [torch.empty_like(qkv, memory_format=torch.contiguous_format),
            torch.empty_like(bias) if bias_grad else qkv.new_empty(0)]


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, dropout_p, seed, segment_ids, bias = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed, segment_ids, bias)
    ctx.num_heads, ctx.scale, ctx.dropout_p = num_heads, scale, dropout_p
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse, *, bwd=None):
    """bwd: the backward to call (the eager twin's kernels), default the registered op."""
    if dout is None:
        return None, None, None, None, None, None, None
    qkv, out, lse, seed, segment_ids, bias = ctx.saved_tensors
    need_bias = ctx.needs_input_grad[6]
    dqkv, dbias = (bwd or biased_qkv_attention_backward_op)(
        dout, qkv, out, lse, bias, ctx.num_heads, ctx.scale, ctx.dropout_p, seed, segment_ids,
        need_bias)
    return dqkv, None, None, None, None, None, dbias if need_bias else None


biased_qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)
BiasedAttentionFn = twin("BiasedAttentionFn", forward, _setup_context,
                         lambda ctx, dout, dlse: _backward(ctx, dout, dlse, bwd=backward_kernels))


def biased_qkv_attention(qkv, num_heads, scale, dropout_p, segment_ids, bias, *, op=None):
    """softmax(q kᵀ·scale + bias) v per head on the kernels (inputs validated by
    vit_fast.functional); op: the custom op (default) or BiasedAttentionFn.apply."""
    dropout_p = float(dropout_p)
    seed = dropout_seed(qkv.device) if dropout_p > 0.0 else None
    return (op or biased_qkv_attention_op)(qkv, num_heads, float(scale), dropout_p, seed,
                                           segment_ids, bias)[0]
