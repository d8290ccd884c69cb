"""timm's NaFlexViT with segment attention instead of a [B, 1, N, N] padding mask.

NaFlexVit builds an additive mask from ``patch_valid`` (create_attention_mask: pair (i, j) kept
when both tokens are valid, or only j with use_key_only_attn_mask) and hands it to every Block,
whose attention then runs SDPA with a dense N×N mask. Converted, the model hands its Blocks the
per-token segment ids instead -- 0 for the prefix tokens and the valid patches, -1 for padding --
and each vit_fast Block runs the fused attention on them: no N×N mask or score tensor.

Every valid token attends to exactly the keys it attends to in timm, so the valid tokens and
everything computed from them (the pooled output, the logits, the parameter gradients) match.
Padding tokens differ: their attention output is 0 here, an average in timm; timm masks them out
of the pooling and of every key, and forward_features' padding rows are not meaningful in either.

Only the mask changes hands: timm's own forward, forward_features, forward_intermediates, patch
dropout and gradient checkpointing run as they are. The segment ids travel where timm passes the
mask (the ``attn_mask`` argument of each Block), wrapped in :class:`SegmentIds`, which only the
converted Blocks (:class:`NaFlexBlock`, and vit_fast.EvaBlock for NaFlexViT with RoPE, which
also gets timm's per-sample rope tensor as before) accept; a model whose blocks are not all
converted keeps timm's mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.naflexvit import NaFlexVit

from .block import Block
from .segments import segment_ids_from_valid

__all__ = ["SegmentIds", "NaFlexBlock", "FusedNaFlexVit"]


class SegmentIds:
    """segment_ids [B, N] (int32), passed where timm's NaFlexVit passes its attention mask."""

    __slots__ = ("ids",)

    def __init__(self, ids: torch.Tensor):
        self.ids = ids


class NaFlexBlock(Block):
    """vit_fast's Block that also takes :class:`SegmentIds` as ``attn_mask``."""

    vit_fast_segments = True

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if isinstance(attn_mask, SegmentIds):
            return self.forward_segments(x, attn_mask.ids)
        return super().forward(x, attn_mask, is_causal)


# Stands in for "a mask was given" so timm's _forward_embeds does not build one; replaced by the
# segment ids before anything reads it.
_NO_DENSE_MASK = object()


class FusedNaFlexVit(NaFlexVit):
    """NaFlexVit whose converted Blocks get segment ids (from patch_valid) instead of a mask."""

    vit_fast_fused = "segment attention from patch_valid (no N×N mask)"

    def takes_segment_ids(self) -> bool:
        # NaFlexBlock, or another converted block that takes SegmentIds (vit_fast.EvaBlock)
        return len(self.blocks) > 0 and all(getattr(type(b), "vit_fast_segments", False)
                                            for b in self.blocks)

    def _forward_embeds(self, x, patch_coord, patch_valid, attn_mask):
        segmented = attn_mask is None and patch_valid is not None and self.takes_segment_ids()
        out = super()._forward_embeds(x, patch_coord, patch_valid,
                                      _NO_DENSE_MASK if segmented else attn_mask)
        if segmented:
            # out["patch_valid"] is after patch dropout's gather, as timm's own mask would be.
            out["attn_mask"] = SegmentIds(
                segment_ids_from_valid(out["patch_valid"], self.num_prefix_tokens).to(x.device))
        return out


# Lookups by class name (FSDP's transformer_layer_cls_to_wrap, accelerate's no-split lists) and
# print(model) see timm's names; __qualname__ keeps ours, so pickle finds these classes.
NaFlexBlock.__name__ = "Block"
FusedNaFlexVit.__name__ = NaFlexVit.__name__
