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
once per autocast region (:class:`AmpWeights`, freed with the graphs that saved them).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from . import dispatch, functional

__all__ = ["amp_weight", "kernel_reasons", "layer_norm_linear", "residual_layer_norm_mlp"]

class AmpWeights:
    """GEMM weights cast to the autocast dtype once per autocast region, like autocast's own
    weight cache: a cast is reused while the region lasts, the parameter is unchanged (its
    version) and the cast is alive. Casts are held only weakly here: autograd's saved tensors
    keep one for its backward, nothing keeps it after.

    The region is told by a sentinel: one fp32 leaf per (device, dtype) whose cast autocast
    itself caches -- read off an empty product that autocast computes with it -- and drops when
    the outermost region exits (torch.clear_autocast_cache). While that cast is alive the region
    is the same: one probe per region, instead of one per weight per call. Where autocast would
    not cache (its cache off, e.g. checkpoint's recompute, or inference mode, which records no
    graph to read the probe off) every call is a region of its own: each call casts."""

    def __init__(self):
        self._sentinels = {}  # (device, dtype) -> (sentinel leaf, weakref to its cast, token)
        self._casts = {}  # id(param) -> (region token, weakref param, version, weakref cast)

    def region(self, device, dtype):
        if torch.is_inference_mode_enabled() or not torch.is_autocast_cache_enabled():
            return object()
        hit = self._sentinels.get((device, dtype))
        if hit is not None and hit[1]() is not None:
            return hit[2]
        sentinel = hit[0] if hit is not None else torch.zeros(1, device=device,
                                                              requires_grad=True)
        with torch.enable_grad():
            probe = sentinel.new_empty((0, 1), dtype=dtype, requires_grad=True)
            cast = torch.matmul(probe, sentinel).grad_fn._saved_vec  # mv(probe, sentinel_cast)
        token = object()
        self._sentinels[(device, dtype)] = (sentinel, weakref.ref(cast), token)
        return token

    def cast(self, t, dtype, region):
        """t in ``dtype`` (None and tensors already in it pass through)."""
        if t is None or t.dtype == dtype:
            return t
        if not (t.is_leaf and t.dtype == torch.float32):
            return t.to(dtype)  # autocast caches fp32 leaves only: the rest casts every time
        key = id(t)
        entry = self._casts.get(key)
        if entry is not None and entry[0] is region and entry[2] == t._version \
                and entry[1]() is t:
            c = entry[3]()
            if c is not None and c.dtype == dtype:
                return c
        c = t.to(dtype)
        if len(self._casts) > 4096:  # entries of freed parameters: one per parameter ever cast
            self._casts.clear()
        self._casts[key] = (region, weakref.ref(t), t._version, weakref.ref(c))
        return c

    def live(self):
        """The entries whose cast is still alive (held by a graph)."""
        return {k: e for k, e in self._casts.items() if e[3]() is not None}

    def clear(self):
        self._casts.clear()


AMP_WEIGHTS = AmpWeights()


def _casts():
    """The live entries (tests)."""
    return AMP_WEIGHTS.live()


def clear_amp_weights():
    """Forget the weak entries (the casts themselves belong to the graphs that saved them)."""
    AMP_WEIGHTS.clear()


def amp_weight(t, dtype):
    """t cast to the autocast dtype once per autocast region (AmpWeights). None and tensors
    already in ``dtype`` pass through; torch.compile traces the cast itself."""
    if t is None or t.dtype == dtype:
        return t
    if torch.compiler.is_compiling():
        return t.to(dtype)
    return AMP_WEIGHTS.cast(t, dtype, AMP_WEIGHTS.region(t.device, dtype))


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
