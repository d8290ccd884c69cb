"""cuBLAS-GEMM variants of ``gelu_mlp`` as custom ops, with fake and autograd registrations:

- vit_fast::gelu_mlp_cublas (+ _backward): GEMMs on cuBLAS, bias+GELU, dGELU and the
  residual/LayerScale/drop-path epilogue in Triton (kernels/gelu_elementwise.py);
- vit_fast::gelu_mlp_tuned (+ _backward, vit_fast/ops/gelu_mlp_tuned.py, registered with
  :func:`register_variant`): picks the Triton or the cuBLAS launcher inside the op, at run time,
  by measurement on CUDA (vit_fast/tuning.py); forward and backward are picked separately.

Both take vit_fast::gelu_mlp's arguments and save exactly what it saves (x, both weights, fc2's
bias, the fc1 pre-activation, the scales), so the memory figures hold whichever runs, and any
forward's saved tensors feed any backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vit_fast import reference_grad
from vit_fast.fallback import reference_on_failure
from vit_fast.kernels import gelu_elementwise as _elementwise
from vit_fast.kernels.gelu_mlp import MlpGrads

from . import gelu_mlp as _triton
from .autograd_twin import twin
from .gelu_mlp import (gelu_mlp_backward_op, gelu_mlp_op, kept_grads, needs_pre, wanted_grads,
                       wanted_kwargs)


def register_variant(name, forward, backward):
    """Custom ops vit_fast::<name> and vit_fast::<name>_backward with vit_fast::gelu_mlp's schema
    and their eager twin; ``forward``/``backward`` take the launcher arguments of
    kernels/gelu_mlp.py. Returns the public-style wrapper (same arguments as
    vit_fast.ops.gelu_mlp.gelu_mlp) with ``.op``, ``.backward_op``, ``.fn`` (the eager twin)."""

    def fwd(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], approximate: str, residual: Optional[Tensor],
            layer_scale: Optional[Tensor], sample_scale: Optional[Tensor],
            save_pre: bool) -> tuple[Tensor, Tensor]:
        return forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                       layer_scale, sample_scale, save_pre)

    fwd_op = torch.library.custom_op(f"vit_fast::{name}", mutates_args=())(fwd)

    @reference_on_failure(name, reference_grad.gelu_mlp_backward)
    def bwd(grad: Tensor, x: Tensor, fc1_weight: Tensor, fc2_weight: Tensor,
            fc2_bias: Optional[Tensor], pre: Tensor, layer_scale: Optional[Tensor],
            sample_scale: Optional[Tensor], *, approximate: str, has_residual: bool,
            needs_fc1_bias: bool, needs_fc2_bias: bool, needs_layer_scale: bool,
            needs_sample_scale: bool) -> list[Tensor]:
        grads = backward(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale,
                         sample_scale, approximate=approximate, has_residual=has_residual,
                         wanted=MlpGrads(needs_fc1_bias, needs_fc2_bias, needs_layer_scale,
                                         needs_sample_scale))
        return [g if g is not None else x.new_empty(0) for g in grads]

    bwd_op = torch.library.custom_op(f"vit_fast::{name}_backward", mutates_args=())(bwd)

    # Same outputs as the Triton ops by contract: their fake kernels give the shapes.
    fwd_op.register_fake(lambda *args: gelu_mlp_op(*args))
    bwd_op.register_fake(lambda *args, **kwargs: gelu_mlp_backward_op(*args, **kwargs))

    def backward_fn(ctx, grad_out, _grad_pre, *, run=bwd_op):
        x, fc1_weight, fc2_weight, fc2_bias, pre, ls, ss = ctx.saved_tensors
        if pre.numel() == 0 and x.numel() != 0:
            raise RuntimeError(f"vit_fast::{name}: backward needs the pre-activation, but the "
                               "forward ran with save_pre=False")
        wanted = wanted_grads(ctx.needs_input_grad, ctx.has_fc1_bias, fc2_bias, ls, ss)
        grads = run(grad_out.contiguous(), x, fc1_weight, fc2_weight, fc2_bias, pre, ls, ss,
                    approximate=ctx.approximate, has_residual=ctx.has_residual,
                    **wanted_kwargs(wanted))
        kept = kept_grads(grads, wanted)
        return (*kept[:5], None, grad_out if ctx.has_residual else None, *kept[5:], None)

    fwd_op.register_autograd(backward_fn, setup_context=_triton._setup_context)
    fn = twin(f"{name}_fn", fwd, _triton._setup_context,
              lambda ctx, grad_out, grad_pre: backward_fn(ctx, grad_out, grad_pre, run=bwd))

    def run(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
            sample_scale, *, eager=False) -> Tensor:
        if residual is None:  # the contract scales only the residual branch
            layer_scale = sample_scale = None
        save_pre = needs_pre(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                             sample_scale)
        return (fn.apply if eager else fwd_op)(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                               approximate, residual, layer_scale, sample_scale,
                                               save_pre)[0]

    run.op, run.backward_op, run.fn, run.backward_kernels = fwd_op, bwd_op, fn, bwd
    return run


def _cublas_fwd(*args):
    return _elementwise.gelu_mlp_cublas_fwd(*args)


def _cublas_bwd(*args, **kwargs):
    return _elementwise.gelu_mlp_cublas_bwd(*args, **kwargs)


gelu_mlp = register_variant("gelu_mlp_cublas", _cublas_fwd, _cublas_bwd)
gelu_mlp_cublas_op = gelu_mlp.op
gelu_mlp_cublas_backward_op = gelu_mlp.backward_op
