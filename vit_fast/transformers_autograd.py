"""Two eager autograd Functions that make converted transformers layers save less for backward.

- ``qkv_linear``: transformers keeps q, k and v as three Linears. The fused path needs one
  [B, N, 3·H·D] qkv, so their weights are concatenated per forward (3·C² elements, cheap next to
  the GEMM). Through F.linear that concatenation would be saved for the backward; here only the
  input and the three weight Parameters (resident anyway) are saved and the backward concatenates
  again. The gradient reaches the three original Parameters.
- ``quick_gelu_mlp``: fc2(quick_gelu(fc1(x))), quick_gelu(a) = a·sigmoid(1.702·a) (CLIP). The
  MLP kernel has no quick_gelu epilogue, so this runs as PyTorch ops, but saves what gelu_mlp
  saves (x and the fc1 pre-activation) and recomputes the activation in the backward, instead of
  eager's x, pre-activation, sigmoid and activation (4 hidden-wide tensors -> 1).

Both take one dtype for all tensors and run outside autocast (the caller uses the plain ops
otherwise); their gradients are the eager ones up to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["qkv_linear", "quick_gelu_mlp"]

_QUICK = 1.702  # quick_gelu's sigmoid slope (transformers.activations.QuickGELUActivation)


def _rows(t):
    return t.reshape(-1, t.shape[-1])


class _QkvLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, wq, wk, wv, bias):
        ctx.save_for_backward(h, wq, wk, wv)
        ctx.has_bias = bias is not None
        return F.linear(h, torch.cat([wq, wk, wv]), bias)

    @staticmethod
    def backward(ctx, g):
        h, wq, wk, wv = ctx.saved_tensors
        gh = g @ torch.cat([wq, wk, wv]) if ctx.needs_input_grad[0] else None
        gw = _rows(g).t() @ _rows(h) if any(ctx.needs_input_grad[1:4]) else None
        gq, gk, gv = gw.split([wq.shape[0], wk.shape[0], wv.shape[0]]) if gw is not None \
            else (None, None, None)
        gb = _rows(g).sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return gh, gq, gk, gv, gb


def qkv_linear(h, wq, wk, wv, bias=None):
    """h @ cat(wq, wk, wv)ᵀ + bias -> [..., 3·H·D] with the (3, H, D) layout of timm's qkv."""
    return _QkvLinear.apply(h, wq, wk, wv, bias)


class _QuickGeluMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        a = F.linear(x, w1, b1)
        ctx.save_for_backward(x, a, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        return F.linear(a * torch.sigmoid(_QUICK * a), w2, b2)

    @staticmethod
    def backward(ctx, gy):
        x, a, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        s = torch.sigmoid(_QUICK * a)
        gw2 = _rows(gy).t() @ _rows(a * s) if need[3] else None
        gb2 = _rows(gy).sum(0) if ctx.has_bias[1] and need[4] else None
        ga = (gy @ w2) * (s + _QUICK * a * s * (1 - s))  # d/da a·σ(ka) = σ + k·a·σ(1-σ)
        gx = ga @ w1 if need[0] else None
        gw1 = _rows(ga).t() @ _rows(x) if need[1] else None
        gb1 = _rows(ga).sum(0) if ctx.has_bias[0] and need[2] else None
        return gx, gw1, gb1, gw2, gb2


def quick_gelu_mlp(x, w1, b1, w2, b2):
    """fc2(quick_gelu(fc1(x))) (nn.Linear weight layout), saving x and fc1's pre-activation."""
    return _QuickGeluMlp.apply(x, w1, b1, w2, b2)
