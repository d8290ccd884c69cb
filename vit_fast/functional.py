"""The public ops. Each checks its inputs, asks dispatch for a backend, and runs it.

Contracts: docs/design.md ("Public op contracts"). Bad input raises ValueError/TypeError naming the
argument before any backend runs, so every backend sees the same valid inputs.

The host path (vit_fast/plans.py): a call's checks, backend choice, autocast rules and the choice
between an op's eager twin and its registered custom op are made once per configuration -- the
arguments' types, shapes, dtypes and devices, the other arguments' values, the policy and
autocast -- and kept as a *plan*, a function that runs exactly what was decided. A repeat call
builds one tuple and runs its plan. Under torch.compile every call takes the full path, so the
checks and choices trace into the graph.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import dispatch, plans, reference
from .errors import DtypeError
from .segments import segment_ids_from_lengths  # noqa: F401  (public here too: README)

__all__ = ["fused_qkv_attention", "qk_norm", "residual_layer_norm", "gelu_mlp", "patch_embed",
           "segment_ids_from_lengths", "rotary_qk", "glu_mlp"]

_APPROXIMATE = ("none", "tanh")
_QK_NORM_KINDS = ("layer", "rms")
# What the reference computes in (and the kernels take the first three of); float8 and complex
# tensors are floating point too but no op here is defined for them.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# --- input checks, shared by the four ops ------------------------------------------------------

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


def _traced_float(v) -> bool:
    """Whether v is a float torch.compile traces symbolically (a recompile with another value, or
    automatic dynamic floats): checked by torch._check in the graph, where it is concrete,
    never by math.isfinite (which dynamo cannot trace on a symbol)."""
    return isinstance(v, torch.SymFloat) or (torch.compiler.is_compiling()
                                             and isinstance(v, float))


def _check_finite(op, name, v):
    if _traced_float(v):
        # The messages name no argument: torch 2.11's dynamo cannot trace a message that reads a
        # variable from outside the lambda (a graph break), so the traced checks name only the value.
        torch._check(v - v == 0, lambda: "vit_fast: a float argument must be finite")  # inf - inf
        return
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite float, got {v!r}")


def _check_eps(op, eps):
    if _traced_float(eps):
        torch._check(eps >= 0, lambda: "vit_fast: eps must be a finite non-negative float")
        torch._check(eps - eps == 0, lambda: "vit_fast: eps must be a finite non-negative float")
        return
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not math.isfinite(eps) \
            or eps < 0:
        raise ValueError(f"{op}: eps must be a finite non-negative float, got {eps!r}")


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


_PLANS = plans.Plans()


def _planned(build, args, first):
    """The result of the plan for ``args`` (``build(*args)`` makes it, validating them, the first
    time a configuration is seen); ``first``: the tensor whose device autocast is read for."""
    if torch.compiler.is_compiling():
        return build(*args)(*args)
    try:
        key = (build, *map(plans.meta, args), *plans.state(first.device.type))
        plan = _PLANS.get(key)
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument: the checks say
        return build(*args)(*args)
    if plan is None:
        plan = _PLANS.put(key, build(*args))
    return plan(*args)


def _run(op, choice, amp, device_type, kernel, ref, args):
    """kernel(*args) with autocast off where it was on (or the reference, dispatch.run's rules)."""
    if amp is None:
        return dispatch.run(op, choice, lambda: kernel(*args), lambda: ref(*args))

    def off():
        # traced: torch.autocast, which dynamo records (a raw switch it would reject)
        with (torch.autocast(device_type, enabled=False) if torch.compiler.is_compiling()
              else plans.NoAutocast(device_type)):
            return kernel(*args)
    return dispatch.run(op, choice, off, lambda: ref(*args))


# --- ops --------------------------------------------------------------------------------------

def fused_qkv_attention(qkv, num_heads, *, scale=None, dropout_p=0.0, segment_ids=None,
                        bias=None):
    """softmax(q kᵀ·scale) v per head from timm's packed qkv.

    qkv: [B, N, 3·H·D], last dim laid out (3, H, D) like timm's ``qkv`` Linear output.
    Returns [B, N, H·D] (heads concatenated, ready for the proj Linear). scale defaults to D**-0.5.
    dropout_p is applied to the attention probabilities whenever it is > 0 (like
    F.scaled_dot_product_attention); modules pass it only in training.
    segment_ids: optional int32/int64 [B, N] on qkv's device, for packed variable-length batches
    (NaViT, NaFlexViT): query i attends to key j iff segment_ids[b, i] == segment_ids[b, j] >= 0.
    Tokens with a negative id are padding: their output rows are exactly 0 and their qkv rows get
    exactly 0 gradient. See segment_ids_from_lengths.
    bias: optional float [H, N, N] (shared by the batch, BEiT's relative position bias) or
    [1 or B, H, N, N], added to the scaled logits: softmax(q kᵀ·scale + bias) v. It gets its
    gradient (summed over the batch) when it requires one 
    """
    if bias is not None:
        return _planned(_biased_attention_plan,
                        (qkv, num_heads, scale, dropout_p, segment_ids, bias), qkv)
    return _planned(_attention_plan, (qkv, num_heads, scale, dropout_p, segment_ids), qkv)


def _attention_plan(qkv, num_heads, scale, dropout_p, segment_ids):
    op = "fused_qkv_attention"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if head_dim > dispatch.MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {head_dim} (qkv last dim / (3*num_heads)) is above the "
                         f"supported maximum {dispatch.MAX_HEAD_DIM}")
    if scale is not None and not isinstance(scale, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    if scale is not None:
        _check_finite(op, "scale", scale)
    if _traced_float(dropout_p):
        torch._check(dropout_p >= 0, lambda: "vit_fast: dropout_p must be a float in [0, 1)")
        torch._check(dropout_p < 1, lambda: "vit_fast: dropout_p must be a float in [0, 1)")
    elif not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    _check_segment_ids(op, segment_ids, qkv)
    scale_f = float(head_dim ** -0.5) if scale is None else scale
    heads, p = int(num_heads), float(dropout_p) if isinstance(dropout_p, numbers.Real) else dropout_p
    amp = _autocast_dtype(qkv.device)
    cast = _cast(amp, qkv)[0] if amp is not None else qkv
    choice = dispatch.choose(op, [cast], head_dim=head_dim, dropout_p=dropout_p,
                             segmented=segment_ids is not None)

    def ref(qkv, num_heads, scale, dropout_p, segment_ids):
        return reference.fused_qkv_attention(qkv, heads, scale=scale_f, dropout_p=p,
                                             segment_ids=segment_ids)
    if choice.backend == "reference":
        def plan(qkv, num_heads, scale, dropout_p, segment_ids):
            if amp is not None:
                (qkv,) = _cast(amp, qkv)
            return ref(qkv, num_heads, scale, dropout_p, segment_ids)
        return plan
    from .ops import attention
    fn = attention.AttentionFn.apply if plans.eager(qkv, segment_ids) else None

    def kernel(qkv, num_heads, scale, dropout_p, segment_ids):
        return attention.fused_qkv_attention(qkv, heads, scale_f, p, segment_ids, op=fn)

    def plan(qkv, num_heads, scale, dropout_p, segment_ids):
        if amp is not None:
            (qkv,) = _cast(amp, qkv)
        return _run(op, choice, amp, qkv.device.type, kernel, ref,
                    (qkv, num_heads, scale, dropout_p, segment_ids))
    return plan


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
    return _planned(_qk_norm_plan, (qkv, num_heads, q_weight, k_weight, q_bias, k_bias, kind, eps),
                    qkv)


def _qk_norm_plan(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, kind, eps):
    op = "qk_norm"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if kind not in _QK_NORM_KINDS:
        raise ValueError(f"{op}: kind must be one of {_QK_NORM_KINDS}, got {kind!r}")
    _check_eps(op, eps)
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
    cast = _cast(amp, qkv)[0] if amp is not None else qkv
    choice = dispatch.choose(op, [cast, q_weight, k_weight, q_bias, k_bias], head_dim=head_dim)
    heads, eps_f = int(num_heads), float(eps)

    def ref(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, kind, eps):
        return reference.qk_norm(qkv, heads, q_weight, k_weight, q_bias, k_bias, kind=kind,
                                 eps=eps_f)
    if choice.backend == "reference":
        def plan(qkv, *rest):
            return ref(_cast(amp, qkv)[0] if amp is not None else qkv, *rest)
        return plan
    from .ops import qk_norm as qk
    fn = qk.QkNormFn.apply if plans.eager(qkv, q_weight, k_weight, q_bias, k_bias) else None

    def kernel(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, kind, eps):
        return qk.qk_norm(qkv, heads, q_weight, k_weight, q_bias, k_bias, kind == "rms", eps_f,
                          op=fn)

    def plan(qkv, *rest):
        if amp is not None:
            (qkv,) = _cast(amp, qkv)
        return _run(op, choice, amp, qkv.device.type, kernel, ref, (qkv, *rest))
    return plan


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
    return _planned(_layer_norm_plan, (x, weight, bias, eps, residual, layer_scale, sample_scale),
                    x)


def _layer_norm_plan(x, weight, bias, eps, residual, layer_scale, sample_scale):
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
    _check_eps(op, eps)
    _check_same_device(op, "x", x, weight=weight, bias=bias, residual=residual,
                       layer_scale=layer_scale, sample_scale=sample_scale)
    amp = _autocast_dtype(x.device)
    tensors = [x, weight, bias, residual, layer_scale, sample_scale]
    if amp is not None:
        tensors = list(_cast(torch.float32, *tensors))
    choice = dispatch.choose(op, tensors, dim=C)
    eps_f = float(eps) if isinstance(eps, numbers.Real) else eps

    def ref(x, weight, bias, eps, residual, layer_scale, sample_scale):
        return reference.residual_layer_norm(x, weight, bias, eps_f, residual=residual,
                                             layer_scale=layer_scale, sample_scale=sample_scale)
    if choice.backend == "reference":
        def plan(x, weight, bias, eps, residual, layer_scale, sample_scale):
            if amp is not None:
                x, weight, bias, residual, layer_scale, sample_scale = _cast(
                    torch.float32, x, weight, bias, residual, layer_scale, sample_scale)
            return ref(x, weight, bias, eps, residual, layer_scale, sample_scale)
        return plan
    from .ops import layer_norm
    fn = layer_norm.ResidualLayerNormFn.apply if plans.eager(*tensors) else None

    def kernel(x, weight, bias, eps, residual, layer_scale, sample_scale):
        return layer_norm.residual_layer_norm(x, weight, bias, eps_f, residual, layer_scale,
                                              sample_scale, op=fn)

    def plan(x, weight, bias, eps, residual, layer_scale, sample_scale):
        if amp is not None:
            x, weight, bias, residual, layer_scale, sample_scale = _cast(
                torch.float32, x, weight, bias, residual, layer_scale, sample_scale)
        return _run(op, choice, amp, x.device.type, kernel, ref,
                    (x, weight, bias, eps, residual, layer_scale, sample_scale))
    return plan


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=None,
             layer_scale=None, sample_scale=None):
    """fc2(gelu(fc1(x))), then residual + that·layer_scale·sample_scale[b] when residual is given.

    x: [..., C]; fc1_weight [H, C], fc1_bias [H], fc2_weight [C_out, H], fc2_bias [C_out] (nn.Linear
    layout; biases may be None); residual [..., C_out]; layer_scale [C_out]; sample_scale [B].
    approximate: "none" (erf, nn.GELU's default) or "tanh".
    """
    return _planned(_gelu_mlp_plan, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                                     residual, layer_scale, sample_scale), x)


