"""LayerNorm followed by a Linear, saving only what the LayerNorm needs: custom op
vit_fast::layer_norm_linear, with fake and autograd registrations. Internal to vit_fast.Block.

    out = h·Wᵀ + b,   h = LayerNorm(x)·ln_weight + ln_bias  (fp32 statistics)

Saved for backward: x and the fp32 mean/rstd, not h (one B·N·C activation less than a LayerNorm
op followed by nn.Linear, which keeps h for its weight gradient). The backward rebuilds h with the
same LayerNorm kernel (bit-identical to the forward's h) right before dW = dOutᵀ·h, drops it, and
then runs dh = dOut·W and the LayerNorm backward, so h and dh are never alive together.

The LayerNorm runs as the existing Triton kernels (vit_fast.kernels.layer_norm, through the
vit_fast::residual_layer_norm ops in the backward so torch.compile can trace it); the GEMMs are
plain Linear math and run as torch (cuBLAS) ops. One dtype for every tensor (dispatch's rule).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vit_fast.kernels.layer_norm import residual_layer_norm_fwd

from . import checks
from . import layer_norm as _ln  # registers vit_fast::residual_layer_norm(_backward)


def _check_args(x, ln_weight, ln_bias, eps, weight, bias):
    op = "layer_norm_linear"
    _ln.check_fwd_args(x, ln_weight, ln_bias, eps, op=op)
    checks.tensor(op, "weight", weight, like=x, ndim=2)
    checks.tensor(op, "weight", weight, like=x, shape=(weight.shape[0], x.shape[-1]))
    checks.tensor(op, "bias", bias, like=x, shape=(weight.shape[0],), optional=True)


@torch.library.custom_op("vit_fast::layer_norm_linear", mutates_args=())
def layer_norm_linear_op(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                         eps: float, weight: Tensor, bias: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(out [..., O], mean [M], rstd [M]) for x [..., C], weight [O, C], bias [O] or None."""
    _check_args(x, ln_weight, ln_bias, eps, weight, bias)
    h, _, mean, rstd = residual_layer_norm_fwd(x, ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias), mean, rstd


@layer_norm_linear_op.register_fake
def _(x, ln_weight, ln_bias, eps, weight, bias):
    _check_args(x, ln_weight, ln_bias, eps, weight, bias)
    rows = checks.rows(x)
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, weight, bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
    ctx.eps = eps
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    C, O = x.shape[-1], weight.shape[0]
    g = dout.reshape(-1, O)
    dw = db = None
    if need[4]:
        # h rebuilt from x by the forward's own kernel: the same bits the forward multiplied.
        h = torch.ops.vit_fast.residual_layer_norm(x, ln_weight, ln_bias, ctx.eps, None, None,
                                                   None)[0]
        dw = g.t().mm(h.reshape(-1, C))
        del h
    if need[5] and ctx.has_bias:
        db = g.sum(0)
    dx = dlnw = dlnb = None
    if need[0] or need[1] or need[2]:
        dh = g.mm(weight).reshape(x.shape)
        grads = torch.ops.vit_fast.residual_layer_norm_backward(
            dh, None, x, None, mean, rstd, ln_weight, None, None, None,
            ln_bias.dtype if (ln_bias is not None and need[2]) else None)
        dx = grads[0]
        dlnw = grads[2] if (ln_weight is not None and need[1]) else None
        dlnb = grads[3] if (ln_bias is not None and need[2]) else None
    return dx, dlnw, dlnb, None, dw, db


layer_norm_linear_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias) -> Tensor:
    """LayerNorm(x)·ln_weight + ln_bias, then ·weightᵀ + bias; x [..., C] -> [..., O]."""
    return layer_norm_linear_op(x, ln_weight, ln_bias, float(eps), weight, bias)[0]
