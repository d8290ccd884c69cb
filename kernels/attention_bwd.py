"""The attention backward kernels: Δ pre-pass, dK/dV (one program per key tile; with WRITE_DQ
also dq's per-key-tile partials, then the dq reduce) and dQ (one program per query tile, the
path for long sequences). The math, the layouts and the dropout and segment terms are stated in
attention.py's header; attention.py launches these (attention_bwd)."""
import triton
import triton.language as tl

from .attention_dropout import _dropout_keep, _keep_threshold
from .attention_segments import _segment_mask, _segment_rows, _segment_span, _segment_tile
from .attention_tiles import _LOG2E, _bias_tile, _load_rows, _operand, _store_rows, _tile_of_head


@triton.jit
def attention_bwd_delta_kernel(
    O,      # [B, N, H*D]
    DO,     # [B, N, H*D]
    DELTA,  # [B, H, N] fp32, contiguous
    N, H,
    stride_o_b, stride_o_n, stride_do_b, stride_do_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Δ_i = Σ_d dO_id·out_id in fp32: the row term of dS, computed once instead of per key block."""
    b, h, bh, start_m = _tile_of_head(N, H, BLOCK_M)
    o = _load_rows(O + b.to(tl.int64) * stride_o_b + h * HEAD_DIM, start_m, N, stride_o_n,
                   HEAD_DIM, BLOCK_M, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b.to(tl.int64) * stride_do_b + h * HEAD_DIM, start_m, N, stride_do_n,
                    HEAD_DIM, BLOCK_M, BLOCK_D).to(tl.float32)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(DELTA + bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=rows < N)


@triton.jit
def _bias_head(BIAS, b, h, stride_bias_b, stride_bias_h, HAS_BIAS: tl.constexpr):
    """Where head h of batch row b's [N, N] bias starts (BIAS itself, None, without a bias)."""
    base = BIAS
    if HAS_BIAS:
        base = BIAS + b.to(tl.int64) * stride_bias_b + h.to(tl.int64) * stride_bias_h
    return base


@triton.jit
def _bwd_setup(SEED, dropout_p, SEG, SPANS, b, row0, N, BLOCK: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """What both backward kernels need before their loop, for the program owning rows row0..
    (a BLOCK-row tile) of batch row b: the dropout key, keep threshold and 1/(1 - p) (0, 0, 1
    without dropout), and with segments its row of SEG, the ids of its rows and the span
    [lo, hi) of the other side it visits (else the whole sequence)."""
    seed, keep_from, keep_scale = 0, 0, 1.0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        keep_from = _keep_threshold(dropout_p)
        keep_scale = 1.0 / (1.0 - dropout_p)
    seg_row, ids, lo, hi = 0, 0, 0, N  # (a jit function cannot return None on triton 3.6)
    if HAS_SEGMENTS:
        seg_row, ids, lo, hi = _segment_tile(SEG, SPANS, b, row0, N, BLOCK)
    return seed, keep_from, keep_scale, seg_row, ids, lo, hi


@triton.jit
def attention_bwd_dkdv_kernel(
    QKV,    # [B, N, 3*H*D]
    DO,     # [B, N, H*D]
    LSE,    # [B, H, N] fp32, contiguous
    DELTA,  # [B, H, N] fp32, contiguous
    DQKV,   # [B, N, 3*H*D]; this kernel writes the k and v thirds
    SEED,   # [1] int64, the forward's dropout key; None without dropout
    N, H,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    sm_scale, qk_scale, dropout_p,
    SEG,    # [B, N] int32 segment ids; None without
    SPANS,  # [B, cdiv(N, BLOCK_N), 2] int32: the queries each key tile visits
    DQ,     # WRITE_DQ: [n_key_blocks, B, N, H*D] (strides below) this key tile's share of dq,
            # scaled; fp32 partials, or dqkv's q third itself when one key tile covers N. None
    stride_dq_kb, stride_dq_b, stride_dq_n,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, WRITE_DQ: tl.constexpr = False,
    BIAS=None,  # [B or 1, H, N, N] fp32, the forward's additive bias; None without
    stride_bias_b=0, stride_bias_h=0, stride_bias_m=0, HAS_BIAS: tl.constexpr = False,
):
    """One program = one BLOCK_N tile of keys of one (b, h): dk, dv accumulate over all queries
    (with segments: the query tiles of its span). With WRITE_DQ it also writes, per query tile,
    this key tile's term of dq (s·dS k over its keys): 5 products per tile pair instead of the
    7 that a separate dq pass (which recomputes S and dP) costs; attention_bwd_dq_reduce_kernel
    sums the partials in key-tile order, so the result is bitwise reproducible without atomics.

    Works on the transposed tiles (keys × queries) so that both products take their K-side
    operand as loaded and need no transpose of an accumulator.
    """
    b, h, bh, start_n = _tile_of_head(N, H, BLOCK_N)
    q_base = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    do_base = DO + b.to(tl.int64) * stride_do_b + h * HEAD_DIM
    row_base = bh.to(tl.int64) * N
    dtype = QKV.dtype.element_ty
    bias_base = _bias_head(BIAS, b, h, stride_bias_b, stride_bias_h, HAS_BIAS)

    k = _operand(_load_rows(q_base + H * HEAD_DIM, start_n, N, stride_qkv_n, HEAD_DIM, BLOCK_N, BLOCK_D), DOT_FP32)
    v = _operand(_load_rows(q_base + 2 * H * HEAD_DIM, start_n, N, stride_qkv_n, HEAD_DIM, BLOCK_N, BLOCK_D), DOT_FP32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    seed, keep_from, keep_scale, seg_row, k_ids, lo, hi = _bwd_setup(
        SEED, dropout_p, SEG, SPANS, b, start_n, N, BLOCK_N, HAS_DROPOUT, HAS_SEGMENTS)
    if WRITE_DQ:
        dq_base = (DQ + (start_n // BLOCK_N).to(tl.int64) * stride_dq_kb
                   + b.to(tl.int64) * stride_dq_b + h * HEAD_DIM)
        key_ok = (start_n + tl.arange(0, BLOCK_N)) < N
    for start_m in range(lo, hi, BLOCK_M):
        q = _operand(_load_rows(q_base, start_m, N, stride_qkv_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
        do = _operand(_load_rows(do_base, start_m, N, stride_do_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
        rows = start_m + offs_m
        lse2 = tl.load(LSE + row_base + rows, mask=rows < N, other=0.0) * _LOG2E
        delta = tl.load(DELTA + row_base + rows, mask=rows < N, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s_t += _bias_tile(bias_base, start_m, start_n, N, stride_bias_m, BLOCK_M, BLOCK_N, True)
        # Padded query rows need no mask: their q, dO, lse and Δ load as 0, so p = 1 there and
        # every term they add to dv (p·dO) and dk (p·(dP − Δ)·q) is exactly 0.
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if HAS_SEGMENTS:
            q_ids = _segment_rows(seg_row, start_m, N, BLOCK_M)
            p_t = tl.where(_segment_mask(k_ids, q_ids), p_t, 0.0)
        elif WRITE_DQ:
            # Padded keys (zero vectors) only feed rows of dk/dv that are never stored, but dq
            # takes ds·k over them: exp2(0 - lse) overflows when every logit of the row is
            # below about -88 and inf·0 is NaN, so they get p = 0. Only the last key tile has
            # any (a branch the whole CTA takes or skips together).
            if start_n + BLOCK_N > N:
                p_t = tl.where(key_ok[:, None], p_t, 0.0)
        if HAS_DROPOUT:
            # dv takes the dropped Z without its 1/(1 - p), applied once at the store.
            keep_t = tl.trans(_dropout_keep(seed, start_m, start_n, bh, keep_from, BLOCK_M, BLOCK_N))
            z_t = tl.where(keep_t, p_t, 0.0)
        else:
            z_t = p_t
        dv += tl.dot(_operand(z_t.to(dtype), DOT_FP32), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        ds_t = _operand((p_t * (dp_t - delta[None, :])).to(dtype), DOT_FP32)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if WRITE_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            _store_rows(dq_base, start_m, N, stride_dq_n, (dq * sm_scale).to(DQ.dtype.element_ty),
                        HEAD_DIM, BLOCK_M, BLOCK_D)
    out_dtype = DQKV.dtype.element_ty
    dk_base = DQKV + b.to(tl.int64) * stride_dqkv_b + (H + h) * HEAD_DIM
    _store_rows(dk_base, start_n, N, stride_dqkv_n, (dk * sm_scale).to(out_dtype), HEAD_DIM, BLOCK_N, BLOCK_D)
    if HAS_DROPOUT:
        dv = dv * keep_scale
    _store_rows(dk_base + H * HEAD_DIM, start_n, N, stride_dqkv_n, dv.to(out_dtype), HEAD_DIM, BLOCK_N, BLOCK_D)


@triton.jit
def attention_bwd_dq_reduce_kernel(
    PART,   # [n_key_blocks, B, N, H*D] fp32: each key tile's (scaled) share of dq
    DQKV,   # [B, N, 3*H*D]; this kernel writes the q third
    N, H, n_key_blocks,
    stride_part_kb, stride_part_b, stride_part_n, stride_dqkv_b, stride_dqkv_n,
    SPANS,  # [B, n_key_blocks, 2] int32: the dK/dV launch's spans (query rows each key tile
            # visited); None without segments
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    KEY_BLOCK: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
):
    """dq = Σ_kb PART[kb], summed in fp32 in key-tile order (fixed: bitwise reproducible), one
    program per BLOCK_M query rows of one (b, h). With segments, key tile kb wrote only the query
    rows of its span, so exactly those rows of PART[kb] are read; the others add 0."""
    b, h, bh, start_m = _tile_of_head(N, H, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < HEAD_DIM)
    part = PART + b.to(tl.int64) * stride_part_b + h * HEAD_DIM + rows[:, None] * stride_part_n + cols[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for kb in range(0, n_key_blocks):
        read = mask
        if HAS_SEGMENTS:
            lo, hi = _segment_span(SPANS, b, kb, N, KEY_BLOCK)
            read = read & ((rows >= lo) & (rows < hi))[:, None]
        # int64: PART holds n_key_blocks copies of dq, past 2^31 elements at large B·N
        dq += tl.load(part + tl.cast(kb, tl.int64) * stride_part_kb, mask=read, other=0.0)
    _store_rows(DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM, start_m, N, stride_dqkv_n,
                dq.to(DQKV.dtype.element_ty), HEAD_DIM, BLOCK_M, BLOCK_D)


@triton.jit
def attention_bwd_dq_kernel(
    QKV,    # [B, N, 3*H*D]
    DO,     # [B, N, H*D]
    LSE,    # [B, H, N] fp32, contiguous
    DELTA,  # [B, H, N] fp32, contiguous
    DQKV,   # [B, N, 3*H*D]; this kernel writes the q third
    SEED,   # [1] int64, the forward's dropout key; None without dropout
    N, H,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n, stride_dqkv_b, stride_dqkv_n,
    sm_scale, qk_scale, dropout_p,
    SEG,    # [B, N] int32 segment ids; None without
    SPANS,  # [B, cdiv(N, BLOCK_M), 2] int32: the keys each query tile visits
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS=None,  # [B or 1, H, N, N] fp32, the forward's additive bias; None without
    stride_bias_b=0, stride_bias_h=0, stride_bias_m=0, HAS_BIAS: tl.constexpr = False,
):
    """One program = one BLOCK_M tile of queries of one (b, h): dq accumulates over all keys
    (with segments: the key tiles of its span). The path for long sequences, where the fused
    pass's partials (one per key tile) would cost too much memory."""
    b, h, bh, start_m = _tile_of_head(N, H, BLOCK_M)
    q_base = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    k_base = q_base + H * HEAD_DIM
    v_base = q_base + 2 * H * HEAD_DIM
    dtype = QKV.dtype.element_ty
    bias_base = _bias_head(BIAS, b, h, stride_bias_b, stride_bias_h, HAS_BIAS)

    q = _operand(_load_rows(q_base, start_m, N, stride_qkv_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
    do = _operand(_load_rows(DO + b.to(tl.int64) * stride_do_b + h * HEAD_DIM, start_m, N, stride_do_n,
                             HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    lse2 = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    seed, keep_from, keep_scale, seg_row, q_ids, lo, hi = _bwd_setup(
        SEED, dropout_p, SEG, SPANS, b, start_m, N, BLOCK_M, HAS_DROPOUT, HAS_SEGMENTS)
    for start_n in range(lo, hi, BLOCK_N):
        k = _operand(_load_rows(k_base, start_n, N, stride_qkv_n, HEAD_DIM, BLOCK_N, BLOCK_D), DOT_FP32)
        v = _operand(_load_rows(v_base, start_n, N, stride_qkv_n, HEAD_DIM, BLOCK_N, BLOCK_D), DOT_FP32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s += _bias_tile(bias_base, start_m, start_n, N, stride_bias_m, BLOCK_M, BLOCK_N)
        # Padded keys are zero vectors, so their ds·k terms vanish, except that exp2(0 - lse)
        # overflows when every logit of the row is below about -88 and inf·0 is NaN: mask them.
        if HAS_SEGMENTS:  # the same, and keys of other segments (padding queries: lse = +inf)
            k_ids = _segment_rows(seg_row, start_n, N, BLOCK_N)
            p = tl.where(_segment_mask(q_ids, k_ids), tl.math.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.where((start_n + offs_n)[None, :] < N, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, start_m, start_n, bh, keep_from, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_operand(ds.to(dtype), DOT_FP32), k, input_precision=DOT_PRECISION)
    dq_base = DQKV + b.to(tl.int64) * stride_dqkv_b + h * HEAD_DIM
    _store_rows(dq_base, start_m, N, stride_dqkv_n, (dq * sm_scale).to(DQKV.dtype.element_ty),
                HEAD_DIM, BLOCK_M, BLOCK_D)


@triton.jit
def attention_bwd_dbias_kernel(
    QKV,    # [B, N, 3*H*D]
    DO,     # [B, N, H*D]
    LSE,    # [B, H, N] fp32, contiguous
    DELTA,  # [B, H, N] fp32, contiguous
    BIAS,   # [B or 1, H, N, N] fp32, the forward's bias (unit key stride)
    DBIAS,  # [G, H, N, N] fp32, contiguous: group g's sum of dS over its batch rows
    SEED,   # [1] int64, the forward's dropout key; None without dropout
    N, H, B, rows_per_group,
    stride_qkv_b, stride_qkv_n, stride_do_b, stride_do_n,
    stride_bias_b, stride_bias_h, stride_bias_m,
    qk_scale, dropout_p,
    keep_scale,  # 1 / (1 - dropout_p), from the host: the division's slow path spilled on sm_80
    SEG,    # [B, N] int32 segment ids; None without
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The bias gradient: the logit gradient dS = P ∘ (dP − Δ) summed over batch rows.

    Program (tile, h, g) owns the BLOCK_M × BLOCK_N tile `tile` (query tile major) of head h and
    walks the batch rows [g·rows_per_group, (g+1)·rows_per_group) in order, rebuilding S and dP
    of each (two products, as the dQ pass does) and adding its dS into one fp32 register tile,
    stored once: no atomics, no per-batch N×N tensor. A bias shared by the batch launches few
    groups (their [G, H, N, N] partials are then summed in a fixed order); a per-batch bias one
    group per row (rows_per_group 1, DBIAS its gradient). With segments every tile is visited
    and masked exactly (no span skipping: a branch around the loads would stop them being
    pipelined across batch rows, and spilled)."""
    n_key_tiles = tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    start_m = (tile // n_key_tiles) * BLOCK_M
    start_n = (tile % n_key_tiles) * BLOCK_N
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    key_ok = (start_n + tl.arange(0, BLOCK_N)) < N
    seed, keep_from = 0, 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        keep_from = _keep_threshold(dropout_p)
    ds_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_end = tl.minimum(B, (g + 1) * rows_per_group)
    # The loop runs over bh = b·H + h, not b: with b as the induction variable and bh derived,
    # ptxas (CUDA 12.8/13) gave the dropout builds 32 registers and a 3.7 KB stack frame.
    for bh in range(g * rows_per_group * H + h, b_end * H, H):
        bh = tl.cast(bh, tl.int32)  # a Python int under the interpreter
        b = bh // H
        q_base = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
        q = _operand(_load_rows(q_base, start_m, N, stride_qkv_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
        k = _operand(_load_rows(q_base + H * HEAD_DIM, start_n, N, stride_qkv_n, HEAD_DIM,
                                BLOCK_N, BLOCK_D), DOT_FP32)
        v = _operand(_load_rows(q_base + 2 * H * HEAD_DIM, start_n, N, stride_qkv_n, HEAD_DIM,
                                BLOCK_N, BLOCK_D), DOT_FP32)
        do = _operand(_load_rows(DO + b.to(tl.int64) * stride_do_b + h * HEAD_DIM, start_m, N,
                                 stride_do_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
        lse2 = tl.load(LSE + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0) * _LOG2E
        delta = tl.load(DELTA + bh.to(tl.int64) * N + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s += _bias_tile(_bias_head(BIAS, b, h, stride_bias_b, stride_bias_h, True), start_m,
                        start_n, N, stride_bias_m, BLOCK_M, BLOCK_N)
        # Padded keys get p = 0 (exp2(0 - lse) may overflow); padded queries load q, dO, lse and
        # Δ as 0, so their dS is 0. With segments, pairs of other segments and padding get 0.
        if HAS_SEGMENTS:
            seg_row = SEG + b.to(tl.int64) * N
            same = _segment_mask(_segment_rows(seg_row, start_m, N, BLOCK_M),
                                 _segment_rows(seg_row, start_n, N, BLOCK_N))
            p = tl.where(same, tl.math.exp2(s - lse2[:, None]), 0.0)
        else:
            p = tl.where(key_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, start_m, start_n, bh, keep_from, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds_sum += p * (dp - delta[:, None])
    cols = start_n + tl.arange(0, BLOCK_N)
    out = DBIAS + (g * H + h).to(tl.int64) * N * N
    tl.store(out + rows[:, None] * N + cols[None, :], ds_sum,
             mask=row_ok[:, None] & key_ok[None, :])