def _gelu_mlp_plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                   layer_scale, sample_scale):
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
    gemm = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if amp is not None:
        gemm = _cast(amp, *gemm)
        if residual is not None and any(t is not None and t.dtype != amp
                                        for t in (residual, layer_scale, sample_scale)):
            # Eager adds the low-precision branch to a wider residual stream in that wider dtype;
            # the kernels take one dtype, so the add runs unfused to keep the stream's precision.
            def unfused(x, w1, b1, w2, b2, approximate, residual, layer_scale, sample_scale):
                branch = gelu_mlp(*_cast(amp, x, w1, b1, w2, b2), approximate=approximate)
                return reference.add_branch(residual, branch, layer_scale, sample_scale)
            return unfused
    choice = dispatch.choose(op, [*gemm, residual, layer_scale, sample_scale])

    def ref(x, w1, b1, w2, b2, approximate, residual, layer_scale, sample_scale):
        return reference.gelu_mlp(x, w1, b1, w2, b2, approximate=approximate, residual=residual,
                                  layer_scale=layer_scale, sample_scale=sample_scale)
    if choice.backend == "reference":
        def plan(x, w1, b1, w2, b2, *rest):
            if amp is not None:
                x, w1, b1, w2, b2 = _cast(amp, x, w1, b1, w2, b2)
            return ref(x, w1, b1, w2, b2, *rest)
        return plan
    from .ops import gelu_mlp_tuned  # triton, cublas, or chosen by measurement (auto)
    eager = plans.eager(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                        sample_scale)

    def kernel(*args):
        return gelu_mlp_tuned.gelu_mlp(*args, eager=eager)

    def plan(x, w1, b1, w2, b2, *rest):
        if amp is not None:
            x, w1, b1, w2, b2 = _cast(amp, x, w1, b1, w2, b2)
        return _run(op, choice, amp, x.device.type, kernel, ref, (x, w1, b1, w2, b2, *rest))
    return plan


