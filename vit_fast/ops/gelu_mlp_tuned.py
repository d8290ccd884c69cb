"""The GELU MLP with its implementation chosen by measurement: custom op vit_fast::gelu_mlp_tuned
(+ _backward), and what the Block's residual->LayerNorm->MLP op runs under each policy.

Two implementations share one contract (kernels/gelu_mlp.py's launcher arguments and the tensors
saved for backward): the Triton GEMMs with fused epilogues (``triton``), and cuBLAS GEMMs with
the epilogues as Triton passes (``cublas``, kernels/gelu_elementwise.py). Under the ``auto``
policy vit_fast.tuning picks one per key -- forward and backward separately -- inside the op, at
run time, so a torch.compile graph holds one opaque op whatever is picked.

The candidates are module functions of the call's arguments: a key seen before costs a tuple and
a dict look-up (vit_fast/tuning.py), not a closure per candidate.
"""
from __future__ import annotations

import torch

from vit_fast import dispatch, reference, tuning
from vit_fast.kernels import gelu_elementwise as _elementwise
from vit_fast.kernels import gelu_mlp as _kernels

from . import gelu_mlp as _triton_op
from .gelu_mlp_cublas import gelu_mlp as cublas_mlp
from .gelu_mlp_cublas import register_variant


def _sig(t):
    return None if t is None else (t.shape, t.dtype)


def _triton_fwd(*args):
    return _kernels.gelu_mlp_fwd(*args, choose=tuning.choose_gemm_config)


def _cublas_fwd(*args):
    return _elementwise.gelu_mlp_cublas_fwd(*args)


def _triton_bwd(*args, approximate, has_residual, wanted):
    return _kernels.gelu_mlp_bwd(*args, approximate=approximate, has_residual=has_residual,
                                 wanted=wanted, choose=tuning.choose_gemm_config)


def _cublas_bwd(*args, approximate, has_residual, wanted):
    return _elementwise.gelu_mlp_cublas_bwd(*args, approximate=approximate,
                                            has_residual=has_residual, wanted=wanted)


FWD = {"triton": _triton_fwd, "cublas": _cublas_fwd}
BWD = {"triton": _triton_bwd, "cublas": _cublas_bwd}


def gelu_mlp_tuned_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                       layer_scale, sample_scale, save_pre):
    """kernels/gelu_mlp.gelu_mlp_fwd's contract; Triton or cuBLAS GEMMs, chosen per key."""
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
            sample_scale, save_pre)
    key = _fwd_key(*args)

    def describe():
        return tuning.make_key("gelu_mlp_fwd", dict(
            x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
            fc2_bias=fc2_bias, residual=residual, layer_scale=layer_scale,
            sample_scale=sample_scale), approximate=approximate, save_pre=save_pre)
    return tuning.select("gelu_mlp_fwd", key, FWD, x, args, describe)


def gelu_mlp_tuned_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                       *, approximate, has_residual, wanted):
    """kernels/gelu_mlp.gelu_mlp_bwd's contract; Triton or cuBLAS GEMMs, chosen per key."""
    args = (grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale)
    key = _bwd_key(*args, approximate, has_residual, wanted)
    cands = {name: _bound(fn, approximate, has_residual, wanted) for name, fn in BWD.items()}

    def describe():
        return tuning.make_key("gelu_mlp_bwd", dict(
            grad=grad, x=x, fc1_weight=fc1_weight, fc2_weight=fc2_weight, fc2_bias=fc2_bias,
            layer_scale=layer_scale, sample_scale=sample_scale), approximate=approximate,
            has_residual=has_residual, needs=tuple(wanted))
    return tuning.select("gelu_mlp_bwd", key, cands, x, args, describe)


def _fwd_key(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
             sample_scale, save_pre):
    return ("gelu_mlp_fwd", x.shape, x.dtype, x.device, fc1_weight.shape, fc2_weight.shape,
            fc1_weight.dtype, fc1_bias is None, fc2_bias is None, _sig(residual),
            layer_scale is None, sample_scale is None, approximate, save_pre)


def _bwd_key(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
             approximate, has_residual, wanted):
    return ("gelu_mlp_bwd", grad.shape, grad.dtype, x.shape, x.dtype, x.device, fc1_weight.shape,
            fc2_weight.shape, fc1_weight.dtype, _sig(fc2_bias), _sig(layer_scale),
            _sig(sample_scale), approximate, has_residual, tuple(wanted))


