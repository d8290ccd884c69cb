"""LayerNorm followed by a Linear, saving only what the LayerNorm needs: custom op
vit_fast::layer_norm_linear, with fake and autograd registrations. Internal to vit_fast.Block.

    out = h·Wᵀ + b,   h = LayerNorm(x)·ln_weight + ln_bias  (fp32 statistics)

Saved for backward: x only, not h (one B·N·C activation less than a LayerNorm op followed by
nn.Linear, which keeps h for its weight gradient), nor the fp32 mean/rstd: the backward rebuilds h
with the same LayerNorm kernel (bit-identical to the forward's h, and it recomputes the same
statistics) right before dW = dOutᵀ·h, drops it, and
then runs dh = dOut·W and the LayerNorm backward, so h and dh are never alive together.

The LayerNorm runs as the existing Triton kernels (vit_fast.kernels.layer_norm, through the
vit_fast::residual_layer_norm ops in the backward so torch.compile can trace it); the GEMMs are
plain Linear math and run as torch (cuBLAS) ops. One dtype for every tensor (dispatch's rule),
except under AMP's contract (FlashAttention's residual_in_fp32): x and the LayerNorm parameters
fp32 (the residual stream), weight and bias in the autocast dtype. The LayerNorm kernel then
writes h directly in that dtype for the GEMM (no fp32 h, no cast kernel) and out has it too.

:data:`LayerNormLinearFn` is the eager twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vit_fast.kernels.layer_norm import residual_layer_norm_fwd

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from . import layer_norm as _ln  # registers vit_fast::residual_layer_norm(_backward)
from .autograd_twin import twin, with_bwd


AMP_DTYPES = (torch.bfloat16, torch.float16)


def gemm_dtype(op, x, weight):
    """The GEMM's dtype: x's, or under AMP's contract (fp32 x, low-precision weight) weight's."""
    if isinstance(weight, Tensor) and x.dtype == torch.float32 and weight.dtype in AMP_DTYPES:
        return weight.dtype
    return x.dtype


def _check_args(x, ln_weight, ln_bias, eps, weight, bias):
    op = "layer_norm_linear"
    _ln.check_fwd_args(x, ln_weight, ln_bias, eps, op=op)
    dtype = gemm_dtype(op, x, weight)
    checks.tensor(op, "weight", weight, like=x, dtype=dtype, ndim=2)
    checks.tensor(op, "weight", weight, like=x, dtype=dtype, shape=(weight.shape[0], x.shape[-1]))
    checks.tensor(op, "bias", bias, like=x, dtype=dtype, shape=(weight.shape[0],), optional=True)


_check_once = checks.once_per_signature(_check_args)


@reference_on_failure("layer_norm_linear", reference_grad.layer_norm_linear)
def forward(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
            weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(out [..., O], mean [M], rstd [M]) for x [..., C], weight [O, C], bias [O] or None."""
    h, _, mean, rstd = residual_layer_norm_fwd(x, ln_weight, ln_bias, eps, out_dtype=weight.dtype)
    return F.linear(h, weight, bias), mean, rstd


def _without_stats(reference):
    def run(*args):
        return reference(*args)[0], None, None
    return run


@reference_on_failure("layer_norm_linear", _without_stats(reference_grad.layer_norm_linear))
def forward_eager(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], eps: float,
                  weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, None, None]:
    """forward for the eager twin: (out, None, None), the statistics not even written (nothing
    keeps them: the backward recomputes them with h)."""
    h = residual_layer_norm_fwd(x, ln_weight, ln_bias, eps, out_dtype=weight.dtype,
                                stats=False)[0]
    return F.linear(h, weight, bias), None, None


@torch.library.custom_op("vit_fast::layer_norm_linear", mutates_args=())
def layer_norm_linear_op(x: Tensor, ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                         eps: float, weight: Tensor, bias: Optional[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(out [..., O], mean [M], rstd [M]) for x [..., C], weight [O, C], bias [O] or None."""
    _check_once(x, ln_weight, ln_bias, eps, weight, bias)
    return forward(x, ln_weight, ln_bias, eps, weight, bias)


@layer_norm_linear_op.register_fake
def _(x, ln_weight, ln_bias, eps, weight, bias):
    _check_args(x, ln_weight, ln_bias, eps, weight, bias)
    rows = checks.rows(x)
    stats = x.new_empty((rows,), dtype=torch.float32)
    out = x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)
    return out, stats, torch.empty_like(stats)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, weight, bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, weight)  # mean, rstd: rebuilt with h
    ctx.eps = eps
    ctx.has_bias = bias is not None
    if mean is not None:  # the eager twin returns no statistics
        ctx.mark_non_differentiable(mean, rstd)
    # their gradients are never read: autograd would otherwise fill zero tensors for them
    # (a memset of each, pre's [M, hidden] included) before every backward
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dmean, _drstd, *, bwd=_ln.TRACED):
    x, ln_weight, ln_bias, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    C, O = x.shape[-1], weight.shape[0]
    g = dout.reshape(-1, O)
    dw = db = None
    # h and the statistics rebuilt from x by the forward's own kernel: the same bits the forward
    # multiplied and normalized with.
    h, _, mean, rstd = bwd.forward(x, ln_weight, ln_bias, ctx.eps, None, None, None, weight.dtype)
    if need[4]:
        dw = g.t().mm(h.reshape(-1, C))
    del h
    if need[5] and ctx.has_bias:
        db = g.sum(0)
    dx = dlnw = dlnb = None
    if need[0] or need[1] or need[2]:
        dh = g.mm(weight).reshape(x.shape).to(x.dtype)  # AMP: the fp32 stream's LN backward
        grads = bwd.backward(
            dh, None, x, None, mean, rstd, ln_weight, None, None, None,
            ln_bias.dtype if (ln_bias is not None and need[2]) else None)
        dx = grads[0]
        dlnw = grads[2] if (ln_weight is not None and need[1]) else None
        dlnb = grads[3] if (ln_bias is not None and need[2]) else None
    return dx, dlnw, dlnb, None, dw, db


layer_norm_linear_op.register_autograd(_backward, setup_context=_setup_context)
LayerNormLinearFn = twin("LayerNormLinearFn", forward_eager, _setup_context,
                         with_bwd(_backward, _ln.EAGER))


def layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias, *, op=None) -> Tensor:
    """LayerNorm(x)·ln_weight + ln_bias, then ·weightᵀ + bias; x [..., C] -> [..., O].
    op: the custom op (default) or LayerNormLinearFn.apply (eager, plain tensors)."""
    return (op or layer_norm_linear_op)(x, ln_weight, ln_bias, float(eps), weight, bias)[0]
