"""Rotary position embeddings on timm's packed qkv, as timm's EvaAttention / AttentionRope apply
them (apply_rot_embed_cat): a pre-pass writing a new packed qkv with q and k rotated and v copied,
which the attention kernels then read unchanged. Triton kernels and their launchers.

Math, for batch row b, token n, head h and the q slot (the k slot the same), x the slot's D
values and p = n - npt (npt prefix tokens: class, register tokens):
    y_i = x_i·cos_i + s_i·x_π(i)·sin_i        for n >= npt  (sin, cos: row p of this (b, h))
    y   = x                                    for n < npt   (prefix tokens are not rotated)
π pairs the columns and s is the sign of the pair's member, which is timm's x·cos + rot(x)·sin:
    interleaved (half=False):  π(i) = i xor 1,        s_i = -1 for even i, +1 for odd i
    half-split  (half=True):   π(i) = i ± D/2,        s_i = -1 for i < D/2, +1 above
The rotation runs in fp32 whatever the I/O dtype; y is cast to qkv's dtype.

Backward. R (x ↦ s∘x_π) has Rᵀz = -s∘z_π, so
    dx_i = dy_i·cos_i − s_i·dy_π(i)·sin_π(i)
from dy and sin/cos alone: the pre-pass saves nothing but sin/cos. With learnable sin/cos
(timm's mixed RoPE: angles from learnable frequencies) their gradients are
    dcos_i = Σ dy_i·x_i,     dsin_i = Σ dy_i·s_i·x_π(i)
summed over the q and k slots and over each dim sin/cos broadcast over (b, h). x is the forward's
input, or (FROM_OUTPUT) recovered from its output by the inverse rotation, which is the dx
formula again: x_i = y_i·cos_i − s_i·y_π(i)·sin_π(i). That inverse is exact where sin/cos are a
rotation, as every timm rope module makes them: equal values on both members of a pair and
sin² + cos² = 1 (to the rounding of y). The sums are deterministic: program (tile, h, g) walks
its batch group g in order into fp32 registers and writes one partial; the partials are summed
in a fixed order by layer_norm.py's reduce kernel. No atomics.

Layouts (last dim stride 1; B and N dims of the inputs may have any stride):
    qkv, dy   [B, N, 3·H·D]         last dim (3, H, D) like timm's qkv Linear output
    y, dx     [B, N, 3·H·D]         contiguous
    sin, cos  [Bs, Hs, N - npt, D]  fp32, Bs in (1, B), Hs in (1, H): stride 0 over a broadcast
                                    dim (timm: [N', D] axial, [H, N', D] mixed, [B, 1, N', D]
                                    NaFlexViT), one set of strides for both
    part      [2, ·, ·, N - npt, D] fp32: dsin and dcos partials of (g, h) at g·stride_pg +
                                    h·stride_ph (the launcher orders them so the dims to sum lead)

Launchers: ``rope_fwd``, ``rope_bwd``. The AOT specs are in rope_aot.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, next_power_of_2, on_tensor_device
from .layer_norm import layer_norm_param_grad_reduce_kernel, reduce_config

MAX_HEAD_DIM = 256  # the largest BLOCK_D bucket shipped (rope_aot.py)


@triton.jit
def _pairs(D, BLOCK_D: tl.constexpr, HALF: tl.constexpr):
    """Per column of a BLOCK_D-wide head tile: its pair partner π(i), the sign s_i (as fp32) and
    whether it is a real column (i < D)."""
    cols = tl.arange(0, BLOCK_D)
    if HALF:
        half = D // 2
        first = cols < half
        partner = tl.where(first, cols + half, cols - half)
    else:
        first = (cols % 2) == 0
        partner = cols ^ 1
    return cols, partner, tl.where(first, -1.0, 1.0), cols < D


@triton.jit
def _turn(t, t_p, a, b_p, sign):
    """t·a − s·t_π·b_π: the backward's dx (t = dy, a = cos, b_π = sin_π) and the inverse
    rotation's x (t = y); all fp32 tiles of one row block."""
    return t * a - sign[None, :] * t_p * b_p


