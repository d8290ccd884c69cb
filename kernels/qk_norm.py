"""q/k normalization over head_dim on timm's packed qkv: Triton kernels and their launchers.

Math, for token row r, head h and the q slot (the k slot the same with its own parameters):
    x = qkv[r, 0, h, :]                                  (D values; qkv's last dim is (3, H, D))
    layer: x̂ = (x - mean(x))·rstd,  rstd = 1/sqrt(mean((x - mean(x))²) + eps)   (nn.LayerNorm)
    rms:   x̂ = x·rstd,              rstd = 1/sqrt(mean(x²) + eps)                 (timm RmsNorm)
    y = x̂·w[h] + b[h]          w, b: [D] (shared, head stride 0) or [H, D]; each optional
    the v slot is copied, so the output is a whole packed qkv for the attention kernel.
Backward, with g = dy·w:
    layer: dx = rstd·(g - mean(g) - x̂·mean(g·x̂));   rms: dx = rstd·(g - x̂·mean(g·x̂))
    dw[h] = Σ_r dy·x̂,  db[h] = Σ_r dy;  dv = dy's v slot.
The statistics are recomputed in the backward from the saved input (its rows are loaded there
anyway), so the input qkv is all the op saves. Parameter gradients reduce in two deterministic
stages, as in layer_norm.py: program (p, h) writes one fp32 partial row PART[k, p, h, :], then
layer_norm_param_grad_reduce_kernel sums the partials in a fixed order -- over p for a per-head
[H, D] parameter, over p and h for a shared [D] one. No atomics.

Launchers: ``qk_norm_fwd``, ``qk_norm_bwd``. The AOT specs are in qk_norm_aot.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, next_power_of_2, on_tensor_device
from .layer_norm import layer_norm_param_grad_reduce_kernel, reduce_config

MAX_HEAD_DIM = 256  # the largest BLOCK_D bucket shipped (qk_norm_aot.py)


@triton.jit
def _normalized(x, mask, inv_d, eps, IS_RMS: tl.constexpr):
    """(x̂, rstd) of a [BLOCK_M, BLOCK_D] fp32 tile whose masked entries are 0; inv_d = 1/D.
    x̂ is 0 outside the mask: a padding row has rstd = 1/sqrt(eps), inf for eps = 0, and must
    not turn into NaN in the gradient sums."""
    if IS_RMS:
        c = x
    else:
        mean = tl.sum(x, axis=1) * inv_d
        c = tl.where(mask, x - mean[:, None], 0.0)
    # rsqrt and a multiply by 1/D, not IEEE divisions: their slow-path subroutine call spilled
    # registers to the stack on sm_80 (as torch's CUDA LayerNorm, rsqrt is within 2 ulp).
    rstd = tl.math.rsqrt(tl.sum(c * c, axis=1) * inv_d + eps)
    return tl.where(mask, c * rstd[:, None], 0.0), rstd


@triton.jit
def _norm_fwd_slot(SRC, DST, W, B, w_row, b_row, mask, cols, col_ok, inv_d, eps,
                   IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Normalize one slot's tile: SRC/DST are [BLOCK_M, BLOCK_D] pointer blocks; this head's
    parameter rows start at W + w_row, B + b_row (W, B None when absent: offset only here)."""
    x = tl.load(SRC, mask=mask, other=0.0).to(tl.float32)
    y, _ = _normalized(x, mask, inv_d, eps, IS_RMS)
    if HAS_W:
        y = y * tl.load(W + w_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + b_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(DST, y.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def qk_norm_fwd_kernel(
    X, Y,            # qkv in [M, 3·H·D] (row stride stride_x, unit column stride); out [M, 3·H·D]
                     # contiguous
    QW, QB, KW, KB,  # [D] or [H, D] each, unit column stride; head stride stride_* (0 = shared);
                     # None when absent (HAS_* off)
    M, H, D, stride_x, stride_qw, stride_qb, stride_kw, stride_kb, eps,
    IS_RMS: tl.constexpr, HAS_QW: tl.constexpr, HAS_QB: tl.constexpr, HAS_KW: tl.constexpr,
    HAS_KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, h) normalizes head h's q and k of rows [i·BLOCK_M, (i+1)·BLOCK_M) and copies
    their v (BLOCK_D >= D)."""
    # Map the program ids to BLOCK_M token rows and one head; a head's D values are one tile row.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < M)[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]  # M·3·H·D passes 2^31 for large batches
    src = X + r64 * stride_x + cols[None, :]
    dst = Y + r64 * (3 * H * D) + cols[None, :]
    inv_d = 1.0 / D.to(tl.float32)
    _norm_fwd_slot(src + h * D, dst + h * D, QW, QB, h * stride_qw, h * stride_qb, mask, cols,
                   col_ok, inv_d, eps, IS_RMS, HAS_QW, HAS_QB)
    _norm_fwd_slot(src + (H + h) * D, dst + (H + h) * D, KW, KB, h * stride_kw, h * stride_kb,
                   mask, cols, col_ok, inv_d, eps, IS_RMS, HAS_KW, HAS_KB)
    v_off = (2 * H + h) * D
    tl.store(dst + v_off, tl.load(src + v_off, mask=mask, other=0.0), mask=mask)


@triton.jit
def _norm_bwd_slot(DY, X, DX, W, w_row, WPART, BPART, row_begin, row_end, off, stride_dy,
                   stride_x, row_dx, cols, col_ok, inv_d, eps, IS_RMS: tl.constexpr,
                   HAS_W: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One slot (q or k) of one head over rows [row_begin, row_end): dx per row, and this
    program's fp32 partial rows of dw (at WPART) and db (at BPART). The head's weight row starts
    at W + w_row (W None when absent)."""
    # 2-D partials, summed over rows once at the end: no cross-warp reduction per tile.
    dw_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + off + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        xhat, rstd = _normalized(x, mask, inv_d, eps, IS_RMS)
        g = dy
        if HAS_W:  # re-read per tile (L1 hits): held across the loop it cost a spill on sm_80
            g = dy * tl.load(W + w_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        c1 = tl.sum(g * xhat, axis=1) * inv_d
        if IS_RMS:
            dx = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(g, axis=1) * inv_d
            dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + r64 * row_dx + off + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_W:
            dw_acc += dy * xhat
        if NEED_B:
            db_acc += dy
    if NEED_W:
        tl.store(WPART + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if NEED_B:
        tl.store(BPART + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def qk_norm_bwd_kernel(
    DY, X, DX,       # dy, x (the forward's input) [M, 3·H·D] row-strided; dx [M, 3·H·D] contiguous
    QW, KW,          # [D] or [H, D], head stride stride_qw / stride_kw (0 = shared); or None
    PART,            # [4, P, H, D] fp32: slot k (dqw, dqb, dkw, dkb) of program (p, h) at [k, p, h]
    M, H, D, stride_dy, stride_x, stride_qw, stride_kw, rows_per_program, eps,
    IS_RMS: tl.constexpr, HAS_QW: tl.constexpr, HAS_KW: tl.constexpr,
    NEED_QW: tl.constexpr, NEED_QB: tl.constexpr, NEED_KW: tl.constexpr, NEED_KB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (p, h) walks rows [p·rows_per_program, (p+1)·rows_per_program) of head h: q, then
    k (one slot's accumulators live at a time), then copies dv."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    P = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    row_dx = 3 * H * D
    part = PART + (pid * H + h) * D  # + k·P·H·D for slot k
    inv_d = 1.0 / D.to(tl.float32)
    slot = P * H * D
    _norm_bwd_slot(DY, X, DX, QW, h * stride_qw, part, part + slot, row_begin, row_end, h * D,
                   stride_dy, stride_x, row_dx, cols, col_ok, inv_d, eps, IS_RMS, HAS_QW, NEED_QW,
                   NEED_QB, BLOCK_M, BLOCK_D)
    _norm_bwd_slot(DY, X, DX, KW, h * stride_kw, part + 2 * slot, part + 3 * slot, row_begin,
                   row_end, (H + h) * D, stride_dy, stride_x, row_dx, cols, col_ok, inv_d, eps,
                   IS_RMS, HAS_KW, NEED_KW, NEED_KB, BLOCK_M, BLOCK_D)
    v_off = (2 * H + h) * D
    for r0 in range(row_begin, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dv = tl.load(DY + r64 * stride_dy + v_off + cols[None, :], mask=mask, other=0.0)
        tl.store(DX + r64 * row_dx + v_off + cols[None, :], dv.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs: one rule for the GPU (every bucket is in qk_norm_aot.py), one for the interpreter.

_MIN_BLOCK_D = 16


def block_d(D: int) -> int:
    return max(_MIN_BLOCK_D, next_power_of_2(D))


def gpu_fwd_block_m(bd: int) -> int:
    return 2048 // bd  # 16 fp32 values a thread per tile at 4 warps


def gpu_bwd_block_m(bd: int, fp32_io: bool = False) -> int:
    # Two [BLOCK_M, BLOCK_D] fp32 accumulators live across the row loop: 8 values a thread each
    # at 4 warps. With fp32 qkv, 4: at 8 the rms builds of D=32/64 spilled a byte on triton 3.6
    # (sm_90); at 4 the bf16 rms D=32 build spills a byte on triton 3.8 (sm_90), so 16-bit keeps 8.
    return (512 if fp32_io else 1024) // bd


def fwd_block_m(bd: int, M: int) -> int:
    if interpreting():  # few, large program instances: the interpreter pays per instance
        return max(1, min(8192 // bd, next_power_of_2(max(M, 1)), 64))
    return gpu_fwd_block_m(bd)


def bwd_block_m(bd: int, M: int, fp32_io: bool = False) -> int:
    if interpreting():
        return max(1, min(4096 // bd, next_power_of_2(max(M, 1)), 32))
    return gpu_bwd_block_m(bd, fp32_io)


NUM_WARPS = 4


def _bwd_programs(M: int, H: int, bm: int, device: torch.device) -> int:
    tiles = cdiv(M, bm)
    if interpreting():
        # Several row programs, each walking two tiles or more: both reduction stages run.
        return max(1, min(cdiv(tiles, 2), 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, cdiv(4 * sms, H)))  # ~4 programs per SM over all heads


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, N, 3·H·D] -> [M, 3·H·D] with unit column stride (rows keep any stride)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _head_stride(p):
    """p made unit-strided, and its head stride: 0 for a shared [D] row."""
    if p is None:
        return None, 0
    p = p.contiguous()
    return p, (p.shape[-1] if p.dim() == 2 else 0)


# ---------------------------------------------------------------------------------------------
# Launchers.

@on_tensor_device
def qk_norm_fwd(qkv, num_heads, q_weight, k_weight, q_bias, k_bias, rms, eps):
    """qkv [B, N, 3·H·D] -> a new contiguous qkv, q and k normalized. Parameters: [D], [H, D] or
    None, one dtype (qkv's or fp32); computed in fp32."""
    B, N, three_c = qkv.shape
    H = num_heads
    D = three_c // (3 * H)
    x = _rows(qkv)
    M = x.shape[0]
    y = torch.empty((M, three_c), device=qkv.device, dtype=qkv.dtype)
    (qw, sqw), (qb, sqb), (kw, skw), (kb, skb) = map(_head_stride, (q_weight, q_bias, k_weight,
                                                                    k_bias))
    if M > 0:
        bd = block_d(D)
        bm = fwd_block_m(bd, M)
        qk_norm_fwd_kernel[(cdiv(M, bm), H)](
            x, y, qw, qb, kw, kb,  # absent parameters as None: the HAS_* flags drop their code
            M, H, D, x.stride(0), sqw, sqb, skw, skb, float(eps),
            IS_RMS=bool(rms), HAS_QW=qw is not None, HAS_QB=qb is not None,
            HAS_KW=kw is not None, HAS_KB=kb is not None, BLOCK_M=bm, BLOCK_D=bd,
            num_warps=NUM_WARPS)
    return y.reshape(B, N, three_c)


@on_tensor_device
def qk_norm_bwd(dy, qkv, num_heads, q_weight, k_weight, rms, eps, *, q_weight_grad,
                k_weight_grad, q_bias=None, k_bias=None):
    """(dqkv, dq_weight, dq_bias, dk_weight, dk_bias) from dy (the gradient of the forward's
    output) and the forward's input qkv. A weight's gradient is computed when its *_grad flag is
    set, a bias's when the bias is passed; None otherwise. Gradients take their parameter's dtype
    and shape; dqkv is contiguous in qkv's dtype."""
    B, N, three_c = qkv.shape
    H = num_heads
    D = three_c // (3 * H)
    x, g = _rows(qkv), _rows(dy)
    M = x.shape[0]
    device = qkv.device
    dx = torch.empty((M, three_c), device=device, dtype=qkv.dtype)
    (qw, sqw), (kw, skw) = _head_stride(q_weight), _head_stride(k_weight)
    # Slot k of PART: dq_weight, dq_bias, dk_weight, dk_bias (the parameter whose sum it holds).
    wanted = [q_weight if q_weight_grad else None, q_bias, k_weight if k_weight_grad else None,
              k_bias]
    bd = block_d(D)
    bm = bwd_block_m(bd, M, qkv.dtype == torch.float32)
    P = _bwd_programs(M, H, bm, device) if M > 0 else 1
    rows_per_program = cdiv(cdiv(max(M, 1), P), bm) * bm
    P = max(1, cdiv(M, rows_per_program))
    part = torch.zeros((4, P, H, D), device=device, dtype=torch.float32) if M == 0 else \
        torch.empty((4, P, H, D), device=device, dtype=torch.float32)
    if M > 0:
        qk_norm_bwd_kernel[(P, H)](
            g, x, dx, qw, kw, part,
            M, H, D, g.stride(0), x.stride(0), sqw, skw, rows_per_program, float(eps),
            IS_RMS=bool(rms), HAS_QW=qw is not None, HAS_KW=kw is not None,
            NEED_QW=wanted[0] is not None, NEED_QB=wanted[1] is not None,
            NEED_KW=wanted[2] is not None, NEED_KB=wanted[3] is not None,
            BLOCK_M=bm, BLOCK_D=bd, num_warps=NUM_WARPS)
    grads = [None if p is None else _reduce_partials(part[k], p) for k, p in enumerate(wanted)]
    return (dx.reshape(B, N, three_c), *grads)


@on_tensor_device
def _reduce_partials(part, param):
    """Σ over the partial rows of part [P, H, D] into param's shape and dtype, in a fixed order:
    over p per head for an [H, D] parameter, over (p, h) for a shared [D] one."""
    P, H, D = part.shape
    rows, C = (P, H * D) if param.dim() == 2 else (P * H, D)
    out = torch.empty(param.shape, device=part.device, dtype=param.dtype)
    block_p, block_n = reduce_config(rows, C, gpu_target(part.device))  # LayerNorm's own config
    layer_norm_param_grad_reduce_kernel[(cdiv(C, block_n), 1)](
        part, out, None, None, rows, C, HAS_OUT1=False, HAS_OUT2=False, BLOCK_P=block_p,
        BLOCK_N=block_n, num_warps=4)
    return out