def patch_embed(images, weight, bias, *, patch_size, pos_embed=None, mean=None, std=None):
    """Non-overlapping patch projection (timm's PatchEmbed conv + flatten), [B, Np, D].

    images: float [B, C, H, W] (any strides), or uint8 [B, H, W, C] as decoded, normalized as
    (images/255 - mean)/std per channel (mean and std required then). weight: [D, C, ph, pw]
    (Conv2d layout), bias: [D] or None, pos_embed: [1, Np, D] or None. H and W must be multiples of
    the patch (pad first for dynamic sizes, as PatchEmbed(dynamic_img_pad=True) does).
    """
    return _planned(_patch_embed_plan, (images, weight, bias, patch_size, pos_embed, mean, std),
                    images)


def _patch_embed_plan(images, weight, bias, patch_size, pos_embed, mean, std):
    op = "patch_embed"
    _check_tensor(op, "images", images, floating=False, dim=4)
    _check_tensor(op, "weight", weight, dim=4)
    ph, pw = _pair(op, "patch_size", patch_size)
    D, C = weight.shape[:2]
    if tuple(weight.shape[2:]) != (ph, pw):
        raise ValueError(f"{op}: weight's kernel {tuple(weight.shape[2:])} must equal patch_size "
                         f"{(ph, pw)}")
    channel_vectors = None
    if images.dtype == torch.uint8:
        if mean is None or std is None:
            raise ValueError(f"{op}: uint8 images need mean and std (per channel) to normalize "
                             "(images/255 - mean)/std")
        if images.shape[-1] != C:
            raise ValueError(f"{op}: uint8 images must be NHWC [B, H, W, {C}] (weight has {C} input "
                             f"channels), got {tuple(images.shape)}")
        channel_vectors = _channel_vectors(op, mean, std, C, images.device)
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
    conv = (images, weight, bias)
    if amp is not None:
        conv = _cast(amp, *conv)
        if pos_embed is not None and pos_embed.dtype != amp:
            # conv(low precision) + a wider pos_embed is wider in eager: add it unfused.
            def unfused(images, weight, bias, patch_size, pos_embed, mean, std):
                out = patch_embed(*_cast(amp, images, weight, bias), patch_size=(ph, pw),
                                  mean=mean, std=std)
                return out + pos_embed
            return unfused
    choice = dispatch.choose(op, [*conv, pos_embed])

    def ref(images, weight, bias, patch_size, pos_embed, mean, std):
        mean, std = channel_vectors(mean, std) if channel_vectors is not None else (mean, std)
        return reference.patch_embed(images, weight, bias, patch_size=(ph, pw),
                                     pos_embed=pos_embed, mean=mean, std=std)
    if choice.backend == "reference":
        def plan(images, weight, bias, *rest):
            if amp is not None:
                images, weight, bias = _cast(amp, images, weight, bias)
            return ref(images, weight, bias, *rest)
        return plan
    from .ops import patch_embed as pe

    def kernel(images, weight, bias, patch_size, pos_embed, mean, std):
        mean, std = channel_vectors(mean, std) if channel_vectors is not None else (mean, std)
        return pe.patch_embed(images, weight, bias, (ph, pw), pos_embed, mean, std)

    def plan(images, weight, bias, *rest):
        if amp is not None:
            images, weight, bias = _cast(amp, images, weight, bias)
        return _run(op, choice, amp, images.device.type, kernel, ref, (images, weight, bias, *rest))
    return plan


