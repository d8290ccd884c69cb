"""Triton backend of ``glu_mlp``: custom ops vit_fast::glu_mlp and vit_fast::glu_mlp_backward, with
fake and autograd registrations.

fc1 comes packed (GluMlp: one [2H, C] weight, ``fc1_value_weight`` None) or as a pair (SwiGLU:
``fc1_weight`` the gate's [H, C], ``fc1_value_weight`` the value's). Saved for backward
(kernels/glu_mlp.py's contract): x, the fc1 and fc2 weights, fc2's bias, the fc1 output
pre = gate | value [M, 2H], the hidden norm's parameters and the scales. The SiLU·value product
and the norm's output and statistics are recomputed, never saved. :data:`GluMlpFn` is the eager
twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.glu_mlp import GluMlpGrads, check_fc1, glu_mlp_bwd, glu_mlp_fwd

from . import checks
from .autograd_twin import twin
from .gelu_mlp import gemm_chooser, needs_pre


def _fc1(weight, value_weight):
    return weight if value_weight is None else (weight, value_weight)


def check_fwd_args(x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight,
                   fc2_bias, residual, layer_scale, sample_scale, norm_weight, norm_bias,
                   norm_eps, op="glu_mlp"):
    """One dtype and device for the GEMM operands (the norm's parameters: x's dtype or fp32),
    fc1 in one of its two layouts, fc2 [C_out, H], the scales as gelu_mlp's."""
    checks.tensor(op, "x", x, dim=1)
    for name, t in (("fc1_weight", fc1_weight), ("fc1_value_weight", fc1_value_weight),
                    ("fc1_bias", fc1_bias), ("fc1_value_bias", fc1_value_bias)):
        checks.tensor(op, name, t, like=x, optional=name != "fc1_weight")
    checks.value(op, (fc1_value_bias is None) or (fc1_value_weight is not None and
                                                   fc1_bias is not None),
                 "fc1_value_bias goes with a (gate, value) fc1 whose gate has a bias too")
    checks.value(op, fc1_value_weight is None or (fc1_bias is None) == (fc1_value_bias is None),
                 "a (gate, value) fc1 has both biases or neither")
    checks.tensor(op, "fc2_weight", fc2_weight, like=x, ndim=2)
    bias = None if fc1_bias is None else _fc1(fc1_bias, fc1_value_bias)
    try:
        H = check_fc1(x, _fc1(fc1_weight, fc1_value_weight), bias, norm_weight, norm_bias,
                      norm_eps)
    except ValueError as exc:
        raise ValueError(f"vit_fast::{op}: {exc}") from None
    c_out = fc2_weight.shape[0]
    checks.tensor(op, "fc2_weight", fc2_weight, like=x, shape=(c_out, H))
    checks.tensor(op, "fc2_bias", fc2_bias, like=x, shape=(c_out,), optional=True)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None:
            checks.tensor(op, name, t, like=x, dtype=t.dtype, shape=(H,))
            checks.value(op, t.dtype in (x.dtype, torch.float32),
                         f"{name} must be {x.dtype} (x's dtype) or float32, got {t.dtype}")
    if norm_eps is not None:
        checks.eps(op, norm_eps)
    checks.tensor(op, "residual", residual, like=x, shape=(*x.shape[:-1], c_out), optional=True)
    if residual is not None:
        checks.tensor(op, "layer_scale", layer_scale, like=x, shape=(c_out,), optional=True)
        checks.sample_scale(op, sample_scale, x)


_check_fwd_once = checks.once_per_signature(check_fwd_args)


def forward(x: Tensor, fc1_weight: Tensor, fc1_value_weight: Optional[Tensor],
            fc1_bias: Optional[Tensor], fc1_value_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], residual: Optional[Tensor], layer_scale: Optional[Tensor],
            sample_scale: Optional[Tensor], gate_last: bool, norm_weight: Optional[Tensor],
            norm_bias: Optional[Tensor], norm_eps: Optional[float],
            save_pre: bool) -> tuple[Tensor, Tensor]:
    """(out, pre): out = residual + fc2(norm(silu(gate)·value))·layer_scale·sample_scale[b],
    pre = gate | value [M, 2H] when save_pre, else empty."""
    bias = None if fc1_bias is None else _fc1(fc1_bias, fc1_value_bias)
    return glu_mlp_fwd(x, _fc1(fc1_weight, fc1_value_weight), bias, fc2_weight, fc2_bias,
                       residual, layer_scale, sample_scale, save_pre, gate_last=gate_last,
                       norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                       choose=gemm_chooser())


