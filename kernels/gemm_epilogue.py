"""Jit pieces the GEMM kernels share: the grouped tile order and the fused epilogue of one output
(sub)tile. kernels/matmul_hopper.py calls them once per epilogue subtile; they are inlined, so a
caller pays only for the flags it sets.
"""
import triton
import triton.language as tl

from .matmul import _gelu_cdf


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
    C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
):
    """Finish the fp32 tile ``acc`` [len(offs_m), len(offs_n)] of A @ B as matmul_kernel's
    EPILOGUE says (0 none / bias / residual, 1 gelu, 2 dgelu; see its docstring for every flag)
    and store it; returns Σ_n acc·gelu(pre) per row when ROW_DOT (the caller sums the subtiles
    of one BLOCK_N tile and stores the row), else a zero row."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows64 = offs_m.to(tl.int64)
    row_dot = tl.zeros_like(offs_m).to(tl.float32)
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
        out = acc * (c + pre * dc)
        if HAS_SAMPLE_SCALE:
            out = out * ss[:, None]
            act = act * ss[:, None]
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
    return row_dot
