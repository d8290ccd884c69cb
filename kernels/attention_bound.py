"""The attention kernels' launchers bound to one configuration, for the Block's one-node step.

attention_fwd / attention_bwd (attention.py) check their arguments, take any layout, handle a
scale <= 0, segments and a bias, and look their launch config up per call. The Block's step
(vit_fast/block_step.py) calls them with one shape, dtype and head count, on a qkv it made itself
(F.linear's output: contiguous), without segments or a bias, at a positive scale.
:func:`bind_fwd` and :func:`bind_bwd` take the same launch decisions once (attention.py's
_fwd_launch and _bwd_launch: the same kernels, configs and plan) and return callables that only
allocate and launch. out and dout are read with their own strides (the forward may have been
SDPA's, whose out is a view).
"""
from __future__ import annotations

import torch

from ._device import cdiv, gpu_target, interpreting, next_power_of_2
from .attention import (_NO_BIAS, _NO_SEGMENTS, LOG2E, _bwd_launch, _dq_partials, _fwd_launch,
                        _REDUCE_BLOCK_M, attention_bwd_delta_kernel, attention_bwd_dkdv_kernel,
                        attention_bwd_dq_kernel, attention_bwd_dq_reduce_kernel,
                        attention_fwd_kernel)
from .direct_launch import DirectLaunch
from .empties import empties

_F32 = torch.float32


class AttentionFwd:
    """attention_fwd(qkv, num_heads, scale, dropout_p=, seed=) for one configuration:
    (out [B, N, H·D], lse [B, H, N] fp32)."""
    __slots__ = ("launch", "N", "H", "C", "stride_b", "stride_n", "outs")

    def __call__(self, qkv, scale, dropout_p, seed):
        N, H, C = self.N, self.H, self.C
        out, lse = empties(qkv, self.outs)
        self.launch(qkv, out, lse, seed, N, H, self.stride_b, self.stride_n, N * C, C,
                    scale * LOG2E, dropout_p)
        return out, lse


def bind_fwd(qkv_shape, num_heads, dtype, dropout, device) -> AttentionFwd:
    """The forward of packed qkv [B, N, 3·H·D] (contiguous) in ``dtype`` with or without
    dropout, no segments, no bias, a scale > 0."""
    B, N, three_c = qkv_shape
    head_dim = three_c // (3 * num_heads)
    bound = AttentionFwd()
    grid, consts = _fwd_launch(B, N, num_heads, head_dim, dtype, dropout, False, False, device)
    bound.launch = DirectLaunch(attention_fwd_kernel, grid, {**_NO_SEGMENTS, **consts, **_NO_BIAS})
    bound.N, bound.H, bound.C = N, num_heads, three_c // 3
    bound.outs = (((B, N, three_c // 3), dtype), ((B, num_heads, N), _F32))  # out, lse
    bound.stride_b, bound.stride_n = N * three_c, three_c
    return bound


class AttentionBwd:
    """attention_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p=, seed=) for one
    configuration: dqkv [B, N, 3·H·D] (contiguous, qkv's dtype)."""
    __slots__ = ("plan", "delta", "dkdv", "dq", "reduce", "B", "N", "H", "C3", "partials",
                 "outs")

    def __call__(self, dout, qkv, out, lse, scale, dropout_p, seed):
        N, H, C3 = self.N, self.H, self.C3
        dqkv, delta = empties(qkv, self.outs)
        so, sd = out.stride(), dout.stride()
        if so[2] != 1:  # rows of any stride; columns unit-stride
            out = out.contiguous()
            so = out.stride()
        if sd[2] != 1:
            dout = dout.contiguous()
            sd = dout.stride()
        self.delta(out, dout, delta, N, H, so[0], so[1], sd[0], sd[1])
        args = (qkv, dout, lse, delta, dqkv, seed, N, H, N * C3, C3, sd[0], sd[1], N * C3, C3,
                scale, scale * LOG2E, dropout_p)
        part = None
        if self.partials:
            part = _dq_partials(self.partials, self.B, N, C3 // 3, qkv.device)
            dq = dict(DQ=part, stride_dq_kb=part.stride(0), stride_dq_b=part.stride(1),
                      stride_dq_n=part.stride(2))
        elif self.plan == "fused":  # one key tile: its share of dq is all of it
            dq = dict(DQ=dqkv, stride_dq_kb=0, stride_dq_b=N * C3, stride_dq_n=C3)
        else:
            dq = _NO_DQ
        self.dkdv(*args, **dq)
        if self.plan == "split":
            self.dq(*args)
        elif part is not None:
            self.reduce(part, dqkv, N, H, self.partials, part.stride(0), part.stride(1),
                        part.stride(2), N * C3, C3, None)
        return dqkv


_NO_DQ = dict(DQ=None, stride_dq_kb=0, stride_dq_b=0, stride_dq_n=0)


def bind_bwd(qkv_shape, num_heads, dtype, dropout, device) -> AttentionBwd:
    """The backward for :func:`bind_fwd`'s configuration, with attention_bwd's plan for it
    (bwd_plan on this GPU: the fused dK/dV/dQ pass, with dq partials or not, or the two
    passes)."""
    B, N, three_c = qkv_shape
    head_dim = three_c // (3 * num_heads)
    plan, delta_grid, delta_consts, dot = _bwd_launch(B, N, num_heads, head_dim, dtype, dropout,
                                                      False, False, gpu_target(device), None)
    bound = AttentionBwd()
    bound.plan = plan[0]
    bound.delta = DirectLaunch(attention_bwd_delta_kernel, delta_grid, delta_consts)
    bound.B, bound.N, bound.H, bound.C3 = B, N, num_heads, three_c
    bound.outs = (((B, N, three_c), dtype), ((B, num_heads, N), _F32))  # dqkv, delta
    block_m, block_n, warps, stages = plan[1]
    bound.dkdv = DirectLaunch(attention_bwd_dkdv_kernel, (cdiv(N, block_n) * B * num_heads,),
                              dict(_NO_SEGMENTS, WRITE_DQ=plan[0] == "fused", BLOCK_M=block_m,
                                   BLOCK_N=block_n, num_warps=warps, num_stages=stages, **dot,
                                   **_NO_BIAS))
    bound.partials = plan[2] if (plan[0] == "fused" and plan[2] > 1) else 0
    bound.dq = bound.reduce = None
    if plan[0] == "split":
        block_m, block_n, warps, stages = plan[2]
        bound.dq = DirectLaunch(attention_bwd_dq_kernel, (cdiv(N, block_m) * B * num_heads,),
                                dict(_NO_SEGMENTS, BLOCK_M=block_m, BLOCK_N=block_n,
                                     num_warps=warps, num_stages=stages, **dot, **_NO_BIAS))
    elif bound.partials:
        rm = _reduce_rows(N)
        bound.reduce = DirectLaunch(attention_bwd_dq_reduce_kernel,
                                    (cdiv(N, rm) * B * num_heads,),
                                    dict(HEAD_DIM=head_dim, BLOCK_D=dot["BLOCK_D"], BLOCK_M=rm,
                                         KEY_BLOCK=plan[1][1], HAS_SEGMENTS=False))
    return bound


def _reduce_rows(N):
    """attention_bwd's dq reduce tile rows (the interpreter's: the sequence, at least 16)."""
    return min(_REDUCE_BLOCK_M, max(16, next_power_of_2(N))) if interpreting() else _REDUCE_BLOCK_M