@torch.library.custom_op("vit_fast::glu_mlp", mutates_args=())
def glu_mlp_op(x: Tensor, fc1_weight: Tensor, fc1_value_weight: Optional[Tensor],
               fc1_bias: Optional[Tensor], fc1_value_bias: Optional[Tensor], fc2_weight: Tensor,
               fc2_bias: Optional[Tensor], residual: Optional[Tensor],
               layer_scale: Optional[Tensor], sample_scale: Optional[Tensor], gate_last: bool,
               norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
               norm_eps: Optional[float], save_pre: bool) -> tuple[Tensor, Tensor]:
    """(out, pre): pre = gate | value [M, 2H] when save_pre, else empty."""
    _check_fwd_once(x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight,
                    fc2_bias, residual, layer_scale, sample_scale, norm_weight, norm_bias,
                    norm_eps)
    return forward(x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight,
                   fc2_bias, residual, layer_scale, sample_scale, gate_last, norm_weight,
                   norm_bias, norm_eps, save_pre)


def _hidden(fc1_weight, fc1_value_weight):
    return fc1_weight.shape[0] // (1 if fc1_value_weight is not None else 2)


@glu_mlp_op.register_fake
def _(x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight, fc2_bias, residual,
      layer_scale, sample_scale, gate_last, norm_weight, norm_bias, norm_eps, save_pre):
    check_fwd_args(x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight,
                   fc2_bias, residual, layer_scale, sample_scale, norm_weight, norm_bias,
                   norm_eps)
    out = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))
    rows = checks.rows(x)
    pre = x.new_empty(rows, 2 * _hidden(fc1_weight, fc1_value_weight)) if save_pre \
        else x.new_empty(0)
    return out, pre


# The backward's results, in order; absent ones are empty tensors.
_GRADS = ("x", "fc1_weight", "fc1_value_weight", "fc1_bias", "fc1_value_bias", "norm_weight",
          "norm_bias", "fc2_weight", "fc2_bias", "layer_scale", "sample_scale")


def backward_kernels(grad: Tensor, x: Tensor, fc1_weight: Tensor,
                     fc1_value_weight: Optional[Tensor], fc2_weight: Tensor,
                     fc2_bias: Optional[Tensor], pre: Tensor, layer_scale: Optional[Tensor],
                     sample_scale: Optional[Tensor], has_residual: bool, gate_last: bool,
                     norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                     norm_eps: Optional[float], want_fc1_bias: bool, want_fc2_bias: bool,
                     want_norm_weight: bool, want_norm_bias: bool, want_layer_scale: bool,
                     want_sample_scale: bool) -> list[Tensor]:
    """The gradients named in _GRADS (an unwanted or absent one as an empty tensor)."""
    g = glu_mlp_bwd(grad, x, _fc1(fc1_weight, fc1_value_weight), fc2_weight, fc2_bias, pre,
                    layer_scale, sample_scale, has_residual=has_residual, gate_last=gate_last,
                    norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                    wanted=GluMlpGrads(want_fc1_bias, want_fc2_bias, want_norm_weight,
                                       want_norm_bias, want_layer_scale, want_sample_scale),
                    choose=gemm_chooser())
    w1, b1 = g.fc1_weight, g.fc1_bias
    pair = fc1_value_weight is not None
    w1g, w1v = (w1 if pair else (w1, None))
    b1g, b1v = (b1 if pair and b1 is not None else (b1, None))
    found = (g.x, w1g, w1v, b1g, b1v, g.norm_weight, g.norm_bias, g.fc2_weight, g.fc2_bias,
             g.layer_scale, g.sample_scale)
    # each absent gradient its own empty tensor: a custom op's outputs may not alias
    return [t if t is not None else x.new_empty(0) for t in found]


@torch.library.custom_op("vit_fast::glu_mlp_backward", mutates_args=())
def glu_mlp_backward_op(grad: Tensor, x: Tensor, fc1_weight: Tensor,
                        fc1_value_weight: Optional[Tensor], fc2_weight: Tensor,
                        fc2_bias: Optional[Tensor], pre: Tensor, layer_scale: Optional[Tensor],
                        sample_scale: Optional[Tensor], has_residual: bool, gate_last: bool,
                        norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                        norm_eps: Optional[float], want_fc1_bias: bool, want_fc2_bias: bool,
                        want_norm_weight: bool, want_norm_bias: bool, want_layer_scale: bool,
                        want_sample_scale: bool) -> list[Tensor]:
    """backward_kernels as a registered op."""
    checks.tensor("glu_mlp_backward", "grad", grad, like=x,
                  shape=(*x.shape[:-1], fc2_weight.shape[0]))
    grads = backward_kernels(grad, x, fc1_weight, fc1_value_weight, fc2_weight, fc2_bias, pre,
                             layer_scale, sample_scale, has_residual, gate_last, norm_weight,
                             norm_bias, norm_eps, want_fc1_bias, want_fc2_bias, want_norm_weight,
                             want_norm_bias, want_layer_scale, want_sample_scale)
    return _unaliased(grads)


def _unaliased(grads):
    """A pair's gate and value gradients are halves of one [2H, ...] result: a custom op's
    outputs may not alias each other, so a later one sharing an earlier one's storage is copied
    (weight-sized; the eager twin returns the views)."""
    seen, out = set(), []
    for t in grads:
        key = t.untyped_storage().data_ptr() if t.numel() else None
        out.append(t.clone() if key is not None and key in seen else t)
        seen.add(key)
    return out


