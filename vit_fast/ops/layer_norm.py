"""Triton backend of ``residual_layer_norm``: custom ops vit_fast::residual_layer_norm (forward) and
vit_fast::residual_layer_norm_backward, with fake and autograd registrations.

The forward op returns (y, s, mean, rstd). Without a residual, s is x itself, and a custom op may
not return an alias of its input, so the op returns an empty placeholder there and the public
entry hands back x: autograd then adds the gradient that flows into s to dx by itself.

:class:`ResidualLayerNormFn` is the op's eager twin (vit_fast/ops/autograd_twin.py): same forward,
setup_context and backward; its backward launches the kernels directly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.layer_norm import MAX_C, residual_layer_norm_bwd, residual_layer_norm_fwd

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from .autograd_twin import twin, with_bwd


def check_fwd_args(x, weight, bias, eps, residual=None, layer_scale=None, sample_scale=None,
                   op="residual_layer_norm"):
    """What the forward kernel needs: one dtype and device, [C] vectors, residual like x."""
    checks.tensor(op, "x", x, dim=1)
    C = x.shape[-1]
    checks.value(op, C <= MAX_C, f"x's last dim {C} is above the kernel's maximum {MAX_C}")
    for name, t in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
        checks.tensor(op, name, t, like=x, shape=(C,), optional=True)
    checks.tensor(op, "residual", residual, like=x, shape=x.shape, optional=True)
    checks.sample_scale(op, sample_scale, x)
    checks.eps(op, eps)


_check_fwd_once = checks.once_per_signature(check_fwd_args)


@reference_on_failure("residual_layer_norm", reference_grad.residual_layer_norm,
                      only_in_backward=True)  # the Block's backward reruns it
def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            residual: Optional[Tensor], layer_scale: Optional[Tensor],
            sample_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s or an empty placeholder, mean, rstd) from the kernel; arguments already checked."""
    y, s, mean, rstd = residual_layer_norm_fwd(x, weight, bias, eps, residual, layer_scale,
                                               sample_scale)
    return y, (s if s is not None else x.new_empty(0)), mean, rstd


@torch.library.custom_op("vit_fast::residual_layer_norm", mutates_args=())
def _fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
            residual: Optional[Tensor], layer_scale: Optional[Tensor],
            sample_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_fwd_once(x, weight, bias, eps, residual, layer_scale, sample_scale)
    return forward(x, weight, bias, eps, residual, layer_scale, sample_scale)


@_fwd_op.register_fake
def _(x, weight, bias, eps, residual, layer_scale, sample_scale):
    check_fwd_args(x, weight, bias, eps, residual, layer_scale, sample_scale)
    rows = checks.rows(x)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(y) if residual is not None else x.new_empty(0)
    stats = x.new_empty((rows,), dtype=torch.float32)
    return y, s, stats, torch.empty_like(stats)


@reference_on_failure("residual_layer_norm", reference_grad.residual_layer_norm_backward)
def backward_kernels(dy: Tensor, ds: Optional[Tensor], s: Tensor, x: Optional[Tensor],
                     mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                     layer_scale: Optional[Tensor], sample_scale: Optional[Tensor],
                     residual_dtype: Optional[torch.dtype],
                     bias_dtype: Optional[torch.dtype]) -> list[Tensor]:
    """[dx, dresidual, dweight, dbias, dlayer_scale]; an absent gradient is an empty tensor.

    residual_dtype / bias_dtype: None when there is no residual / no bias gradient to compute.
    """
    grads = residual_layer_norm_bwd(
        dy, ds, s, mean, rstd, weight, has_residual=residual_dtype is not None,
        need_bias_grad=bias_dtype is not None, x=x, layer_scale=layer_scale,
        sample_scale=sample_scale, residual_dtype=residual_dtype, bias_dtype=bias_dtype)
    return list(grads)


@torch.library.custom_op("vit_fast::residual_layer_norm_backward", mutates_args=())
def _bwd_op(dy: Tensor, ds: Optional[Tensor], s: Tensor, x: Optional[Tensor], mean: Tensor,
            rstd: Tensor, weight: Optional[Tensor], layer_scale: Optional[Tensor],
            sample_scale: Optional[Tensor], residual_dtype: Optional[torch.dtype],
            bias_dtype: Optional[torch.dtype]) -> list[Tensor]:
    """backward_kernels as a registered op (its arguments checked)."""
    _check_bwd_once(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale, residual_dtype,
                    bias_dtype)
    grads = backward_kernels(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale,
                             residual_dtype, bias_dtype)
    return [g if g is not None else s.new_empty(0) for g in grads]  # a custom op returns tensors


def _check_bwd_args(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale, residual_dtype,
                    bias_dtype):
    op = "residual_layer_norm_backward"
    checks.tensor(op, "s", s, dim=1)
    C, M = s.shape[-1], checks.rows(s)
    checks.value(op, C <= MAX_C, f"s's last dim {C} is above the kernel's maximum {MAX_C}")
    checks.tensor(op, "dy", dy, like=s, shape=s.shape)
    for name, t in (("mean", mean), ("rstd", rstd)):
        checks.tensor(op, name, t, like=s, shape=(M,), dtype=torch.float32)
    checks.tensor(op, "weight", weight, like=s, shape=(C,), optional=True)
    for name, dt in (("residual_dtype", residual_dtype), ("bias_dtype", bias_dtype)):
        checks.value(op, dt is None or dt in checks.KERNEL_DTYPES,
                     f"{name} must be None, float32, float16 or bfloat16, got {dt}")
    if residual_dtype is not None:  # the residual branch's inputs are read only with a residual
        checks.tensor(op, "ds", ds, like=s, shape=s.shape, optional=True)
        checks.tensor(op, "layer_scale", layer_scale, like=s, shape=(C,), optional=True)
        checks.tensor(op, "x", x, like=s, shape=s.shape, optional=layer_scale is None)
        checks.sample_scale(op, sample_scale, s)


