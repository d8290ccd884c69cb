"""Attention's launch configs: the CUDA tables every launch picks from (and the AOT specs are
generated from, attention_aot.py), as pure functions of the table key, so what runs is exactly
what was compiled and checked. The launchers (attention.py) add the interpreter's tiles, the
device's shared-memory limit and the backward's launch structure (bwd_plan)."""
from ._device import cdiv, next_power_of_2

# ---------------------------------------------------------------------------------------------
# Configs. On CUDA a table keyed on (head-dim bucket, short sequence), every entry of which is
# compiled ahead of time for sm_80/sm_90 with 0 spills (aot_specs); a table rather than
# @triton.autotune so that what runs is exactly what was checked. fp16 and bf16 share entries
# (same bytes per element, same mma shapes); fp32 has none (see attention._not_shipped). Values:
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M tiles queries, BLOCK_N keys.
# ---------------------------------------------------------------------------------------------
_SHORT_N = 64  # sequences this short would leave most of a 128-row tile empty

_CUDA_CONFIGS = {
    # (kernel, BLOCK_D bucket, short): (BLOCK_M, BLOCK_N, num_warps, num_stages)
    ("fwd", 64, False): (128, 64, 4, 3),
    ("fwd", 128, False): (128, 64, 8, 3),
    ("fwd", 256, False): (64, 32, 8, 2),
    ("fwd", 64, True): (64, 64, 4, 2),
    ("fwd", 128, True): (64, 64, 4, 2),
    ("fwd", 256, True): (64, 32, 8, 2),
    ("dkdv", 64, False): (32, 128, 8, 3),
    ("dkdv", 128, False): (32, 64, 4, 2),
    ("dkdv", 256, False): (32, 32, 8, 2),
    ("dkdv", 64, True): (32, 64, 4, 2),
    ("dkdv", 128, True): (32, 64, 4, 2),
    ("dkdv", 256, True): (32, 32, 8, 2),
    ("dq", 64, False): (128, 32, 4, 3),
    ("dq", 128, False): (64, 32, 4, 2),
    ("dq", 256, False): (32, 32, 8, 2),
    ("dq", 64, True): (64, 32, 4, 2),
    ("dq", 128, True): (64, 32, 4, 2),
    ("dq", 256, True): (32, 32, 8, 2),
    # dK/dV with dq's partials (WRITE_DQ, chosen by bwd_plan), on _FUSED_ARCHS. Query tiles of
    # 64 rows keep dq's product (64 × D over the key tile) a whole warpgroup's wgmma on sm_90.
    # No entry for head dims over 128: their 32-key tiles would need up to 16 partials at ViT
    # lengths, so they keep the two passes.
    ("dkdv_dq", 64, False): (64, 128, 8, 2),
    ("dkdv_dq", 128, False): (64, 64, 8, 2),
    ("dkdv_dq", 64, True): (64, 64, 4, 2),
    ("dkdv_dq", 128, True): (64, 64, 8, 2),
}
# Dropout builds (HAS_DROPOUT=True) whose entry above spilled: the Philox rounds over each
# score tile add register pressure, so these spread the tile over 8 warps (0 spills, sm_80/90).
_CUDA_DROPOUT_CONFIGS = {
    # 64 keys per tile at 8 warps needs 160 registers with the mask (1 CTA/SM on sm_90); 32
    # keys keeps the 2 CTAs of 8 warps the old (one Philox call per score) build had.
    ("fwd", 64, False): (128, 32, 8, 3),
    ("fwd", 64, True): (64, 32, 4, 2),  # 64 keys: 220 registers on sm_80, 2 CTAs/SM where 3 were
    ("dkdv", 128, False): (32, 64, 8, 2),
    ("dkdv", 128, True): (32, 64, 8, 2),
    # One stage: at 2 the D=48 build spilled on triton 3.6 (sm_80); 8 warps would also fix it
    # but cost sm_90 a CTA and the D=64 build 1.8x its integer work per score.
    ("dkdv", 64, True): (32, 64, 4, 1),
    ("dq", 64, False): (128, 32, 8, 3),
    # None: no fused build. The 128 bucket's fused pass with the mask needs 255 registers and
    # spills (sm_90); those calls take the two passes (bwd_plan).
    ("dkdv_dq", 128, False): None,
    ("dkdv_dq", 128, True): None,
}
# Segment builds (HAS_SEGMENTS=True) whose entry above spilled on sm_80 (the id mask of each
# score tile): the same tiles over 8 warps. Ahead of the dropout table when both apply.
# The long 64-bucket forward's 4 warps needed 255 registers and spilled (4 B on sm_86 with triton
# 3.8, 1 B on sm_80 with 3.6): 8 warps keep the tile at 198 registers, 0 spills on sm_80/86/90
# (3.6 and 3.8), and the same 8 warps per SM (1 CTA of 8 where 2 of 4 were).
_CUDA_SEGMENT_CONFIGS = {
    ("fwd", 64, False): (128, 64, 8, 3),
    ("fwd", 128, True): (64, 64, 8, 2),
    ("dkdv", 128, False): (32, 64, 8, 2),
    ("dkdv", 128, True): (32, 64, 8, 2),
}
# Builds with a bias (HAS_BIAS=True), keyed on (table key, dropout, segments), ahead of every
# other table; entries absent: the bias build takes the tile the same call without a bias takes.
# The forward pipelines the fp32 bias tile beside K and V (4·(stages − 1)·BLOCK_M·BLOCK_N bytes of
# shared memory, _bias_shared_bytes), and the score tile gains a term: the long forwards take
# 32-key tiles over 8 warps (the 64-key ones spilled, sm_80 and sm_90, or took 180 KB on sm_80);
# the dQ pass and the fused pass whose 4-warp tiles spilled take 8 warps.
_LONG_FWD_BIAS = (128, 32, 8, 3)
_CUDA_BIAS_CONFIGS = {
    **{(("fwd", bucket, False), dropout, segments): _LONG_FWD_BIAS
       for bucket in (64, 128) for dropout in (False, True) for segments in (False, True)},
    (("fwd", 128, True), True, False): (64, 64, 8, 2),
    (("dq", 64, False), False, False): (128, 32, 8, 3),
    (("dq", 64, False), False, True): (128, 32, 8, 3),
    # 4 warps spilled at head dims 80-112 on sm_80 with segments and dropout
    (("dq", 128, False), True, True): (64, 32, 8, 2),
    (("dq", 128, True), True, True): (64, 32, 8, 2),
    (("dkdv_dq", 64, True), False, True): (64, 64, 8, 2),
    # The other fused builds with a bias needed 253-255 registers on sm_90 at 4 warps (short
    # 64 bucket), 64 x 128 (long 64 bucket) and 64 x 64 over 8 warps (128 bucket) on triton 3.8,
    # and spilled on 3.9 (24 B, at head dims 48-128 with and without dropout or segments).
    # 64 x 64 over 8 warps (the entry above) takes 218-248 on 3.8 and 3.9 in the 64 bucket, and
    # 64 x 32 over 8 warps 202-208 in the 128 bucket (one stage of 64 x 64 still spilled with
    # segments); triton 3.6 takes up to 255 (D=48-64 with dropout, D=80-128 with fp32 partials).
    # 0 spills on 3.6, 3.8 and 3.9, the same 8 warps per SM (1 CTA). Cost: the 64 bucket's fused
    # pass covers N <= 256, the 128 bucket's N <= 128 (_MAX_DQ_PARTIALS key tiles; its short
    # sequences now write 2 partials); longer sequences with a bias take the two passes.
    **{(("dkdv_dq", 64, short), dropout, False): (64, 64, 8, 2)
       for short in (False, True) for dropout in (False, True)},
    **{(("dkdv_dq", 128, short), False, segments): (64, 32, 8, 2)
       for short in (False, True) for segments in (False, True)},
    # The long 64-bucket dK/dV with dropout spilled at head dim 48 on sm_80 (32 x 128 over 8
    # warps, 2 or 3 stages): the short build's tile, as with segments and dropout.
    (("dkdv", 64, False), True, False): (32, 64, 4, 1),
    # With segments and a bias the 64-bucket dK/dV tiles (32 x 128 long, 32 x 64 short, 4 warps)
    # spilled a byte on triton 3.6 (sm_80), and one stage spilled on 3.8 at head dim 32: 8 warps.
    (("dkdv", 64, False), False, True): (32, 64, 8, 2),
    (("dkdv", 64, True), False, True): (32, 64, 8, 2),
    # No fused build: the long one with segments and a bias spilled a byte on triton 3.6 (sm_90,
    # head dim 48, fp32 dq partials); those calls take the two passes.
    (("dkdv_dq", 64, False), False, True): None,
}
# Bias forwards for GPUs with 99 KB of shared memory per block (sm_86, sm_89, sm_120): the long
# 128-bucket tile takes 104 KB there; two stages take 72 KB.
_CUDA_BIAS_FWD_SMALLER = {("fwd", 128, False): [(128, 32, 8, 2)]}
# Builds with both segments and dropout, ahead of both tables. None: no fused build; the short
# 64-bucket one needs 255 registers on triton 3.8 and spills on 3.6 (sm_90), at 4 and 8 warps;
# the long one spills 1 B on triton 3.9 at head dim 48 (sm_90).
# The 256 bucket's dQ at 2 stages spilled on triton 3.6 (sm_80 and sm_90); 1 stage does not.
# The 64 bucket's long dK/dV (32 x 128, 8 warps) spilled on 3.6 (sm_80): the short build's tile.
# The long 128-bucket forward (128 x 64, 8 warps) spilled 1 B on triton 3.6 (sm_80, 255 registers);
# 32-key tiles take 202 there, still 1 CTA of 8 warps per SM (it is also the 99 KB GPUs' tile).
# The long 64-bucket forward keeps the dropout build's tile over the segment table's.
_CUDA_SEGMENT_DROPOUT_CONFIGS = {("dkdv_dq", 64, True): None, ("dkdv", 64, False): (32, 64, 4, 1),
                                 ("fwd", 128, False): (128, 32, 8, 3), ("dkdv_dq", 64, False): None,
                                 ("fwd", 64, False): _CUDA_DROPOUT_CONFIGS[("fwd", 64, False)],
                                 ("dq", 256, False): (32, 32, 8, 1), ("dq", 256, True): (32, 32, 8, 1)}