@glu_mlp_backward_op.register_fake
def _(grad, x, fc1_weight, fc1_value_weight, fc2_weight, fc2_bias, pre, layer_scale,
      sample_scale, has_residual, gate_last, norm_weight, norm_bias, norm_eps, want_fc1_bias,
      want_fc2_bias, want_norm_weight, want_norm_bias, want_layer_scale, want_sample_scale):
    H = _hidden(fc1_weight, fc1_value_weight)
    pair = fc1_value_weight is not None

    def empty():
        return x.new_empty(0)

    def like(t, want):
        return torch.empty_like(t) if (want and t is not None) else empty()
    return [torch.empty_like(x), torch.empty_like(fc1_weight),
            torch.empty_like(fc1_value_weight) if pair else empty(),
            x.new_empty(H if pair else 2 * H) if want_fc1_bias else empty(),
            x.new_empty(H) if (want_fc1_bias and pair) else empty(),
            like(norm_weight, want_norm_weight), like(norm_bias, want_norm_bias),
            torch.empty_like(fc2_weight), like(fc2_bias, want_fc2_bias),
            like(layer_scale, want_layer_scale and has_residual),
            like(sample_scale, want_sample_scale and has_residual)]


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_value_weight, fc1_bias, fc1_value_bias, fc2_weight, fc2_bias, residual,
     layer_scale, sample_scale, gate_last, norm_weight, norm_bias, norm_eps, save_pre) = inputs
    ctx.has_residual = residual is not None
    ctx.has_fc1_bias = fc1_bias is not None
    ctx.gate_last, ctx.norm_eps = gate_last, norm_eps
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, fc1_weight, fc1_value_weight, fc2_weight, fc2_bias, output[1],
                          layer_scale, sample_scale, norm_weight, norm_bias)


def _backward(ctx, grad_out, _grad_pre, *, bwd=None):
    """bwd: the backward to call (the eager twin's kernels), default the registered op."""
    (x, fc1_weight, fc1_value_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
     norm_weight, norm_bias) = ctx.saved_tensors
    if pre.dim() != 2:
        raise RuntimeError("vit_fast::glu_mlp: backward needs fc1's output, but the forward ran "
                           "with save_pre=False (call vit_fast.ops.glu_mlp.glu_mlp instead)")
    need = ctx.needs_input_grad
    res = ctx.has_residual
    grads = (bwd or glu_mlp_backward_op)(
        grad_out.contiguous(), x, fc1_weight, fc1_value_weight, fc2_weight, fc2_bias, pre,
        layer_scale, sample_scale, res, ctx.gate_last, norm_weight, norm_bias, ctx.norm_eps,
        ctx.has_fc1_bias and (need[3] or need[4]), fc2_bias is not None and need[6],
        norm_weight is not None and need[11], norm_bias is not None and need[12],
        res and layer_scale is not None and need[8], res and sample_scale is not None and need[9])
    d = dict(zip(_GRADS, grads))

    def kept(name, i):
        t = d[name]
        return t if need[i] and (t.numel() or name == "x") else None
    return (kept("x", 0), kept("fc1_weight", 1), kept("fc1_value_weight", 2),
            kept("fc1_bias", 3), kept("fc1_value_bias", 4), kept("fc2_weight", 5),
            kept("fc2_bias", 6), grad_out if (res and need[7]) else None,
            kept("layer_scale", 8), kept("sample_scale", 9), None, kept("norm_weight", 11),
            kept("norm_bias", 12), None, None)


glu_mlp_op.register_autograd(_backward, setup_context=_setup_context)
GluMlpFn = twin("GluMlpFn", forward, _setup_context,
                lambda ctx, g, gp: _backward(ctx, g, gp, bwd=backward_kernels))


def glu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate_last, norm_weight, norm_bias,
            norm_eps, residual, layer_scale, sample_scale, *, op=None) -> Tensor:
    """vit_fast.functional.glu_mlp on the kernels (inputs validated there); fc1_weight and
    fc1_bias packed tensors or (gate, value) pairs. op: the custom op (default) or
    GluMlpFn.apply (eager, plain tensors)."""
    if residual is None:
        layer_scale = sample_scale = None
    w1, w1v = tuple(fc1_weight) if isinstance(fc1_weight, (tuple, list)) else (fc1_weight, None)
    b1, b1v = tuple(fc1_bias) if isinstance(fc1_bias, (tuple, list)) else (fc1_bias, None)
    save_pre = needs_pre(x, w1, w1v, b1, b1v, fc2_weight, fc2_bias, residual, layer_scale,
                         sample_scale, norm_weight, norm_bias)
    out, _ = (op or glu_mlp_op)(x, w1, w1v, b1, b1v, fc2_weight, fc2_bias, residual, layer_scale,
                                sample_scale, bool(gate_last), norm_weight, norm_bias,
                                None if norm_eps is None else float(norm_eps), save_pre)
    return out
