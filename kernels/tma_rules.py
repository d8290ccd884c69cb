"""What TMA (sm_90 tensor descriptors) can read: the rules both TMA kernels check on their
operands, in a module of their own so that the launchers deciding whether a TMA candidate is
offered (a measured-selection key holds the answer) need not import the TMA kernels.

TMA reads a tensor through a descriptor: the innermost dimension unit-stride, every other stride
and the base address multiples of 16 bytes, nothing empty.
"""
from __future__ import annotations

import torch


def gemm_operand_reasons(*operands) -> list:
    """TMA's limits on 2-D GEMM operands (name, tensor): one unit stride (the descriptor's inner
    dimension), the other (its row stride) a multiple of 16 bytes, a 16-byte aligned base, and
    something to multiply (M, N, K > 0)."""
    reasons = []
    for name, t in operands:
        row_stride = t.stride(0) if t.stride(1) == 1 else (t.stride(1) if t.stride(0) == 1
                                                            else None)
        if 0 in t.shape:
            reasons.append(f"{name} is empty")
        elif row_stride is None:
            reasons.append(f"{name} has no unit stride: {tuple(t.stride())}")
        elif (row_stride * t.element_size()) % 16 or t.data_ptr() % 16:
            reasons.append(f"{name}'s strides {tuple(t.stride())} or base are not 16-byte aligned")
    return reasons


def packed_qkv_reasons(qkv: torch.Tensor, num_heads: int) -> list:
    """TMA's rules on the [B, N, 3·H, D] view of qkv: unit last stride, every other stride
    (D, the row and batch strides) and the base 16-byte aligned, nothing empty."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        return [f"qkv {tuple(qkv.shape)} is not [B, N, 3·H·D] for H = {num_heads}"]
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if qkv.numel() == 0:
        return ["qkv is empty"]
    if qkv.stride(-1) != 1:
        return [f"qkv's last dim is not contiguous: strides {tuple(qkv.stride())}"]
    strides = (qkv.stride(0), qkv.stride(1), head_dim)
    if any(s * qkv.element_size() % 16 for s in strides) or qkv.data_ptr() % 16:
        return [f"qkv's strides {tuple(qkv.stride())} (head dim {head_dim}) or base are not "
                "16-byte aligned"]
    return []
