"""The second half of a pre-norm Block as one op, saving no LayerNorm output: custom op
vit_fast::residual_layer_norm_mlp, with fake and autograd registrations. Internal to vit_fast.Block.

    s   = residual + x·ls1·ss1[b]                       (the residual stream after attention)
    h   = LayerNorm(s)·ln_weight + ln_bias               (fp32 statistics)
    out = s + fc2(gelu(fc1(h)))·ls2·ss2[b]

x is the attention branch, residual the Block's input; ls1/ls2 LayerScale [C], ss1/ss2 drop-path
[B] (each optional). The forward is the two existing launchers back to back
(residual_layer_norm_fwd, gelu_mlp_fwd); h lives only between them. Saved for backward: s, the
fc1 pre-activation, and x only when ls1 needs its gradient (as vit_fast::residual_layer_norm
does); the fp32 mean/rstd come back with the rebuilt h.
The backward rebuilds h from s with the forward's LayerNorm kernel (bit-identical), runs the MLP
backward (whose last GEMM, dW1 = d_preᵀ·h, is what needs h), drops h, then the LayerNorm backward
with the residual's gradient (= dOut) added. All kernel calls in the backward go through the
registered vit_fast::residual_layer_norm / gelu_mlp_backward ops so torch.compile can trace them.

AMP's contract (FlashAttention's residual_in_fp32): residual, the LayerNorm parameters and the
LayerScales fp32, the branch x and the MLP weights in the autocast dtype. The LayerNorm kernel
keeps s in fp32 and writes h in the autocast dtype; fc2's epilogue adds into the fp32 stream (out
fp32). These run the triton MLP launchers (the out_dtype they take).

:data:`ResidualLayerNormMlpFn` is the eager twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.gelu_mlp import MlpGrads
from vit_fast.kernels.gelu_mlp import gelu_mlp_fwd as _triton_mlp_fwd
from vit_fast.kernels.layer_norm import residual_layer_norm_fwd

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from . import gelu_mlp as _mlp  # registers vit_fast::gelu_mlp_backward
from . import layer_norm as _ln  # registers vit_fast::residual_layer_norm(_backward)
from .autograd_twin import twin, with_bwd
from .gelu_mlp_tuned import mlp_launchers  # the MLP's launchers: triton, cublas or tuned


def _check_args(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2):
    op = "residual_layer_norm_mlp"
    if isinstance(residual, Tensor) and isinstance(x, Tensor) and residual.dtype != x.dtype:
        return _check_amp_args(op, x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias,
                               eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                               layer_scale2, sample_scale2)
    _ln.check_fwd_args(x, ln_weight, ln_bias, eps, residual, layer_scale1, sample_scale1, op=op)
    checks.tensor(op, "residual", residual, like=x, shape=x.shape)
    # the MLP reads LN's output (x's shape) and adds its branch to s (x's shape too)
    _mlp.check_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                        layer_scale2, sample_scale2, op=op)


def _check_amp_args(op, x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps,
                    fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2,
                    sample_scale2):
    """AMP: the stream (residual, LN parameters, LayerScales) fp32, the GEMMs in x's dtype."""
    checks.value(op, residual.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16),
                 f"residual ({residual.dtype}) and x ({x.dtype}) differ: only AMP's fp32 "
                 "residual with a bfloat16/float16 branch x may")
    # The LayerNorm reads the stream: its checks with residual in x's place.
    _ln.check_fwd_args(residual, ln_weight, ln_bias, eps, None, layer_scale1, None, op=op)
    checks.tensor(op, "x", x, like=residual, dtype=x.dtype, shape=residual.shape)
    checks.sample_scale(op, sample_scale1, residual)
    _mlp.check_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, None, None,
                        None, op=op)
    checks.tensor(op, "layer_scale2", layer_scale2, like=residual, shape=(fc2_weight.shape[0],),
                  optional=True)
    checks.sample_scale(op, sample_scale2, residual)


def _amp(x, residual):
    return residual.dtype != x.dtype


_check_once = checks.once_per_signature(_check_args)


def _forward(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
             fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2, save_pre,
             stats):
    h, s, mean, rstd = residual_layer_norm_fwd(x, ln_weight, ln_bias, eps, residual, layer_scale1,
                                               sample_scale1, out_dtype=fc1_weight.dtype,
                                               stats=stats)
    if _amp(x, residual):
        out, pre = _triton_mlp_fwd(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, s,
                                   layer_scale2, sample_scale2, save_pre, out_dtype=s.dtype,
                                   choose=_mlp.gemm_chooser())
        return out, s, mean, rstd, pre
    gelu_mlp_fwd = mlp_launchers()[0]
    out, pre = gelu_mlp_fwd(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, s,
                            layer_scale2, sample_scale2, save_pre)
    return out, s, mean, rstd, pre


