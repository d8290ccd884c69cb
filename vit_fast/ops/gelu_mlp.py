"""Triton backend of ``gelu_mlp``: custom ops vit_fast::gelu_mlp (forward) and
vit_fast::gelu_mlp_backward, with fake and autograd registrations.

Saved for backward: x, both weights, fc2's bias (for d layer_scale), the fc1 pre-activation and
the scales. The GELU output is not saved: backward recomputes it from the pre-activation.
:data:`GeluMlpFn` is the eager twin (vit_fast/ops/autograd_twin.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast.kernels.gelu_mlp import MlpGrads, gelu_mlp_bwd, gelu_mlp_fwd
from vit_fast import tuning as _tuning

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure

from . import checks
from .autograd_twin import twin, with_bwd


def check_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                   layer_scale, sample_scale, op="gelu_mlp"):
    """What the GEMMs need: one dtype and device, nn.Linear layouts that chain, [N] vectors."""
    checks.tensor(op, "x", x, dim=1)
    C = x.shape[-1]
    checks.tensor(op, "fc1_weight", fc1_weight, like=x, ndim=2)
    checks.tensor(op, "fc2_weight", fc2_weight, like=x, ndim=2)
    H, c_out = fc1_weight.shape[0], fc2_weight.shape[0]
    checks.tensor(op, "fc1_weight", fc1_weight, like=x, shape=(H, C))
    checks.tensor(op, "fc2_weight", fc2_weight, like=x, shape=(c_out, H))
    checks.tensor(op, "fc1_bias", fc1_bias, like=x, shape=(H,), optional=True)
    checks.tensor(op, "fc2_bias", fc2_bias, like=x, shape=(c_out,), optional=True)
    checks.approximate(op, approximate)
    checks.tensor(op, "residual", residual, like=x, shape=(*x.shape[:-1], c_out), optional=True)
    if residual is not None:  # the scales apply only to a residual branch; ignored otherwise
        checks.tensor(op, "layer_scale", layer_scale, like=x, shape=(c_out,), optional=True)
        checks.sample_scale(op, sample_scale, x)


_check_fwd_once = checks.once_per_signature(check_fwd_args)


def forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], approximate: str, residual: Optional[Tensor],
            layer_scale: Optional[Tensor], sample_scale: Optional[Tensor],
            save_pre: bool) -> tuple[Tensor, Tensor]:
    """(out, pre) from the Triton GEMMs: pre is the fc1 pre-activation [M, H] when save_pre,
    else empty."""
    return gelu_mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                        layer_scale, sample_scale, save_pre, choose=gemm_chooser())


@torch.library.custom_op("vit_fast::gelu_mlp", mutates_args=())
def gelu_mlp_op(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
                fc2_bias: Optional[Tensor], approximate: str, residual: Optional[Tensor],
                layer_scale: Optional[Tensor], sample_scale: Optional[Tensor],
                save_pre: bool) -> tuple[Tensor, Tensor]:
    """(out, pre): pre is the fc1 pre-activation [M, H] when save_pre, else empty."""
    _check_fwd_once(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                    layer_scale, sample_scale)
    return forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                   layer_scale, sample_scale, save_pre)


def gemm_chooser():
    """How the Triton GEMMs pick their tile config: vit_fast.tuning (timed on CUDA, the fixed
    table elsewhere)."""
    return _tuning.choose_gemm_config


@gelu_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
      sample_scale, save_pre):
    check_fwd_args(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                   layer_scale, sample_scale)
    out = x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))
    pre = x.new_empty((checks.rows(x), fc1_weight.shape[0]) if save_pre else (0,))
    return out, pre


def wanted_grads(needs_input_grad, fc1_bias, fc2_bias, layer_scale, sample_scale):
    """MlpGrads from an autograd ctx's needs_input_grad over gelu_mlp's forward arguments (x,
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, sample_scale,
    ...); the others are flags or tensors, or None when absent."""
    need = needs_input_grad
    return MlpGrads(fc1_bias=need[2] and fc1_bias, fc2_bias=need[4] and fc2_bias is not None,
                    layer_scale=need[7] and layer_scale is not None,
                    sample_scale=need[8] and sample_scale is not None)


def wanted_kwargs(wanted: MlpGrads) -> dict:
    """The backward ops' keyword arguments for ``wanted``: needs_fc1_bias=..., and so on."""
    return {f"needs_{name}": bool(flag) for name, flag in wanted._asdict().items()}


def kept_grads(grads, wanted: MlpGrads) -> list:
    """A backward op's [dx, dW1, db1, dW2, db2, dls, dss] with None where not ``wanted``."""
    flags = (True, True, wanted.fc1_bias, True, wanted.fc2_bias, wanted.layer_scale,
             wanted.sample_scale)
    return [g if f else None for g, f in zip(grads, flags)]


@reference_on_failure("gelu_mlp", reference_grad.gelu_mlp_backward)
def backward_kernels(grad: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                     fc2_bias: Optional[Tensor], pre: Tensor, layer_scale: Optional[Tensor],
                     sample_scale: Optional[Tensor], *, approximate: str, has_residual: bool,
                     needs_fc1_bias: bool, needs_fc2_bias: bool, needs_layer_scale: bool,
                     needs_sample_scale: bool) -> list[Tensor]:
    """[dx, dW1, db1, dW2, db2, dlayer_scale, dsample_scale]; an empty tensor where not needed."""
    wanted = MlpGrads(needs_fc1_bias, needs_fc2_bias, needs_layer_scale, needs_sample_scale)
    grads = gelu_mlp_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                         approximate=approximate, has_residual=has_residual, wanted=wanted,
                         choose=gemm_chooser())
    return [g if g is not None else x.new_empty(0) for g in grads]


