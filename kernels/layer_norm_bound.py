"""The residual LayerNorm launchers bound to one configuration, for the Block's one-node step.

residual_layer_norm_fwd / _bwd (layer_norm.py) take any layout and decide per call: row strides,
unit-stride vectors, the launch config, which partials to stack. The Block's step
(vit_fast/block_step.py) calls them with the same shapes, dtypes and flags every time, on tensors
it allocated itself (contiguous) or parameters it checked once. :func:`bind_fwd` and
:func:`bind_bwd` make those decisions once -- with the launchers' own config functions, so the
launch is the same -- and return a callable that only allocates and launches.

What the caller guarantees on every call (the step checks x per call and the parameters when it
is made): the tensors have the bound shapes and dtypes, rows are contiguous, vectors are
unit-stride, and the device is current (the step's forward enters the device once; autograd's
backward thread runs on it).
"""
from __future__ import annotations

import math

import torch

from ._device import gpu_target
from .direct_launch import DirectLaunch
from .empties import empties
from .layer_norm import (DS_MAX_C, _bwd_launch, _fwd_launch, layer_norm_param_grad_reduce_kernel,
                         residual_layer_norm_bwd_kernel, residual_layer_norm_fwd_kernel)

_F32 = torch.float32


class LayerNormFwd:
    """residual_layer_norm_fwd(x, weight, bias, eps, residual, layer_scale, sample_scale,
    out_dtype, stats=False) for one configuration: returns (y, s); s is None without a
    residual. Weight and bias are present (LayerNorm's affine)."""
    __slots__ = ("launch", "M", "C", "rows_per_sample", "outs")

    def __call__(self, x, weight, bias, eps, residual=None, layer_scale=None, sample_scale=None):
        y, s = empties(x, self.outs)
        C = self.C
        self.launch(x, residual, layer_scale, sample_scale, weight, bias, y, s, None, None,
                    self.M, C, C, C, self.rows_per_sample, eps)
        return y, s