@reference_on_failure("residual_layer_norm_mlp", reference_grad.residual_layer_norm_mlp)
def forward(x: Tensor, residual: Tensor, layer_scale1: Optional[Tensor],
            sample_scale1: Optional[Tensor], ln_weight: Optional[Tensor],
            ln_bias: Optional[Tensor], eps: float, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
            fc2_weight: Tensor, fc2_bias: Optional[Tensor], approximate: str,
            layer_scale2: Optional[Tensor], sample_scale2: Optional[Tensor], save_pre: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [..., C], s [..., C], mean [M], rstd [M], pre [M, H] or empty when not save_pre)."""
    return _forward(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                    fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2,
                    save_pre, True)


def _reference_without_stats(*args):
    out, s, _, _, pre = reference_grad.residual_layer_norm_mlp(*args)
    return out, s, None, None, pre


@reference_on_failure("residual_layer_norm_mlp", _reference_without_stats)
def forward_eager(x: Tensor, residual: Tensor, layer_scale1: Optional[Tensor],
                  sample_scale1: Optional[Tensor], ln_weight: Optional[Tensor],
                  ln_bias: Optional[Tensor], eps: float, fc1_weight: Tensor,
                  fc1_bias: Optional[Tensor], fc2_weight: Tensor, fc2_bias: Optional[Tensor],
                  approximate: str, layer_scale2: Optional[Tensor],
                  sample_scale2: Optional[Tensor], save_pre: bool):
    """forward for the eager twin: the statistics not written (the backward recomputes them with
    h), (out, s, None, None, pre)."""
    return _forward(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                    fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2,
                    save_pre, False)


@torch.library.custom_op("vit_fast::residual_layer_norm_mlp", mutates_args=())
def residual_layer_norm_mlp_op(
        x: Tensor, residual: Tensor, layer_scale1: Optional[Tensor],
        sample_scale1: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
        eps: float, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
        fc2_bias: Optional[Tensor], approximate: str, layer_scale2: Optional[Tensor],
        sample_scale2: Optional[Tensor], save_pre: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out [..., C], s [..., C], mean [M], rstd [M], pre [M, H] or empty when not save_pre)."""
    _check_once(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2)
    return forward(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                   fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2,
                   save_pre)


@residual_layer_norm_mlp_op.register_fake
def _(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight, fc1_bias,
      fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2, save_pre):
    _check_args(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2)
    rows = checks.rows(x)
    s = torch.empty_like(residual, memory_format=torch.contiguous_format)
    stats = x.new_empty((rows,), dtype=torch.float32)
    pre = x.new_empty((rows, fc1_weight.shape[0]) if save_pre else (0,))
    return torch.empty_like(s), s, stats, torch.empty_like(stats), pre


def _setup_context(ctx, inputs, output):
    (x, residual, ls1, ss1, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
     approximate, ls2, ss2, _save_pre) = inputs
    _, s, mean, rstd, pre = output
    need_x = ls1 is not None or (ss1 is not None and ss1.requires_grad)
    ctx.save_for_backward(s, x if need_x else None, pre, ln_weight, ln_bias,
                          fc1_weight, fc2_weight, fc2_bias, ls1, ss1, ls2, ss2)
    ctx.eps, ctx.approximate = eps, approximate
    # the forward's backward: the same policy's, the triton one under AMP (kept as both the
    # kernels, for the eager twin, and the registered op, for a traced backward)
    ctx.amp = _amp(x, residual)
    if ctx.amp:
        ctx.mlp_backward = (_mlp.backward_kernels, torch.ops.vit_fast.gelu_mlp_backward)
    else:
        ctx.mlp_backward = mlp_launchers()[1:]
    ctx.has_fc1_bias = fc1_bias is not None
    ctx.residual_dtype = residual.dtype
    ctx.mark_non_differentiable(*(t for t in (s, mean, rstd, pre) if t is not None))
    # their gradients are never read: autograd would otherwise fill zero tensors for them
    # (a memset of each, pre's [M, hidden] included) before every backward
    ctx.set_materialize_grads(False)


