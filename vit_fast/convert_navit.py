"""convert() for packed variable-resolution models: vit-pytorch's NaViT and timm's NaFlexVit.

Both keep the images of a packed batch apart with a dense mask; converted, they pass per-token
segment ids to the fused attention instead (vit_fast/navit.py, vit_fast/naflexvit.py). The
models change class in place (to a subclass with the same state: isinstance, parameters,
buffers, hooks and state_dict keys all stay), the way their packing or mask code is replaced.
vit-pytorch is imported only when a NaViT is found.
"""
from __future__ import annotations

import torch.nn as nn

from . import modules

__all__ = ["convert_packed", "is_navit"]


def is_navit(module):
    """Whether ``module`` is (a subclass of) vit-pytorch's NaViT, without importing vit-pytorch."""
    kind = type(module)
    return any(k.__module__ == "vit_pytorch.na_vit" and k.__name__ == "NaViT" for k in kind.__mro__)


def _convert_navit(prefix, model, summary):
    from vit_pytorch import na_vit

    from .navit import FusedNaViT, FusedNaViTTransformer, navit_transformer_why_not
    if isinstance(model, FusedNaViT):
        summary.already.append(prefix + "transformer")
        return
    if type(model) is not na_vit.NaViT:
        summary.left.append((prefix.rstrip(".") or type(model).__name__,
                             f"{type(model).__name__} subclasses NaViT with its own code; not "
                             "converted"))
        return
    why = type(model.transformer) is not na_vit.Transformer and "not NaViT's Transformer"
    why = why or navit_transformer_why_not(model.transformer)
    if why:
        summary.left.append((prefix + "transformer", why))
        return
    model.transformer.__class__ = FusedNaViTTransformer
    model.__class__ = FusedNaViT
    summary.swapped.append(prefix + "transformer")
    summary.fused.append((prefix + "transformer", FusedNaViT.vit_fast_fused))
    summary.left.append((prefix + "attn_pool", "NaViT's attention pooling (one query per image "
                         "over the N tokens: a [B, 1, images, N] mask) stays eager; small next "
                         "to the N×N self-attention"))
    summary.left.append((prefix + "to_patch_embedding", "vit-pytorch's patch embedding (LayerNorm, "
                         "Linear, LayerNorm on packed patches) is left as it is"))


def _convert_naflexvit(prefix, model, summary):
    from timm.models.naflexvit import NaFlexVit

    from .eva_block import EvaBlock
    from .naflexvit import FusedNaFlexVit, NaFlexBlock
    if isinstance(model, FusedNaFlexVit):
        summary.already.append(prefix + "blocks")
        return
    blocks = list(model.blocks)
    why = ""
    if type(model) is not NaFlexVit:
        why = f"{type(model).__name__} subclasses NaFlexVit; not converted"
    elif not blocks or not all(type(b) in (modules.Block, EvaBlock) for b in blocks):
        why = ("not every block is a swapped vit_fast Block or EvaBlock (custom blocks, blocks "
               "a converter left as timm's, or blocks=False): the model keeps timm's N×N "
               "padding mask")
    if why:
        summary.left.append((prefix + "blocks", why))
        return
    for block in blocks:
        if type(block) is modules.Block:
            block.__class__ = NaFlexBlock  # EvaBlock takes the segment ids as it is
    model.__class__ = FusedNaFlexVit
    summary.fused.append((prefix + "blocks", FusedNaFlexVit.vit_fast_fused))
    if model.attn_pool is not None:
        summary.left.append((prefix + "attn_pool", "timm's AttentionPoolLatent (latent queries "
                             "over the N tokens, a [B, 1, 1, N] key mask) stays eager"))


def convert_packed(model: nn.Module, summary) -> None:
    """Convert every NaViT / NaFlexVit in ``model`` (after convert() swapped timm's Blocks)."""
    from timm.models.naflexvit import NaFlexVit
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if is_navit(module):
            _convert_navit(prefix, module, summary)
        elif isinstance(module, NaFlexVit):
            _convert_naflexvit(prefix, module, summary)