_DELTA_BLOCK_M = 64
_REDUCE_BLOCK_M = 64
# The 5-product backward (dK/dV pass writing dq's per-key-tile partials, then a reduce) keeps
# n_key_blocks fp32 copies of dq alive between the two launches: 4·n_key_blocks bytes per dq
# element (ViT-B/16 at B=64, 2 key tiles: 78 MB), and 8·n_key_blocks bytes of traffic (written,
# then read). Both grow with N like the two products saved (S and dP of the dq pass), at
# BLOCK_N/2 FLOPs per byte, below H100's ridge: by bytes and FLOPs alone (bench roofline) the
# partials cost more than they save. What the fused pass saves besides products is the
# per-score work the dq pass repeats (exp2, the dropout mask, the segment mask), so it runs
# only while the partials stay few: up to 4 key tiles (N <= 512 at D <= 64), beyond which the
# 7-product pair of passes (dK/dV, then dQ) runs. One key tile (N <= BLOCK_N) needs no
# partials: the pass writes dq itself. A GPU measurement should set this cap (docs/design.md).
_MAX_DQ_PARTIALS = 4
# Where the fused pass ships. On sm_80 its 64-query tiles spill (mma.sync keeps a copy of the q
# and dO operands per warp: 255 registers and local memory at 4 and 8 warps), and 32-query
# tiles, which fit there, would pad dq's product to 64 rows on sm_90; sm_80 keeps the two passes.
_FUSED_ARCHS = (90,)


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def shipped_config(key, dropout: bool = False, segments: bool = False, bias: bool = False):
    """The CUDA table's (BLOCK_M, BLOCK_N, num_warps, num_stages) for key = (kernel, BLOCK_D
    bucket, short), with the bias, segment and dropout overrides that apply; None: that variant
    has no build (a fused entry whose calls take the two passes)."""
    if bias and (key, dropout, segments) in _CUDA_BIAS_CONFIGS:
        return _CUDA_BIAS_CONFIGS[(key, dropout, segments)]
    if segments and dropout and key in _CUDA_SEGMENT_DROPOUT_CONFIGS:
        return _CUDA_SEGMENT_DROPOUT_CONFIGS[key]
    if segments and key in _CUDA_SEGMENT_CONFIGS:
        return _CUDA_SEGMENT_CONFIGS[key]
    if dropout and key in _CUDA_DROPOUT_CONFIGS:
        return _CUDA_DROPOUT_CONFIGS[key]
    return _CUDA_CONFIGS[key]