_check_bwd_once = checks.once_per_signature(_check_bwd_args)


@_bwd_op.register_fake
def _(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale, residual_dtype, bias_dtype):
    _check_bwd_args(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale, residual_dtype,
                    bias_dtype)
    C = s.shape[-1]
    none = s.new_empty(0)
    has_res = residual_dtype is not None
    return [s.new_empty(s.shape),
            s.new_empty(s.shape, dtype=residual_dtype) if has_res else none,
            weight.new_empty((C,)) if weight is not None else none,
            s.new_empty((C,), dtype=bias_dtype) if bias_dtype is not None else none,
            layer_scale.new_empty((C,)) if (has_res and layer_scale is not None) else none]


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual, layer_scale, sample_scale = inputs
    y, s, mean, rstd = output
    has_res = residual is not None
    # Only what the backward cannot rebuild cheaply: s (x itself without a residual), the fp32
    # statistics, and x when dlayer_scale needs it.
    need_x = has_res and (layer_scale is not None
                          or (sample_scale is not None and sample_scale.requires_grad))
    ctx.save_for_backward(s if has_res else x, x if need_x else None,
                          mean, rstd, weight, layer_scale if has_res else None,
                          sample_scale if has_res else None)
    ctx.residual_dtype = residual.dtype if has_res else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, rstd)
    # A gradient into s that nobody produced stays None instead of a materialized [M, C] zero.
    ctx.set_materialize_grads(False)


def _recompute_traced(x, weight, bias, eps, residual, layer_scale, sample_scale, out_dtype=None):
    """The LayerNorm forward as the Block ops' backward reruns it (registered op), y in
    out_dtype."""
    y, s, mean, rstd = torch.ops.vit_fast.residual_layer_norm(x, weight, bias, eps, residual,
                                                              layer_scale, sample_scale)
    return (y.to(out_dtype) if out_dtype is not None else y), s, mean, rstd


def _recompute_reference(x, weight, bias, eps, residual, layer_scale, sample_scale,
                         out_dtype=None):
    y, s, mean, rstd = reference_grad.residual_layer_norm(x, weight, bias, eps, residual,
                                                          layer_scale, sample_scale)
    return (y.to(out_dtype) if out_dtype is not None else y), s, mean, rstd


@reference_on_failure("residual_layer_norm", _recompute_reference, only_in_backward=True)
def _recompute_kernel(x, weight, bias, eps, residual, layer_scale, sample_scale, out_dtype=None):
    """The same on the kernel, y written in out_dtype (the GEMM's) directly."""
    return residual_layer_norm_fwd(x, weight, bias, eps, residual, layer_scale, sample_scale,
                                   out_dtype=out_dtype)


class EAGER:
    """The sub-ops the backward calls: the kernels (eager twin). forward(..., out_dtype) is the
    LayerNorm rerun (y written in out_dtype); backward returns None for an absent gradient."""
    forward = staticmethod(lambda *args: _recompute_kernel(*args))
    backward = staticmethod(lambda *args: backward_kernels(*args))


class TRACED:
    """The sub-ops the backward calls: the registered ops (custom op, traced by torch.compile)."""
    forward = staticmethod(_recompute_traced)
    backward = staticmethod(lambda *args: torch.ops.vit_fast.residual_layer_norm_backward(*args))


def _backward(ctx, dy, ds, _dmean, _drstd, *, bwd=TRACED):
    s, x, mean, rstd, weight, layer_scale, sample_scale = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(s)
    if ds is not None and ds.numel() == 0:
        ds = None
    need = ctx.needs_input_grad
    dx, dres, dw, db, dls = bwd.backward(
        dy, ds, s, x if layer_scale is not None else None, mean, rstd, weight, layer_scale,
        sample_scale, ctx.residual_dtype, ctx.bias_dtype if need[2] else None)
    dss = None
    if need[6] and sample_scale is not None and ctx.residual_dtype is not None:
        dss = sample_scale_grad(dres, x, layer_scale, sample_scale)
    return (dx, dw if need[1] else None, db if need[2] else None, None,
            dres if need[4] else None,
            dls if (layer_scale is not None and need[5]) else None, dss)


def sample_scale_grad(ds, x, layer_scale, sample_scale):
    """d sample_scale[b] = Σ over sample b's rows and channels of ds·x·layer_scale, in fp32.

    ds is the gradient of s = residual + x·layer_scale·sample_scale[b]; sample_scale is usually a
    drop-path mask without a gradient, so this runs only when one is asked for."""
    branch = x.float() if layer_scale is None else x.float() * layer_scale.float()
    per_sample = (ds.float() * branch).reshape(sample_scale.shape[0], math.prod(x.shape[1:]))
    return per_sample.sum(1).to(sample_scale.dtype)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
ResidualLayerNormFn = twin("ResidualLayerNormFn", forward, _setup_context,
                           with_bwd(_backward, EAGER))


def residual_layer_norm(x, weight, bias, eps, residual, layer_scale, sample_scale, *, op=None):
    """(y, s) as in vit_fast.functional.residual_layer_norm; inputs already validated there.
    op: the custom op (default) or ResidualLayerNormFn.apply (eager, plain tensors)."""
    if residual is None:
        # s = x: the branch factors have nothing to scale.
        layer_scale = sample_scale = None
    y, s, _, _ = (op or _fwd_op)(x, weight, bias, float(eps), residual, layer_scale, sample_scale)
    return y, (s if residual is not None else x)