def bind_fwd(x_shape, device, out_dtype, residual_dtype=None, layer_scale=False,
             sample_scale=False) -> LayerNormFwd:
    """The forward of [..., C] rows (x_shape) on ``device``, y in out_dtype; with
    residual_dtype, s = residual + x·layer_scale·sample_scale in that dtype. No statistics."""
    C = x_shape[-1]
    M = math.prod(x_shape[:-1])
    has_res = residual_dtype is not None
    bound = LayerNormFwd()
    bound.launch = DirectLaunch(residual_layer_norm_fwd_kernel, *_fwd_launch(
        M, C, gpu_target(device), has_res, has_res and layer_scale, has_res and sample_scale,
        True, True, False))
    bound.M, bound.C = M, C
    bound.rows_per_sample = max(M // x_shape[0], 1) if (sample_scale and len(x_shape) > 1) else 1
    x_shape = tuple(x_shape)
    bound.outs = ((x_shape, out_dtype), (x_shape, residual_dtype) if has_res else None)  # y, s
    return bound


class LayerNormStats:
    """residual_layer_norm_fwd without a residual, with statistics (the backward's recompute):
    returns (y, mean, rstd)."""
    __slots__ = ("launch", "M", "C", "outs")

    def __call__(self, x, weight, bias, eps):
        y, mean, rstd = empties(x, self.outs)
        C = self.C
        self.launch(x, None, None, None, weight, bias, y, None, mean, rstd, self.M, C, C, 0, 1,
                    eps)
        return y, mean, rstd


def bind_stats(x_shape, device, out_dtype) -> LayerNormStats:
    """LayerNorm of [..., C] rows with weight and bias, y in out_dtype, mean/rstd fp32 [M]."""
    C = x_shape[-1]
    M = math.prod(x_shape[:-1])
    bound = LayerNormStats()
    bound.launch = DirectLaunch(residual_layer_norm_fwd_kernel, *_fwd_launch(
        M, C, gpu_target(device), False, False, False, True, True, True))
    bound.M, bound.C = M, C
    bound.outs = ((tuple(x_shape), out_dtype), ((M,), _F32), ((M,), _F32))  # y, mean, rstd
    return bound


class LayerNormBwd:
    """residual_layer_norm_bwd for one configuration: (dx, dresidual, dweight, dbias,
    dlayer_scale), None where not bound. dx in the bound dx dtype (s's unless given); the
    parameter gradients in their parameter's dtype (unit-stride [C])."""
    __slots__ = ("programs", "rows_per_program", "launch", "reduce", "M", "C", "K", "outs",
                 "param_outs", "rows_per_sample", "has_ds", "has_res", "has_ls", "has_ss",
                 "bias_grad")

    def __call__(self, dy, ds, s, mean, rstd, weight, x=None, layer_scale=None,
                 sample_scale=None):
        dx, dres, part = empties(s, self.outs)
        dw, db, dls = empties(s, self.param_outs)
        db_part = part[1] if self.bias_grad else None
        dls_part = part[self.K - 1] if self.has_ls else None
        C = self.C
        self.launch(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale, dx, dres,
                    part[0], db_part, dls_part, self.M, C, C, C, C, C, self.rows_per_program,
                    self.rows_per_sample)
        outs = [g for g in (dw, db, dls) if g is not None]
        self.reduce(part, *outs, *[None] * (3 - self.K), self.programs, C)
        return dx, dres, dw, db, dls


def bind_bwd(s_shape, device, s_dtype, *, has_ds, residual_dtype=None, layer_scale=None,
             sample_scale=False, bias_grad=True, bias_dtype=None, weight_dtype=None,
             dx_dtype=None) -> LayerNormBwd:
    """The backward of LayerNorm (weight present, in weight_dtype: s_dtype if not given) over
    [..., C] rows: has_ds: a gradient of s comes in too, added to dx (ds: contiguous, s's shape);
    with residual_dtype the residual form (dresidual in that dtype), layer_scale (its dtype) /
    sample_scale as the forward had them;
    bias_grad: dbias wanted (bias_dtype: s_dtype if not given). dx (the branch's gradient in the
    residual form) in dx_dtype, s_dtype if not given: the kernel computes in fp32 and rounds once
    on its store, as a cast of an fp32 dx would."""
    C = s_shape[-1]
    M = math.prod(s_shape[:-1])
    has_res = residual_dtype is not None
    has_ls = has_res and layer_scale is not None
    has_ss = has_res and sample_scale
    K = 1 + bool(bias_grad) + has_ls
    bound = LayerNormBwd()
    bound.programs, bound.rows_per_program, consts, reduce_grid, reduce_consts = _bwd_launch(
        M, C, gpu_target(device), K, has_ds, has_res, has_ls, has_ss, True,
        bool(bias_grad))
    bound.launch = DirectLaunch(residual_layer_norm_bwd_kernel, (bound.programs,), consts)
    bound.reduce = DirectLaunch(layer_norm_param_grad_reduce_kernel, reduce_grid, reduce_consts)
    bound.M, bound.C, bound.K = M, C, K
    s_shape = tuple(s_shape)
    bound.outs = ((s_shape, dx_dtype or s_dtype), (s_shape, residual_dtype) if has_res else None,
                  ((K, bound.programs, C), _F32))  # dx, dresidual, the parameters' partials
    bound.rows_per_sample = max(M // s_shape[0], 1) if (has_ss and len(s_shape) > 1) else 1
    bound.has_ds, bound.has_res, bound.has_ls, bound.has_ss = has_ds, has_res, has_ls, has_ss
    bound.bias_grad = bool(bias_grad)
    bound.param_outs = (((C,), weight_dtype or s_dtype),  # dweight, dbias, dlayer_scale
                        ((C,), bias_dtype or s_dtype) if bias_grad else None,
                        ((C,), layer_scale) if has_ls else None)
    return bound
