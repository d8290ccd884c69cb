"""Jit pieces the GEMM kernels share: GELU's factors, the grouped tile order and the fused
epilogue of one output (sub)tile. kernels/matmul.py calls the epilogue once per tile,
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
    EPILOGUE says (0 none / bias / residual, 1 gelu, 2 dgelu; see its docstring for every flag)
    and store it. ROW_DOT stores Σ_n acc·gelu(pre) over this tile's columns into row
    ``rowdot_row`` of ROWDOT [rows, M] (the launcher sums the rows in a fixed order)."""
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