# Forward tiles for GPUs whose shared memory per block is below what the entry above needs: the
# D=128 entry takes 112 KB on sm_80, over the 99 KB that sm_86/sm_89/sm_120 let a block opt in
# to. Tried in order after the entry; the first that fits is launched. 128 x 32 keeps the
# 128-query tile (K/V read once per 128 queries) and the 3-stage pipeline (72 KB).
_CUDA_FWD_SMALLER = {
    ("fwd", 128, False): [(128, 32, 8, 3)],
}


def fwd_shared_bytes(config, block_d: int, elem_bytes: int = 2, segments: bool = False,
                     bias: bool = False) -> int:
    """Shared memory of a forward build on the mma.sync GPUs (sm_80, sm_86, sm_89, sm_120), in
    bytes: the Q tile, num_stages - 1 pipeline buffers of the K and V tiles, and the P tile's
    trip from the accumulator to the operand layout; with segments, room for the key tile's int32
    ids in each pipeline buffer (the fp16 D=256 build pipelines them: 128 B over the rest).
    Equal to what triton 3.8 allocates for every shipped forward build on sm_80 without segments,
    at least that with them; tests/test_aot_attention.py checks it bounds the compiled builds on
    sm_80 and sm_86. (sm_90's wgmma builds take more, but every sm_90 GPU allows 227 KB.)"""
    block_m, block_n, _, stages = config
    ids = 4 * (stages - 1) * block_n if segments else 0
    ids += _bias_shared_bytes(config) if bias else 0
    return elem_bytes * (block_m * block_d + 2 * (stages - 1) * block_n * block_d + block_m * block_n) + ids


