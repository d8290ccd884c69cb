"""Triton backend of ``qk_norm``: custom ops vit_fast::qk_norm and vit_fast::qk_norm_backward,
with fake and autograd registrations.

Autograd saves only the input qkv (the parameters are kept by their modules anyway): the
backward recomputes the per-row statistics from it, so no fp32 statistics are stored. The
output qkv is what fused_qkv_attention saves for its own backward.
:data:`QkNormFn` is the eager twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.qk_norm import MAX_HEAD_DIM, qk_norm_bwd, qk_norm_fwd

from . import checks
from .autograd_twin import twin


def check_args(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps, op="qk_norm"):
    """qkv [B, N, 3·H·D], H = num_heads, D <= MAX_HEAD_DIM; parameters [D] or [H, D] on qkv's
    device, all of one dtype: qkv's or float32."""
    checks.tensor(op, "qkv", qkv, ndim=3)
    checks.value(op, isinstance(num_heads, int) and num_heads > 0,
                 f"num_heads must be a positive int, got {num_heads!r}")
    three_c = qkv.shape[-1]
    checks.value(op, three_c % (3 * num_heads) == 0 and three_c > 0,
                 f"qkv's last dim ({three_c}) must be 3*num_heads*head_dim "
                 f"(num_heads={num_heads})")
    D = three_c // (3 * num_heads)
    checks.value(op, D <= MAX_HEAD_DIM,
                 f"head_dim {D} is above the kernel's maximum {MAX_HEAD_DIM}")
    params = (("q_weight", q_weight), ("k_weight", k_weight), ("q_bias", q_bias),
              ("k_bias", k_bias))
    dtype = next((t.dtype for _, t in params if isinstance(t, Tensor)), qkv.dtype)
    checks.value(op, dtype in (qkv.dtype, torch.float32),
                 f"the q/k norm parameters must be {qkv.dtype} (qkv's dtype) or float32, "
                 f"got {dtype}")
    for name, t in params:
        checks.tensor(op, name, t, like=qkv, dtype=dtype, optional=True)
        if t is not None:
            checks.value(op, tuple(t.shape) in ((D,), (num_heads, D)),
                         f"{name} must have shape ({D},) or ({num_heads}, {D}), "
                         f"got {tuple(t.shape)}")
    checks.eps(op, eps)


_check_once = checks.once_per_signature(check_args)


def forward(qkv: Tensor, num_heads: int, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
            q_bias: Optional[Tensor], k_bias: Optional[Tensor], rms: bool, eps: float) -> Tensor:
    """A new contiguous qkv [B, N, 3·H·D] with q and k normalized over head_dim (LayerNorm, or
    RMSNorm when ``rms``), then ·weight + bias; v copied."""
    return qk_norm_fwd(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps)


@torch.library.custom_op("vit_fast::qk_norm", mutates_args=())
def qk_norm_op(qkv: Tensor, num_heads: int, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
               q_bias: Optional[Tensor], k_bias: Optional[Tensor], rms: bool,
               eps: float) -> Tensor:
    """A new contiguous qkv [B, N, 3·H·D] with q and k normalized over head_dim (LayerNorm, or
    RMSNorm when ``rms``), then ·weight + bias; v copied."""
    _check_once(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps)
    return forward(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps)


@qk_norm_op.register_fake
def _(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps):
    check_args(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def backward_kernels(dy: Tensor, qkv: Tensor, num_heads: int, q_weight: Optional[Tensor],
                     k_weight: Optional[Tensor], q_bias: Optional[Tensor],
                     k_bias: Optional[Tensor], rms: bool, eps: float, q_weight_grad: bool,
                     k_weight_grad: bool) -> list[Tensor]:
    """[dqkv, dq_weight, dq_bias, dk_weight, dk_bias]: a weight's gradient when its *_grad flag
    is set, a bias's when the bias is passed; an absent gradient is an empty tensor."""
    grads = qk_norm_bwd(dy, qkv, num_heads, q_weight, k_weight, rms, eps,
                        q_weight_grad=q_weight_grad, k_weight_grad=k_weight_grad,
                        q_bias=q_bias, k_bias=k_bias)
    return [g if g is not None else qkv.new_empty(0) for g in grads]


@torch.library.custom_op("vit_fast::qk_norm_backward", mutates_args=())
def qk_norm_backward_op(dy: Tensor, qkv: Tensor, num_heads: int, q_weight: Optional[Tensor],
                        k_weight: Optional[Tensor], q_bias: Optional[Tensor],
                        k_bias: Optional[Tensor], rms: bool, eps: float, q_weight_grad: bool,
                        k_weight_grad: bool) -> list[Tensor]:
    """backward_kernels as a registered op (its arguments checked)."""
    _check_bwd_once(dy, qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps)
    return backward_kernels(dy, qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps,
                            q_weight_grad, k_weight_grad)


def _check_bwd_args(dy, qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps):
    op = "qk_norm_backward"
    check_args(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps, op=op)
    checks.tensor(op, "dy", dy, like=qkv, shape=qkv.shape)


_check_bwd_once = checks.once_per_signature(_check_bwd_args)


@qk_norm_backward_op.register_fake
def _(dy, qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps, q_weight_grad,
      k_weight_grad):
    _check_bwd_args(dy, qkv, num_heads, q_weight, k_weight, q_bias, k_bias, eps)
    return [torch.empty_like(qkv, memory_format=torch.contiguous_format)] + [
        torch.empty_like(p) if (p is not None and need) else qkv.new_empty(0)
        for p, need in ((q_weight, q_weight_grad), (q_bias, True), (k_weight, k_weight_grad),
                        (k_bias, True))]


def _setup_context(ctx, inputs, output):
    qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, q_bias, k_bias)
    ctx.num_heads, ctx.rms, ctx.eps = num_heads, rms, eps


def _backward(ctx, dy, *, bwd=None):
    """bwd: the backward to call (the eager twin's kernels), default the registered op."""
    qkv, q_weight, k_weight, q_bias, k_bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dqkv, dqw, dqb, dkw, dkb = (bwd or qk_norm_backward_op)(
        dy, qkv, ctx.num_heads, q_weight, k_weight, q_bias if need[4] else None,
        k_bias if need[5] else None, ctx.rms, ctx.eps, q_weight is not None and need[2],
        k_weight is not None and need[3])
    return (dqkv, None, dqw if (need[2] and q_weight is not None) else None,
            dkw if (need[3] and k_weight is not None) else None,
            dqb if (need[4] and q_bias is not None) else None,
            dkb if (need[5] and k_bias is not None) else None, None, None)


qk_norm_op.register_autograd(_backward, setup_context=_setup_context)
QkNormFn = twin("QkNormFn", forward, _setup_context,
                lambda ctx, dy: _backward(ctx, dy, bwd=backward_kernels))


def qk_norm(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps, *, op=None):
    """vit_fast.functional.qk_norm on the kernels; inputs already validated there.
    op: the custom op (default) or QkNormFn.apply (eager, plain tensors)."""
    return (op or qk_norm_op)(qkv, int(num_heads), q_weight, k_weight, q_bias, k_bias, bool(rms),
                              float(eps))
