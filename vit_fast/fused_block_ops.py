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

import torch
import torch.nn.functional as F

from . import dispatch, functional
from .amp_weights import AmpWeights

__all__ = ["amp_weight", "kernel_reasons", "layer_norm_linear", "residual_layer_norm_mlp"]

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
