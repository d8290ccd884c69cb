"""The four public ops. Each checks its inputs, asks dispatch for a backend, and runs it.

Contracts: docs/design.md ("Public op contracts"). Bad input raises ValueError/TypeError naming the
argument before any backend runs, so every backend sees the same valid inputs.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from . import dispatch, reference
from .segments import segment_ids_from_lengths  # noqa: F401  (public here too: README)

__all__ = ["fused_qkv_attention", "qk_norm", "residual_layer_norm", "gelu_mlp", "patch_embed",
           "segment_ids_from_lengths"]

_APPROXIMATE = ("none", "tanh")
_QK_NORM_KINDS = ("layer", "rms")
# What the reference computes in (and the kernels take the first three of); float8 and complex
# tensors are floating point too but no op here is defined for them.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --- input checks, shared by the four ops ------------------------------------------------------

class DtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. Both a TypeError and a ValueError (as numpy's AxisError is
    both a ValueError and an IndexError), so either ``except`` a caller already has catches it."""


def _check_tensor(op, name, t, *, optional=False, floating=True, min_dim=None, dim=None):
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise DtypeError(f"{op}: {name} must be a floating-point tensor (float32, float16, "
                         f"bfloat16 or float64), got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")


def _check_shape(op, name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_same_device(op, ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             "all tensors must be on one device")


def _check_same_dtype(op, ref_name, ref, **others):
    """Tensors a GEMM or conv multiplies together share ref's dtype, as F.linear/F.conv2d
    require -- after autocast's casts (float64 is never cast), which make mixed inputs legal."""
    amp = _autocast_dtype(ref.device)

    def compute_dtype(t):
        return amp if (amp is not None and t.dtype != torch.float64) else t.dtype
    for name, t in others.items():
        if t is not None and compute_dtype(t) != compute_dtype(ref):
            raise DtypeError(f"{op}: {name} is {t.dtype} but {ref_name} is {ref.dtype}; they must "
                             "have one dtype (or run under torch.autocast, which casts them)")


def _check_finite(op, name, v):
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")


def _check_sample_scale(op, sample_scale, x):
    if sample_scale is None:
        return
    if x.dim() < 2:
        raise ValueError(f"{op}: sample_scale needs x with a batch dim first, got x {tuple(x.shape)}")
    _check_shape(op, "sample_scale", sample_scale, (x.shape[0],))


def _pair(op, name, v):
    if isinstance(v, numbers.Integral):
        v = (int(v), int(v))
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(p, numbers.Integral) and p > 0 for p in v)):
        raise ValueError(f"{op}: {name} must be a positive int or a pair of them, got {v!r}")
    return int(v[0]), int(v[1])


# --- autocast ---------------------------------------------------------------------------------
# Custom ops get no autocast rule of their own, so each op applies here what autocast does to the
# eager modules it replaces: GEMM-like ops (attention, MLP, patch conv) compute in the autocast
# dtype; LayerNorm runs in float32 (autocast's layer_norm policy on CUDA), which also keeps an fp32
# residual stream fp32. Like autocast, float64 tensors are never cast. The reference backend runs
# with autocast still on, as eager code would; a kernel backend runs with it off, so nothing inside
# a launcher or the extension is cast behind the op's back.

def _autocast_dtype(device):
    """torch.autocast's dtype when autocast is enabled for ``device``'s type, else None."""
    kind = device.type
    # cpu/cuda skip the availability query: torch.compile would leave it in the graph as a node.
    if kind not in ("cpu", "cuda") and not torch.amp.is_autocast_available(kind):
        return None
    if not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _cast(dtype, *tensors):
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _kernel_context(amp, device):
    return torch.autocast(device.type, enabled=False) if amp is not None else contextlib.nullcontext()


# --- ops --------------------------------------------------------------------------------------

