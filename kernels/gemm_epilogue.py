"""Jit pieces the GEMM kernels share: GELU's and SiLU's factors, the grouped tile order and the
fused epilogue of one output (sub)tile. kernels/matmul.py calls the epilogue once per tile,
kernels/matmul_hopper.py once per epilogue subtile; jit functions are inlined, so a caller pays
only for the flags it sets.
"""
import triton
import triton.language as tl


@triton.jit
def _gelu_cdf(x, APPROX_TANH: tl.constexpr):
    """(c, dc) with gelu(x) = x·c(x) and gelu'(x) = c + x·dc; fp32 in and out.

    erf form: c = ½(1 + erf(x/√2)), dc = φ(x). tanh form: c = ½(1 + tanh u), u = √(2/π)(x + 0.044715x³).
    A caller that needs only gelu leaves dc unused and the compiler drops it.
    """
    if APPROX_TANH:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh through exp: no tanh in tl.math, and libdevice does not run under the interpreter.
        # exp overflow to inf still gives the right limit (t -> 1).
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        c = 0.5 * (1.0 + t)
        dc = 0.5 * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        c = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        dc = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return c, dc


@triton.jit
def _silu_parts(g):
    """(σ(g), silu(g)) with silu(g) = g·σ(g) and silu'(g) = σ + silu·(1 - σ); fp32 in and out.

    σ through exp, not tl.sigmoid's libdevice path (the interpreter has no libdevice); exp(-g)
    overflowing to inf for very negative g still gives the right limit (σ -> 0).
    """
    s = 1.0 / (1.0 + tl.exp(-g))
    return s, g * s


