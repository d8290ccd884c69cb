"""The GELU MLP with its GEMM mainloops on cuBLAS (torch.mm / F.linear) and the elementwise work
fused in Triton: the ``cublas`` implementation of vit_fast::gelu_mlp.

Same math and the same saved-for-backward contract as kernels/gelu_mlp.py (x, both weights, fc2's
bias, the fc1 pre-activation, the scales), so either implementation's backward can follow the
other's forward. What changes is where the epilogues run: cuBLAS GEMMs cannot take a GELU or a
residual epilogue, so each becomes one elementwise pass over the GEMM output (one extra HBM round
trip of that output against the fused Triton GEMM, but eager's own GEMM speed).

Forward, pre = x W1ᵀ + b1 (cuBLAS, bias in its epilogue):
  gelu_fwd_kernel            act = gelu(pre)                        (pre is what backward keeps)
  y = act W2ᵀ (cuBLAS);  residual_epilogue_kernel  out = res + (y + b2)·ls·ss[b]   (in place)
Backward, g = d_out, w2s = ls·W2 (weight-sized):
  d_act = g w2s (cuBLAS);  gelu_bwd_kernel  d_pre = d_act·ss[b]·gelu'(pre) (in place),
    act_s = gelu(pre)·ss[b] (recomputed for dW2),  rowdot[m] = Σ_h d_act·gelu(pre) (for d ss)
    and fp32 column partials of d_pre per program (db1 before their sum)
  E = gᵀ act_s (fp32),  dx = d_pre W1,  dW1 = d_preᵀ x (cuBLAS),  db2 = column sum of g and db1
  = column sum of the partials (Triton).
Deterministic: no atomics; rowdot sums a whole row inside one program in a fixed order; cuBLAS
GEMMs are run-to-run reproducible on one GPU and stream (CUBLAS_WORKSPACE_CONFIG for several).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, on_tensor_device
from .direct_launch import DirectLaunch
from .gelu_mlp import MlpGrads
from .matmul import _gelu_cdf, colsum



class ElementwiseBlocks(NamedTuple):
    """Tile sizes of the three kernels below (all launched with 4 warps, default stages)."""
    fwd: int                  # elements per program of gelu_fwd_kernel
    bwd: tuple                # (rows, columns per step) of gelu_bwd_kernel
    epilogue: tuple           # (rows, columns) of residual_epilogue_kernel


# Elements per program: 16 per thread at 4 warps keeps these memory-bound kernels under ~100
# registers (fp32 included), so enough warps stay resident to cover HBM latency.
# Under the interpreter every program costs Python time: few, large tiles.
CUDA_BLOCKS = ElementwiseBlocks(1024, (16, 128), (16, 128))
INTERPRET_BLOCKS = ElementwiseBlocks(1 << 16, (64, 1024), (64, 1024))
NUM_WARPS = 4


def elementwise_blocks(target=None) -> ElementwiseBlocks:
    """The launchers' config (kernels/gelu_elementwise_aot.py compiles the same); target None
    under the interpreter. The same on every GPU: these kernels are bound by HBM bandwidth."""
    return INTERPRET_BLOCKS if target is None else CUDA_BLOCKS


@triton.jit
def gelu_fwd_kernel(PRE, ACT, numel, APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    """ACT[i] = gelu(PRE[i]) for i < numel; PRE, ACT contiguous, same dtype (ACT may be PRE).

    GELU is applied to the pre-activation as stored (rounded to its dtype), so backward's
    recompute from the saved PRE agrees with the forward bit for bit, as in matmul_kernel.
    """
    # 64-bit offsets: B·N·hidden passes 2³¹ at large batches.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    pre = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    c, _dc = _gelu_cdf(pre, APPROX_TANH)
    tl.store(ACT + offs, (pre * c).to(ACT.dtype.element_ty), mask=mask)


@triton.jit
def gelu_bwd_kernel(DACT, PRE, DPRE, ACTS, SSCALE, ROWDOT, DBPART, M, N, rows_per_sample,
                    APPROX_TANH: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
                    STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr, COL_SUM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dGELU for BLOCK_M whole rows per program (walking the N columns in BLOCK_N steps):

    d_pre = d_act·ss[m // rows_per_sample]·gelu'(pre)       -> DPRE (may be DACT: read first)
    act_s = gelu(pre)·ss[m // rows_per_sample]               -> ACTS when STORE_ACT
    rowdot[m] = Σ_n d_act·gelu(pre)  (fp32)                  -> ROWDOT when ROW_DOT
    dbpart[p, n] = Σ_{m of program p} d_pre[m, n] as stored  -> DBPART when COL_SUM

    DACT, PRE, DPRE, ACTS: [M, N] contiguous, one dtype; SSCALE [M // rows_per_sample];
    ROWDOT fp32 [M]; DBPART fp32 [cdiv(M, BLOCK_M), N]. A program owning whole rows makes the row
    sum complete and ordered. The column partials are fc1's bias gradient before a fixed-order sum
    over programs: taken from the tile in registers, they spare a second read of d_pre ([M, N])
    by a column-sum pass (deterministic: no atomics).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    if HAS_SAMPLE_SCALE:
        ss = tl.load(SSCALE + rows // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)
    row_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_base = rows.to(tl.int64)[:, None] * N
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (cols < N)[None, :]
        offs = row_base + cols[None, :]
        d = tl.load(DACT + offs, mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
        c, dc = _gelu_cdf(pre, APPROX_TANH)
        act = pre * c
        if ROW_DOT:
            row_dot += tl.sum(d * act, axis=1)
        d_pre = d * (c + pre * dc)
        if HAS_SAMPLE_SCALE:
            d_pre = d_pre * ss[:, None]
            act = act * ss[:, None]
        d_pre = d_pre.to(DPRE.dtype.element_ty)
        tl.store(DPRE + offs, d_pre, mask=mask)
        if COL_SUM:  # of the stored values (masked rows hold 0: d_act loads as 0 there)
            tl.store(DBPART + pid.to(tl.int64) * N + cols, tl.sum(d_pre.to(tl.float32), axis=0),
                     mask=cols < N)
        if STORE_ACT:
            tl.store(ACTS + offs, act.to(ACTS.dtype.element_ty), mask=mask)
    if ROW_DOT:
        tl.store(ROWDOT + rows, row_dot, mask=mask_m)


@triton.jit
def residual_epilogue_kernel(Y, BIAS, LSCALE, SSCALE, RES, OUT, M, N, rows_per_sample,
                             stride_rm, stride_rn, HAS_BIAS: tl.constexpr,
                             HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT = RES + (Y + bias[n])·ls[n]·ss[m // rows_per_sample], each factor optional, in fp32.

    Y, OUT: [M, N] contiguous (OUT may be Y); RES [M, N] with strides stride_rm/rn; BIAS, LSCALE
    [N]; SSCALE [M // rows_per_sample]. Unused pointers are never read.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < M
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    r64 = rows.to(tl.int64)[:, None]
    out = tl.load(Y + r64 * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_LAYER_SCALE:
        out = out * tl.load(LSCALE + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SAMPLE_SCALE:
        ss = tl.load(SSCALE + rows // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)
        out = out * ss[:, None]
    out += tl.load(RES + r64 * stride_rm + cols[None, :] * stride_rn, mask=mask,
                   other=0.0).to(tl.float32)
    tl.store(OUT + r64 * N + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

# The launches of the configurations seen (a few per model: shapes, dtypes, flags, GPU, device),
# each made past Triton's per-call launch path once it is compiled (kernels/direct_launch.py).
# Cleared when it grows past _MAX_LAUNCHES (varying shapes: NaFlex batches), which only costs
# re-recording.
_LAUNCHES = {}
_MAX_LAUNCHES = 256


def _keep(key, kernel, grid, consts):
    """The launch of a configuration not in _LAUNCHES yet (the callers looked it up), kept."""
    if len(_LAUNCHES) >= _MAX_LAUNCHES:
        _LAUNCHES.clear()
    launch = _LAUNCHES[key] = DirectLaunch(kernel, grid, consts)
    return launch


@on_tensor_device
def gelu_forward(pre, act, approximate):
    """act <- gelu(pre); both contiguous, same shape and dtype (act may be pre itself)."""
    n = pre.numel()
    if n:
        target = gpu_target(pre.device)
        key = ("fwd", n, approximate, pre.dtype, act.dtype, target, pre.get_device())
        launch = _LAUNCHES.get(key)
        if launch is None:
            block = elementwise_blocks(target).fwd
            launch = _keep(key, gelu_fwd_kernel, (cdiv(n, block),),
                             dict(APPROX_TANH=approximate == "tanh", BLOCK=block,
                                  num_warps=NUM_WARPS))
        launch(pre, act, n)
    return act


@on_tensor_device
def gelu_backward(d_act, pre, approximate, sample_scale=None, rows_per_sample=1, *,
                  store_act=True, row_dot=False, col_sum=False):
    """In place d_act <- d_pre; returns (act_s or None, rowdot fp32 [M] or None, the column
    partials fp32 [programs, N] or None: their sum over rows is Σ_m d_pre[m]).
    See gelu_bwd_kernel."""
    M, N = pre.shape
    act_s = torch.empty_like(pre) if store_act else None
    rowdot = torch.zeros(M, device=pre.device, dtype=torch.float32) if row_dot else None
    if not (M and N):
        parts = torch.zeros(1, N, device=pre.device, dtype=torch.float32) if col_sum else None
        return act_s, rowdot, parts
    target = gpu_target(pre.device)
    key = ("bwd", M, N, approximate, d_act.dtype, pre.dtype, sample_scale is not None,
           store_act, row_dot, col_sum, target, pre.get_device())
    launch = _LAUNCHES.get(key)
    if launch is None:
        bm, bn = elementwise_blocks(target).bwd
        # Absent tensors go in as None: Triton specializes them away (the flags say so too).
        launch = _keep(key, gelu_bwd_kernel, (cdiv(M, bm),), dict(
            APPROX_TANH=approximate == "tanh", HAS_SAMPLE_SCALE=sample_scale is not None,
            STORE_ACT=store_act, ROW_DOT=row_dot, COL_SUM=col_sum, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=NUM_WARPS))
    parts = (torch.empty(launch.grid[0], N, device=pre.device, dtype=torch.float32)
             if col_sum else None)
    launch(d_act, pre, d_act, act_s, sample_scale, rowdot, parts, M, N, rows_per_sample)
    return act_s, rowdot, parts


@on_tensor_device
def residual_epilogue(y, bias, layer_scale, sample_scale, residual, rows_per_sample=1):
    """In place y <- residual + (y + bias)·layer_scale·sample_scale[b]; y [M, N] contiguous."""
    M, N = y.shape
    if M and N:
        target = gpu_target(y.device)
        key = ("epilogue", M, N, y.dtype, residual.dtype, bias is not None,
               layer_scale is not None, sample_scale is not None, target, y.get_device())
        launch = _LAUNCHES.get(key)
        if launch is None:
            bm, bn = elementwise_blocks(target).epilogue
            launch = _keep(key, residual_epilogue_kernel, (cdiv(M, bm), cdiv(N, bn)), dict(
                HAS_BIAS=bias is not None, HAS_LAYER_SCALE=layer_scale is not None,
                HAS_SAMPLE_SCALE=sample_scale is not None, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=NUM_WARPS))
        launch(y, bias, layer_scale, sample_scale, residual, y, M, N, rows_per_sample,
               residual.stride(0), residual.stride(1))
    return y


def _rows_per_sample(x):
    """Rows of x [B, ..., C] per sample: the product of its middle dims (no view of x[0]: a
    view is an aten call)."""
    shape = x.shape
    if len(shape) < 2:
        return 1
    rows = 1
    for d in shape[1:-1]:
        rows *= d
    return rows


def _mm_fp32(a, b):
    """a @ b accumulated and returned in fp32 from operands in their own dtype (cuBLAS writes
    fp32 directly on CUDA; elsewhere the upcast product is the same sum of exact products)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def gelu_mlp_cublas_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                        layer_scale, sample_scale, save_pre):
    """Same arguments and results as kernels.gelu_mlp.gelu_mlp_fwd: (out [..., C_out], pre [M, H]
    when save_pre else an empty tensor)."""
    C, c_out = x.shape[-1], fc2_weight.shape[0]
    x2 = x.reshape(-1, C)
    pre = F.linear(x2, fc1_weight, fc1_bias).contiguous()
    # Without a backward the activation overwrites the pre-activation: one [M, H] buffer.
    act = gelu_forward(pre, torch.empty_like(pre) if save_pre else pre, approximate)
    if residual is None:
        out = F.linear(act, fc2_weight, fc2_bias)
    else:
        out = residual_epilogue(torch.mm(act, fc2_weight.t()), fc2_bias, layer_scale,
                                sample_scale, residual.reshape(-1, c_out), _rows_per_sample(x))
    return out.reshape(*x.shape[:-1], c_out), (pre if save_pre else x.new_empty(0))


