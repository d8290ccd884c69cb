"""Swap vit_fast modules into an existing model, in place, weights kept.

The new modules take over the old ones' submodules (the same nn.Linear / nn.LayerNorm / Conv2d
objects), so parameters, their device, dtype, requires_grad, optimizer references and every
submodule's own train/eval mode are kept, and state_dict keys do not change. Converting twice is
a no-op whose summary lists what is already converted.

A swapped module takes its fused path only while nothing attached to it (hooks, adapters,
parametrizations...) would notice; ``why_not_fused(model)`` lists, live, what runs plain and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from . import modules

__all__ = ["convert", "ConversionSummary", "why_not_fused"]


@dataclass
class ConversionSummary:
    swapped: list = field(default_factory=list)   # qualified names of replaced modules
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


def why_not_fused(model: nn.Module) -> dict:
    """{qualified name: reasons} of the vit_fast modules in ``model`` that run their plain
    submodules right now (hooks, adapters, parametrizations, active dropout...)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, (modules.Block, modules.Attention, modules.Mlp, modules.PatchEmbed)) or (
                type(m).__name__ == "FusedNaViTTransformer"):
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


def _other_timm_block(module):
    """A block of timm's vision_transformer other than Block (parallel, res-post, ...)."""
    kind = type(module)
    return kind.__module__ == "timm.models.vision_transformer" and kind.__name__.endswith("Block")


def _adopt(cls, old, replace=None):
    """A new ``cls`` module built around ``old``'s submodules and parameters, in their order.

    No parameter is created or copied: the same objects move over, so state_dict keys and the
    order of parameters() (which optimizers and checkpoints rely on) stay as they were.
    ``replace`` maps a submodule name to the module that takes its place.
    """
    replace = replace or {}
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, param in old._parameters.items():
        new.register_parameter(name, param)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    for name, module in old._modules.items():
        setattr(new, name, replace.get(name, module))
    # Plain attributes (num_heads, scale, patch_size, a ``gate`` of None...) come along too.
    plain = {k: v for k, v in vars(old).items() if not k.startswith("_") and k != "training"}
    for key, value in plain.items():
        setattr(new, key, value)
    new.training = old.training  # this module's mode only: children keep their own
    return new


def _convert_attention(old):
    TimmAttention = _timm_classes()[1]
    if isinstance(old, modules.Attention) or type(old) is not TimmAttention:
        return old
    new = _adopt(modules.Attention, old)
    new.qk_scale = None  # timm's fused path uses head_dim**-0.5 whatever ``scale`` says
    return new


def _convert_mlp(old):
    TimmMlp = _timm_classes()[2]
    if type(old) is not TimmMlp:
        return old
    return _adopt(modules.Mlp, old)


def _convert_layer_scale(old):
    TimmLayerScale = _timm_classes()[3]
    if type(old) is not TimmLayerScale:
        return old
    return _adopt(modules.LayerScale, old)


def _convert_block(old):
    return _adopt(modules.Block, old, {
        "attn": _convert_attention(old.attn), "mlp": _convert_mlp(old.mlp),
        "ls1": _convert_layer_scale(old.ls1), "ls2": _convert_layer_scale(old.ls2)})


def _convert_layer_norm(old):
    return _adopt(modules.LayerNorm, old)


def _convert_patch_embed(old):
    return _adopt(modules.PatchEmbed, old)


def convert(model: nn.Module, *, blocks: bool = True, patch_embed: bool = True) -> nn.Module:
    """Swap timm's Blocks (and PatchEmbed) in ``model`` for vit_fast's, in place.

    Works on timm's VisionTransformer and its relatives that use its Block (deit, dinov2 with
    LayerScale, register-token and CLIP models...). Returns ``model``; what was swapped and what
    was left, with the reason, is in ``model.vit_fast_summary`` (a ConversionSummary), as of
    this call. Each submodule keeps its own train/eval mode; converting again changes nothing.
    A swapped Block runs its plain submodules for as long as something attached to them would
    notice the fused path (hooks, adapters, pruning...): ``why_not_fused(model)`` lists those.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    TimmBlock, _, _, _, TimmPatchEmbed = _timm_classes()
    from .convert_vit_pytorch import VitPytorchTransformer
    summary = ConversionSummary()
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, (modules.Block, modules.PatchEmbed, VitPytorchTransformer)):
            summary.already.append(name)
            continue
        if type(module) is TimmBlock:
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
            summary.left.append((name, f"{type(module).__name__} subclasses timm's Block with its "
                                       "own forward; not swapped"))
        elif type(module) is TimmPatchEmbed:
            if patch_embed:
                replacements.append((name, _convert_patch_embed(module)))
            else:
                summary.left.append((name, "patch_embed=False"))
        elif isinstance(module, TimmPatchEmbed):
            summary.left.append((name, f"{type(module).__name__} subclasses timm's PatchEmbed; "
                                       "not swapped"))
        elif _other_timm_block(module):
            summary.left.append((name, f"timm's {type(module).__name__} is not the Block vit_fast "
                                       "fuses; left as it is"))
    if any(isinstance(new, modules.Block) for _, new in replacements):
        # A ViT's own norms (timm: norm_pre, norm, fc_norm) run as the fused LayerNorm op too;
        # only in a model whose Blocks were swapped, never in an arbitrary network.
        replacements += [(name, _convert_layer_norm(m)) for name, m in model.named_children()
                         if _is_plain_layer_norm(m)]
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not attr:
            raise ValueError("convert: pass the model that contains the Block, not a Block itself")
        setattr(parent, attr, new)
        summary.swapped.append(name)
    if blocks:
        from .convert_navit import convert_packed
        convert_packed(model, summary)  # vit-pytorch NaViT, timm NaFlexVit: segment ids, no mask
        from .convert_vit_pytorch import convert_vit_pytorch, is_vit_pytorch_model
        if is_vit_pytorch_model(model):  # lucidrains' vit-pytorch ViT / SimpleViT
            convert_vit_pytorch(model, summary)
        from .convert_transformers import convert_transformers, is_transformers_model
        if is_transformers_model(model):  # Hugging Face ViT, DeiT, DINOv2, CLIP/SigLIP vision
            convert_transformers(model, summary)
    summary.not_fused = [(name, new.why_not_fused()) for name, new in replacements
                         if isinstance(new, modules.Block) and new.why_not_fused()]
    if not summary.swapped and not summary.left and not summary.already:
        summary.left.append(("", f"{type(model).__name__} has no timm Block or PatchEmbed to swap"))
    model.vit_fast_summary = summary
    return model
