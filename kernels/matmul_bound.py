"""matmul and colsum launches bound to one configuration, for the Block's one-node step.

kernels/matmul.matmul decides per call: the plan of the problem, the chooser's key (strides, TMA
readability) and its answer, which vectors need a unit-stride copy, the grid and constexprs. The
Block's step (vit_fast/block_step.py) runs its MLP GEMMs with the same shapes, dtypes and
epilogues every time, on tensors it allocated itself or on weights it holds by storage.
:func:`bind` asks matmul's own plan and chooser once, with the first call's tensors, and returns
a :class:`GemmLaunch` that only allocates and launches -- the same kernel, config and arguments
matmul would launch -- or None where matmul would do something else (see :func:`bind`).

What the caller guarantees on every call: the operands have the bound shapes and dtypes, the
epilogue's vectors are unit-stride, PRE and the residual are row-contiguous, and the device is
current. Operand strides are read per call: a layout change cannot make a launch wrong, only
stale the bound config's choice.
"""
from __future__ import annotations

import torch

from ._device import cdiv, gpu_target
from .direct_launch import DirectLaunch
from .empties import empties
from .matmul import (_C_COLUMNS, GemmConfig, _chosen, colsum_kernel, colsum_launch, launch_key,
                     launch_plan, matmul_kernel)

_F32 = torch.float32


class GemmLaunch:
    """matmul(a, b, out_dtype, ...) for one configuration: returns (C, aux, rowdot) as matmul
    does. ``a_t`` / ``b_t``: the call passes that operand untransposed (a weight [N, K] for
    b = weightᵀ, a [K, M] tensor for a = tᵀ); its strides are read swapped, no view made."""
    __slots__ = ("launch", "M", "N", "K", "outs", "aux", "store_act", "pre_from_aux",
                 "rows_per_sample", "a_t", "b_t")

    def __call__(self, a, b, bias=None, pre=None, residual=None, layer_scale=None,
                 sample_scale=None):
        c, aux, rowdot = empties(a, self.outs)
        sa, sb = a.stride(), b.stride()
        if self.a_t:
            sa = (sa[1], sa[0])
        if self.b_t:
            sb = (sb[1], sb[0])
        if pre is not None and pre.stride(0) != self.N:  # PRE and ACT share one row stride
            pre = pre.contiguous()
        rs = residual.stride() if residual is not None else (0, 1)
        N = self.N
        self.launch(
            a, b, c, bias, aux if self.pre_from_aux else pre, aux if self.store_act else None,
            residual, layer_scale, sample_scale, rowdot, self.M, N, self.K,
            self.rows_per_sample, sa[0], sa[1], sb[0], sb[1], N, 1,
            N if (pre is not None or self.aux) else 0, rs[0], rs[1])
        return c, aux, rowdot


def bind(a, b, out_dtype, *, bias=None, epilogue="none", approximate="none", pre=None,
         store_pre=False, store_act=False, row_dot=False, residual=None, layer_scale=None,
         sample_scale=None, rows_per_sample=1, choose=None, a_t=False, b_t=False):
    """matmul(a, b, out_dtype, ...)'s launch (its arguments, a and b as matmul sees them) bound
    with the plan and the choice matmul makes for them, or None where matmul would do more than
    one matmul_kernel launch of a chosen config: a key the chooser has not answered yet, another
    kernel chosen (the Hopper GEMM), split-K, an empty problem or reduction, the GLU kinds, an
    epilogue vector that is not unit-stride, an aux whose layout is not [M, N] contiguous."""
    M, K = a.shape
    N = b.shape[1]
    if not (M and N and K) or epilogue in _C_COLUMNS:
        return None
    if any(t is not None and t.numel() > 1 and t.stride(0) != 1
           for t in (bias, layer_scale, sample_scale)):
        return None
    if pre is not None and pre.stride() != (N, 1):
        return None
    plan, precision = launch_plan(a, b, epilogue, approximate, bias, store_pre, store_act,
                                  row_dot, residual, layer_scale, sample_scale)
    config = plan.candidates[0]
    if choose is not None and len(plan.candidates) > 1:
        config = _chosen(choose, launch_key(a, b, out_dtype, plan, precision))
    if type(config) is not GemmConfig or config.split_k > 1:
        return None
    bound = GemmLaunch()
    bound.launch = DirectLaunch(matmul_kernel, *plan.launch(config))
    bound.M, bound.N, bound.K = M, N, K
    bound.aux, bound.store_act = store_pre or store_act, store_act
    bound.pre_from_aux = store_pre and pre is None
    bound.outs = (((M, N), out_dtype), ((M, N), a.dtype) if bound.aux else None,
                  ((cdiv(N, config.block_n), M), _F32) if row_dot else None)  # C, aux, rowdot
    bound.rows_per_sample = rows_per_sample
    bound.a_t, bound.b_t = a_t, b_t
    return bound


class ColsumLaunch:
    """colsum(x, sample_scale, rows_per_sample) for one configuration (x [M, N] rows)."""
    __slots__ = ("launch", "M", "N", "rows_per_chunk", "rows_per_sample", "outs")

    def __call__(self, x, sample_scale=None):
        part, = empties(x, self.outs)
        s = x.stride()
        self.launch(x, sample_scale, part, self.M, self.N, self.rows_per_chunk,
                    self.rows_per_sample, s[0], s[1])
        return part.sum(0)


def bind_colsum(x, sample_scale=None, rows_per_sample=1):
    """colsum's launch for x's shape (with or without a unit-stride sample_scale), or None for an
    empty x (colsum returns zeros there without a launch)."""
    M, N = x.shape
    if not (M and N) or (sample_scale is not None and sample_scale.numel() > 1
                         and sample_scale.stride(0) != 1):
        return None
    bound = ColsumLaunch()
    grid, bound.rows_per_chunk, consts = colsum_launch(M, N, gpu_target(x.device),
                                                       sample_scale is not None)
    bound.launch = DirectLaunch(colsum_kernel, grid, consts)
    bound.M, bound.N = M, N
    bound.rows_per_sample, bound.outs = rows_per_sample, (((grid[1], N), _F32),)
    return bound
