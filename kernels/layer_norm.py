"""Fused residual + LayerScale + drop-path + LayerNorm: Triton kernels and their launchers.

Math (one row r of C features, b = r // rows_per_sample the sample the row belongs to):
    s[r]  = x[r]                                   without a residual
    s[r]  = residual[r] + x[r]·layer_scale·ss[b]   with one (layer_scale, ss each optional)
    y[r]  = (s[r] - mean[r])·rstd[r]·weight + bias,  rstd = 1/sqrt(var + eps), fp32 statistics
Backward, with x̂ = (s - mean)·rstd and g = dy·weight:
    ds_total = rstd·(g - mean(g·x̂)·x̂ - mean(g)) + ds
    dresidual = ds_total,  dx = ds_total·layer_scale·ss[b]  (dx = ds_total without a residual)
    dweight = Σ_r dy·x̂,  dbias = Σ_r dy,  dlayer_scale = Σ_r ds_total·x·ss[b]
The column sums are reduced in two deterministic stages: each backward program keeps fp32
partials for its rows in registers and writes one row of a [K, P, C] buffer; then one reduction
kernel sums the P partial rows per column in a fixed order. No atomics anywhere.

Launchers: ``residual_layer_norm_fwd``, ``residual_layer_norm_bwd``; their configs come from
``fwd_config`` / ``bwd_config`` / ``reduce_config``, which kernels/layer_norm_aot.py also calls. Only torch and triton are imported here; autograd lives in vit_fast/ops.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, next_power_of_2, on_tensor_device
from .direct_launch import kept

MAX_C = 8192


@triton.jit
def residual_layer_norm_fwd_kernel(
    X, RES, LS, SS, W, B,  # x, residual [M, C] (row-strided); ls, w, b [C]; ss [M // rows_per_sample]
    Y, S, MEAN, RSTD,              # y, s [M, C] contiguous; mean, rstd [M] fp32 (STORE_STATS)
    M, C, stride_x, stride_res, rows_per_sample, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STORE_STATS: tl.constexpr = True,
):
    """One program normalizes BLOCK_M whole rows (BLOCK_C >= C); writes y, s (with a residual),
    and with STORE_STATS mean and rstd (the Block's forward ops keep neither: their backward
    recomputes them with y). Columns of X and RES are contiguous; the last dim of every tensor
    is C."""
    # Map the program id to the BLOCK_M rows of X it normalizes; the whole row sits in registers.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    # int64 offsets: M·C passes 2^31 for large batches at C = 8192.
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        branch = x
        if HAS_LAYER_SCALE:
            ls = tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)
            branch = branch * ls[None, :]
        if HAS_SAMPLE_SCALE:
            ss = tl.load(SS + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)
            branch = branch * ss[:, None]
        res = tl.load(RES + r64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Round s to its storage dtype before the statistics, so y is exactly LayerNorm of the s
        # we return and the backward, which re-reads the stored s, recomputes the same x̂.
        s_io = (res + branch).to(S.dtype.element_ty)
        tl.store(S + r64 * C + cols[None, :], s_io, mask=mask)
        s = s_io.to(tl.float32)
    else:
        s = x
    # Shift each row by its first element before summing: a constant row then centres to exact
    # zeros (y == bias, never NaN for eps > 0), and the shifted sums lose less precision.
    s0 = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)
    d = tl.where(mask, s - s0[:, None], 0.0)
    mean_d = tl.sum(d, axis=1) / C
    centred = tl.where(mask, d - mean_d[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + rows, s0 + mean_d, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


# Row width (BLOCK_C) from which the backward adds a tile into the weight/bias partials before
# computing dx rather than after: dy is then dead before x and ds are loaded. At 8192 columns
# (16 warps, the 128-register cap) the late order spilled 8 bytes on sm_90 with triton 3.6 and
# 3.9; below it the early order made ptxas spill 4 bytes at 1024/2048 columns on sm_80 (3.8).
_PARAM_GRADS_EARLY_FROM = tl.constexpr(8192)
# Without a residual, compiled builds add ds with PTX's add.rn.f32, which the compiler may not
# contract with the multiply before it into one FMA (Triton's default fp fusion would), so dx =
# round(round(dsum) + ds), the bits of a dx stored and added afterwards (the Block's step adds
# the residual's gradient to LayerNorm 1's here, where the general path's autograd adds it to a
# stored dx: the same bits). Inline PTX rather than libdevice's add_rn, which Triton builds with
# flush-to-zero (add.rn.ftz: subnormals would differ). The residual form's ds is added in this
# kernel on both paths, so it stays an ordinary add. The interpreter runs no PTX and never
# contracts: a plain add there.
_ADD_RN = tl.constexpr(not interpreting())
# The widest rows whose backward takes a ds without the residual form: at 8192 columns (16 warps,
# 128 registers a thread) holding ds spills on triton 3.6 (sm_80 and sm_90); callers add it
# afterwards there.
DS_MAX_C = 4096


@triton.jit
def _add_rounded(a, b):
    """a + b (fp32), rounded on its own: never fused with the operation that produced a."""
    if _ADD_RN:
        return tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def _param_grad_partials(dw_acc, db_acc, dy, xhat, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_WEIGHT:
        dw_acc += dy * xhat
    if HAS_BIAS:
        db_acc += dy
    return dw_acc, db_acc


@triton.jit
def residual_layer_norm_bwd_kernel(
    DY, DS, S, X, MEAN, RSTD, W, LS, SS,   # dy, ds, s, x [M, C] (row-strided); mean, rstd [M] fp32;
                                           # w, ls [C]; ss [B]
    DX, DRES, DW_PART, DB_PART, DLS_PART,  # dx, dres [M, C] contiguous; *_PART [P, C] fp32, row p
                                           # written by program p only
    M, C, stride_dy, stride_ds, stride_s, stride_x, rows_per_program, rows_per_sample,
    HAS_DS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr,
    HAS_SAMPLE_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program p walks rows [p·rows_per_program, (p+1)·rows_per_program) in BLOCK_M-row tiles:
    writes dx (and dresidual) per row, and one fp32 partial row of dweight / dbias / dlayer_scale
    at row p of its *_PART buffer. x̂ is recomputed from the stored s and fp32 mean/rstd."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    # 2-D partials: summing over rows once at the end instead of every tile keeps the row loop
    # free of cross-warp reductions.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    dls_acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(S + r64 * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # Without a residual ds is loaded with dy and s (loaded where it is added, ptxas spilled
        # the 128-column fp16 build on sm_90). C <= DS_MAX_C there.
        if HAS_DS and not HAS_RESIDUAL:
            ds = tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        # weight and layer_scale are re-read per tile (L1/L2 hits) rather than held across the
        # loop: at C = 8192 holding them costs the registers that keep the kernel from spilling.
        g = dy
        if HAS_WEIGHT:
            g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        c1 = tl.sum(xhat * g, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        if BLOCK_C >= _PARAM_GRADS_EARLY_FROM:
            dw_acc, db_acc = _param_grad_partials(dw_acc, db_acc, dy, xhat, HAS_WEIGHT, HAS_BIAS)
        dsum = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_RESIDUAL:
            if HAS_DS:
                dsum += tl.load(DS + r64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DRES + r64 * C + cols[None, :], dsum.to(DRES.dtype.element_ty), mask=mask)
            dbranch = dsum
            if HAS_SAMPLE_SCALE:
                ss = tl.load(SS + rows // rows_per_sample, mask=row_ok, other=0.0).to(tl.float32)
                dbranch = dbranch * ss[:, None]
            if HAS_LAYER_SCALE:
                x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                dls_acc += dbranch * x
                ls = tl.load(LS + cols, mask=col_ok, other=0.0).to(tl.float32)
                dbranch = dbranch * ls[None, :]
            tl.store(DX + r64 * C + cols[None, :], dbranch.to(DX.dtype.element_ty), mask=mask)
        else:
            if HAS_DS:
                dsum = _add_rounded(dsum, ds)
            tl.store(DX + r64 * C + cols[None, :], dsum.to(DX.dtype.element_ty), mask=mask)
        if BLOCK_C < _PARAM_GRADS_EARLY_FROM:
            dw_acc, db_acc = _param_grad_partials(dw_acc, db_acc, dy, xhat, HAS_WEIGHT, HAS_BIAS)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    if HAS_RESIDUAL and HAS_LAYER_SCALE:
        tl.store(DLS_PART + pid * C + cols, tl.sum(dls_acc, axis=0), mask=col_ok)


@triton.jit
def layer_norm_param_grad_reduce_kernel(
    PART,              # [K, P, C] fp32 partial sums, contiguous
    OUT0, OUT1, OUT2,  # [C] each, in its parameter's dtype: gradient k goes to OUTk (K <= 3);
    P, C,              # OUT1 and OUT2 None (HAS_OUT1/HAS_OUT2 off) when K < 2, K < 3
    HAS_OUT1: tl.constexpr, HAS_OUT2: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """OUTk[c] = Σ_p PART[k, p, c], summed in the same order on every run (deterministic).
    Grid: (cdiv(C, BLOCK_N), K). Separate outputs rather than one [K, C] tensor: the gradients
    are handed to autograd as distinct tensors, each in its own parameter's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1)
    col_ok = cols < C
    base = PART + k.to(tl.int64) * P * C
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        acc += tl.load(base + parts[:, None] * C + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    # k as a [BLOCK_N] block: triton 3.9's interpreter rejects a block mask & a scalar compare
    k_cols = tl.zeros([BLOCK_N], dtype=tl.int32) + k
    tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_ok & (k_cols == 0))
    if HAS_OUT1:
        tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=col_ok & (k_cols == 1))
    if HAS_OUT2:
        tl.store(OUT2 + cols, total.to(OUT2.dtype.element_ty), mask=col_ok & (k_cols == 2))