def fused_qkv_attention(qkv, num_heads, *, scale=None, dropout_p=0.0, segment_ids=None):
    """softmax(q kᵀ·scale) v per head from timm's packed qkv.

    qkv: [B, N, 3·H·D], last dim laid out (3, H, D) like timm's ``qkv`` Linear output.
    Returns [B, N, H·D] (heads concatenated, ready for the proj Linear). scale defaults to D**-0.5.
    dropout_p is applied to the attention probabilities whenever it is > 0 (like
    F.scaled_dot_product_attention); modules pass it only in training.
    segment_ids: optional int32/int64 [B, N] on qkv's device, for packed variable-length batches
    (NaViT, NaFlexViT): query i attends to key j iff segment_ids[b, i] == segment_ids[b, j] >= 0.
    Tokens with a negative id are padding: their output rows are exactly 0 and their qkv rows get
    exactly 0 gradient. See segment_ids_from_lengths.
    """
    op = "fused_qkv_attention"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if head_dim > dispatch.MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {head_dim} (qkv last dim / (3*num_heads)) is above the "
                         f"supported maximum {dispatch.MAX_HEAD_DIM}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None:
        _check_finite(op, "scale", scale)
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    _check_segment_ids(op, segment_ids, qkv)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    amp = _autocast_dtype(qkv.device)
    if amp is not None:
        (qkv,) = _cast(amp, qkv)
    choice = dispatch.choose(op, [qkv], head_dim=head_dim, dropout_p=dropout_p,
                             segmented=segment_ids is not None)

    def kernel():
        from .ops import attention
        with _kernel_context(amp, qkv.device):
            return attention.fused_qkv_attention(qkv, int(num_heads), scale, float(dropout_p),
                                                 segment_ids)
    return dispatch.run(op, choice, kernel, lambda: reference.fused_qkv_attention(
        qkv, int(num_heads), scale=scale, dropout_p=dropout_p, segment_ids=segment_ids))


def _check_segment_ids(op, segment_ids, qkv):
    if segment_ids is None:
        return
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"{op}: segment_ids must be an int32/int64 torch.Tensor [B, N] or None, "
                        f"got {type(segment_ids).__name__}")
    if segment_ids.dtype not in (torch.int32, torch.int64):
        raise DtypeError(f"{op}: segment_ids must be int32 or int64, got {segment_ids.dtype}")
    _check_shape(op, "segment_ids", segment_ids, qkv.shape[:2])
    _check_same_device(op, "qkv", qkv, segment_ids=segment_ids)


def qk_norm(qkv, num_heads, q_weight, k_weight, q_bias=None, k_bias=None, *, kind="layer",
            eps=1e-6):
    """timm's packed qkv [B, N, 3·H·D] with q and k normalized over head_dim and v copied: a new
    contiguous qkv of the same layout, ready for :func:`fused_qkv_attention`.

    kind="layer": LayerNorm, (x - mean)·rsqrt(var + eps)·weight + bias — timm's ``qk_norm=True``
    (``q_norm = norm_layer(head_dim)``: weight and bias [D], shared by the heads).
    kind="rms": x·rsqrt(mean(x²) + eps)·weight (+ bias) — timm's RmsNorm, and vit-pytorch NaViT's
    ``RMSNorm(heads, dim_head)``, which computes F.normalize(x, dim=-1)·sqrt(D)·gamma with gamma
    [H, 1, D]: pass ``gamma.reshape(H, D)`` as the weight and eps=0. (F.normalize divides by
    max(‖x‖, 1e-12), i.e. x·sqrt(D)/‖x‖ = x·rsqrt(mean(x²)): the same as rms with eps 0 except
    for vectors of norm below 1e-12, which F.normalize leaves near 0 and eps=0 makes inf/NaN; a
    tiny eps such as 1e-12 keeps those finite.)
    Weights and biases: [D] (shared by the heads), [H, D] (per head) or None (no affine), one
    dtype for all of them: qkv's, or float32 under autocast. Statistics are fp32.
    """
    op = "qk_norm"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if kind not in _QK_NORM_KINDS:
        raise ValueError(f"{op}: kind must be one of {_QK_NORM_KINDS}, got {kind!r}")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{op}: eps must be a finite non-negative float, got {eps!r}")
    params = {"q_weight": q_weight, "k_weight": k_weight, "q_bias": q_bias, "k_bias": k_bias}
    for name, t in params.items():
        _check_tensor(op, name, t, optional=True)
        if t is not None and tuple(t.shape) not in ((head_dim,), (num_heads, head_dim)):
            raise ValueError(f"{op}: {name} must have shape ({head_dim},) (shared by the heads) or "
                             f"({num_heads}, {head_dim}) (per head), got {tuple(t.shape)}")
    _check_same_device(op, "qkv", qkv, **params)
    amp = _autocast_dtype(qkv.device)
    present = [(n, t) for n, t in params.items() if t is not None]
    if present:
        # The affine runs in fp32 like the statistics, so fp32 parameters with a low-precision
        # qkv are what autocast gives eager LayerNorm; outside autocast torch wants one dtype.
        _check_same_dtype(op, present[0][0], present[0][1], **dict(present[1:]))
        if amp is None:
            _check_same_dtype(op, "qkv", qkv, **dict(present))
    if amp is not None:
        (qkv,) = _cast(amp, qkv)
    choice = dispatch.choose(op, [qkv, q_weight, k_weight, q_bias, k_bias], head_dim=head_dim)

    def kernel():
        from .ops import qk_norm as qk
        with _kernel_context(amp, qkv.device):
            return qk.qk_norm(qkv, int(num_heads), q_weight, k_weight, q_bias, k_bias,
                              kind == "rms", float(eps))
    return dispatch.run(op, choice, kernel, lambda: reference.qk_norm(
        qkv, int(num_heads), q_weight, k_weight, q_bias, k_bias, kind=kind, eps=float(eps)))


