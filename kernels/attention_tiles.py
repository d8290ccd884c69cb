"""Tile helpers the attention kernels share: strided row loads/stores of one head's slice, the
dot-operand upcast for the interpreter, the program-id -> (batch, head, tile) mapping, and the
log2/ln constants of the exp2-based softmax."""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Globals a jit function reads must be constexpr.
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _load_rows(base, row0, n_rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """[BLOCK_R, BLOCK_D] tile of rows row0.. of a head slice; rows >= n_rows and the head-dim
    padding read as 0, which keeps padded logits finite and padded dot terms zero."""
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, row0, n_rows, stride_row, tile, HEAD_DIM: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], tile, mask=mask)


@triton.jit
def _operand(x, DOT_FP32: tl.constexpr):
    # The interpreter computes bf16 tl.dot wrongly (triton#11584); there the operands go to fp32
    # after being rounded to the I/O dtype, so the numbers match what the GPU's dot sees.
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_of_head(N, H, BLOCK: tl.constexpr):
    """Program id -> (b, h, b·H + h, first row of this program's BLOCK-row tile).

    A 1-D grid with the tiles of one head adjacent, so programs that share that head's K/V (or
    Q/dO) run together and hit L2, and no 65535 limit on B·H as a second grid axis would have.
    """
    num_tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    bh = pid // num_tiles
    return bh // H, bh % H, bh, (pid % num_tiles) * BLOCK


@triton.jit
def _bias_tile(base, start_m, start_n, N, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               TRANSPOSED: tl.constexpr = False):
    """The additive bias of queries start_m.. × keys start_n.. of one head (base = its [N, N]
    slice, row stride stride_m, unit key stride), in fp32 and times log2(e) to join the base-2
    logits; [BLOCK_M, BLOCK_N], or [BLOCK_N, BLOCK_M] when TRANSPOSED (the dK/dV kernel's keys ×
    queries tiles, loaded so rather than transposed after). Entries past N read as 0: their
    logits are masked (padded keys) or add nothing (padded queries) as without a bias. Offsets
    within the head are int32: the launcher takes N <= 46340 (N² < 2^31)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    if TRANSPOSED:
        ptrs = base + cols[:, None] + rows[None, :] * stride_m
        mask = (cols[:, None] < N) & (rows[None, :] < N)
    else:
        ptrs = base + rows[:, None] * stride_m + cols[None, :]
        mask = (rows[:, None] < N) & (cols[None, :] < N)
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * _LOG2E
