"""Segment ids of packed variable-length batches, and the dense mask the eager paths need.

A packed batch row holds several sequences (images) back to back: ``segment_ids`` [B, N] gives
each token the index of its sequence, and -1 to padding. ``fused_qkv_attention(...,
segment_ids=...)`` keeps the sequences apart without ever building an N×N mask; the eager
fallbacks (a hook on a layer, TorchScript, torch.fx) use :func:`segment_attention_mask`.
"""
from __future__ import annotations

import numbers

import torch

from .errors import DtypeError

__all__ = ["segment_attention_mask", "segment_ids_from_lengths", "segment_ids_from_valid"]


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


def segment_ids_from_lengths(lengths, total_len=None, *, device=None, dtype=torch.int32):
    """segment_ids [B, total_len] for a packed batch: row b holds the sequences lengths[b]
    (a list of token counts) back to back with ids 0, 1, ..., and -1 (padding) after them.

    total_len defaults to the longest row. E.g. [[3, 2], [4]] -> [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]].
    """
    op = "segment_ids_from_lengths"
    if not isinstance(lengths, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in lengths):
        raise TypeError(f"{op}: lengths must be a list (one per sample) of lists of ints, got "
                        f"{type(lengths).__name__}")
    for row in lengths:
        if not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 0
                   for n in row):
            raise ValueError(f"{op}: lengths must be non-negative ints, got {list(row)!r}")
    longest = max((sum(row) for row in lengths), default=0)
    if total_len is None:
        total_len = longest
    if not isinstance(total_len, numbers.Integral) or isinstance(total_len, bool) or total_len < longest:
        raise ValueError(f"{op}: total_len must be an int >= the longest row ({longest}), "
                         f"got {total_len!r}")
    if dtype not in (torch.int32, torch.int64):
        raise DtypeError(f"{op}: dtype must be torch.int32 or torch.int64, got {dtype}")
    ids = torch.full((len(lengths), int(total_len)), -1, dtype=dtype)
    for b, row in enumerate(lengths):
        counts = torch.tensor([int(n) for n in row], dtype=torch.int64)
        ids[b, :int(counts.sum())] = torch.repeat_interleave(torch.arange(len(row), dtype=dtype), counts)
    return ids.to(device) if device is not None else ids