def gemm_grad(g, ls2, lp):
    """(g, ls2 in the GEMMs' dtype lp, k): what fc2's backward reads; k [C] or None.

    Under AMP, eager casts the gradient of fc2's output, g·ls2, to lp; folding ls2 into fc2's
    weight instead would cast g itself, which overflows fp16 at a GradScaler scale 1/ls2 times
    smaller. So g is cast as g·k with k = ls2 rounded to a power of two (1 where ls2 is 0) and
    ls2/k is folded: the same products, eager's range, and d_ls2 exact after dividing by k.
    """
    if g.dtype == lp:
        return g, ls2, None
    if ls2 is None:
        return g.to(lp), None, None
    a = ls2.detach().float().abs()
    k = torch.where(a > 0, torch.exp2(torch.round(torch.log2(a))), torch.ones_like(a))
    k = torch.where(torch.isfinite(k), k, torch.ones_like(k))
    return (g * k).to(lp), (ls2.float() / k).to(lp), k


def _backward(ctx, dout, _ds, _dmean, _drstd, _dpre, *, bwd=_ln.TRACED):
    (s, x, pre, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias, ls1, ss1, ls2,
     ss2) = ctx.saved_tensors
    if pre.dim() != 2:  # the forward's placeholder for "not saved" is 1-D
        raise RuntimeError("vit_fast::residual_layer_norm_mlp: backward needs the fc1 "
                           "pre-activation, but the forward ran with save_pre=False")
    need = ctx.needs_input_grad
    g = dout.contiguous()
    lp = fc1_weight.dtype  # the GEMMs' dtype (s's under one dtype, the autocast dtype under AMP)
    h, _, mean, rstd = bwd.forward(s, ln_weight, ln_bias, ctx.eps, None, None, None, lp)
    wanted = MlpGrads(fc1_bias=need[8] and ctx.has_fc1_bias,
                      fc2_bias=need[10] and fc2_bias is not None,
                      layer_scale=need[12] and ls2 is not None,
                      sample_scale=need[13] and ss2 is not None)

    g_lp, ls_lp, k = gemm_grad(g, ls2, lp)
    mlp_backward = ctx.mlp_backward[0 if bwd is _ln.EAGER else 1]
    dh, dw1, db1, dw2, db2, dls2, dss2 = mlp_backward(
        g_lp, h, fc1_weight, fc2_weight, fc2_bias, pre, ls_lp,
        ss2.to(lp) if ss2 is not None else None, approximate=ctx.approximate, has_residual=True,
        **_mlp.wanted_kwargs(wanted))
    del h
    if k is not None and dls2 is not None:
        dls2 = dls2.float() / k  # exact: k is a power of two
    dh = dh.to(s.dtype)
    x = x.to(s.dtype) if x is not None else None  # the LayerNorm backward reads the fp32 stream
    # s feeds both the LayerNorm and the output's residual add: the latter's gradient is dout.
    dx, dres, dlnw, dlnb, dls1 = bwd.backward(
        dh, g, s, x if ls1 is not None else None, mean, rstd, ln_weight, ls1, ss1,
        ctx.residual_dtype, ln_bias.dtype if (ln_bias is not None and need[5]) else None)
    dss1 = _ln.sample_scale_grad(dres, x, ls1, ss1) if (need[3] and ss1 is not None) else None

    def keep(grad, wanted):
        return grad if wanted else None
    return (dx, dres, keep(dls1, ls1 is not None and need[2]), dss1,
            keep(dlnw, ln_weight is not None and need[4]),
            keep(dlnb, ln_bias is not None and need[5]), None,
            dw1, keep(db1, wanted.fc1_bias), dw2, keep(db2, wanted.fc2_bias), None,
            keep(dls2, wanted.layer_scale), keep(dss2, wanted.sample_scale), None)


residual_layer_norm_mlp_op.register_autograd(_backward, setup_context=_setup_context)
ResidualLayerNormMlpFn = twin("ResidualLayerNormMlpFn", forward_eager, _setup_context,
                              with_bwd(_backward, _ln.EAGER))


def residual_layer_norm_mlp(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps,
                            fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2,
                            sample_scale2, *, op=None) -> Tensor:
    """The Block's output from the attention branch x and the Block's input residual.
    op: the custom op (default) or ResidualLayerNormMlpFn.apply (eager, plain tensors)."""
    save_pre = torch.is_grad_enabled() and (
        x.requires_grad or residual.requires_grad or fc1_weight.requires_grad
        or any(t is not None and t.requires_grad for t in (
            layer_scale1, sample_scale1, ln_weight, ln_bias, fc1_bias, fc2_weight, fc2_bias,
            layer_scale2, sample_scale2)))
    return (op or residual_layer_norm_mlp_op)(
        x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, float(eps), fc1_weight,
        fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2, save_pre)[0]