def _packed_head_dim(op, qkv, num_heads):
    """head_dim D of a packed qkv [B, N, 3·H·D] with H = num_heads (checked)."""
    if not isinstance(num_heads, numbers.Integral) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"{op}: num_heads must be a positive int, got {num_heads!r}")
    if qkv.shape[-1] % (3 * num_heads) != 0 or qkv.shape[-1] == 0:
        raise ValueError(f"{op}: qkv's last dim ({qkv.shape[-1]}) must be 3*num_heads*head_dim "
                         f"(divisible by 3*num_heads = {3 * num_heads})")
    return qkv.shape[-1] // (3 * num_heads)


def residual_layer_norm(x, weight, bias, eps, *, residual=None, layer_scale=None, sample_scale=None):
    """(y, s): s = x, or residual + x·layer_scale·sample_scale[b]; y = LayerNorm(s)·weight + bias.

    x, residual: [..., C]; weight, bias, layer_scale: [C] (each may be None); sample_scale: [B]
    (drop-path keep mask already divided by the keep probability), B = x.shape[0].
    Statistics are fp32 whatever the input dtype.
    """
    op = "residual_layer_norm"
    _check_tensor(op, "x", x, min_dim=1)
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("layer_scale", layer_scale)):
        _check_tensor(op, name, t, optional=True, dim=1)
        _check_shape(op, name, t, (C,))
    _check_tensor(op, "residual", residual, optional=True)
    _check_shape(op, "residual", residual, x.shape)
    _check_tensor(op, "sample_scale", sample_scale, optional=True)
    _check_sample_scale(op, sample_scale, x)
    if (layer_scale is not None or sample_scale is not None) and residual is None:
        raise ValueError(f"{op}: layer_scale and sample_scale scale the branch added to residual; "
                         "pass residual too")
    if not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite non-negative float, got {eps!r}")
    _check_same_device(op, "x", x, weight=weight, bias=bias, residual=residual,
                       layer_scale=layer_scale, sample_scale=sample_scale)
    amp = _autocast_dtype(x.device)
    if amp is not None:
        x, weight, bias, residual, layer_scale, sample_scale = _cast(
            torch.float32, x, weight, bias, residual, layer_scale, sample_scale)
    tensors = [x, weight, bias, residual, layer_scale, sample_scale]
    choice = dispatch.choose(op, tensors, dim=C)

    def kernel():
        from .ops import layer_norm
        with _kernel_context(amp, x.device):
            return layer_norm.residual_layer_norm(x, weight, bias, float(eps), residual,
                                                  layer_scale, sample_scale)
    return dispatch.run(op, choice, kernel, lambda: reference.residual_layer_norm(
        x, weight, bias, float(eps), residual=residual, layer_scale=layer_scale,
        sample_scale=sample_scale))


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=None,
             layer_scale=None, sample_scale=None):
    """fc2(gelu(fc1(x))), then residual + that·layer_scale·sample_scale[b] when residual is given.

    x: [..., C]; fc1_weight [H, C], fc1_bias [H], fc2_weight [C_out, H], fc2_bias [C_out] (nn.Linear
    layout; biases may be None); residual [..., C_out]; layer_scale [C_out]; sample_scale [B].
    approximate: "none" (erf, nn.GELU's default) or "tanh".
    """
    op = "gelu_mlp"
    _check_tensor(op, "x", x, min_dim=1)
    _check_tensor(op, "fc1_weight", fc1_weight, dim=2)
    _check_tensor(op, "fc2_weight", fc2_weight, dim=2)
    C, (H, C1), (Co, H2) = x.shape[-1], fc1_weight.shape, fc2_weight.shape
    if C1 != C:
        raise ValueError(f"{op}: fc1_weight must be [hidden, {C}] to match x [..., {C}], "
                         f"got {tuple(fc1_weight.shape)}")
    if H2 != H:
        raise ValueError(f"{op}: fc2_weight must be [out, {H}] to match fc1_weight "
                         f"{tuple(fc1_weight.shape)}, got {tuple(fc2_weight.shape)}")
    for name, t, n in (("fc1_bias", fc1_bias, H), ("fc2_bias", fc2_bias, Co),
                       ("layer_scale", layer_scale, Co)):
        _check_tensor(op, name, t, optional=True, dim=1)
        _check_shape(op, name, t, (n,))
    if approximate not in _APPROXIMATE:
        raise ValueError(f"{op}: approximate must be one of {_APPROXIMATE}, got {approximate!r}")
    _check_tensor(op, "residual", residual, optional=True)
    _check_shape(op, "residual", residual, tuple(x.shape[:-1]) + (Co,))
    _check_tensor(op, "sample_scale", sample_scale, optional=True)
    _check_sample_scale(op, sample_scale, x)
    if (layer_scale is not None or sample_scale is not None) and residual is None:
        raise ValueError(f"{op}: layer_scale and sample_scale scale the branch added to residual; "
                         "pass residual too")
    _check_same_device(op, "x", x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                       fc2_bias=fc2_bias, residual=residual, layer_scale=layer_scale,
                       sample_scale=sample_scale)
    # residual, layer_scale and sample_scale are added/multiplied, so they promote as in torch.
    _check_same_dtype(op, "x", x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias)
    amp = _autocast_dtype(x.device)
    if amp is not None:
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = _cast(
            amp, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        if residual is not None and any(t is not None and t.dtype != amp
                                        for t in (residual, layer_scale, sample_scale)):
            # Eager adds the low-precision branch to a wider residual stream in that wider dtype;
            # the kernels take one dtype, so the add runs unfused to keep the stream's precision.
            branch = gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                              approximate=approximate)
            return reference.add_branch(residual, branch, layer_scale, sample_scale)
    tensors = [x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale, sample_scale]
    choice = dispatch.choose(op, tensors)
    def kernel():
        from . import tuning  # triton, cublas, or chosen by measurement (auto)
        with _kernel_context(amp, x.device):
            return tuning.gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                                   residual, layer_scale, sample_scale)
    return dispatch.run(op, choice, kernel, lambda: reference.gelu_mlp(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate=approximate, residual=residual,
        layer_scale=layer_scale, sample_scale=sample_scale))


