"""vit_fast/dropout_mask.py: torch's copy of the attention kernels' dropout mask, bit for bit.

Philox4x32-10 against the Random123 known-answer vectors (Salmon et al., SC11; the vectors of
Random123's tests/kat_vectors file, philox4x32 with 10 rounds), then the whole mask against the
kernel's `_dropout_keep` itself (a test-only kernel that stores what it returns, under the
interpreter) and against the mask the attention forward applies.
"""
import pytest
import torch
import triton
import triton.language as tl

from test_attention_triton import _probe_mask
from vit_fast.dropout_mask import attention_keep_mask, keep_threshold, philox4x32
from vit_fast.kernels.attention_dropout import _dropout_keep, _keep_threshold

# (counter c0..c3, key k0 k1, output words)
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", RANDOM123_KAT, ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(counter, key, want):
    got = philox4x32(*counter, *key)
    assert tuple(int(w) for w in got) == want
    # Vectorised: the same call broadcast inside a batch of others gives the same words.
    batch = [torch.tensor([c, 7, c]) for c in counter]
    words = philox4x32(*batch, *key)
    assert tuple(int(w[0]) for w in words) == want and tuple(int(w[2]) for w in words) == want


@triton.jit
def _keep_probe_kernel(SEED, OUT, start_m, start_n, bh, dropout_p,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    keep = _dropout_keep(tl.load(SEED), start_m, start_n, bh, _keep_threshold(dropout_p),
                         BLOCK_M, BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(OUT + offs, keep.to(tl.int8))


def _kernel_tile(seed, start_m, start_n, bh, p, block_m, block_n):
    out = torch.empty(block_m, block_n, dtype=torch.int8)
    _keep_probe_kernel[(1,)](torch.tensor([seed], dtype=torch.int64), out, start_m, start_n, bh, p,
                             BLOCK_M=block_m, BLOCK_N=block_n)
    return out.bool()


# (seed, start_m, start_n, bh, dropout_p, BLOCK_M, BLOCK_N): tile offsets, heads past 2^16,
# seeds using the high word and negative ones, p's whose fp32 threshold rounds up.
TILES = [
    (7, 0, 0, 0, 0.5, 16, 16),
    (0x5EED_1234_ABCD_0042, 48, 96, 5, 0.3, 32, 64),
    (-(2 ** 62) - 12345, 1008, 16, 70001, 0.1, 16, 32),
    (2 ** 63 - 1, 64, 624, 3, 0.9, 64, 16),
    (-1, 16, 32, 2 ** 31 + 11, 1 / 3, 16, 16),
]


@pytest.mark.parametrize("seed,start_m,start_n,bh,p,block_m,block_n", TILES)
def test_mask_equals_the_kernels_dropout_keep(seed, start_m, start_n, bh, p, block_m, block_n):
    want = _kernel_tile(seed, start_m, start_n, bh, p, block_m, block_n)
    n = max(start_m + block_m, start_n + block_n)
    # Only head bh is needed: build it directly (batch = 1 head-set holding bh at the end).
    from vit_fast import dropout_mask
    halves = dropout_mask._halves(torch.tensor([seed]), torch.tensor([bh]), -(-n // 16) * 16)[0]
    got = halves[start_m:start_m + block_m, start_n:start_n + block_n] >= keep_threshold(p)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()  # the case is not trivially all kept or dropped


@pytest.mark.parametrize("B,H,N,p", [(2, 3, 20, 0.5), (1, 2, 33, 0.25)])
def test_mask_equals_what_the_attention_forward_drops(B, H, N, p):
    """End to end through attention_keep_mask's own head indexing (bh = b·H + h) and cropping of
    N, against the forward kernel's output (tests/test_attention_triton.py's probe)."""
    seed = torch.tensor([0x1234_5678_9ABC_DEF0 - 2 ** 62], dtype=torch.int64)
    assert torch.equal(attention_keep_mask(seed, B, H, N, p), _probe_mask(B, H, N, p, seed))


def test_mask_chunking_and_threshold(monkeypatch):
    from vit_fast import dropout_mask
    seed = torch.tensor([42], dtype=torch.int64)
    whole = attention_keep_mask(seed, 2, 3, 40, 0.4)
    monkeypatch.setattr(dropout_mask, "_CALLS_PER_CHUNK", 1)  # one head per chunk
    assert torch.equal(attention_keep_mask(seed, 2, 3, 40, 0.4), whole)
    # ceil(p·2^16) of p as fp32: 0.1 -> 6553.6001 (fp32) -> 6554; exact multiples stay.
    assert keep_threshold(0.1) == 6554 and keep_threshold(0.5) == 32768 and keep_threshold(0.0) == 0
    assert attention_keep_mask(seed, 1, 1, 5, 0.0).all()


def test_mask_rejects_bad_arguments():
    with pytest.raises(TypeError, match="seed"):
        attention_keep_mask(torch.tensor([1], dtype=torch.int32), 1, 1, 4, 0.5)
    with pytest.raises(ValueError, match="dropout_p"):
        attention_keep_mask(torch.tensor([1]), 1, 1, 4, 1.0)
