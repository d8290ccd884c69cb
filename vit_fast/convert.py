"""Swap vit_fast modules into an existing model, in place, weights kept.

The new modules take over the old ones' submodules (the same nn.Linear / nn.LayerNorm / Conv2d
objects) and hooks (vit_fast/adopt.py), so parameters, their device, dtype, requires_grad,
optimizer references, every submodule's own train/eval mode and the handles of hooks registered
before convert are kept, and state_dict keys do not change. Converting twice is a no-op whose
summary lists what is already converted.

What is converted: timm's vision_transformer Block and PatchEmbed (here); timm's other
transformer blocks through vit_fast/timm_blocks.py (a converter registered for the class, or the
reason it stays timm's); NaViT / NaFlexVit (convert_navit.py); vit-pytorch's attention, feed-forward
and transformer modules, recognised by what they compute (convert_vit_pytorch.py); Hugging Face
ViT-family encoder layers (convert_transformers.py).

A converted module takes its fused path only while nothing attached to it (hooks, adapters,
parametrizations...) would notice; ``why_not_fused(model)`` lists, live, what runs plain and why.
It is also reachable as ``vit_fast.convert.why_not_fused`` (``vit_fast.convert`` is this
function), as is ``vit_fast.convert.ConversionSummary``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from . import beit_block, eva_block  # noqa: F401  (register their converters in timm_blocks)
from . import modules, timm_blocks
from .adopt import adopt
from .convert_navit import convert_packed
from .convert_transformers import convert_transformers, is_transformers_model
from .convert_vit_pytorch import convert_vit_pytorch
from .fusion import FusedModule

__all__ = ["convert", "ConversionSummary", "why_not_fused"]


@dataclass
class ConversionSummary:
    swapped: list = field(default_factory=list)   # qualified names of converted modules
    left: list = field(default_factory=list)      # (qualified name, why it was left as it is)
    already: list = field(default_factory=list)   # vit_fast modules found in place (convert again)
    not_fused: list = field(default_factory=list)  # (name, reasons): swapped, but plain for now
    fused: list = field(default_factory=list)     # (name, what runs fused there), where not obvious

    def __str__(self):
        lines = [f"vit_fast.convert: swapped {len(self.swapped)} module(s), left {len(self.left)}"
                 + (f", {len(self.already)} already converted" if self.already else "")]
        lines += [f"  swapped {name}" for name in self.swapped]
        lines += [f"  already {name}" for name in self.already]
        lines += [f"  fused   {name}: {what}" for name, what in self.fused]
        lines += [f"  left    {name}: {why}" for name, why in self.left]
        lines += [f"  plain   {name}: {'; '.join(why)}" for name, why in self.not_fused]
        return "\n".join(lines)


# vit_fast's blocks (what a second convert finds in place, and names as already converted)
_BLOCKS = (modules.Block, eva_block.EvaBlock, beit_block.BeitBlock)
_CONVERTED = (*_BLOCKS, modules.PatchEmbed)


def _reports(m):
    """Whether ``m`` is a converted module that can say why it runs plain."""
    return isinstance(m, FusedModule) or getattr(type(m), "vit_fast_reports", False)


def why_not_fused(model: nn.Module) -> dict:
    """{qualified name: reasons} of the converted modules in ``model`` that run their plain
    submodules right now (hooks, adapters, parametrizations, active dropout...)."""
    found = {}
    for name, m in model.named_modules():
        if _reports(m):
            reasons = m.why_not_fused()
            if reasons:
                found[name] = reasons
    return found


def _is_plain_layer_norm(module):
    from timm.layers import LayerNorm as TimmLayerNorm
    return type(module) in (nn.LayerNorm, TimmLayerNorm) and len(module.normalized_shape) == 1


def _timm_classes():
    from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block
    return Block, Attention, Mlp, LayerScale, PatchEmbed


def _convert_attention(old):
    TimmAttention = _timm_classes()[1]
    if isinstance(old, modules.Attention) or type(old) is not TimmAttention:
        return old
    new = adopt(modules.Attention, old)
    new.qk_scale = None  # timm's fused path uses head_dim**-0.5 whatever ``scale`` says
    return new


def _convert_mlp(old):
    TimmMlp = _timm_classes()[2]
    if type(old) is not TimmMlp:
        return old
    return adopt(modules.Mlp, old)


def _convert_layer_scale(old):
    TimmLayerScale = _timm_classes()[3]
    if type(old) is not TimmLayerScale:
        return old
    return adopt(modules.LayerScale, old)


def _convert_block(old):
    return adopt(modules.Block, old, {
        "attn": _convert_attention(old.attn), "mlp": _convert_mlp(old.mlp),
        "ls1": _convert_layer_scale(old.ls1), "ls2": _convert_layer_scale(old.ls2)})


def _inside(name, prefixes):
    return any(name.startswith(p + ".") for p in prefixes)


def _convert_timm(model, summary, blocks, patch_embed):
    """timm's Blocks and PatchEmbed, and every other timm transformer block (converted by a
    registered converter, or named in summary.left with the reason): the replacements to make."""
    TimmBlock, _, _, _, TimmPatchEmbed = _timm_classes()
    replacements, handled = [], []
    for name, module in model.named_modules():
        if _inside(name, handled):
            continue  # inside a block already swapped or reported
        if isinstance(module, _CONVERTED):
            summary.already.append(name)
            handled.append(name)
            continue
        if type(module) is TimmBlock:
            handled.append(name)
            if not blocks:
                summary.left.append((name, "blocks=False"))
                continue
            new = _convert_block(module)
            ok, why = new.fusable()
            if ok:
                replacements.append((name, new))
            else:
                summary.left.append((name, why))
        elif isinstance(module, TimmBlock):
            handled.append(name)
            summary.left.append((name, f"{type(module).__name__} subclasses timm's Block with its "
                                       "own forward; not swapped"))
        elif type(module) is TimmPatchEmbed:
            if patch_embed:
                replacements.append((name, adopt(modules.PatchEmbed, module)))
            else:
                summary.left.append((name, "patch_embed=False"))
        elif isinstance(module, TimmPatchEmbed):
            summary.left.append((name, f"{type(module).__name__} subclasses timm's PatchEmbed; "
                                       "not swapped"))
        elif timm_blocks.is_transformer_block(module):
            handled.append(name)
            if not blocks:
                summary.left.append((name, "blocks=False"))
                continue
            new, why = timm_blocks.convert_or_reason(module, model)
            if new is not None:
                replacements.append((name, new))
            else:
                summary.left.append((name, why))
    if any(isinstance(new, modules.Block) for _, new in replacements):
        # A ViT's own norms (timm: norm_pre, norm, fc_norm) run as the fused LayerNorm op too;
        # only in a model whose Blocks were swapped, never in an arbitrary network.
        replacements += [(name, adopt(modules.LayerNorm, m)) for name, m in model.named_children()
                         if _is_plain_layer_norm(m)]
    return replacements


def _replace(model, summary, replacements):
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        if not attr:
            raise ValueError("convert: pass the model that contains the Block, not a Block itself")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        summary.swapped.append(name)


def convert(model: nn.Module, *, blocks: bool = True, patch_embed: bool = True) -> nn.Module:
    """Swap the transformer blocks (and timm's PatchEmbed) in ``model`` for vit_fast's, in place.

    Works on timm's VisionTransformer and its relatives that use its Block (deit, dinov2 with
    LayerScale, register-token and CLIP models...), NaFlexVit, vit-pytorch models (attention and
    feed-forward modules recognised by what they compute, NaViT) and Hugging Face ViT / DeiT /
    DINOv2 / CLIP / SigLIP vision encoders. Returns ``model``; what was swapped and what was
    left, with the reason, is in ``model.vit_fast_summary`` (a ConversionSummary), as of this
    call. Each submodule keeps its own train/eval mode and its hooks; converting again changes
    nothing. A converted module runs its plain submodules for as long as something attached to
    them would notice the fused path (hooks, adapters, pruning...): ``why_not_fused(model)``
    (also ``vit_fast.convert.why_not_fused``) lists those.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    summary = ConversionSummary()
    replacements = _convert_timm(model, summary, blocks, patch_embed)
    _replace(model, summary, replacements)
    if blocks:
        convert_packed(model, summary)  # vit-pytorch NaViT, timm NaFlexVit: segment ids, no mask
        convert_vit_pytorch(model, summary)  # vit-pytorch's modules, by what they compute
        if is_transformers_model(model):  # Hugging Face ViT, DeiT, DINOv2, CLIP/SigLIP vision
            convert_transformers(model, summary)
    summary.not_fused[:0] = [(name, new.why_not_fused()) for name, new in replacements
                             if isinstance(new, _BLOCKS) and new.why_not_fused()]
    if not (summary.swapped or summary.left or summary.already or summary.fused):
        summary.left.append(("", f"{type(model).__name__} has no transformer block vit_fast "
                                 "converts (timm Block or PatchEmbed, vit-pytorch attention / "
                                 "feed-forward, transformers ViT-family layers)"))
    model.vit_fast_summary = summary
    return model


# The README's spelling: ``vit_fast.convert`` is this function (the package exports it under the
# module's name), so what the module offers beside it hangs off the function too.
convert.why_not_fused = why_not_fused
convert.ConversionSummary = ConversionSummary