@triton.jit
def _column_pairs(t):
    """(even, odd) columns of t [R, 2k] (or elements of a 1-D [2k]): the gate and value halves
    of a GLU tile whose B columns interleave them. The pair sits in adjacent accumulator
    columns, which the MMA layouts keep in one thread."""
    if len(t.shape) == 1:
        pairs = tl.reshape(t, (t.shape[0] // 2, 2))
    else:
        pairs = tl.reshape(t, (t.shape[0], t.shape[1] // 2, 2))
    return tl.split(pairs)


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile_id``: GROUP_M row-tiles share each B column-tile while
    it is still in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def epilogue_store(
    acc, offs_m, offs_n, M, N, rows_per_sample,
    C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT, rowdot_row,
    stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
):
    """Finish the fp32 tile ``acc`` [len(offs_m), len(offs_n)] of A @ B as matmul_kernel's
    EPILOGUE says (0 none / bias / residual, 1 gelu, 2 dgelu, 3 glu, 4 dglu, 5 dident; see its
    docstring for every flag and layout) and store it. ROW_DOT stores Σ_n acc·act over this
    tile's columns into row ``rowdot_row`` of ROWDOT [rows, M] (the launcher sums the rows in a
    fixed order)."""
    if EPILOGUE == 3:
        _glu_store(acc, offs_m, offs_n, M, N, C, BIAS, PRE, stride_cm, stride_cn, stride_pm,
                   HAS_BIAS, STORE_PRE)
    elif EPILOGUE == 4:
        _dglu_store(acc, offs_m, offs_n, M, N, rows_per_sample, C, PRE, ACT, SSCALE, ROWDOT,
                    rowdot_row, stride_cm, stride_cn, stride_pm, STORE_ACT, ROW_DOT,
                    HAS_SAMPLE_SCALE)
    else:
        _epilogue_store_n(acc, offs_m, offs_n, M, N, rows_per_sample,
                          C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT, rowdot_row,
                          stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
                          HAS_BIAS, EPILOGUE, APPROX_TANH, STORE_PRE, STORE_ACT, ROW_DOT,
                          HAS_RESIDUAL, HAS_LAYER_SCALE, HAS_SAMPLE_SCALE)


@triton.jit
def _epilogue_store_n(
    acc, offs_m, offs_n, M, N, rows_per_sample,
    C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT, rowdot_row,
    stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
):
    """The epilogues whose output C has the tile's own shape (EPILOGUE 0, 1, 2, 5)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows64 = offs_m.to(tl.int64)
    if HAS_SAMPLE_SCALE:
        ss = tl.load(SSCALE + offs_m // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    aux_offs = rows64[:, None] * stride_pm + offs_n[None, :]
    if EPILOGUE == 1:
        if STORE_PRE:
            tl.store(PRE + aux_offs, acc.to(PRE.dtype.element_ty), mask=mask)
        # GELU of the pre-activation as rounded to its storage dtype: the backward's recompute
        # from the saved PRE agrees bit for bit.
        pre = acc.to(C.dtype.element_ty).to(tl.float32)
        c, dc = _gelu_cdf(pre, APPROX_TANH)
        out = pre * c
    elif EPILOGUE == 2:
        pre = tl.load(PRE + aux_offs, mask=mask, other=0.0).to(tl.float32)
        c, dc = _gelu_cdf(pre, APPROX_TANH)
        act = pre * c
        if ROW_DOT:
            row_dot = tl.sum(acc * act, axis=1)
        # Finish with acc, c and dc before any store so only act and out stay live (no spills).
        out = acc * (c + pre * dc)
        if HAS_SAMPLE_SCALE:
            out = out * ss[:, None]
            act = act * ss[:, None]
        if ROW_DOT:
            tl.store(ROWDOT + rowdot_row.to(tl.int64) * M + offs_m, row_dot, mask=mask_m)
        if STORE_ACT:
            tl.store(ACT + aux_offs, act.to(ACT.dtype.element_ty), mask=mask)
    elif EPILOGUE == 5:
        # dGELU's epilogue with the identity as activation: fc2's input is PRE itself (the GLU
        # MLP's rebuilt hidden LayerNorm output).
        act = tl.load(PRE + aux_offs, mask=mask, other=0.0).to(tl.float32)
        if ROW_DOT:
            row_dot = tl.sum(acc * act, axis=1)
        out = acc
        if HAS_SAMPLE_SCALE:
            out = out * ss[:, None]
            act = act * ss[:, None]
        if ROW_DOT:
            tl.store(ROWDOT + rowdot_row.to(tl.int64) * M + offs_m, row_dot, mask=mask_m)
        if STORE_ACT:
            tl.store(ACT + aux_offs, act.to(ACT.dtype.element_ty), mask=mask)
    else:
        out = acc
        if HAS_RESIDUAL:
            if HAS_LAYER_SCALE:
                out = out * tl.load(LSCALE + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if HAS_SAMPLE_SCALE:
                out = out * ss[:, None]
            res_ptrs = RES + rows64[:, None] * stride_rm + offs_n[None, :] * stride_rn
            out = out + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    c_ptrs = C + rows64[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _glu_store(acc, offs_m, offs_n, M, N, C, BIAS, PRE, stride_cm, stride_cn, stride_pm,
               HAS_BIAS: tl.constexpr, STORE_PRE: tl.constexpr):
    """EPILOGUE 3, the GLU forward: acc's columns interleave gate and value (B column 2j is the
    gate of hidden unit j, 2j+1 its value; N = 2H). C [M, H] <- silu(gate)·value; PRE [M, 2H]
    (row stride stride_pm) <- gate in columns [0, H), value in [H, 2H) when STORE_PRE."""
    mask_m = offs_m < M
    rows64 = offs_m.to(tl.int64)
    if HAS_BIAS:  # interleaved like B's columns
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    gate, value = _column_pairs(acc)
    offs_h, _odd = _column_pairs(offs_n)
    # offs_h = offs_n[0]/2 + arange(HALF): said as hints, which the split hides from the
    # compiler; without them every store is scalar.
    HALF: tl.constexpr = offs_n.shape[0] // 2
    offs_h = tl.max_contiguous(tl.multiple_of(offs_h // 2, HALF), HALF)
    H = N // 2
    mask = mask_m[:, None] & (offs_h < H)[None, :]
    # The activation of the pre-activations as rounded to their storage dtype: the backward's
    # recompute from the saved PRE agrees bit for bit.
    gate = gate.to(C.dtype.element_ty)
    value = value.to(C.dtype.element_ty)
    if STORE_PRE:
        pre_ptrs = PRE + rows64[:, None] * stride_pm + offs_h[None, :]
        tl.store(pre_ptrs, gate.to(PRE.dtype.element_ty), mask=mask)
        tl.store(pre_ptrs + H, value.to(PRE.dtype.element_ty), mask=mask)
    gate = gate.to(tl.float32)
    _s, silu = _silu_parts(gate)
    out = silu * value.to(tl.float32)
    c_ptrs = C + rows64[:, None] * stride_cm + offs_h[None, :] * stride_cn
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _dglu_store(acc, offs_m, offs_n, M, N, rows_per_sample, C, PRE, ACT, SSCALE, ROWDOT,
                rowdot_row, stride_cm, stride_cn, stride_pm,
                STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr):
    """EPILOGUE 4, the GLU backward: acc = d_act over hidden columns (N = H). With gate, value
    read from PRE [M, 2H] (row stride stride_pm; gate in [0, H), value in [H, 2H)), s = σ(gate),
    d = acc·ss[m // rows_per_sample]:
        C [M, 2H] <- d·value·silu'(gate) in columns [0, H), d·silu(gate) in [H, 2H);
        ACT [M, H] (contiguous) <- silu(gate)·value·ss when STORE_ACT (fc2's input, for dW2);
        ROWDOT[rowdot_row, m] <- Σ_n acc·silu(gate)·value when ROW_DOT.
    """
    mask_m = offs_m < M
    BM: tl.constexpr = acc.shape[0]
    HALF: tl.constexpr = acc.shape[1] // 2
    parts = tl.split(tl.permute(tl.reshape(acc, (BM, 2, HALF)), (0, 2, 1)))
    cols = tl.split(tl.permute(tl.reshape(offs_n, (2, HALF)), (1, 0)))
    if HAS_SAMPLE_SCALE:
        ss = tl.load(SSCALE + offs_m // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)
    if ROW_DOT:
        row_dot = tl.zeros((BM,), dtype=tl.float32)
    rows64 = offs_m.to(tl.int64)
    for i in tl.static_range(2):
        d = parts[i]
        cols_i = tl.max_contiguous(tl.multiple_of(cols[i], HALF), HALF)
        mask = mask_m[:, None] & (cols_i < N)[None, :]
        pre_ptrs = PRE + rows64[:, None] * stride_pm + cols_i[None, :]
        s, silu = _silu_parts(tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32))
        value = tl.load(pre_ptrs + N, mask=mask, other=0.0).to(tl.float32)
        act = silu * value
        if ROW_DOT:
            row_dot += tl.sum(d * act, axis=1)
        if HAS_SAMPLE_SCALE:
            d = d * ss[:, None]
            act = act * ss[:, None]
        if STORE_ACT:
            tl.store(ACT + rows64[:, None] * N + cols_i[None, :], act.to(ACT.dtype.element_ty),
                     mask=mask)
        c_ptrs = C + rows64[:, None] * stride_cm + cols_i[None, :] * stride_cn
        tl.store(c_ptrs + N * stride_cn, (d * silu).to(C.dtype.element_ty), mask=mask)
        tl.store(c_ptrs, (d * value * (s + silu * (1.0 - s))).to(C.dtype.element_ty), mask=mask)
    if ROW_DOT:
        tl.store(ROWDOT + rowdot_row.to(tl.int64) * M + offs_m, row_dot, mask=mask_m)
