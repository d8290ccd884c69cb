"""convert() for vit-pytorch: attention, feed-forward and transformer modules, by what they compute.

Every module of a model that is not from torch, timm, transformers or vit_fast is looked at:
an attention computing softmax(q kᵀ·scale)·v over its own tokens, or a feed-forward net(x) of
[LayerNorm], Linear, GELU, [Dropout], Linear, [Dropout] (vit_pytorch_match.py says how that is
told), is converted in place (vit_pytorch_modules.py): its class becomes a same-named subclass
with a fused forward. A transformer whose forward is the pre-norm layer loop over such pairs also
runs each pair fused. This covers vit-pytorch's ViT, SimpleViT (with qk-norm, register tokens,
FFT, patch dropout, 1D, 3D), PiT, ViViT, MobileViT's attention, ParallelViT, PatchMerger, CCT's
attention, vit_3d..., wherever their Transformer comes from, and copies of that code in a user's
own model. An attention-like module that computes something else (talking heads, re-attention,
LSA, cross-attention to a context, windows, convolutional projections) is named in the summary
with the reason and runs as it is.

NaViT is converted by convert_navit.py (segment ids instead of its mask); its subtree is skipped
here. Nothing is imported from vit-pytorch.
"""
from __future__ import annotations

import torch.nn as nn

from .convert_navit import is_navit
from .vit_pytorch_forms import looks_like_attention, looks_like_feed_forward
from .vit_pytorch_match import attention_form, canonical_layer_loop, feed_forward_form
from .vit_pytorch_modules import FusedAttention, FusedFeedForward, FusedTransformer, fused_class

__all__ = ["convert_vit_pytorch"]

_LIBRARIES = ("torch", "timm", "transformers", "vit_fast")
_PAIR_FUSED = ("per layer: the residual add and the feed-forward's LayerNorm in one op, the "
               "MLP's residual in its epilogue")


def _library(module):
    return type(module).__module__.split(".")[0] in _LIBRARIES


def _under(name, roots):
    return any(name == r or name.startswith(r + ".") for r in roots if r) or "" in roots


def _is_layer_loop(module):
    layers = getattr(module, "layers", None)
    return (isinstance(layers, nn.ModuleList) and len(layers) > 0
            and all(isinstance(layer, nn.ModuleList) and len(layer) == 2 for layer in layers)
            and canonical_layer_loop(type(module))[0])


def _convert_modules(model, summary):
    """Attention and feed-forward modules: converted in place, or named with the reason."""
    skip = []  # subtrees handled elsewhere or already reported
    for name, m in model.named_modules():
        if skip and _under(name, skip):
            continue
        if isinstance(m, (FusedAttention, FusedFeedForward)):
            summary.already.append(name)
            skip.append(name)
            continue
        if is_navit(m) or (_library(m) and type(m).__module__.startswith("vit_fast")
                           and not isinstance(m, FusedTransformer)):
            skip.append(name)  # NaViT (convert_navit.py), or modules vit_fast made
            continue
        if _library(m):
            continue
        form, why = attention_form(m)
        role = "attention"
        if form is None and not looks_like_attention(m):
            form, why = feed_forward_form(m)
            role = "feed_forward"
            if form is None and not looks_like_feed_forward(m):
                continue  # neither: nothing to say about it
        if form is None:
            if not any(d is not m and not _library(d) and looks_like_attention(d)
                       for d in m.modules()):  # a container of attention layers: look inside
                summary.left.append((name, why))
            continue
        m._vit_fast_form = form
        m.__class__ = fused_class(role, type(m))
        summary.swapped.append(name)
        if m.why_not_fused():  # hooks registered before convert, say
            summary.not_fused.append((name, m.why_not_fused()))
        skip.append(name)


def _convert_transformers(model, summary):
    """Transformers running the pre-norm loop over converted pairs: each pair fused."""
    for name, m in model.named_modules():
        if isinstance(m, FusedTransformer):
            summary.already.append(name)
            continue
        if _library(m) or not _is_layer_loop(m):
            continue
        if not any(isinstance(a, FusedAttention) and isinstance(f, FusedFeedForward)
                   for a, f in m.layers):
            continue
        m._vit_fast_final_norm = canonical_layer_loop(type(m))[1]
        m.__class__ = fused_class("transformer", type(m))
        summary.swapped.append(name)
        summary.fused.append((name, _PAIR_FUSED))
        why = m.why_not_fused()
        if why:
            summary.not_fused.append((name, why))


def _note_partial_layers(model, summary):
    """A user-level layer (``...Layer`` / ``...Block``) holding a converted attention, whose own
    forward is not a loop vit_fast fuses (CCT's post-norm layer with its MLP written inline):
    say which part of it still runs as written."""
    for name, m in model.named_modules():
        if _library(m) or isinstance(m, (FusedAttention, FusedFeedForward, FusedTransformer)):
            continue
        if not type(m).__name__.endswith(("Layer", "Block")):
            continue
        fused = [n for n, c in m.named_children() if isinstance(c, FusedAttention)]
        if fused:
            summary.left.append((name, f"{type(m).__name__}: its attention ({', '.join(fused)}) "
                                       "runs fused; the rest of its forward (norms, an MLP "
                                       "written inline) runs as written"))


def convert_vit_pytorch(model: nn.Module, summary) -> None:
    """Convert the vit-pytorch-shaped modules of ``model`` in place; note it in ``summary``."""
    swapped = len(summary.swapped)
    _convert_modules(model, summary)
    _convert_transformers(model, summary)
    _note_partial_layers(model, summary)
    embed = getattr(model, "to_patch_embedding", None)
    if len(summary.swapped) > swapped and isinstance(embed, nn.Sequential):
        summary.left.append(("to_patch_embedding", "vit-pytorch's patch embedding (Rearrange, "
                             "LayerNorm, Linear, LayerNorm) is not a Conv2d; left as it is"))