def _channel_vectors(op, mean, std, C, device):
    """(mean, std) -> their fp32 [C] tensors on ``device``, as a function of the call's mean and
    std. Numbers (the usual constants) are checked and put on the device once, here: a call then
    copies nothing from the host and reads nothing back (no sync; CUDA-graph safe). Tensors are
    the call's data: converted per call, std == 0 checked on the device (_check_nonzero_std)."""
    m, s = _channel_vector(op, "mean", mean, C, device), _channel_vector(op, "std", std, C, device)
    _check_nonzero_std(op, std, s)
    if not isinstance(mean, torch.Tensor) and not isinstance(std, torch.Tensor):
        return lambda mean, std: (m, s)

    def per_call(mean, std):
        t = _channel_vector(op, "std", std, C, device)
        _check_nonzero_std(op, std, t)
        return _channel_vector(op, "mean", mean, C, device), t
    return per_call


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
    if torch.compiler.is_compiling() or std.device.type != "cpu":
        # on a GPU, reading the values back would stall the host (and break a CUDA graph):
        # the check runs on the device and fails the stream instead
        torch._assert_async((std != 0).all(), f"{op}: std must be non-zero")
    elif bool((std == 0).any()):
        raise ValueError(f"{op}: std must be non-zero, got {std.tolist()}")