def forward_choice(*args):
    """The implementation gelu_mlp_tuned_fwd(*args) runs, once its key has been chosen (a
    function of the same arguments), or None while the choice is open: what a caller that holds
    one configuration (vit_fast/block_step.py) calls from then on, without the key."""
    name = tuning.tuner().choice(_fwd_key(*args))
    return FWD.get(name) if name is not None else None


def backward_choice(*args, approximate, has_residual, wanted):
    """As :func:`forward_choice`, for gelu_mlp_tuned_bwd: a function of its positional arguments,
    the keyword options bound."""
    name = tuning.tuner().choice(_bwd_key(*args, approximate, has_residual, wanted))
    fn = BWD.get(name) if name is not None else None
    return None if fn is None else _bound(fn, approximate, has_residual, wanted)


_BOUND = {}  # (fn, options) -> fn with the backward's keyword options bound (made once)


def _bound(fn, approximate, has_residual, wanted):
    k = (fn, approximate, has_residual, wanted)
    hit = _BOUND.get(k)
    if hit is None:
        def hit(*args):
            return fn(*args, approximate=approximate, has_residual=has_residual, wanted=wanted)
        hit.impl = fn  # which implementation (vit_fast/block_step.py binds the Triton one's)
        _BOUND[k] = hit
    return hit


gelu_mlp_tuned = register_variant("gelu_mlp_tuned", gelu_mlp_tuned_fwd, gelu_mlp_tuned_bwd)


def mlp_launchers(policy=None):
    """(forward launcher, eager backward, registered backward op) of the GELU MLP for a backend
    policy: what the Block's residual->LayerNorm->MLP op runs. 'auto' selects inside, per key."""
    policy = policy or dispatch.current_policy()
    if policy == "triton":
        return _triton_fwd, _triton_op.backward_kernels, torch.ops.vit_fast.gelu_mlp_backward
    if policy == "cublas":
        return (_cublas_fwd, cublas_mlp.backward_kernels,
                torch.ops.vit_fast.gelu_mlp_cublas_backward)
    return (gelu_mlp_tuned_fwd, gelu_mlp_tuned.backward_kernels,
            torch.ops.vit_fast.gelu_mlp_tuned_backward)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
             sample_scale, *, eager=False):
    """The kernel path of functional.gelu_mlp (inputs validated, autocast applied): the forced
    implementation, else the tuned op; with VIT_FAST_TUNE=speed also the eager reference.
    eager: call the ops' eager twins (plain tensors, nothing tracing)."""
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
            sample_scale)
    policy = dispatch.current_policy()
    if policy == "triton":
        return _triton_op.gelu_mlp(*args, op=_triton_op.GeluMlpFn.apply if eager else None)
    if policy == "cublas":
        return cublas_mlp(*args, eager=eager)
    if tuning.mode() != "speed" or torch.compiler.is_compiling() or not tuning.measurable(x):
        return gelu_mlp_tuned(*args, eager=eager)
    tensors = [t for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                           sample_scale) if t is not None]
    train = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def ref():
        return reference.gelu_mlp(*args[:5], approximate=approximate, residual=residual,
                                  layer_scale=layer_scale, sample_scale=sample_scale)

    cands = {"kernels": lambda: gelu_mlp_tuned(*args, eager=eager), "reference": ref}
    timed = {n: _with_backward(fn, tensors) if train else fn for n, fn in cands.items()}
    key = ("gelu_mlp", x.shape, x.dtype, x.device, fc1_weight.shape, fc2_weight.shape,
           _sig(fc1_bias), _sig(fc2_bias), _sig(residual), _sig(layer_scale),
           _sig(sample_scale), approximate, train)
    t = tuning.tuner()
    name = t.choice(key)
    if name is None:  # time forward(+backward) of each, then run the winner for its graph
        name, _ = t.run("gelu_mlp", key, timed, measure=True, device=x.device,
                        describe=lambda: tuning.make_key(
                            "gelu_mlp", dict(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
                                             fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                                             residual=residual, layer_scale=layer_scale,
                                             sample_scale=sample_scale),
                            approximate=approximate, train=train))
    return cands[name]()


def _with_backward(fn, tensors):
    """fn's forward and backward, as one timed step (grads returned, not accumulated)."""
    needs = [t for t in tensors if t.requires_grad]

    def step():
        out = fn()
        return torch.autograd.grad(out, needs, torch.ones_like(out))
    return step
