"""The attention kernels' dropout keep mask, computed in torch, bit for bit.

kernels/attention_dropout.py `_dropout_keep` draws the mask inside the kernels and never stores
it. A backward recomputed with the reference (vit_fast.fallback, when a backward kernel cannot
launch) needs the same mask, so this module rebuilds it from the same int64 seed:

- Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel Random Numbers: As Easy as 1, 2, 3",
  SC11), as triton.language.philox runs it: ten rounds, multipliers 0xD2511F53 / 0xCD9E8D57,
  Weyl key increments 0x9E3779B9 / 0xBB67AE85, key (low, high 32 bits of the seed). uint32
  arithmetic is emulated in int64 tensors (torch has no full uint32 arithmetic on every device
  and version): every value stays in [0, 2^32) and a 32x32-bit product is built from 16-bit
  halves so nothing exceeds 2^49. Vectorised, on whatever device the seed is (no host sync).
- The layout: query i = 16d + 8e + r (r < 8), key j = 16c + 8a + 2t + b (a, b < 2, t < 4) of
  head bh = batch·H + head takes the 16-bit half e of word 2a + b of the Philox call with counter
  (8d + r, 4c + t, bh, 0), and is kept when that half is >= ceil(p·2^16) (p as the kernel's fp32).
"""
from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57   # round multipliers (of counter words 0 and 2)
_BUMP_A, _BUMP_B = 0x9E3779B9, 0xBB67AE85  # key schedule increments (of key words 0 and 1)
# Philox calls per chunk of mask computation: each call takes ~20 int64 temporaries, so this
# bounds the working memory of a large (B·H·N²) mask to a few hundred MB.
_CALLS_PER_CHUNK = 1 << 22


def _mul_hi_lo(multiplier: int, x: torch.Tensor):
    """(high, low) 32-bit words of multiplier·x for uint32 values held in int64."""
    low_product = multiplier * (x & 0xFFFF)                 # < 2^48
    mid = multiplier * (x >> 16) + (low_product >> 16)      # < 2^49: multiplier·x >> 16
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-``rounds`` of counter (c0, c1, c2, c3) under key (k0, k1): four uint32 words as
    int64 tensors (broadcast together). Inputs: int64 tensors or ints in [0, 2^32)."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(v, dtype=torch.int64) for v in (c0, c1, c2, c3, k0, k1))
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(_MUL_A, c0)
        hi1, lo1 = _mul_hi_lo(_MUL_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _BUMP_A) & _MASK32, (k1 + _BUMP_B) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(dropout_p: float) -> int:
    """`_keep_threshold`: a 16-bit half h keeps its entry when h >= ceil(p·2^16), p rounded to
    fp32 as the kernel receives it (p·2^16 is then exact)."""
    return math.ceil(torch.tensor(dropout_p, dtype=torch.float32).item() * 65536.0)


def _halves(seed: torch.Tensor, heads: torch.Tensor, n16: int) -> torch.Tensor:
    """The 16-bit random halves [len(heads), n16, n16] of queries × keys 0..n16 of those heads."""
    key = seed.reshape(()).to(torch.int64)
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    rows = torch.arange(n16 // 2, device=seed.device)        # 8d + r
    quads = torch.arange(n16 // 4, device=seed.device)       # 4c + t
    words = philox4x32(rows[None, :, None], quads[None, None, :], heads[:, None, None], 0, k0, k1)
    g = heads.numel()
    # [bh, 8d + r, 4c + t, word 2a + b] -> [bh, 8d + r, 16c + 8a + 2t + b]
    words = torch.stack(words, -1).reshape(g, n16 // 2, n16 // 16, 4, 2, 2)
    words = words.permute(0, 1, 2, 4, 3, 5).reshape(g, n16 // 2, n16)
    # [bh, 8d + r, j, half e] -> [bh, 16d + 8e + r, j]
    halves = torch.stack((words & 0xFFFF, words >> 16), -1).reshape(g, n16 // 16, 8, n16, 2)
    return halves.permute(0, 1, 4, 2, 3).reshape(g, n16, n16)


def attention_keep_mask(seed: torch.Tensor, batch: int, num_heads: int, n: int,
                        dropout_p: float) -> torch.Tensor:
    """The keep mask [batch, num_heads, n, n] (bool, True = kept; query × key) that the attention
    kernels apply for ``seed`` (int64 [1], computed on its device) and ``dropout_p``."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("seed must be a 1-element int64 tensor (the attention op's dropout key)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    threshold = keep_threshold(dropout_p)
    n16 = -(-n // 16) * 16  # the bits of (i, j) do not depend on n: draw whole 16 x 16 blocks
    heads_per_chunk = max(1, _CALLS_PER_CHUNK // max(1, n16 * n16 // 8))
    all_heads = torch.arange(batch * num_heads, device=seed.device)
    if all_heads.numel() == 0 or n == 0:
        return torch.ones(batch, num_heads, n, n, dtype=torch.bool, device=seed.device)
    keep = [(_halves(seed, heads, n16) >= threshold)[:, :n, :n]
            for heads in all_heads.split(heads_per_chunk)]
    return torch.cat(keep).reshape(batch, num_heads, n, n)