def _channel_vector(op, name, v, C, device):
    t = torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
    if t.numel() != C:
        raise ValueError(f"{op}: {name} must have one value per channel ({C}), got {t.numel()}")
    return t


# --- rotary embeddings, the attention bias and the gated MLP (issue 28) ------------------------

def rotary_qk(qkv, num_heads, sin, cos, *, num_prefix_tokens=0, half=False):
    """timm's packed qkv [B, N, 3·H·D] with rotary position embeddings applied to q and k as
    timm's EvaAttention / AttentionRope apply them (apply_rot_embed_cat), v copied: a new qkv of
    the same layout, ready for :func:`fused_qkv_attention`.

    Tokens n >= num_prefix_tokens are rotated with row n - num_prefix_tokens of sin and cos;
    the prefix (class, register) tokens pass through. sin, cos: [N', D], [H, N', D] or
    [B or 1, H or 1, N', D] with N' = N - num_prefix_tokens (timm's rope tensor is
    ``cat([sin, cos], -1)``: pass its two halves). half=False: the interleaved layout
    (rot(x) = [-x1, x0, -x3, x2, ...]), half=True: the half-split one. The rotation runs in fp32.
    sin and cos get gradients when they require them (timm's mixed RoPE).
    """
    return _planned(_rotary_qk_plan,
                    (qkv, num_heads, sin, cos, num_prefix_tokens, half), qkv)


def glu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate_last=False, norm_weight=None,
            norm_bias=None, norm_eps=None, residual=None, layer_scale=None, sample_scale=None):
    """fc2(norm(silu(gate)·value)), timm's GluMlp(act_layer=nn.SiLU) and SwiGLU; then, when
    residual is given, residual + that·layer_scale·sample_scale[b].

    fc1_weight: packed [2H, C] (GluMlp: fc1's output chunked into x1 | x2; the gate is x2 with
    gate_last, else x1) or a (gate, value) pair of [H, C] weights (SwiGLU's fc1_g, fc1_x);
    fc1_bias in the same form, or None. norm_eps not None: a LayerNorm over the H hidden units
    (norm_weight, norm_bias [H] or None) between the gating and fc2 (EVA02 base's scale_mlp).
    """
    op = "glu_mlp"
    w1, w1v = _fc1_pair(op, "fc1_weight", fc1_weight)
    b1, b1v = _fc1_pair(op, "fc1_bias", fc1_bias) if fc1_bias is not None else (None, None)
    if fc1_bias is not None and (w1v is None) != (b1v is None):
        raise ValueError(f"{op}: fc1_bias must have fc1_weight's form (a tensor for a packed "
                         "weight, a (gate, value) pair for a pair)")
    # the pairs travel as separate arguments: a plan's key holds tensors by their metadata
    return _planned(_glu_mlp_plan,
                    (x, w1, w1v, b1, b1v, fc2_weight, fc2_bias, gate_last, norm_weight,
                     norm_bias, norm_eps, residual, layer_scale, sample_scale), x)


