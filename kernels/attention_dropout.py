"""The attention dropout mask: Philox4x32-10 bits keyed by a per-call seed, a pure function of
(query, key, head) so the forward and both backward kernels regenerate the same mask."""
import triton
import triton.language as tl


@triton.jit
def _keep_threshold(dropout_p):
    """A 16-bit random half h keeps its entry when h >= this: P(keep) = 1 − ceil(p·2^16)/2^16,
    1 − p to within 2^-16 (p·2^16 is exact in fp32). Up to 2^16, so p near 1 drops everything."""
    return tl.ceil(dropout_p * 65536.0).to(tl.uint32)


@triton.jit
def _dropout_keep(seed, start_m, start_n, bh, keep_from, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] keep mask (True = kept) of queries start_m.. × keys start_n.. of head bh.

    One Philox4x32-10 call (ten rounds) makes eight entries' bits: four 32-bit words, each split
    into two 16-bit halves. Query i = 16d + 8e + r (r < 8) and key j = 16c + 8a + 2t + b (a, b < 2,
    t < 4) take half e of word 2a + b of the call with counter (8d + r, 4c + t, b·H + h, 0). Those
    eight entries are the ones one thread holds in the mma accumulator layout (rows r, r + 8;
    columns 2t, 2t + 1, 2t + 8, 2t + 9 of a 16 × 16 block), so no data crosses threads. start_m
    and start_n are multiples of 16 (every tile is), so the bits depend on (i, j) only, not the
    tile shapes, and every kernel regenerates the same mask. Counters are 32-bit: no N² index.
    """
    rows = (start_m // 2 + tl.arange(0, BLOCK_M // 2)).to(tl.uint32)
    quads = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    zero = tl.zeros([BLOCK_M // 2, BLOCK_N // 4], tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, rows[:, None] + zero, quads[None, :] + zero,
                               zero + bh.to(tl.uint32), zero)
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))          # [8d + r, 4c + t, b, a]
    words = tl.reshape(words, [BLOCK_M // 2, BLOCK_N // 16, 4, 2, 2])
    words = tl.reshape(tl.permute(words, (0, 1, 4, 2, 3)), [BLOCK_M // 2, BLOCK_N])
    halves = tl.join(words & 0xFFFF, words >> 16)              # [8d + r, j, e]
    halves = tl.reshape(halves, [BLOCK_M // 16, 8, BLOCK_N, 2])
    halves = tl.reshape(tl.permute(halves, (0, 3, 1, 2)), [BLOCK_M, BLOCK_N])
    return halves >= keep_from