# ---------------------------------------------------------------------------------------------
# Configs: pure functions of (C, M, target), target None under the interpreter. The launchers
# call them; kernels/layer_norm_aot.py calls them too to list what it compiles ahead of time.

_MIN_BLOCK_C = 64  # narrower rows share the 64-column kernel (masked): fewer configs to ship
# Second stage: 32 columns (128 B rows) by 64 partial rows per step.
_REDUCE_BLOCK_N = 32
_REDUCE_BLOCK_P = 64


class RowConfig(NamedTuple):
    """One launch's tiling: BLOCK_M rows of BLOCK_C (>= C) columns per step, num_warps; for the
    backward also the number of programs, each walking rows_per_program rows."""
    block_m: int
    block_c: int
    num_warps: int
    programs: int = 1
    rows_per_program: int = 0


def _block_c(C: int) -> int:
    return max(_MIN_BLOCK_C, next_power_of_2(C))


def fwd_config(C: int, M: int, target=None) -> RowConfig:
    block_c = _block_c(C)
    # Enough threads that a full row stays at <= 16 fp32 values per thread per tensor.
    warps = 4 if block_c <= 1024 else (8 if block_c <= 4096 else 16)
    if target is None:
        # Few, large program instances: the interpreter's cost is per instance and per op.
        return RowConfig(max(1, min(16384 // block_c, next_power_of_2(max(M, 1)), 128)),
                         block_c, warps)
    return RowConfig(max(1, 2048 // block_c), block_c, warps)


def bwd_config(C: int, M: int, target=None) -> RowConfig:
    block_c = _block_c(C)
    # The backward holds about twice the forward's live values per element; at 4096 columns,
    # 8 warps needed ~170 registers a thread (sm_90 AOT), 16 warps halve that.
    warps = 4 if block_c <= 1024 else (8 if block_c <= 2048 else 16)
    if target is None:
        block_m = max(1, min(8192 // block_c, next_power_of_2(max(M, 1)), 64))
    else:
        # Three [BLOCK_M, BLOCK_C] fp32 accumulators live across the row loop: smaller tiles.
        block_m = max(1, 1024 // block_c)
    tiles = cdiv(M, block_m)
    if target is None:
        # Several programs per call so the two-stage reduction is exercised, each walking
        # two tiles or more so the in-register accumulation is too.
        programs = max(1, min(cdiv(tiles, 2), 8))
    else:
        # A few programs per SM hide memory latency; more would only grow the partial buffer.
        programs = max(1, min(tiles, 4 * target.sms))
    rows_per_program = cdiv(cdiv(M, programs), block_m) * block_m if M else block_m
    programs = max(1, cdiv(M, rows_per_program))
    return RowConfig(block_m, block_c, warps, programs, rows_per_program)


def reduce_config(P: int, C: int, target=None):
    """(BLOCK_P, BLOCK_N) of layer_norm_param_grad_reduce_kernel."""
    if target is None:
        return min(_REDUCE_BLOCK_P, next_power_of_2(max(P, 1))), _block_c(C)
    return _REDUCE_BLOCK_P, _REDUCE_BLOCK_N


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """[..., C] -> [M, C] with unit column stride (rows may keep any stride, even 0).
    M is spelled out: reshape(-1, 0) is ambiguous for the empty feature dim C = 0."""
    t = t.reshape(math.prod(t.shape[:-1]), C)
    return t if t.stride(-1) == 1 or C <= 1 else t.contiguous()


def _row_stride(t, C):
    """The row stride of t [..., C] read as [M, C] without a view (a view is an aten op each call:
    the host path avoids them), or None when its leading dims do not collapse or its columns
    are not unit-stride."""
    if t.stride(-1) != 1 and C > 1:
        return None
    d = t.dim()
    if d == 2:
        return t.stride(0)
    if d == 3:
        return t.stride(1) if t.stride(0) == t.stride(1) * t.shape[1] or t.shape[0] <= 1 else None
    return C if d == 1 else None


def _strided_rows(t, C):
    """(t or its [M, C] copy, row stride): t read as rows without a view where it can be."""
    stride = _row_stride(t, C)
    if stride is not None:
        return t, stride
    t = _rows(t, C)
    return t, t.stride(0)


def _vector(t):
    """A [C] or [B] parameter with unit stride: the kernels index it as PTR + i, so a [::2] slice
    or a zero-stride ``expand`` would be read wrongly (or past its end). A copy costs C elements."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# Launchers.

@on_tensor_device
def residual_layer_norm_fwd(x, weight, bias, eps, residual=None, layer_scale=None, sample_scale=None,
                            out_dtype=None, stats=True):
    """Forward launcher. x, residual: [..., C]; weight, bias, layer_scale: [C] or None;
    sample_scale: [x.shape[0]] or None (layer_scale and sample_scale apply only with a residual).

    Returns (y, s, mean, rstd): y [..., C] in out_dtype (default x's dtype), s (None without a
    residual: s is x) in the residual's dtype, mean and rstd fp32 [M] with M = x.numel() // C
    (None when not ``stats``). The kernel computes in fp32 whatever the dtypes: AMP passes an
    fp32 residual stream, a low-precision branch x and out_dtype = the GEMM's dtype.
    """
    C = x.shape[-1]
    if C > MAX_C:
        raise ValueError(f"residual_layer_norm kernel: C={C} > {MAX_C}")
    M = x.numel() // C if C else math.prod(x.shape[:-1])
    has_res = residual is not None
    if weight is not None and weight.stride(0) != 1:
        weight = _vector(weight)
    if bias is not None and bias.stride(0) != 1:
        bias = _vector(bias)
    if layer_scale is not None and layer_scale.stride(0) != 1:
        layer_scale = _vector(layer_scale)
    if sample_scale is not None and sample_scale.stride(0) != 1:
        sample_scale = _vector(sample_scale)
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    s = torch.empty(x.shape, device=x.device, dtype=residual.dtype) if has_res else None
    mean = torch.empty((M,), device=x.device, dtype=torch.float32) if stats else None
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32) if stats else None
    if C == 0:  # rows without features: nothing to normalize, statistics defined as 0
        if stats:
            mean.zero_()
            rstd.zero_()
    elif M > 0:
        stride_x = _row_stride(x, C)
        x2 = x if stride_x is not None else _rows(x, C)
        stride_x = stride_x if stride_x is not None else x2.stride(0)
        stride_res = _row_stride(residual, C) if has_res else 0
        res2 = residual if stride_res is not None else _rows(residual, C)
        if stride_res is None:
            stride_res = res2.stride(0)
        if not has_res:  # the scales apply to the residual branch only
            layer_scale = sample_scale = None
        grid, consts = _fwd_launch(M, C, gpu_target(x.device), has_res, layer_scale is not None,
                                   sample_scale is not None, weight is not None, bias is not None,
                                   stats)
        rows_per_sample = M // x.shape[0] if (sample_scale is not None and x.dim() > 1) else 1
        # Absent tensors go in as None: Triton specializes them away (the flags say so too).
        kept(residual_layer_norm_fwd_kernel, grid, consts)(
            x2, res2, layer_scale, sample_scale, weight, bias, y, s, mean, rstd,
            M, C, stride_x, stride_res, max(rows_per_sample, 1), float(eps))
    return y, s, mean, rstd


_LAUNCHES = {}  # the launchers' per-configuration grids and constexprs (pure, so kept)


def _fwd_launch(M, C, target, *flags):
    """(grid, constexprs) of residual_layer_norm_fwd_kernel for this configuration, made once."""
    key = ("fwd", M, C, target, flags)
    hit = _LAUNCHES.get(key)
    if hit is None:
        cfg = fwd_config(C, M, target)
        has_res, has_ls, has_ss, has_w, has_b, stats = flags
        hit = _LAUNCHES[key] = ((cdiv(M, cfg.block_m),), dict(
            HAS_RESIDUAL=has_res, HAS_LAYER_SCALE=has_ls, HAS_SAMPLE_SCALE=has_ss,
            HAS_WEIGHT=has_w, HAS_BIAS=has_b, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
            STORE_STATS=stats, num_warps=cfg.num_warps))
    return hit


def _bwd_launch(M, C, target, K, *flags):
    """(programs, rows_per_program, constexprs, reduce grid, reduce constexprs) of the backward's
    two kernels for this configuration, made once."""
    key = ("bwd", M, C, target, K, flags)
    hit = _LAUNCHES.get(key)
    if hit is None:
        cfg = bwd_config(C, M, target)
        has_ds, has_res, has_ls, has_ss, has_w, has_b = flags
        block_p, block_n = reduce_config(cfg.programs, C, target)
        hit = _LAUNCHES[key] = (
            cfg.programs, cfg.rows_per_program,
            dict(HAS_DS=has_ds, HAS_RESIDUAL=has_res, HAS_LAYER_SCALE=has_ls,
                 HAS_SAMPLE_SCALE=has_ss, HAS_WEIGHT=has_w, HAS_BIAS=has_b,
                 BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps),
            (cdiv(C, block_n), K),
            dict(HAS_OUT1=K > 1, HAS_OUT2=K > 2, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4))
    return hit


@on_tensor_device
def residual_layer_norm_bwd(dy, ds, s, mean, rstd, weight, *, has_residual, need_bias_grad,
                            x=None, layer_scale=None, sample_scale=None, residual_dtype=None,
                            bias_dtype=None):
    """Backward launcher. dy, ds (or None): gradients of y and s, [..., C]; s: the forward's s
    (x itself without a residual); mean, rstd: fp32 [M]; weight, layer_scale: [C] or None;
    x: [..., C], needed only with layer_scale; sample_scale: [B] or None.

    Returns (dx, dresidual, dweight, dbias, dlayer_scale), None where there is nothing to compute.
    dx has s's dtype, dresidual residual_dtype; the parameter gradients their parameter's dtype.
    """
    C = s.shape[-1]
    M = s.numel() // C if C else math.prod(s.shape[:-1])
    dy2, s2 = _strided_rows(dy, C), _strided_rows(s, C)
    if weight is not None and weight.stride(0) != 1:
        weight = _vector(weight)
    if layer_scale is not None and layer_scale.stride(0) != 1:
        layer_scale = _vector(layer_scale)
    if sample_scale is not None and sample_scale.stride(0) != 1:
        sample_scale = _vector(sample_scale)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    device = s.device
    has_ls = has_residual and layer_scale is not None
    has_ss = has_residual and sample_scale is not None
    ds2 = _strided_rows(ds, C) if (ds is not None and has_residual) else None
    x2 = _strided_rows(x, C) if has_ls else s2
    dx = torch.empty(s.shape, device=device, dtype=s.dtype)
    dres = torch.empty(s.shape, device=device, dtype=residual_dtype or s.dtype) if has_residual else None

    # Which parameter gradients, in the order their partial rows are stacked.
    wanted = []
    if weight is not None:
        wanted.append(weight.dtype)
    if need_bias_grad:
        wanted.append(bias_dtype or s.dtype)
    if has_ls:
        wanted.append(layer_scale.dtype)
    K = len(wanted)
    P, rows_per_program, consts, reduce_grid, reduce_consts = _bwd_launch(
        M, C, gpu_target(device), K, ds2 is not None, has_residual, has_ls, has_ss,
        weight is not None, need_bias_grad)
    part = torch.empty((max(K, 1), P, C), device=device, dtype=torch.float32)
    if M > 0 and C > 0:
        k_of = iter(range(K))
        dw_part = part[next(k_of)] if weight is not None else None
        db_part = part[next(k_of)] if need_bias_grad else None
        dls_part = part[next(k_of)] if has_ls else None
        rows_per_sample = M // s.shape[0] if (has_ss and s.dim() > 1) else 1
        kept(residual_layer_norm_bwd_kernel, (P,), consts)(
            dy2[0], ds2[0] if ds2 is not None else None, s2[0], x2[0] if has_ls else None, mean,
            rstd, weight, layer_scale if has_ls else None, sample_scale if has_ss else None,
            dx, dres, dw_part, db_part, dls_part,
            M, C, dy2[1], ds2[1] if ds2 is not None else 0, s2[1],
            x2[1] if has_ls else 0, rows_per_program, max(rows_per_sample, 1))
    else:
        part.zero_()
    grads = [torch.empty((C,), device=device, dtype=dt) for dt in wanted]
    if K and C > 0:
        kept(layer_norm_param_grad_reduce_kernel, reduce_grid, reduce_consts)(
            part, *grads, *[None] * (3 - K), P, C)
    it = iter(grads)
    dw = next(it) if weight is not None else None
    db = next(it) if need_bias_grad else None
    dls = next(it) if has_ls else None
    return dx, dres, dw, db, dls
