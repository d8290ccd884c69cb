"""Segment masking of the attention kernels: packed variable-length batches (NaViT, NaFlexViT).

Token t of batch row b carries the id seg[b, t]; query i meets key j iff seg[b, i] == seg[b, j]
and that id is >= 0 (negative = padding). Inside a tile the mask is exact, whatever the ids.
Across tiles the work is cut by spans: for each tile of one side (queries in the forward and dQ,
keys in dK/dV) the launcher finds the first and past-last tile of the other side whose id range
[min, max] (padding left out) overlaps its own, and the kernel loops over that span only. When
each segment is one contiguous run (how NaViT and NaFlexViT pack), every tile inside the span
meets the tile that owns it, so the work is the sum of squared segment lengths, not N²; ids in
another order still give exact results (the mask), only the span skips less.

Layouts: seg [B, N] int32, contiguous (int64 ids relabelled exactly: _int32_ids);
spans [B, cdiv(N, BLOCK_ROWS), 2] int32, contiguous, (first row, past-last row) of the other side, both multiples of its tile (hi may pass N).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _segment_rows(seg_row, row0, N, BLOCK: tl.constexpr):
    """[BLOCK] ids of tokens row0.. of one batch row (seg_row = SEG + b·N); tokens past N read
    as -1, so padding and the ragged end of the last tile mask alike."""
    rows = row0 + tl.arange(0, BLOCK)
    return tl.load(seg_row + rows, mask=rows < N, other=-1)


@triton.jit
def _segment_mask(row_ids, col_ids):
    """[R, C] True where row token and column token share a segment that is not padding."""
    return (row_ids[:, None] == col_ids[None, :]) & (row_ids[:, None] >= 0)


@triton.jit
def _segment_span(SPANS, b, tile, N, BLOCK: tl.constexpr):
    """(first, past-last) row of the other side that tile `tile` (of BLOCK rows) of batch row b
    must visit."""
    entry = SPANS + (b.to(tl.int64) * tl.cdiv(N, BLOCK) + tile) * 2
    return tl.load(entry), tl.load(entry + 1)


@triton.jit
def _segment_tile(SEG, SPANS, b, row0, N, BLOCK: tl.constexpr):
    """For the program owning rows row0.. (a BLOCK-row tile) of batch row b: its row of SEG,
    the ids of its rows, and the (first, past-last) row of its span on the other side."""
    seg_row = SEG + b.to(tl.int64) * N
    ids = _segment_rows(seg_row, row0, N, BLOCK)
    lo, hi = _segment_span(SPANS, b, row0 // BLOCK, N, BLOCK)
    return seg_row, ids, lo, hi


def _tile_id_ranges(seg: torch.Tensor, block: int):
    """(min, max) [B, cdiv(N, block)] of the non-negative ids of each tile; a tile of padding
    only gets (int max, -1), which overlaps nothing."""
    B, N = seg.shape
    tiles = F.pad(seg, (0, (-N) % block), value=-1).reshape(B, -1, block)
    valid = tiles >= 0
    lo = torch.where(valid, tiles, torch.iinfo(seg.dtype).max).amin(-1)
    hi = torch.where(valid, tiles, -1).amax(-1)
    return lo, hi


def segment_spans(seg: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    """spans [B, cdiv(N, block_rows), 2] int32 (layout above) for tiles of block_rows rows
    visiting tiles of block_cols columns. Torch ops on [B, N/block_rows, N/block_cols] booleans:
    no host sync, nothing of size N²."""
    r_lo, r_hi = _tile_id_ranges(seg, block_rows)
    c_lo, c_hi = _tile_id_ranges(seg, block_cols)
    meets = (r_lo[:, :, None] <= c_hi[:, None, :]) & (c_lo[:, None, :] <= r_hi[:, :, None])
    n_cols = meets.shape[-1]
    first = meets.to(torch.int32).argmax(-1)
    past_last = n_cols - meets.flip(-1).to(torch.int32).argmax(-1)
    some = meets.any(-1)
    spans = torch.stack([torch.where(some, first, 0), torch.where(some, past_last, 0)], -1)
    return (spans * block_cols).to(torch.int32).contiguous()


def _int32_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Contiguous int32 ids meaning what segment_ids (int32 or int64) means. int64 ids are
    relabelled by their rank among the distinct ids of their row: exact (a row has at most
    N < 2^31 of them), order-preserving (runs stay runs, so the spans skip as much), negative
    ids -1. Device ops only (a sort of [B, N]): no host sync. int32 ids in the kernels leave
    the registers that int64 ids spilled on sm_80."""
    if segment_ids.dtype == torch.int32:
        return segment_ids.contiguous()
    ordered, order = segment_ids.sort(dim=1)
    new_value = torch.ones_like(ordered, dtype=torch.int32)
    new_value[:, 0] = 0
    new_value[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = torch.empty_like(new_value).scatter_(1, order, new_value.cumsum(1, dtype=torch.int32))
    return torch.where(segment_ids < 0, -1, rank).to(torch.int32).contiguous()


def segment_args(segment_ids, block_rows: int, block_cols: int) -> dict:
    """The kernels' segment arguments for one launch whose program tiles block_rows rows and
    loops over tiles of block_cols: None (HAS_SEGMENTS=False, the unsegmented build) without
    segment_ids. Ids reach the kernels as contiguous int32 (_int32_ids), so one build serves
    both dtypes and every stride."""
    if segment_ids is None:
        return dict(SEG=None, SPANS=None, HAS_SEGMENTS=False)
    seg = _int32_ids(segment_ids)
    return dict(SEG=seg, SPANS=segment_spans(seg, block_rows, block_cols), HAS_SEGMENTS=True)
