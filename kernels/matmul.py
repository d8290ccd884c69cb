"""Tiled GEMM with fused epilogues (bias, GELU, dGELU, LayerScale + drop-path + residual), and a
deterministic column sum. Used by the GELU-MLP forward and backward (``gelu_mlp.py``).

One kernel, constexpr flags per epilogue: every variant is the same tile loop, so the compiler
drops what a launch does not use.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import interpreting, on_tensor_device

EPILOGUE = {"none": 0, "gelu": 1, "dgelu": 2}


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
def matmul_kernel(
    A, B, C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT,
    M, N, K, rows_per_sample,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """acc = A @ B in fp32 (A [M, K], B [K, N], any strides), then by EPILOGUE:

    0 none:  out = acc (+ bias[n]); with HAS_RESIDUAL out = res + out·ls[n]·ss[m // rows_per_sample]
             (ls, ss each optional).                                              C <- out
    1 gelu:  pre = acc (+ bias[n]); C <- gelu(pre); PRE <- pre when STORE_PRE (what backward keeps).
    2 dgelu: pre read from PRE; d_act = acc (·ss[m // rows_per_sample]);  C <- d_act·gelu'(pre);
             ACT <- gelu(pre)(·ss[...]) when STORE_ACT (recomputed for fc2's weight gradient);
             ROWDOT[pid_n, m] <- Σ_n∈tile acc·gelu(pre) when ROW_DOT (for the sample_scale grad).

    Layouts: C [M, N] (strides stride_cm/cn, its dtype is the output dtype); BIAS, LSCALE [N];
    SSCALE [M // rows_per_sample]; PRE and ACT [M, N] with row stride stride_pm, unit column stride;
    RES [M, N] (stride_rm/rn); ROWDOT fp32 [cdiv(N, BLOCK_N), M]. Unused pointers are never read.
    """
    # Grouped ordering: GROUP_M row-tiles share each B column-tile while it is still in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: row · row-stride passes 2^31 once M·max(K, N) does (ViT-B's hidden 3072
    # at ~700k rows). Column offsets stay 32-bit: a tile spans at most BLOCK columns.
    rows64 = offs_m.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_FP32:
            # The interpreter computes 16-bit dots wrongly; compiled kernels keep tensor-core dots.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_SAMPLE_SCALE:
        ss = tl.load(SSCALE + offs_m // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    aux_offs = rows64[:, None] * stride_pm + offs_n[None, :]

    if EPILOGUE == 1:
        if STORE_PRE:
            tl.store(PRE + aux_offs, acc.to(PRE.dtype.element_ty), mask=mask)
        # GELU is applied to the pre-activation as rounded to its storage dtype, so the forward
        # output and the backward's recompute from the saved PRE agree bit for bit.
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
            tl.store(ROWDOT + pid_n.to(tl.int64) * M + offs_m, row_dot, mask=mask_m)
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
def colsum_kernel(X, SSCALE, OUT, M, N, rows_per_chunk, rows_per_sample, stride_xm, stride_xn,
                  HAS_SAMPLE_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[chunk, n] = Σ_{m in chunk} X[m, n]·ss[m // rows_per_sample] (ss optional), in fp32.

    X [M, N] any strides; SSCALE [M // rows_per_sample]; OUT fp32 [cdiv(M, rows_per_chunk), N].
    Row chunks give the GPU enough programs; summing the chunks afterwards in a fixed order keeps
    the bias gradient deterministic without atomics. rows_per_chunk is a multiple of BLOCK_M.
    """
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_end = tl.minimum(M, (chunk + 1) * rows_per_chunk)
    for m0 in range(chunk * rows_per_chunk, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if HAS_SAMPLE_SCALE:
            x = x * tl.load(SSCALE + offs_m // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        acc += x
    tl.store(OUT + chunk.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=mask_n)


# Shipped tile configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). A fixed table
# instead of @triton.autotune: the tile shape fixes the summation order, so picking it by timing
# would make results depend on the benchmark run. Every entry passes AOT with 0 spills.
CONFIGS = {
    "128x128_16": (128, 128, 64, 8, 8, 3),
    "128x64_16": (128, 64, 64, 8, 8, 3),
    "64x64_16": (64, 64, 64, 8, 4, 4),
    "128x64_32": (128, 64, 32, 8, 8, 3),
    "64x64_32": (64, 64, 32, 8, 4, 3),
    "128x64x16_32": (128, 64, 16, 8, 8, 3),
}
COLSUM_BLOCK = (32, 128)  # (BLOCK_M, BLOCK_N) of colsum_kernel on CUDA
# Under the interpreter every program instance costs Python time: few, large tiles.
INTERPRET_CONFIG = (128, 128, 128, 8, 4, 1)


def config_name(M, N, dtype, epilogue, sms, precision="ieee"):
    """Large tiles once they fill the GPU, else small ones for more programs. The dGELU epilogue
    holds pre, act and the gradient at once: 128×128 spills there, so it gets 128×64. Exact fp32
    dots (FMA, no tensor cores) hold their operands in registers: BLOCK_K 16 keeps sm_80 unspilled."""
    if dtype == torch.float32 and precision == "ieee":
        return "128x64x16_32"
    if dtype == torch.float32:
        large = "128x64_32"
        small = "64x64_32"
    else:
        large = "128x64_16" if epilogue == "dgelu" else "128x128_16"
        small = "64x64_16"
    bm, bn = CONFIGS[large][:2]
    return large if triton.cdiv(M, bm) * triton.cdiv(N, bn) >= sms else small


def pick_config(M, N, dtype, device, epilogue="none"):
    if interpreting() or device.type != "cuda":
        return INTERPRET_CONFIG
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return CONFIGS[config_name(M, N, dtype, epilogue, sms, input_precision(dtype))]


def input_precision(dtype) -> str:
    # fp32 inputs use tf32 only when the user allowed it for matmuls, as torch does.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


@on_tensor_device
def matmul(a, b, out_dtype, *, bias=None, epilogue="none", approximate="none", pre=None,
           store_pre=False, store_act=False, row_dot=False, residual=None, layer_scale=None,
           sample_scale=None, rows_per_sample=1):
    """C = epilogue(a @ b) for a [M, K], b [K, N] (any strides); see matmul_kernel.

    Returns (C [M, N] contiguous out_dtype, aux, rowdot): aux is the pre-activation written by
    epilogue "gelu" with store_pre, or gelu(pre)(·ss) written by "dgelu" with store_act (a's
    dtype), else None; rowdot is fp32 [N-tiles, M] when row_dot, else None.
    """
    M, K = a.shape
    N = b.shape[1]
    dev = a.device
    # The epilogue indexes these as PTR + n (or + row // rows_per_sample): unit stride needed, and
    # a zero-stride ``expand`` would otherwise be read past its one element. Copies are [N] / [B].
    bias, layer_scale, sample_scale = (
        t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()
        for t in (bias, layer_scale, sample_scale))
    if pre is not None and pre.stride(1) != 1 and N > 1:
        pre = pre.contiguous()
    c = torch.empty((M, N), device=dev, dtype=out_dtype)
    aux = torch.empty((M, N), device=dev, dtype=a.dtype) if (store_pre or store_act) else None
    BM, BN, BK, GM, warps, stages = pick_config(M, N, a.dtype, dev, epilogue)
    rowdot = torch.empty((triton.cdiv(N, BN), M), device=dev, dtype=torch.float32) if row_dot else None
    if M == 0 or N == 0:
        if rowdot is not None:
            rowdot.zero_()
        return c, aux, rowdot
    if K == 0:  # an empty reduction is still a well-defined (bias-only) epilogue: use zeros
        a = a.new_zeros((M, 1))
        b = b.new_zeros((1, N))
        K = 1
    # Pointers a launch does not use still need a tensor; the kernel never dereferences them.
    pre_t = pre if pre is not None else (aux if store_pre else c)
    act_t = aux if store_act else c
    stride_pm = pre_t.stride(0)
    if aux is not None and pre is not None and aux.stride(0) != stride_pm:
        pre = pre.contiguous()  # PRE and ACT share one row stride in the kernel
        pre_t, stride_pm = pre, pre.stride(0)
    res = residual if residual is not None else c
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    matmul_kernel[grid](
        a, b, c, bias if bias is not None else c, pre_t, act_t, res,
        layer_scale if layer_scale is not None else c,
        sample_scale if sample_scale is not None else c,
        rowdot if rowdot is not None else c,
        M, N, K, rows_per_sample,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        stride_pm, res.stride(0), res.stride(1),
        HAS_BIAS=bias is not None, EPILOGUE=EPILOGUE[epilogue], APPROX_TANH=approximate == "tanh",
        STORE_PRE=store_pre, STORE_ACT=store_act, ROW_DOT=row_dot,
        HAS_RESIDUAL=residual is not None, HAS_LAYER_SCALE=layer_scale is not None,
        HAS_SAMPLE_SCALE=sample_scale is not None,
        DOT_FP32=interpreting(), INPUT_PRECISION=input_precision(a.dtype),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, num_warps=warps, num_stages=stages,
    )
    return c, aux, rowdot


@on_tensor_device
def colsum(x, sample_scale=None, rows_per_sample=1):
    """Σ_m x[m, :]·ss[m // rows_per_sample] in fp32 [N], deterministic (fixed chunks, fixed order)."""
    M, N = x.shape
    if M == 0 or N == 0:
        return torch.zeros(N, device=x.device, dtype=torch.float32)
    if sample_scale is not None and sample_scale.stride(0) != 1 and sample_scale.numel() > 1:
        sample_scale = sample_scale.contiguous()
    BLOCK_M, BLOCK_N = (256, 256) if interpreting() else COLSUM_BLOCK
    rows_per_chunk = BLOCK_M * max(1, triton.cdiv(triton.cdiv(M, BLOCK_M), 64))
    chunks = triton.cdiv(M, rows_per_chunk)
    part = torch.empty((chunks, N), device=x.device, dtype=torch.float32)
    colsum_kernel[(triton.cdiv(N, BLOCK_N), chunks)](
        x, sample_scale if sample_scale is not None else x, part, M, N, rows_per_chunk,
        rows_per_sample, x.stride(0), x.stride(1),
        HAS_SAMPLE_SCALE=sample_scale is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    # torch's reduction over a fixed shape is deterministic; the partials are few rows.
    return part.sum(0)