# Every gelu_mlp backward op (this one, the cublas and the tuned variants) has this schema: the
# saved tensors positionally, then options and the wanted optional gradients keyword-only.
@torch.library.custom_op("vit_fast::gelu_mlp_backward", mutates_args=())
def gelu_mlp_backward_op(grad: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
                         fc2_bias: Optional[Tensor], pre: Tensor, layer_scale: Optional[Tensor],
                         sample_scale: Optional[Tensor], *, approximate: str, has_residual: bool,
                         needs_fc1_bias: bool, needs_fc2_bias: bool, needs_layer_scale: bool,
                         needs_sample_scale: bool) -> list[Tensor]:
    """[dx, dW1, db1, dW2, db2, dlayer_scale, dsample_scale]; an empty tensor where not needed."""
    _check_bwd_once(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                    approximate, has_residual)
    return backward_kernels(
        grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
        approximate=approximate, has_residual=has_residual, needs_fc1_bias=needs_fc1_bias,
        needs_fc2_bias=needs_fc2_bias, needs_layer_scale=needs_layer_scale,
        needs_sample_scale=needs_sample_scale)


def _check_bwd_args(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                    approximate, has_residual):
    op = "gelu_mlp_backward"
    check_fwd_args(x, fc1_weight, None, fc2_weight, fc2_bias, approximate, None, None, None,
                   op=op)
    H, c_out = fc1_weight.shape[0], fc2_weight.shape[0]
    checks.tensor(op, "grad", grad, like=x, shape=(*x.shape[:-1], c_out))
    checks.tensor(op, "pre", pre, like=x, shape=(checks.rows(x), H))
    if has_residual:
        checks.tensor(op, "layer_scale", layer_scale, like=x, shape=(c_out,), optional=True)
        checks.sample_scale(op, sample_scale, x)


_check_bwd_once = checks.once_per_signature(_check_bwd_args)


@gelu_mlp_backward_op.register_fake
def _(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale, *, approximate,
      has_residual, needs_fc1_bias, needs_fc2_bias, needs_layer_scale, needs_sample_scale):
    _check_bwd_args(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                    approximate, has_residual)
    def maybe(need, like):
        return torch.empty_like(like) if (need and like is not None) else x.new_empty(0)
    needs_layer_scale = needs_layer_scale and has_residual
    needs_sample_scale = needs_sample_scale and has_residual
    return [torch.empty_like(x), torch.empty_like(fc1_weight),
            x.new_empty((fc1_weight.shape[0],) if needs_fc1_bias else (0,)),
            torch.empty_like(fc2_weight), maybe(needs_fc2_bias, fc2_bias),
            maybe(needs_layer_scale, layer_scale), maybe(needs_sample_scale, sample_scale)]


def _setup_context(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale, \
        sample_scale, save_pre = inputs
    ctx.approximate = approximate
    ctx.has_residual = residual is not None
    ctx.has_fc1_bias = fc1_bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, fc1_weight, fc2_weight, fc2_bias, output[1], layer_scale, sample_scale)


def _backward(ctx, grad_out, _grad_pre, *, bwd=None):
    """bwd: the backward to call (the eager twin's kernels), default the registered op."""
    x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale = ctx.saved_tensors
    if pre.dim() != 2:  # the forward's placeholder for "not saved" is 1-D
        raise RuntimeError("vit_fast::gelu_mlp: backward needs the pre-activation, but the forward "
                           "ran with save_pre=False (call vit_fast.ops.gelu_mlp.gelu_mlp instead)")
    wanted = wanted_grads(ctx.needs_input_grad, ctx.has_fc1_bias, fc2_bias, layer_scale,
                          sample_scale)
    grads = (bwd or gelu_mlp_backward_op)(
        grad_out.contiguous(), x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale,
        sample_scale, approximate=ctx.approximate, has_residual=ctx.has_residual,
        **wanted_kwargs(wanted))
    d_x, d_w1, d_b1, d_w2, d_b2, d_ls, d_ss = kept_grads(grads, wanted)
    d_res = grad_out if ctx.has_residual else None
    return d_x, d_w1, d_b1, d_w2, d_b2, None, d_res, d_ls, d_ss, None


gelu_mlp_op.register_autograd(_backward, setup_context=_setup_context)
GeluMlpFn = twin("GeluMlpFn", forward, _setup_context,
                 with_bwd(_backward, lambda *a, **k: backward_kernels(*a, **k)))


def needs_pre(*tensors) -> bool:
    """Whether a backward will run: the fc1 pre-activation must then be kept."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
             sample_scale, *, op=None) -> Tensor:
    """fc2(gelu(fc1(x))) (+ residual, LayerScale, drop-path); inputs already validated by
    vit_fast.functional. layer_scale and sample_scale only apply when residual is given.
    op: the custom op (default) or GeluMlpFn.apply (eager, plain tensors)."""
    if residual is None:
        layer_scale = sample_scale = None
    save_pre = needs_pre(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                         sample_scale)
    out, _ = (op or gelu_mlp_op)(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                                 residual, layer_scale, sample_scale, save_pre)
    return out
