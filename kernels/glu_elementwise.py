"""Elementwise GLU kernels over the saved fc1 pre-activation: the GLU MLP's hidden LayerNorm path
(kernels/glu_mlp.py), where the activation feeds a LayerNorm rather than straight into fc2, so
neither can live in a GEMM epilogue.

pre is [M, 2H] with the gate in columns [0, H) and the value in [H, 2H) (what matmul's "glu"
epilogue saves), s = σ(gate):
  glu_fwd_kernel   act = silu(gate)·value                                   [M, H]
  glu_bwd_kernel   d_pre = d_act·value·silu'(gate) | d_act·silu(gate)        [M, 2H]
silu'(gate) = s + silu(gate)·(1 - s). Both compute in fp32 from pre as stored, so they agree
bit for bit with the GEMM epilogues' own recompute.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, on_tensor_device
from .gemm_epilogue import _silu_parts


class GluBlocks(NamedTuple):
    """(rows, columns) of hidden units per program of both kernels (4 warps, default stages)."""
    fwd: tuple
    bwd: tuple


# 16 hidden units a thread at 4 warps: these kernels are bound by HBM bandwidth; the backward
# holds five values per unit. Under the interpreter every program costs Python time: few, large.
CUDA_BLOCKS = GluBlocks((16, 128), (16, 128))
INTERPRET_BLOCKS = GluBlocks((64, 1024), (64, 1024))
NUM_WARPS = 4


def glu_blocks(target=None) -> GluBlocks:
    """The launchers' tiles (kernels/glu_mlp_aot.py compiles the same); target None under the
    interpreter. The same on every GPU: memory-bound kernels."""
    return INTERPRET_BLOCKS if target is None else CUDA_BLOCKS


@triton.jit
def glu_fwd_kernel(PRE, ACT, M, H, stride_pm, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """ACT[m, h] = silu(PRE[m, h])·PRE[m, H + h] for a [BLOCK_M, BLOCK_H] tile.

    PRE [M, 2H] (row stride stride_pm, unit columns); ACT [M, H] contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]  # M·2H passes 2^31 at large batches
    gate_ptrs = PRE + r64 * stride_pm + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(gate_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    _s, silu = _silu_parts(gate)
    tl.store(ACT + r64 * H + cols[None, :], (silu * value).to(ACT.dtype.element_ty), mask=mask)


@triton.jit
def glu_bwd_kernel(DACT, PRE, DPRE, M, H, stride_dm, stride_pm,
                   BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """d_pre of one [BLOCK_M, BLOCK_H] tile of hidden units:
    DPRE[m, h] = d·value·silu'(gate), DPRE[m, H + h] = d·silu(gate), d = DACT[m, h].

    DACT [M, H] (row stride stride_dm); PRE [M, 2H] (row stride stride_pm); DPRE [M, 2H]
    contiguous; unit columns everywhere."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    gate_ptrs = PRE + r64 * stride_pm + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(gate_ptrs + H, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(DACT + r64 * stride_dm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s, silu = _silu_parts(gate)
    out_ptrs = DPRE + r64 * (2 * H) + cols[None, :]
    tl.store(out_ptrs + H, (d * silu).to(DPRE.dtype.element_ty), mask=mask)
    tl.store(out_ptrs, (d * value * (s + silu * (1.0 - s))).to(DPRE.dtype.element_ty), mask=mask)


def _unit_columns(t):
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@on_tensor_device
def glu_forward(pre):
    """act [M, H] (pre's dtype) = silu(gate)·value from pre [M, 2H] = gate | value."""
    pre = _unit_columns(pre)
    M, H = pre.shape[0], pre.shape[1] // 2
    act = torch.empty((M, H), device=pre.device, dtype=pre.dtype)
    if M and H:
        bm, bh = glu_blocks(gpu_target(pre.device)).fwd
        glu_fwd_kernel[(cdiv(M, bm), cdiv(H, bh))](
            pre, act, M, H, pre.stride(0), BLOCK_M=bm, BLOCK_H=bh, num_warps=NUM_WARPS)
    return act


@on_tensor_device
def glu_backward(d_act, pre):
    """d_pre [M, 2H] (pre's dtype) = the gradient of gate | value from d_act [M, H]."""
    pre, d_act = _unit_columns(pre), _unit_columns(d_act)
    M, H = d_act.shape
    d_pre = torch.empty((M, 2 * H), device=pre.device, dtype=pre.dtype)
    if M and H:
        bm, bh = glu_blocks(gpu_target(pre.device)).bwd
        glu_bwd_kernel[(cdiv(M, bm), cdiv(H, bh))](
            d_act, pre, d_pre, M, H, d_act.stride(0), pre.stride(0),
            BLOCK_M=bm, BLOCK_H=bh, num_warps=NUM_WARPS)
    return d_pre