def _biased_attention_plan(qkv, num_heads, scale, dropout_p, segment_ids, bias):
    op = "fused_qkv_attention"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if scale is not None:
        if not isinstance(scale, numbers.Real):
            raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
        _check_finite(op, "scale", scale)
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    _check_segment_ids(op, segment_ids, qkv)
    _check_tensor(op, "bias", bias)
    B, N = qkv.shape[0], qkv.shape[1]
    shape = tuple(bias.shape)
    if not (shape == (num_heads, N, N) or (len(shape) == 4 and shape[0] in (1, B)
                                           and shape[1:] == (num_heads, N, N))):
        raise ValueError(f"{op}: bias must be [H, N, N] = [{num_heads}, {N}, {N}] or "
                         f"[1 or B, H, N, N] (B = {B}), got {list(shape)}")
    _check_same_device(op, "qkv", qkv, bias=bias)
    scale_f = float(head_dim ** -0.5) if scale is None else float(scale)
    heads, p = int(num_heads), float(dropout_p)
    amp = _autocast_dtype(qkv.device)
    cast = _cast(amp, qkv)[0] if amp is not None else qkv
    # the bias is read as fp32 whatever its dtype: only qkv's dtype matters to the kernel
    choice = dispatch.choose(op, [cast], head_dim=head_dim, dropout_p=dropout_p,
                             segmented=segment_ids is not None, biased=True)

    def ref(qkv, num_heads, scale, dropout_p, segment_ids, bias):
        return reference.biased_qkv_attention(qkv, heads, bias, scale=scale_f, dropout_p=p,
                                              segment_ids=segment_ids)

    def cast_qkv(qkv):
        return _cast(amp, qkv)[0] if amp is not None else qkv
    if choice.backend == "reference":
        def plan(qkv, *rest):
            return ref(cast_qkv(qkv), *rest)
        return plan
    from .ops import attention_bias
    fn = attention_bias.BiasedAttentionFn.apply if plans.eager(qkv, segment_ids, bias) else None

    def kernel(qkv, num_heads, scale, dropout_p, segment_ids, bias):
        return attention_bias.biased_qkv_attention(qkv, heads, scale_f, p, segment_ids, bias,
                                                   op=fn)

    def plan(qkv, *rest):
        qkv = cast_qkv(qkv)
        return _run(op, choice, amp, qkv.device.type, kernel, ref, (qkv, *rest))
    return plan


