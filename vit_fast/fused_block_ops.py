"""The two ops of vit_fast.Block's fused path, with the Block's backend decision in one place.

    layer_norm_linear(x, ...)        = Linear(LayerNorm(x))                        (LN1 -> qkv)
    residual_layer_norm_mlp(p, x, ...) = s + ls2·MLP(LayerNorm(s)),  s = x + ls1·p    (LN2 -> MLP)

With the kernels (``kernels=True``, see :func:`kernel_reasons`) each is one custom op whose
backward rebuilds the LayerNorm output instead of saving it (vit_fast/ops/layer_norm_linear.py,
residual_layer_norm_mlp.py). Otherwise they run as the public functional ops
(residual_layer_norm, gelu_mlp: their checks, autocast rules and reference backend) and an
F.linear, which is the same math.

Under torch.autocast the kernels run AMP's contract (FlashAttention's residual_in_fp32): the fp32
residual stream and LayerNorm parameters as they are, the GEMM weights cast to the autocast dtype
once per autocast region (:func:`amp_weight`: autocast's own weight cache, freed at the region's
exit).
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from . import dispatch, functional

__all__ = ["amp_weight", "kernel_reasons", "layer_norm_linear", "residual_layer_norm_mlp"]

# Weight casts for AMP are autocast's own: amp_weight takes the cast from autocast's weight cache,
# which holds it for the autocast region and drops it when the outermost region exits
# (torch.autocast.__exit__ -> torch.clear_autocast_cache), so the casts live exactly as long as
# eager's and eager ops on the same weight share them. PyTorch has no Python API to that cache and
# no exit hook, so _autocast_cached reads the cast off an empty product autocast computes with it.
# The thread-local dict (per thread like autocast's cache) only keeps weak references in front of
# it: id(parameter) -> (weakref to it, its version, dtype, weakref to the cast), so a hit costs a
# dict look-up and nothing here keeps a cast alive.
class _Local(threading.local):
    # casts made per thread on first access, not by the first call: an attribute set while Dynamo
    # traces is state it guards on, and the next call recompiled
    def __init__(self):
        self.casts = {}


_LOCAL = _Local()


def _casts():
    return _LOCAL.casts


def clear_amp_weights():
    """Forget the weak entries (the casts themselves belong to autocast's cache)."""
    _casts().clear()


def _autocast_cached(t, dtype):
    """t's cast from autocast's weight cache (made there if absent). matmul is on autocast's
    lower-precision list on CPU and CUDA; multiplied by an empty probe that requires grad, t's
    cast is what the product's backward saves and nothing is computed (a zero-size output)."""
    with torch.enable_grad():
        if t.dim() == 2:
            probe = t.new_empty((t.shape[1], 0), dtype=dtype, requires_grad=True)
            return torch.matmul(t, probe).grad_fn._saved_self  # mm(t_cast, probe)
        probe = t.new_empty((0, t.shape[0]), dtype=dtype, requires_grad=True)
        return torch.matmul(probe, t).grad_fn._saved_vec  # mv(probe, t_cast)


def _cacheable(t, dtype):
    """Where autocast itself caches a cast: a leaf fp32 parameter that requires grad, autocast on
    for its device with ``dtype`` and the cache enabled (cache_enabled=False, e.g. checkpoint's
    recompute, casts every time). Under inference_mode, which records no graph to read the cast
    off, each call casts (each weight is used once per forward)."""
    kind = t.device.type
    return (t.is_leaf and t.requires_grad and t.dtype == torch.float32 and t.dim() in (1, 2)
            and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and torch.is_autocast_enabled(kind)
            and torch.get_autocast_dtype(kind) == dtype and torch.is_autocast_cache_enabled())


def amp_weight(t, dtype):
    """t cast to the autocast dtype once per autocast region, shared with autocast's own cache
    (freed when the region exits). None and tensors already in ``dtype`` pass through; where
    autocast would not cache (see _cacheable; torch.compile traces the cast) it casts each call."""
    if t is None or t.dtype == dtype:
        return t
    if not _cacheable(t, dtype):
        return t.to(dtype)
    casts = _casts()
    hit = casts.get(id(t))
    old = hit[3]() if hit is not None and hit[0]() is t and hit[2] == dtype else None
    if old is not None and hit[1] == t._version:
        return old
    cast = _autocast_cached(t, dtype)
    if cast is old:
        # Updated in place inside the region (an optimizer step under autocast): autocast's
        # cache still holds the old values; follow the update, uncached.
        return t.to(dtype)
    casts[id(t)] = (weakref.ref(t), t._version, dtype, weakref.ref(cast, _forget(id(t), casts)))
    return cast


def _forget(key, casts):
    """A weakref callback that drops key's entry once its cast is freed (not a newer one)."""
    def drop(ref):
        entry = casts.get(key)
        if entry is not None and entry[3] is ref:
            del casts[key]
    return drop


def kernel_reasons(x, ln_tensors, mlp_tensors):
    """Why the Block's two ops cannot run as the kernels for this call; [] when they can.

    ln_tensors: every tensor the LayerNorm kernels read (x, LN weights and biases, LayerScales,
    the qkv weights the LN->Linear op multiplies); mlp_tensors: x and the MLP's weights.
    """
    if x.dim() < 2:
        return [f"x must be [B, N, C], got shape {tuple(x.shape)}"]
    amp = functional._autocast_dtype(x.device)
    if amp is not None:  # AMP's contract: fp32 stream and parameters, GEMMs in the autocast dtype
        if amp not in (torch.bfloat16, torch.float16):
            return [f"autocast dtype {amp} is not bfloat16/float16"]
        if any(t is not None and t.dtype != torch.float32 for t in (*ln_tensors, *mlp_tensors)):
            return ["under autocast the kernels take an fp32 stream and fp32 parameters"]
    ln = dispatch.choose("residual_layer_norm", ln_tensors, dim=x.shape[-1])
    mlp = dispatch.choose("gelu_mlp", mlp_tensors)
    return ([] if ln.backend == mlp.backend == "triton" else ln.reasons + mlp.reasons)


def layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias, *, kernels):
    """(LayerNorm(x)·ln_weight + ln_bias)·weightᵀ + bias; x [..., C] -> [..., O]."""
    if kernels:
        from .ops.layer_norm_linear import layer_norm_linear as op
        return op(x, ln_weight, ln_bias, eps, weight, bias)
    h = functional.residual_layer_norm(x, ln_weight, ln_bias, eps)[0]
    return F.linear(h, weight, bias)


def residual_layer_norm_mlp(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps,
                            fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2,
                            sample_scale2, *, kernels):
    """s + fc2(gelu(fc1(LayerNorm(s))))·layer_scale2·sample_scale2[b], with
    s = residual + x·layer_scale1·sample_scale1[b] (each scale optional)."""
    if kernels:
        from .ops.residual_layer_norm_mlp import residual_layer_norm_mlp as op
        return op(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps, fc1_weight,
                  fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2, sample_scale2)
    h, s = functional.residual_layer_norm(x, ln_weight, ln_bias, eps, residual=residual,
                                          layer_scale=layer_scale1, sample_scale=sample_scale1)
    return functional.gelu_mlp(h, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                               approximate=approximate, residual=s, layer_scale=layer_scale2,
                               sample_scale=sample_scale2)
