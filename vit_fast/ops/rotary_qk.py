"""Triton backend of ``rotary_qk``: custom ops vit_fast::rotary_qk and vit_fast::rotary_qk_backward,
with fake and autograd registrations.

The forward is the rope pre-pass of kernels/rope.py: a new packed qkv with q and k rotated, which
fused_qkv_attention then reads unchanged. Autograd saves sin and cos only; when they need a
gradient (timm's mixed RoPE, whose angles come from learnable frequencies) it also keeps the
op's *output*, which the attention that follows saves anyway (one storage, nothing extra): the
backward recovers the input from it by the inverse rotation (exact for timm's rope tables,
kernels/rope.py). :data:`RotaryFn` is the eager twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from vit_fast.kernels.rope import MAX_HEAD_DIM, rope_bwd, rope_fwd

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from .autograd_twin import twin


def check_args(qkv, num_heads, sin, cos, num_prefix_tokens, op="rotary_qk"):
    """qkv [B, N, 3·H·D] with D even and <= MAX_HEAD_DIM; sin and cos float tensors of one shape
    on qkv's device that broadcast to [B, H, N - num_prefix_tokens, D] with at most 4 dims."""
    checks.tensor(op, "qkv", qkv, ndim=3)
    checks.value(op, isinstance(num_heads, int) and num_heads > 0,
                 f"num_heads must be a positive int, got {num_heads!r}")
    B, N, three_c = qkv.shape
    checks.value(op, three_c % (3 * num_heads) == 0 and three_c > 0,
                 f"qkv's last dim ({three_c}) must be 3*num_heads*head_dim (num_heads={num_heads})")
    D = three_c // (3 * num_heads)
    checks.value(op, D % 2 == 0, f"head_dim must be even to rotate pairs, got {D}")
    checks.value(op, D <= MAX_HEAD_DIM, f"head_dim {D} is above the kernel's maximum {MAX_HEAD_DIM}")
    checks.value(op, isinstance(num_prefix_tokens, int) and 0 <= num_prefix_tokens <= N,
                 f"num_prefix_tokens must be an int in [0, N={N}], got {num_prefix_tokens!r}")
    rest = N - num_prefix_tokens
    for name, t in (("sin", sin), ("cos", cos)):
        checks.tensor(op, name, t, like=qkv, dtype=t.dtype if isinstance(t, Tensor) else None)
        checks.value(op, t.is_floating_point(), f"{name} must be a float tensor, got {t.dtype}")
        checks.value(op, 2 <= t.dim() <= 4, f"{name} must be [N', D], [H, N', D] or "
                                            f"[B, H, N', D], got {tuple(t.shape)}")
        lead = (1,) * (4 - t.dim()) + tuple(t.shape)
        checks.value(op, lead[0] in (1, B) and lead[1] in (1, num_heads) and lead[2] == rest
                     and lead[3] == D,
                     f"{name} {tuple(t.shape)} does not broadcast to [B={B}, H={num_heads}, "
                     f"N - num_prefix_tokens={rest}, D={D}]")
    checks.value(op, sin.shape == cos.shape,
                 f"sin {tuple(sin.shape)} and cos {tuple(cos.shape)} must have one shape")


_check_once = checks.once_per_signature(check_args)


def forward(qkv: Tensor, num_heads: int, sin: Tensor, cos: Tensor, num_prefix_tokens: int,
            half: bool) -> Tensor:
    """A new contiguous qkv [B, N, 3·H·D]: q and k of tokens n >= num_prefix_tokens rotated
    with sin/cos row n - num_prefix_tokens (timm's apply_rot_embed_cat), v copied."""
    return rope_fwd(qkv, num_heads, sin, cos, num_prefix_tokens=num_prefix_tokens, half=half)


@torch.library.custom_op("vit_fast::rotary_qk", mutates_args=())
def rotary_qk_op(qkv: Tensor, num_heads: int, sin: Tensor, cos: Tensor, num_prefix_tokens: int,
                 half: bool) -> Tensor:
    """A new contiguous qkv [B, N, 3·H·D]: q and k of tokens n >= num_prefix_tokens rotated
    with sin/cos row n - num_prefix_tokens (timm's apply_rot_embed_cat), v copied."""
    _check_once(qkv, num_heads, sin, cos, num_prefix_tokens)
    return forward(qkv, num_heads, sin, cos, num_prefix_tokens, half)