def _rotary_qk_plan(qkv, num_heads, sin, cos, num_prefix_tokens, half):
    op = "rotary_qk"
    _check_tensor(op, "qkv", qkv, dim=3)
    head_dim = _packed_head_dim(op, qkv, num_heads)
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even to rotate pairs, got {head_dim}")
    N = qkv.shape[1]
    if not isinstance(num_prefix_tokens, numbers.Integral) or isinstance(num_prefix_tokens, bool) \
            or not 0 <= num_prefix_tokens <= N:
        raise ValueError(f"{op}: num_prefix_tokens must be an int in [0, N={N}], "
                         f"got {num_prefix_tokens!r}")
    if not isinstance(half, bool):
        raise TypeError(f"{op}: half must be a bool, got {type(half).__name__}")
    rest = N - int(num_prefix_tokens)
    for name, t in (("sin", sin), ("cos", cos)):
        _check_tensor(op, name, t)
        lead = (1,) * (4 - t.dim()) + tuple(t.shape) if t.dim() <= 4 else None
        if lead is None or t.dim() < 2 or lead[0] not in (1, qkv.shape[0]) \
                or lead[1] not in (1, num_heads) or lead[2:] != (rest, head_dim):
            raise ValueError(f"{op}: {name} must be [N', D], [H, N', D] or [B, H, N', D] with "
                             f"N' = N - num_prefix_tokens = {rest}, D = {head_dim}, H = "
                             f"{num_heads}, B = {qkv.shape[0]} (each of H, B may be 1), "
                             f"got {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: sin {tuple(sin.shape)} and cos {tuple(cos.shape)} must have one "
                         "shape")
    _check_same_device(op, "qkv", qkv, sin=sin, cos=cos)
    heads, npt = int(num_heads), int(num_prefix_tokens)
    amp = _autocast_dtype(qkv.device)

    def cast_qkv(qkv):  # q and k feed the attention's GEMMs: autocast's dtype, as eager's are
        return _cast(amp, qkv)[0] if amp is not None else qkv
    choice = dispatch.choose(op, [cast_qkv(qkv)], head_dim=head_dim)

    def ref(qkv, num_heads, sin, cos, num_prefix_tokens, half):
        return reference.rotary_qk(qkv, heads, sin, cos, num_prefix_tokens=npt, half=half)
    if choice.backend == "reference":
        def plan(qkv, *rest):
            return ref(cast_qkv(qkv), *rest)
        return plan
    from .ops import rotary_qk as rope
    fn = rope.RotaryFn.apply if plans.eager(qkv, sin, cos) else None

    def kernel(qkv, num_heads, sin, cos, num_prefix_tokens, half):
        return rope.rotary_qk(qkv, heads, sin, cos, npt, half, op=fn)

    def plan(qkv, *rest):
        qkv = cast_qkv(qkv)
        return _run(op, choice, amp, qkv.device.type, kernel, ref, (qkv, *rest))
    return plan


def _fc1_pair(op, name, t):
    """(first, second or None) of a packed tensor or a (gate, value) pair."""
    if isinstance(t, (tuple, list)):
        if len(t) != 2:
            raise ValueError(f"{op}: {name} as a pair must be (gate, value), got {len(t)} items")
        return tuple(t)
    return t, None