def gelu_mlp_cublas_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale,
                        sample_scale, *, approximate, has_residual, wanted=MlpGrads(), gemms=None):
    """Same arguments and results as kernels.gelu_mlp.gelu_mlp_bwd (dx, dW1, db1, dW2, db2, dls,
    dss; the optional ones not in ``wanted`` are None). gemms: a kernels.gelu_mlp.Gemms whose
    column sums the two colsum launches take (bound ones: the Block's step), else colsum."""
    colsum_of = gemms.colsum if gemms is not None else _colsum_named
    ls, ss = (layer_scale, sample_scale) if has_residual else (None, None)
    rps, dtype = _rows_per_sample(x), x.dtype
    x2, g = x.reshape(-1, x.shape[-1]), grad.reshape(-1, fc2_weight.shape[0])
    needs_fc1_bias, needs_fc2_bias = wanted.fc1_bias, wanted.fc2_bias
    needs_layer_scale, needs_sample_scale = (wanted.layer_scale and ls is not None,
                                             wanted.sample_scale and ss is not None)
    w2s = fc2_weight if ls is None else (fc2_weight.float() * ls.float()[:, None]).to(dtype)
    d_pre = torch.mm(g, w2s)
    act_s, rowdot, b1_parts = gelu_backward(d_pre, pre, approximate, ss, rps,
                                            row_dot=needs_sample_scale, col_sum=needs_fc1_bias)
    # E = gᵀ·act_s stays fp32: dW2 = ls·E and d ls = Σ_h W2∘E both come from it.
    e = _mm_fp32(g.t(), act_s)
    del act_s
    d_w2 = (e if ls is None else e * ls.float()[:, None]).to(fc2_weight.dtype)
    g_sum = colsum_of("g_sum", g, ss, rps) if (needs_fc2_bias or needs_layer_scale) else None
    lsf = ls.float() if ls is not None else None
    d_b2 = d_ls = d_ss = None
    if needs_fc2_bias and fc2_bias is not None:
        d_b2 = (g_sum if lsf is None else g_sum * lsf).to(fc2_bias.dtype)
    if needs_layer_scale:
        bias_term = fc2_bias.float() * g_sum if fc2_bias is not None else 0.0
        d_ls = ((fc2_weight.float() * e).sum(1) + bias_term).to(ls.dtype)
    if needs_sample_scale:
        if fc2_bias is not None:  # the bias part of fc2's output, scaled like the rest
            rowdot = rowdot + g.float() @ (fc2_bias.float() * (lsf if lsf is not None else 1.0))
        d_ss = rowdot.reshape(-1, rps).sum(1).to(ss.dtype)
    d_x = torch.mm(d_pre, fc1_weight)
    d_w1 = torch.mm(d_pre.t(), x2)
    d_b1 = colsum_of("d_b1", b1_parts).to(dtype) if needs_fc1_bias else None
    return d_x.reshape(x.shape), d_w1, d_b1, d_w2, d_b2, d_ls, d_ss


def _colsum_named(name, x, sample_scale=None, rows_per_sample=1):
    """colsum under Gemms.colsum's signature (the name keys a bound launch; unused here)."""
    return colsum(x, sample_scale, rows_per_sample)