@rotary_qk_op.register_fake
def _(qkv, num_heads, sin, cos, num_prefix_tokens, half):
    check_args(qkv, num_heads, sin, cos, num_prefix_tokens)
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _reference_backward(dy, out, sin, cos, num_heads, num_prefix_tokens, half, sin_cos_grad):
    """The reference's gradients from the same saved tensors: the input is the output turned
    back (a rotation by -angle: sin negated)."""
    qkv = None
    if sin_cos_grad:
        from vit_fast import reference
        qkv = reference.rotary_qk(out, num_heads, -sin.float(), cos.float(),
                                  num_prefix_tokens=num_prefix_tokens, half=half)
    dx, dsin, dcos = reference_grad.rotary_qk_backward(dy, num_heads, sin, cos, num_prefix_tokens,
                                                       half, sin_cos_grad, qkv)
    return [dx, dsin if dsin is not None else dy.new_empty(0),
            dcos if dcos is not None else dy.new_empty(0)]


@reference_on_failure("rotary_qk", _reference_backward)
def backward_kernels(dy: Tensor, out: Tensor, sin: Tensor, cos: Tensor, num_heads: int,
                     num_prefix_tokens: int, half: bool, sin_cos_grad: bool) -> list[Tensor]:
    """[dqkv, dsin, dcos] from dy = d out; dsin and dcos (sin's shape and dtype) only with
    sin_cos_grad (then ``out`` is the forward's output), else empty tensors."""
    dx, dsin, dcos = rope_bwd(dy, num_heads, sin, cos, num_prefix_tokens=num_prefix_tokens,
                              half=half, sin_cos_grad=sin_cos_grad,
                              out=out if sin_cos_grad else None)
    # each absent gradient its own empty tensor: a custom op's outputs may not alias
    return [dx, dsin if dsin is not None else dy.new_empty(0),
            dcos if dcos is not None else dy.new_empty(0)]


@torch.library.custom_op("vit_fast::rotary_qk_backward", mutates_args=())
def rotary_qk_backward_op(dy: Tensor, out: Tensor, sin: Tensor, cos: Tensor, num_heads: int,
                          num_prefix_tokens: int, half: bool, sin_cos_grad: bool) -> list[Tensor]:
    """backward_kernels as a registered op (its arguments checked)."""
    _check_bwd_once(dy, out, sin, cos, num_heads, num_prefix_tokens)
    return backward_kernels(dy, out, sin, cos, num_heads, num_prefix_tokens, half, sin_cos_grad)


def _check_bwd_args(dy, out, sin, cos, num_heads, num_prefix_tokens):
    op = "rotary_qk_backward"
    check_args(dy, num_heads, sin, cos, num_prefix_tokens, op=op)
    if out.numel():
        checks.tensor(op, "out", out, like=dy, shape=dy.shape)


_check_bwd_once = checks.once_per_signature(_check_bwd_args)


@rotary_qk_backward_op.register_fake
def _(dy, out, sin, cos, num_heads, num_prefix_tokens, half, sin_cos_grad):
    _check_bwd_args(dy, out, sin, cos, num_heads, num_prefix_tokens)
    grads = [torch.empty_like(sin), torch.empty_like(cos)] if sin_cos_grad else \
        [dy.new_empty(0), dy.new_empty(0)]
    return [torch.empty_like(dy, memory_format=torch.contiguous_format)] + grads


def _setup_context(ctx, inputs, output):
    qkv, num_heads, sin, cos, num_prefix_tokens, half = inputs
    need = ctx.needs_input_grad
    ctx.sin_cos_grad = bool(need[2] or need[3])
    # the output only when sin/cos need a gradient: the attention keeps it anyway
    ctx.save_for_backward(sin, cos, output if ctx.sin_cos_grad else None)
    ctx.num_heads, ctx.npt, ctx.half = num_heads, num_prefix_tokens, half


def _backward(ctx, dy, *, bwd=None):
    """bwd: the backward to call (the eager twin's kernels), default the registered op."""
    sin, cos, out = ctx.saved_tensors
    if out is None:
        out = dy.new_empty(0)
    dx, dsin, dcos = (bwd or rotary_qk_backward_op)(dy, out, sin, cos, ctx.num_heads, ctx.npt,
                                                    ctx.half, ctx.sin_cos_grad)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, None, dsin if need[2] else None,
            dcos if need[3] else None, None, None)


rotary_qk_op.register_autograd(_backward, setup_context=_setup_context)
RotaryFn = twin("RotaryFn", forward, _setup_context,
                lambda ctx, dy: _backward(ctx, dy, bwd=backward_kernels))


def rotary_qk(qkv, num_heads, sin, cos, num_prefix_tokens, half, *, op=None):
    """vit_fast.functional.rotary_qk on the kernels; inputs already validated there.
    op: the custom op (default) or RotaryFn.apply (eager, plain tensors)."""
    return (op or rotary_qk_op)(qkv, int(num_heads), sin, cos, int(num_prefix_tokens), bool(half))