def _bias_shared_bytes(config) -> int:
    """What a bias build's forward adds to fwd_shared_bytes: the fp32 bias tile in each pipeline
    buffer (equal to what triton 3.8 allocates for the bias builds on sm_80)."""
    block_m, block_n, _, stages = config
    return 4 * (stages - 1) * block_m * block_n


def fwd_configs(key, dropout: bool = False, segments: bool = False, bias: bool = False):
    """Every forward config the launcher can pick for key, in order of preference."""
    first = shipped_config(key, dropout, segments, bias)
    smaller = (_CUDA_BIAS_FWD_SMALLER if bias else _CUDA_FWD_SMALLER).get(key, [])
    return [first] + [c for c in smaller if c != first]


def fwd_config(key, dropout: bool = False, segments: bool = False, shared_limit=None,
               bias: bool = False):
    """The first of fwd_configs that fits shared_limit bytes per block (None: no limit known).
    When none fits, the smallest: its launch failure falls back to the reference."""
    configs = fwd_configs(key, dropout, segments, bias)
    fits = [c for c in configs if shared_limit is None
            or fwd_shared_bytes(c, key[1], segments=segments, bias=bias) <= shared_limit]
    return fits[0] if fits else configs[-1]


# The bias gradient (attention_bwd_dbias_kernel): a BLOCK_M × BLOCK_N tile of dS per program,
# rebuilt for each batch row (S and dP: two products), keyed on the head-dim bucket.
# 64 x 64 tiles spilled on sm_80 in every bucket; at head dim 128 so did 64 x 32 (4 and 8 warps)
# and 32 x 32 over two stages with dropout, while three stages fit (0 spills, sm_80 and sm_90).
_CUDA_DBIAS_CONFIGS = {64: (64, 32, 4, 2), 128: (32, 32, 8, 3), 256: (32, 32, 8, 2)}
# Programs the bias gradient aims for per SM: a bias shared by the batch splits the batch into
# as many groups as it takes to reach this (each group one fp32 [H, N, N] partial).
_DBIAS_PROGRAMS_PER_SM = 4


def dbias_config(head_dim: int, dropout: bool = False, segments: bool = False):
    """The CUDA (BLOCK_M, BLOCK_N, num_warps, num_stages) of attention_bwd_dbias_kernel."""
    return _CUDA_DBIAS_CONFIGS[max(64, _block_d(head_dim))]


def dbias_groups(batch: int, tiles: int, heads: int, shared: bool, sms=None) -> int:
    """How many batch groups the bias gradient runs (its fp32 partials: groups × [H, N, N]).
    A per-batch bias: one per batch row. A shared one: enough for _DBIAS_PROGRAMS_PER_SM
    programs per SM over tiles × heads (sms None, the interpreter: 2, so the reduce runs), at
    most the batch: the partials stay under (4·SMs·BLOCK_M·BLOCK_N + H·N²)·4 bytes whatever B."""
    if not shared:
        return batch
    want = 2 if sms is None else cdiv(_DBIAS_PROGRAMS_PER_SM * sms, tiles * heads)
    per_group = cdiv(batch, max(1, min(batch, want)))
    return cdiv(batch, per_group)  # no group left empty