def _glu_mlp_plan(x, w1, w1v, b1, b1v, fc2_weight, fc2_bias, gate_last, norm_weight, norm_bias,
                  norm_eps, residual, layer_scale, sample_scale):
    op = "glu_mlp"
    _check_tensor(op, "x", x, min_dim=1)
    pair = w1v is not None
    C = x.shape[-1]
    for name, t in (("fc1_weight", w1), ("fc1_weight[1]", w1v if pair else w1)):
        _check_tensor(op, name, t, dim=2)
        if t.shape[1] != C:
            raise ValueError(f"{op}: {name} must be [hidden, {C}] to match x [..., {C}], "
                             f"got {tuple(t.shape)}")
    if pair and w1.shape != w1v.shape:
        raise ValueError(f"{op}: fc1_weight's gate {tuple(w1.shape)} and value "
                         f"{tuple(w1v.shape)} must have one shape")
    if not pair and w1.shape[0] % 2:
        raise ValueError(f"{op}: a packed fc1_weight must be [2·hidden, C], got {tuple(w1.shape)}")
    H = w1.shape[0] if pair else w1.shape[0] // 2
    for name, t, n in (("fc1_bias", b1, H if pair else 2 * H), ("fc1_bias[1]", b1v, H)):
        _check_tensor(op, name, t, optional=True, dim=1)
        _check_shape(op, name, t, (n,))
    if pair and (b1 is None) != (b1v is None):
        raise ValueError(f"{op}: fc1_bias as a pair has both biases or neither")
    _check_tensor(op, "fc2_weight", fc2_weight, dim=2)
    if fc2_weight.shape[1] != H:
        raise ValueError(f"{op}: fc2_weight must be [out, {H}] to match fc1, got "
                         f"{tuple(fc2_weight.shape)}")
    Co = fc2_weight.shape[0]
    for name, t, n in (("fc2_bias", fc2_bias, Co), ("layer_scale", layer_scale, Co),
                       ("norm_weight", norm_weight, H), ("norm_bias", norm_bias, H)):
        _check_tensor(op, name, t, optional=True, dim=1)
        _check_shape(op, name, t, (n,))
    if norm_eps is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError(f"{op}: norm_weight/norm_bias need norm_eps (the hidden LayerNorm's eps)")
    if norm_eps is not None:
        _check_eps(op, norm_eps)
    if not isinstance(gate_last, bool):
        raise TypeError(f"{op}: gate_last must be a bool, got {type(gate_last).__name__}")
    _check_tensor(op, "residual", residual, optional=True)
    _check_shape(op, "residual", residual, tuple(x.shape[:-1]) + (Co,))
    _check_tensor(op, "sample_scale", sample_scale, optional=True)
    _check_sample_scale(op, sample_scale, x)
    if (layer_scale is not None or sample_scale is not None) and residual is None:
        raise ValueError(f"{op}: layer_scale and sample_scale scale the branch added to residual; "
                         "pass residual too")
    gemm = dict(fc1_weight=w1, fc1_value_weight=w1v, fc1_bias=b1, fc1_value_bias=b1v,
                fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    _check_same_device(op, "x", x, **gemm, norm_weight=norm_weight, norm_bias=norm_bias,
                       residual=residual, layer_scale=layer_scale, sample_scale=sample_scale)
    _check_same_dtype(op, "x", x, **gemm)
    eps_f = None if norm_eps is None else float(norm_eps)
    amp = _autocast_dtype(x.device)

    def fc1(w1, w1v):
        return w1 if w1v is None else (w1, w1v)

    def ref(x, w1, w1v, b1, b1v, w2, b2, gate_last, nw, nb, eps, residual, layer_scale,
            sample_scale):
        return reference.glu_mlp(x, fc1(w1, w1v), None if b1 is None else fc1(b1, b1v), w2, b2,
                                 gate_last=gate_last, norm_weight=nw, norm_bias=nb,
                                 norm_eps=eps_f, residual=residual, layer_scale=layer_scale,
                                 sample_scale=sample_scale)

    def cast_gemm(*gemm):  # x, w1, w1v, b1, b1v, w2, b2
        return gemm if amp is None else _cast(amp, *gemm)
    if amp is not None and residual is not None and any(
            t is not None and t.dtype != amp for t in (residual, layer_scale, sample_scale)):
        # as gelu_mlp: a low-precision branch added to a wider stream adds in the wider dtype
        def unfused(x, w1, w1v, b1, b1v, w2, b2, gate_last, nw, nb, eps, residual, layer_scale,
                    sample_scale):
            branch = glu_mlp(x, fc1(w1, w1v), None if b1 is None else fc1(b1, b1v), w2, b2,
                             gate_last=gate_last, norm_weight=nw, norm_bias=nb, norm_eps=eps)
            return reference.add_branch(residual, branch, layer_scale, sample_scale)
        return unfused
    tensors = [*cast_gemm(x, w1, w1v, b1, b1v, fc2_weight, fc2_bias), residual, layer_scale,
               sample_scale]
    choice = dispatch.choose(op, tensors, norm=(norm_weight, norm_bias),
                             hidden=H if norm_eps is not None else 0)
    if choice.backend == "reference":
        def plan(*args):
            return ref(*cast_gemm(*args[:7]), *args[7:])
        return plan
    from .ops import glu_mlp as glu
    fn = glu.GluMlpFn.apply if plans.eager(*tensors, norm_weight, norm_bias) else None

    def kernel(x, w1, w1v, b1, b1v, w2, b2, gate_last, nw, nb, eps, residual, layer_scale,
               sample_scale):
        return glu.glu_mlp(x, fc1(w1, w1v), None if b1 is None else fc1(b1, b1v), w2, b2,
                           gate_last, nw, nb, eps_f, residual, layer_scale, sample_scale, op=fn)

    def plan(*args):
        args = (*cast_gemm(*args[:7]), *args[7:])
        return _run(op, choice, amp, x.device.type, kernel, ref, args)
    return plan