@triton.jit
def rope_fwd_kernel(
    X,     # qkv [B, N, 3·H·D], row strides stride_x_b / stride_x_n, unit column stride
    Y,     # [B, N, 3·H·D] contiguous
    SIN, COS,  # [Bs, Hs, N - npt, D] fp32, strides stride_s_b / _h / _n (0: broadcast), unit last
    N, H, D, npt,
    stride_x_b, stride_x_n, stride_s_b, stride_s_h, stride_s_n,
    HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, h, b) rotates head h's q and k of tokens [i·BLOCK_M, (i+1)·BLOCK_M) of batch
    row b and copies their v (BLOCK_D >= D)."""
    # Map the program ids to a token tile, a head and a batch row; a head's D values are one row.
    n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    b = tl.program_id(2)
    cols, partner, sign, col_ok = _pairs(D, BLOCK_D, HALF)
    mask = (n < N)[:, None] & col_ok[None, :]
    # Prefix tokens read cos 1 and sin 0 (masked loads), which leaves them exactly as they were.
    turned = mask & (n >= npt)[:, None]
    s_off = b.to(tl.int64) * stride_s_b + h.to(tl.int64) * stride_s_h + (n - npt)[:, None] * stride_s_n
    cos = tl.load(COS + s_off + cols[None, :], mask=turned, other=1.0)
    sin = tl.load(SIN + s_off + cols[None, :], mask=turned, other=0.0)
    src = X + b.to(tl.int64) * stride_x_b + n[:, None].to(tl.int64) * stride_x_n
    dst = Y + (b.to(tl.int64) * N + n[:, None]) * (3 * H * D)
    for slot in tl.static_range(2):
        off = (slot * H + h) * D
        x = tl.load(src + off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_p = tl.load(src + off + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        y = x * cos + sign[None, :] * x_p * sin
        tl.store(dst + off + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    v_off = (2 * H + h) * D
    tl.store(dst + v_off + cols[None, :], tl.load(src + v_off + cols[None, :], mask=mask), mask=mask)


@triton.jit
def rope_bwd_kernel(
    DY,    # [B, N, 3·H·D] the gradient of the forward's output, row strides stride_dy_b / _n
    DX,    # [B, N, 3·H·D] contiguous
    X,     # NEED_GRAD: the forward's input qkv, or with FROM_OUTPUT its output (row strides
           # stride_x_b / _n); None otherwise
    SIN, COS,  # as the forward
    PART,  # NEED_GRAD: [2, ·, ·, N - npt, D] fp32 partials (header); None otherwise
    N, H, D, npt, B, rows_per_group,
    stride_dy_b, stride_dy_n, stride_x_b, stride_x_n, stride_s_b, stride_s_h, stride_s_n,
    stride_part_g, stride_part_h, stride_part_slot,
    HALF: tl.constexpr, NEED_GRAD: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (i, h, g) walks batch rows [g·rows_per_group, (g+1)·rows_per_group) in order for
    tokens [i·BLOCK_M, (i+1)·BLOCK_M) of head h: dx of q and k rotated back, dv copied, and with
    NEED_GRAD this (g, h)'s fp32 sums of dsin and dcos stored once at the end."""
    n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    g = tl.program_id(2)
    cols, partner, sign, col_ok = _pairs(D, BLOCK_D, HALF)
    mask = (n < N)[:, None] & col_ok[None, :]
    turned = mask & (n >= npt)[:, None]
    n_off = (n - npt)[:, None] * stride_s_n
    d_sin = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    d_cos = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for b in range(g * rows_per_group, tl.minimum(B, (g + 1) * rows_per_group)):
        b = tl.cast(b, tl.int64)  # a Python int under the interpreter
        s_off = b * stride_s_b + h.to(tl.int64) * stride_s_h + n_off
        cos = tl.load(COS + s_off + cols[None, :], mask=turned, other=1.0)
        sin_p = tl.load(SIN + s_off + partner[None, :], mask=turned, other=0.0)
        if NEED_GRAD and FROM_OUTPUT:
            sin = tl.load(SIN + s_off + cols[None, :], mask=turned, other=0.0)
            cos_p = tl.load(COS + s_off + partner[None, :], mask=turned, other=1.0)
        src = DY + b * stride_dy_b + n[:, None].to(tl.int64) * stride_dy_n
        dst = DX + (b * N + n[:, None]) * (3 * H * D)
        if NEED_GRAD:
            fwd = X + b * stride_x_b + n[:, None].to(tl.int64) * stride_x_n
        for slot in tl.static_range(2):
            off = (slot * H + h) * D
            dy = tl.load(src + off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy_p = tl.load(src + off + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(dst + off + cols[None, :], _turn(dy, dy_p, cos, sin_p, sign).to(DX.dtype.element_ty),
                     mask=mask)
            if NEED_GRAD:
                x = tl.load(fwd + off + cols[None, :], mask=turned, other=0.0).to(tl.float32)
                x_p = tl.load(fwd + off + partner[None, :], mask=turned, other=0.0).to(tl.float32)
                if FROM_OUTPUT:  # x and x_π from y and y_π: the inverse rotation
                    x, x_p = _turn(x, x_p, cos, sin_p, sign), _turn(x_p, x, cos_p, sin, -sign)
                d_cos += dy * x
                d_sin += dy * sign[None, :] * x_p
        v_off = (2 * H + h) * D
        tl.store(dst + v_off + cols[None, :], tl.load(src + v_off + cols[None, :], mask=mask), mask=mask)
    if NEED_GRAD:
        part = PART + g.to(tl.int64) * stride_part_g + h.to(tl.int64) * stride_part_h \
            + (n - npt)[:, None] * D + cols[None, :]
        tl.store(part, d_sin, mask=turned)
        tl.store(part + stride_part_slot, d_cos, mask=turned)


# ---------------------------------------------------------------------------------------------
# Configs: pure functions (rope_aot.py lists what they can return on a GPU); the interpreter has
# its own rule.

NUM_WARPS = 4
_MIN_BLOCK_D = 16
_PROGRAMS_PER_SM = 4  # what the gradient's batch groups aim for


def block_d(D: int) -> int:
    return max(_MIN_BLOCK_D, next_power_of_2(D))


def gpu_block_m(bd: int, backward: bool = False) -> int:
    """Token rows per program on a GPU: 8 fp32 values a thread per tile at 4 warps (the
    backward holds more tiles: the two gradient sums beside dy, x and their partners)."""
    return (512 if backward else 1024) // bd


def block_m(bd: int, N: int, backward: bool = False) -> int:
    if interpreting():  # few, large program instances: the interpreter pays per instance
        return max(1, min(4096 // bd, next_power_of_2(max(N, 1)), 64))
    return gpu_block_m(bd, backward)


def grad_groups(batch: int, tiles: int, heads: int, per_row: bool, sms=None) -> int:
    """Batch groups of the sin/cos gradient (each one fp32 partial of H·N'·D per slot): one per
    row where sin/cos are per batch row; else enough for _PROGRAMS_PER_SM programs per SM
    (sms None, the interpreter: 2, so the sum over groups runs), never an empty group."""
    if per_row:
        return batch
    want = 2 if sms is None else cdiv(_PROGRAMS_PER_SM * sms, tiles * heads)
    per_group = cdiv(batch, max(1, min(batch, want)))
    return cdiv(batch, per_group)


# ---------------------------------------------------------------------------------------------
# Launchers.

def _sin_cos(sin, cos, qkv: torch.Tensor, num_heads: int, npt: int):
    """(sin, cos) as fp32 [Bs, Hs, N', D] views sharing one set of strides (unit last), and
    (stride_b, stride_h, stride_n) with 0 over a broadcast dim; checks the shapes."""
    B, N, three_c = qkv.shape
    D = three_c // (3 * num_heads)
    for name, t in (("sin", sin), ("cos", cos)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device}, qkv on {qkv.device}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin and cos must have one shape, got {list(sin.shape)} and {list(cos.shape)}")
    if not 0 <= npt <= N:
        raise ValueError(f"num_prefix_tokens must be in [0, N = {N}], got {npt}")
    shape = tuple(sin.shape)
    if not (2 <= len(shape) <= 4 and shape[-2:] == (N - npt, D) and
            (len(shape) < 3 or shape[-3] in (1, num_heads)) and (len(shape) < 4 or shape[0] in (1, B))):
        raise ValueError(f"sin/cos must be [N - num_prefix_tokens, D] = [{N - npt}, {D}], with leading "
                         f"dims [1 or H, ...] or [1 or B, 1 or H, ...] (H = {num_heads}, B = {B}) "
                         f"broadcasting as timm's rope does, got {list(shape)}")
    if D % 2:
        raise ValueError(f"rotary embeddings pair the head dim's columns: D = {D} is odd")
    lead = (None,) * (4 - len(shape))
    sin, cos = sin.float()[lead], cos.float()[lead]
    if sin.stride() != cos.stride() or sin.stride(-1) != 1:
        sin, cos = sin.contiguous(), cos.contiguous()
    Bs, Hs = sin.shape[0], sin.shape[1]
    strides = (0 if Bs == 1 else sin.stride(0), 0 if Hs == 1 else sin.stride(1), sin.stride(2))
    return sin, cos, strides


def _rows_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@on_tensor_device
def rope_fwd(qkv: torch.Tensor, num_heads: int, sin: torch.Tensor, cos: torch.Tensor, *,
             num_prefix_tokens: int = 0, half: bool = False) -> torch.Tensor:
    """A new contiguous packed qkv [B, N, 3·H·D] in qkv's dtype: q and k of tokens n >=
    num_prefix_tokens rotated with sin/cos row n - num_prefix_tokens (timm's apply_rot_embed_cat;
    half: the half-split layout, else interleaved), v copied.

    sin, cos: [N', D], [1 or H, N', D] or [1 or B, 1 or H, N', D] with N' = N - num_prefix_tokens
    (as timm's rope modules give them: the two halves of a [..., 2·D] cat tensor work as they
    are), any float dtype, read as fp32. What the backward needs: sin, cos (and, for their
    gradients, qkv or this output: rope_bwd)."""
    qkv = _rows_unit(qkv)
    sin, cos, (ssb, ssh, ssn) = _sin_cos(sin, cos, qkv, num_heads, num_prefix_tokens)
    B, N, three_c = qkv.shape
    D = three_c // (3 * num_heads)
    y = torch.empty(B, N, three_c, device=qkv.device, dtype=qkv.dtype)
    if y.numel() == 0:
        return y
    bd = block_d(D)
    bm = block_m(bd, N)
    rope_fwd_kernel[(cdiv(N, bm), num_heads, B)](
        qkv, y, sin, cos, N, num_heads, D, num_prefix_tokens, qkv.stride(0), qkv.stride(1),
        ssb, ssh, ssn, HALF=bool(half), BLOCK_M=bm, BLOCK_D=bd, num_warps=NUM_WARPS)
    return y


@on_tensor_device
def rope_bwd(dout: torch.Tensor, num_heads: int, sin: torch.Tensor, cos: torch.Tensor, *,
             num_prefix_tokens: int = 0, half: bool = False, sin_cos_grad: bool = False,
             qkv=None, out=None):
    """(dqkv, dsin, dcos) from dout [B, N, 3·H·D], the gradient of rope_fwd's output: dqkv
    contiguous in dout's dtype (q, k rotated back, v passed through). dsin, dcos (sin's shape
    and dtype) only with sin_cos_grad, else None; they need the forward's input ``qkv`` (exact)
    or its output ``out`` (x recovered by the inverse rotation: exact where sin/cos are a
    rotation, as timm's rope modules make them), one of the two. Sums over the dims sin/cos
    broadcast over run in a fixed order (bitwise reproducible)."""
    dout = _rows_unit(dout)
    sin_in = sin
    sin, cos, (ssb, ssh, ssn) = _sin_cos(sin, cos, dout, num_heads, num_prefix_tokens)
    B, N, three_c = dout.shape
    H = num_heads
    D = three_c // (3 * H)
    npt = num_prefix_tokens
    fwd = None
    if sin_cos_grad:
        if (qkv is None) == (out is None):
            raise ValueError("sin_cos_grad needs one of qkv (the forward's input) and out (its output)")
        fwd = _rows_unit(qkv if qkv is not None else out)
        if fwd.shape != dout.shape:
            raise ValueError(f"{'qkv' if qkv is not None else 'out'} must be {list(dout.shape)}, "
                             f"got {list(fwd.shape)}")
    dx = torch.empty(B, N, three_c, device=dout.device, dtype=dout.dtype)
    if dx.numel() == 0:
        zeros = torch.zeros_like(sin_in) if sin_cos_grad else None
        return dx, zeros, zeros if zeros is None else zeros.clone()
    bd = block_d(D)
    bm = block_m(bd, N, backward=True)
    tiles = cdiv(N, bm)
    Bs, Hs = sin.shape[0], sin.shape[1]
    groups, part, part_args = B, None, (0, 0, 0)
    if sin_cos_grad:
        target = gpu_target(dout.device)
        groups = grad_groups(B, tiles, H, Bs == B and B > 1, target.sms if target else None)
        n_rest = (N - npt) * D
        # Partials ordered so the dims to sum lead (header): h first when only h is summed.
        h_major = Hs == 1 and Bs == B and B > 1
        part = torch.empty(2, *((H, groups) if h_major else (groups, H)), n_rest,
                           device=dout.device, dtype=torch.float32)
        part_args = (n_rest, groups * n_rest, part.stride(0)) if h_major else \
            (H * n_rest, n_rest, part.stride(0))
    rows_per_group = cdiv(B, groups)
    rope_bwd_kernel[(tiles, H, groups)](
        dout, dx, fwd, sin, cos, part, N, H, D, npt, B, rows_per_group,
        dout.stride(0), dout.stride(1), fwd.stride(0) if fwd is not None else 0,
        fwd.stride(1) if fwd is not None else 0, ssb, ssh, ssn, *part_args,
        HALF=bool(half), NEED_GRAD=bool(sin_cos_grad), FROM_OUTPUT=out is not None and sin_cos_grad,
        BLOCK_M=bm, BLOCK_D=bd, num_warps=NUM_WARPS)
    if not sin_cos_grad:
        return dx, None, None
    return (dx, *_sum_partials(part, sin_in, B, H, Bs, Hs, groups))


@on_tensor_device
def _sum_partials(part, like, B, H, Bs, Hs, groups):
    """dsin, dcos in like's shape and dtype from the [2, ·, ·, N'·D] partials: summed over the
    leading dims that like broadcasts over, in a fixed order (layer_norm's reduce kernel)."""
    n_rest = part.shape[-1]
    kept = (Bs if Bs > 1 or B == 1 else 1) * (Hs if Hs > 1 else 1)  # partial rows kept apart
    rows = part.shape[1] * part.shape[2] // kept
    if rows == 1:
        return [part[i].reshape(like.shape).to(like.dtype) for i in range(2)]
    C = kept * n_rest
    outs = [torch.empty(like.shape, device=like.device, dtype=like.dtype) for _ in range(2)]
    block_p, block_c = reduce_config(rows, C, gpu_target(part.device))
    layer_norm_param_grad_reduce_kernel[(cdiv(C, block_c), 2)](
        part, outs[0], outs[1], None, rows, C, HAS_OUT1=True, HAS_OUT2=False, BLOCK_P=block_p,
        BLOCK_N=block_c, num_warps=4)
    return outs
