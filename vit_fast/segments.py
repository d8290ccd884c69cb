"""Segment ids of packed variable-length batches, and the dense mask the eager paths need.

A packed batch row holds several sequences (images) back to back: ``segment_ids`` [B, N] gives
each token the index of its sequence, and -1 to padding. ``fused_qkv_attention(...,
segment_ids=...)`` keeps the sequences apart without ever building an N×N mask; the eager
fallbacks (a hook on a layer, TorchScript, torch.fx) use :func:`segment_attention_mask`.
"""
from __future__ import annotations

import torch

__all__ = ["segment_attention_mask", "segment_ids_from_valid"]


def segment_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, N, N] bool, True where query and key carry the same id.

    Padding (-1) attends to padding only, so no row is empty (no NaN from a softmax over nothing)
    and no real token ever reads a padding key. Padding rows come out as an average over padding
    where the fused op writes 0; either way nothing downstream of a real token sees them.
    """
    return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def segment_ids_from_valid(valid: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """int32 [B, P + N] from a [B, N] validity mask (NaFlexViT's patch_valid): one segment (0)
    per row for the P prefix tokens (class, registers) and the valid patches, -1 for padding."""
    ids = torch.where(valid.bool(), 0, -1).to(torch.int32)
    if num_prefix_tokens:
        ids = torch.cat((ids.new_zeros(ids.shape[0], num_prefix_tokens), ids), dim=1)
    return ids
