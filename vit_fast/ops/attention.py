"""Triton backend of ``fused_qkv_attention``: custom ops vit_fast::fused_qkv_attention_fwd/_bwd
with fake and autograd registrations.

The forward op returns (out, lse); autograd saves exactly qkv, out and the fp32 lse [B, H, N]
(no N×N matrix), plus, with dropout, the 1-element int64 seed from which the backward op
regenerates the dropout mask along with the probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.attention import attention_bwd, attention_fwd


@torch.library.custom_op("vit_fast::fused_qkv_attention_fwd", mutates_args=())
def fused_qkv_attention_fwd(qkv: Tensor, num_heads: int, scale: float, dropout_p: float = 0.0,
                            seed: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """qkv [B, N, 3·H·D] -> out [B, N, H·D] (qkv's dtype), lse [B, H, N] (fp32).

    dropout_p > 0 needs seed (int64 [1] on qkv's device): the op is a pure function of it.
    """
    return attention_fwd(qkv, num_heads, scale, dropout_p=dropout_p, seed=seed)


@fused_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale, dropout_p=0.0, seed=None):
    B, N, three_c = qkv.shape
    out = qkv.new_empty(B, N, three_c // 3)
    lse = qkv.new_empty(B, num_heads, N, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vit_fast::fused_qkv_attention_bwd", mutates_args=())
def fused_qkv_attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                            scale: float, dropout_p: float = 0.0,
                            seed: Optional[Tensor] = None) -> Tensor:
    """dqkv [B, N, 3·H·D] from dout [B, N, H·D] and the forward's qkv, out, lse, dropout_p, seed."""
    return attention_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p=dropout_p, seed=seed)


@fused_qkv_attention_bwd.register_fake
def _(dout, qkv, out, lse, num_heads, scale, dropout_p=0.0, seed=None):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.num_heads, ctx.scale, ctx.dropout_p = num_heads, scale, dropout_p
    # lse is an internal by-product; declaring it non-differentiable means its gradient is never
    # asked for, so the backward need not handle one.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse, seed = ctx.saved_tensors
    dqkv = fused_qkv_attention_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale, ctx.dropout_p, seed)
    return dqkv, None, None, None, None


fused_qkv_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def dropout_seed(device: torch.device) -> Tensor:
    """One int64 Philox key drawn from torch's generator of ``device``, so torch.manual_seed
    makes dropout reproducible; it stays on the device (no host sync, CUDA-graph safe)."""
    return torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), dtype=torch.int64, device=device)


def fused_qkv_attention(qkv: Tensor, num_heads: int, scale: float, dropout_p: float = 0.0) -> Tensor:
    """softmax(q kᵀ·scale) v per head from timm's packed qkv [B, N, 3·H·D] -> [B, N, H·D],
    the probabilities dropped with probability dropout_p (a fresh mask per call).

    Inputs are validated, and scale resolved to a float, by vit_fast.functional.
    """
    dropout_p = float(dropout_p)
    seed = dropout_seed(qkv.device) if dropout_p > 0.0 else None
    return fused_qkv_attention_fwd(qkv, num_heads, float(scale), dropout_p, seed)[0]
