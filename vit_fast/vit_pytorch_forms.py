"""The shapes of a vit-pytorch attention and feed-forward module, read from its submodules.

A module is a candidate for the fused path when its submodules are those of

    attention     out(attention(qkv(norm(x)))), attention = softmax(q kᵀ·scale)·v per head over
                  the tokens of x itself (optional RMS q/k norm, dropout on the probabilities):
                  ``to_qkv`` or ``qkv`` a plain Linear dim -> 3·heads·dim_head, ``heads`` /
                  ``num_heads``, ``scale``, ``norm`` a LayerNorm, ``attend`` an nn.Softmax,
                  ``dropout`` / ``attn_drop``, ``to_out`` or ``proj`` [+ ``proj_drop``], optional
                  ``q_norm`` / ``k_norm`` (vit-pytorch's RMSNorm(heads, dim_head)), nothing else;
    feed-forward  net(x), net = [LayerNorm], Linear, GELU, [Dropout], Linear, [Dropout].

An extra parameter or submodule that would enter the result names the form that cannot fuse
(talking heads, re-attention, LSA, cross-attention, convolutional projections, windows). What the
forward does with them is the probe's question (vit_pytorch_probe.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from . import dispatch

__all__ = ["AttentionForm", "FeedForwardForm", "attention_structure_reason", "structural_form",
           "feed_forward_structure_reason", "feed_forward_indices", "looks_like_attention",
           "looks_like_feed_forward", "RMS_EPS", "MAX_NET_LAYERS"]

# vit-pytorch's RMSNorm is F.normalize(x)·sqrt(D)·gamma = x·rsqrt(mean(x²))·gamma: qk_norm's rms
# with eps 0; a tiny eps keeps an all-zero q or k finite, as F.normalize's clamp does.
RMS_EPS = 1e-24


@dataclass(frozen=True)
class AttentionForm:
    """Where one attention module keeps each piece of out(softmax(q kᵀ·scale)·v)."""
    qkv: str                    # "to_qkv" | "qkv": Linear dim -> 3·H·D, laid out (3, H, D)
    heads: str                  # attribute with the head count: "heads" | "num_heads"
    scale: object               # attribute name holding the scale, or the constant (float)
    norm: object                # "norm" (a LayerNorm on the input) or None
    qk_norm: bool               # q_norm / k_norm are vit-pytorch's RMSNorm(heads, dim_head)
    out: tuple                  # modules applied to the attention output, in order
    attn_dropout: object = None  # child nn.Dropout on the probabilities ("dropout" | "attn_drop")
    dropout_p: object = None    # float attribute used as SDPA's dropout_p in training instead
    rank: int = 3               # x is [B, N, C] (3) or [B, P, N, C] (4, MobileViT)


@dataclass(frozen=True)
class FeedForwardForm:
    """net = [LayerNorm], Linear, GELU, [Dropout], Linear, [Dropout]: the index of each piece."""
    norm: object                # index of the LayerNorm in net, or None
    fc1: int
    act: int
    fc2: int
    approximate: str            # gelu_mlp's GELU form ("none" | "tanh")


def _plain_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _plain_layer_norm(m, dim):
    return (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward
            and tuple(m.normalized_shape) == (dim,) and m.elementwise_affine)


def _is_rms_norm(m, heads, head_dim):
    """vit-pytorch's RMSNorm(heads, dim): gamma [heads, 1, dim], scale = dim ** 0.5, nothing else
    (its forward, F.normalize(x)·scale·gamma, is checked by the probe)."""
    params = dict(m.named_parameters(recurse=False))
    gamma = params.get("gamma")
    return (set(params) == {"gamma"} and not list(m.children())
            and tuple(gamma.shape) == (heads, 1, head_dim)
            and isinstance(getattr(m, "scale", None), (int, float))
            and math.isclose(m.scale, head_dim ** 0.5, rel_tol=1e-6))


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTENTION_PARTS = {"norm", "attend", "dropout", "attn_drop", "to_qkv", "qkv", "to_out", "proj",
                    "proj_drop", "q_norm", "k_norm"}


def _has_conv(m):
    return any(isinstance(s, _CONV) for s in m.modules())


def _named_form_reason(m, children, params):
    """The attention forms that cannot fuse, named for what they compute."""
    names = set(children) | set(params)
    if "temperature" in params:
        return ("LSA (vit_for_small_dataset): a learned temperature and a diagonal mask on the "
                "scores; stays eager")
    if any(n.startswith("reattn") for n in names):
        return ("re-attention (DeepViT): the heads' attention maps are mixed before they weight "
                "the values; stays eager")
    if any(n.startswith(("mix_heads", "talking")) or n in ("proj_l", "proj_w") for n in names):
        return ("talking heads (CaiT): the heads' scores are mixed before and after the softmax; "
                "stays eager")
    if any(children.get(n) is not None and _has_conv(children[n])
           for n in ("to_qkv", "qkv", "to_q", "to_k", "to_v", "to_kv")):
        return "convolutional q/k/v projections (CvT-style); stays eager"
    if "to_q" in children and ("to_kv" in children or "to_k" in children):
        return ("separate to_q / to_kv projections: cross-attention to a context (or a query "
                "layout vit_fast does not read); stays eager")
    if any("window" in n or "rel_pos" in n or "pos_bias" in n for n in names):
        return ("windowed attention or a position bias on the scores; not one fused "
                "softmax(q kᵀ)·v over all tokens; stays eager")
    return ""


def _heads(m):
    for name in ("heads", "num_heads"):
        value = getattr(m, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None, None


def attention_structure_reason(m, form=None):
    """Why ``m``'s submodules are not those of a fusable attention ('' when they are). With
    ``form`` (a converted module), also that they still sit where ``form`` says."""
    children = dict(m.named_children())
    params = dict(m.named_parameters(recurse=False))
    why = _named_form_reason(m, children, params)
    if why:
        return why
    qkv_name = "to_qkv" if "to_qkv" in children else "qkv" if "qkv" in children else None
    if qkv_name is None:
        return "no to_qkv / qkv projection: not an attention vit_fast reads"
    qkv = children[qkv_name]
    if not _plain_linear(qkv):
        return f"{qkv_name} is {type(qkv).__name__}, not a plain nn.Linear (an adapter?)"
    extra = [n for n in children if n not in _ATTENTION_PARTS]
    if extra:
        return (f"submodules {extra} beyond norm / to_qkv / attend / dropout / to_out enter the "
                "attention; stays eager")
    if params:
        return f"its own parameters {sorted(params)} enter the attention; stays eager"
    heads_attr, heads = _heads(m)
    if heads is None:
        return "no integer heads / num_heads attribute"
    width = qkv.out_features
    if width % (3 * heads):
        return f"{qkv_name} width {width} is not 3 x heads ({heads}) x dim_head"
    head_dim = width // (3 * heads)
    if head_dim > dispatch.MAX_HEAD_DIM:
        return f"dim_head {head_dim} is above the fused attention's maximum {dispatch.MAX_HEAD_DIM}"
    norm = children.get("norm")
    if norm is not None and not isinstance(norm, nn.Identity) \
            and not _plain_layer_norm(norm, qkv.in_features):
        return f"norm is {type(norm).__name__}, not an nn.LayerNorm({qkv.in_features})"
    attend = children.get("attend")
    if attend is not None and not (type(attend) is nn.Softmax and attend.dim in (-1, 3, 4)):
        return (f"attend is {type(attend).__name__}, not nn.Softmax(dim=-1) (a custom attention "
                "function); stays eager")
    q_norm, k_norm = children.get("q_norm"), children.get("k_norm")
    plain_qk = all(n is None or isinstance(n, nn.Identity) for n in (q_norm, k_norm))
    if not plain_qk and not all(n is not None and _is_rms_norm(n, heads, head_dim)
                                for n in (q_norm, k_norm)):
        return (f"q_norm / k_norm are {type(q_norm).__name__} / {type(k_norm).__name__}, not "
                "vit-pytorch's RMSNorm(heads, dim_head)")
    for name in ("dropout", "attn_drop", "proj_drop"):
        d = children.get(name)
        if d is not None and type(d) is not nn.Dropout:
            return f"{name} is {type(d).__name__}, not nn.Dropout"
    if form is not None:
        if form.qkv != qkv_name or form.heads != heads_attr or form.qk_norm == plain_qk \
                or (form.norm is None) != (norm is None or isinstance(norm, nn.Identity)):
            return "its submodules changed since convert"
    return ""


def structural_form(m):
    """The AttentionForm of a module attention_structure_reason accepted (rank and dropout
    are the probe's to fill in)."""
    children = dict(m.named_children())
    qkv_name = "to_qkv" if "to_qkv" in children else "qkv"
    heads_attr, heads = _heads(m)
    head_dim = children[qkv_name].out_features // (3 * heads)
    norm = children.get("norm")
    q_norm = children.get("q_norm")
    qk_norm = q_norm is not None and not isinstance(q_norm, nn.Identity)
    scale = getattr(m, "scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = "scale"
    else:  # no scale attribute: qk-norm's dots are unscaled; otherwise dim_head ** -0.5
        scale = 1.0 if qk_norm else head_dim ** -0.5
    if "to_out" in children:
        out = ("to_out",)
    elif "proj" in children:
        out = ("proj",) + (("proj_drop",) if "proj_drop" in children else ())
    else:
        out = ()
    return AttentionForm(qkv=qkv_name, heads=heads_attr, scale=scale,
                         norm="norm" if norm is not None and not isinstance(norm, nn.Identity)
                         else None, qk_norm=qk_norm, out=out)


_FF_ACTIVATIONS = {nn.GELU}
MAX_NET_LAYERS = 6


def _net_layout(layers):
    """(LayerNorm index or None, indices of the three non-dropout layers after it)."""
    i = 1 if layers and isinstance(layers[0], nn.LayerNorm) else 0
    core = [j for j in range(i, len(layers)) if type(layers[j]) is not nn.Dropout]
    return (0 if i else None), core


def feed_forward_structure_reason(m):
    """Why ``m`` is not a feed-forward net(x) gelu_mlp can run ('' when it is). Dropouts may sit
    anywhere after the LayerNorm: inactive they are the identity, and while one is active the
    module runs its own net."""
    children = dict(m.named_children())
    if set(children) != {"net"} or dict(m.named_parameters(recurse=False)):
        return "not a feed-forward holding only its ``net``"
    net = children["net"]
    if type(net) is not nn.Sequential:
        return f"net is {type(net).__name__}, not an nn.Sequential"
    layers = list(net)
    if len(layers) > MAX_NET_LAYERS:  # the fused path watches net.0 .. net.5 for hooks
        return (f"net has {len(layers)} layers (at most {MAX_NET_LAYERS}: LayerNorm, Linear, "
                "activation, Linear, dropouts)")
    if _has_conv(net):
        return "a convolutional feed-forward (Conv layers in net); stays eager"
    norm, core = _net_layout(layers)
    if len(core) != 3 or not all(isinstance(layers[j], nn.Linear) for j in (core[0], core[2])):
        return ("net is not [LayerNorm], Linear, activation, Linear with dropouts "
                f"({', '.join(type(layer).__name__ for layer in layers)})")
    fc1, act, fc2 = (layers[j] for j in core)
    if type(act) not in _FF_ACTIVATIONS:
        return (f"activation {type(act).__name__}: the fused MLP (gelu_mlp) has GELU epilogues "
                "only (erf, tanh); the feed-forward runs eagerly")
    if act.approximate not in ("none", "tanh"):
        return f"GELU approximate={act.approximate!r} has no gelu_mlp epilogue"
    if not (_plain_linear(fc1) and _plain_linear(fc2)):
        return "net's Linears are not plain nn.Linear (an adapter?)"
    if fc2.in_features != fc1.out_features:
        return "net's Linears do not chain"
    if norm is not None and not _plain_layer_norm(layers[norm], fc1.in_features):
        return f"net[0] is not a plain nn.LayerNorm({fc1.in_features})"
    return ""


def feed_forward_indices(m):
    """The FeedForwardForm of a module feed_forward_structure_reason accepted."""
    layers = list(m.net)
    norm, (fc1, act, fc2) = _net_layout(layers)
    return FeedForwardForm(norm=norm, fc1=fc1, act=act, fc2=fc2,
                           approximate=layers[act].approximate)


def looks_like_attention(m) -> bool:
    """Whether a user would call ``m`` an attention layer (for naming what convert leaves)."""
    name = type(m).__name__.lower()
    children = {n for n, _ in m.named_children()}
    return ("attention" in name or name in ("attn", "lsa") or name.endswith("attn")
            or bool(children & {"to_qkv", "to_q", "to_kv"}))


def looks_like_feed_forward(m) -> bool:
    name = type(m).__name__.lower()
    return "feedforward" in name or name in ("ff", "ffn")