def patch_embed(images, weight, bias, *, patch_size, pos_embed=None, mean=None, std=None):
    """Non-overlapping patch projection (timm's PatchEmbed conv + flatten), [B, Np, D].

    images: float [B, C, H, W] (any strides), or uint8 [B, H, W, C] as decoded, normalized as
    (images/255 - mean)/std per channel (mean and std required then). weight: [D, C, ph, pw]
    (Conv2d layout), bias: [D] or None, pos_embed: [1, Np, D] or None. H and W must be multiples of
    the patch (pad first for dynamic sizes, as PatchEmbed(dynamic_img_pad=True) does).
    """
    op = "patch_embed"
    _check_tensor(op, "images", images, floating=False, dim=4)
    _check_tensor(op, "weight", weight, dim=4)
    ph, pw = _pair(op, "patch_size", patch_size)
    D, C = weight.shape[:2]
    if tuple(weight.shape[2:]) != (ph, pw):
        raise ValueError(f"{op}: weight's kernel {tuple(weight.shape[2:])} must equal patch_size "
                         f"{(ph, pw)}")
    if images.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError(f"{op}: uint8 images need mean and std (per channel) to normalize "
                             "(images/255 - mean)/std")
        if images.shape[-1] != C:
            raise ValueError(f"{op}: uint8 images must be NHWC [B, H, W, {C}] (weight has {C} input "
                             f"channels), got {tuple(images.shape)}")
        std_given = std
        mean = _channel_vector(op, "mean", mean, C, images.device)
        std = _channel_vector(op, "std", std, C, images.device)
        _check_nonzero_std(op, std_given, std)
        H, W = images.shape[1:3]
    else:
        if images.dtype not in _FLOAT_DTYPES:
            raise DtypeError(f"{op}: images must be floating-point NCHW or uint8 NHWC, "
                            f"got {images.dtype}")
        if mean is not None or std is not None:
            raise ValueError(f"{op}: mean/std normalize uint8 images only; float images are taken "
                             "as already normalized")
        if images.shape[1] != C:
            hint = " (this looks NHWC; float images must be NCHW)" if images.shape[-1] == C else ""
            raise ValueError(f"{op}: images must be [B, {C}, H, W] to match weight's {C} input "
                             f"channels, got {tuple(images.shape)}{hint}")
        H, W = images.shape[2:]
    if H % ph or W % pw:
        raise ValueError(f"{op}: image size {H}x{W} is not divisible by patch size {ph}x{pw}")
    num_patches = (H // ph) * (W // pw)
    _check_tensor(op, "bias", bias, optional=True, dim=1)
    _check_shape(op, "bias", bias, (D,))
    _check_tensor(op, "pos_embed", pos_embed, optional=True)
    _check_shape(op, "pos_embed", pos_embed, (1, num_patches, D))
    _check_same_device(op, "images", images, weight=weight, bias=bias, pos_embed=pos_embed)
    # pos_embed is added, so it promotes as in torch; the conv's operands must agree.
    _check_same_dtype(op, "weight", weight, bias=bias,
                      images=images if images.is_floating_point() else None)
    amp = _autocast_dtype(images.device)
    if amp is not None:
        images, weight, bias = _cast(amp, images, weight, bias)
        if pos_embed is not None and pos_embed.dtype != amp:
            # conv(low precision) + a wider pos_embed is wider in eager: add it unfused.
            out = patch_embed(images, weight, bias, patch_size=(ph, pw), mean=mean, std=std)
            return out + pos_embed
    choice = dispatch.choose(op, [images, weight, bias, pos_embed])

    def kernel():
        from .ops import patch_embed as pe
        with _kernel_context(amp, images.device):
            return pe.patch_embed(images, weight, bias, (ph, pw), pos_embed, mean, std)
    return dispatch.run(op, choice, kernel, lambda: reference.patch_embed(
        images, weight, bias, patch_size=(ph, pw), pos_embed=pos_embed, mean=mean, std=std))


def _check_nonzero_std(op, given, std):
    """std == 0 would divide by zero. Python numbers (the usual constants) are checked as such;
    a tensor's values are data: checked eagerly, and as a runtime assert inside torch.compile,
    where reading them back (bool(...)) would break the graph."""
    if not isinstance(given, torch.Tensor):
        values = given if isinstance(given, (list, tuple)) else [given]
        if all(isinstance(v, numbers.Real) for v in values):
            if any(v == 0 for v in values):
                raise ValueError(f"{op}: std must be non-zero, got {given!r}")
            return
    if torch.compiler.is_compiling():
        torch._assert_async((std != 0).all(), f"{op}: std must be non-zero")
    elif bool((std == 0).any()):
        raise ValueError(f"{op}: std must be non-zero, got {std.tolist()}")


def _channel_vector(op, name, v, C, device):
    t = torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
    if t.numel() != C:
        raise ValueError(f"{op}: {name} must have one value per channel ({C}), got {t.numel()}")
    return t
