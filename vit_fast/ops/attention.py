"""Triton backend of ``fused_qkv_attention``: custom ops vit_fast::fused_qkv_attention_fwd/_bwd
with fake and autograd registrations.

The forward op returns (out, lse); autograd saves exactly qkv, out and the fp32 lse [B, H, N]
(no N×N matrix), and the backward op rebuilds the probabilities from them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vit_fast.kernels.attention import attention_bwd, attention_fwd


@torch.library.custom_op("vit_fast::fused_qkv_attention_fwd", mutates_args=())
def fused_qkv_attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3·H·D] -> out [B, N, H·D] (qkv's dtype), lse [B, H, N] (fp32)."""
    return attention_fwd(qkv, num_heads, scale)


@fused_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    B, N, three_c = qkv.shape
    out = qkv.new_empty(B, N, three_c // 3)
    lse = qkv.new_empty(B, num_heads, N, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vit_fast::fused_qkv_attention_bwd", mutates_args=())
def fused_qkv_attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                            scale: float) -> Tensor:
    """dqkv [B, N, 3·H·D] from dout [B, N, H·D] and the forward's qkv, out, lse."""
    return attention_bwd(dout, qkv, out, lse, num_heads, scale)


@fused_qkv_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    # lse is an internal by-product; declaring it non-differentiable means its gradient is never
    # asked for, so the backward need not handle one.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = fused_qkv_attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, None, None


fused_qkv_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_qkv_attention(qkv: Tensor, num_heads: int, scale: float) -> Tensor:
    """softmax(q kᵀ·scale) v per head from timm's packed qkv [B, N, 3·H·D] -> [B, N, H·D].

    Inputs are validated, and scale resolved to a float, by vit_fast.functional.
    """
    return fused_qkv_attention_fwd(qkv, num_heads, float(scale))[0]
