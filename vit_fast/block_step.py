"""The fused Block's step as one autograd node, for a configuration that has run once.

    y1      = LN1(x)                          kernel; not saved (the backward rebuilds it)
    qkv     = y1·Wqkvᵀ + bqkv                 cuBLAS
    o, lse  = attention(qkv)                  the kernel, or the alternative chosen for the key
    p       = o·Wpᵀ + bp                      cuBLAS
    h, s    = LN2(s),  s = x + ls1·ss1·p      kernel; h not saved
    out     = s + ls2·ss2·MLP(h)              the MLP implementation chosen for the key

The general fused path (vit_fast/block_plan.py) runs the same math as three ops and an F.linear:
four autograd nodes, each op re-entering its launchers' per-call logic, plus under AMP eight
autograd casts. Once a configuration has run forward and backward there (kernels built, tuning
choices made), :class:`BlockStep` runs it as one node: the same launchers, kernels and configs,
the same roundings and casts, called straight down from one forward and one backward with
everything that depends only on the configuration decided when the step is made.

Saved for backward, as the three ops save it: x, qkv, o, lse, s, the fc1 pre-activation, the
attention branch p only when ls1 or ss1 needs it, the GEMM weights (under AMP their casts) and
LayerNorm parameters. Neither LayerNorm output nor any statistic is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .amp_weights import AmpWeights
from .kernels.gelu_mlp import gelu_mlp_fwd as _triton_mlp_fwd
from .kernels.layer_norm import residual_layer_norm_bwd, residual_layer_norm_fwd
from .ops import attention as _attention
from .ops import gelu_mlp as _mlp
from .ops.attention_sdpa import attention_forward
from .ops.gelu_mlp_tuned import mlp_launchers
from .ops.layer_norm import sample_scale_grad
from .ops.residual_layer_norm_mlp import gemm_grad


class BlockStep:
    """What one configuration of the fused Block runs (made by :meth:`make` from its BlockPlan):
    the MLP and attention implementations of the plan's policy, AMP's dtype, and the parameters
    it was made with, by storage (:meth:`holds`)."""
    __slots__ = ("heads", "approximate", "amp", "policy", "mlp_fwd", "mlp_bwd", "chooser",
                 "ptrs")

    def __init__(self, heads, approximate, amp, policy, ptrs):
        self.heads, self.approximate, self.amp, self.policy = heads, approximate, amp, policy
        self.ptrs = ptrs
        if amp is not None:  # AMP's contract: the Triton MLP writes into the fp32 stream
            self.mlp_fwd, self.mlp_bwd = _triton_mlp_fwd, _mlp.backward_kernels
            self.chooser = _mlp.gemm_chooser()
        else:
            self.mlp_fwd, self.mlp_bwd = mlp_launchers(policy)[:2]
            self.chooser = None

    @classmethod
    def make(cls, block, plan):
        """The step of ``plan``'s configuration, with ``block``'s parameters as they are now."""
        return cls(plan.heads, plan.approximate, plan.amp, plan.policy,
                   _storages(_block_params(block)))

    def holds(self, params) -> bool:
        """Whether ``params`` are the tensors the step was made with, by storage: a parameter
        replaced, or its ``.data`` swapped (whatever its shape, dtype or layout now), is not.
        Updates in place (optimizers) keep the storage."""
        return _storages(params) == self.ptrs

    def forward(self, x, params, scalars, ss1, ss2, seed, segment_ids):
        """The Block's output; params = (n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2,
        ls2) as the modules hold them (fp32 under AMP); scalars = (eps1, eps2, scale, drop)."""
        return BlockFn.apply(self, scalars, ss1, ss2, seed, segment_ids, x, *params)


def _block_params(block):
    a, mlp = block.attn, block.mlp
    return (block.norm1.weight, block.norm1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight,
            a.proj.bias, block.ls1._parameters.get("gamma"), block.norm2.weight, block.norm2.bias,
            mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
            block.ls2._parameters.get("gamma"))


def _storages(params):
    return [0 if p is None else p.data_ptr() for p in params]


# The step's own cast cache: its casts are made inside the node (no autograd), so they must never
# be handed to the general path, whose casts carry the gradient to the fp32 parameter.
_CASTS = AmpWeights()


def _amp_casts(amp, params):
    """The GEMM weights in the autocast dtype, cast once per autocast region (as the general
    path's AmpWeights casts them), the rest as they are."""
    n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = params
    region = _CASTS.region(qw.device, amp)
    cast = _CASTS.cast
    return (n1w, n1b, cast(qw, amp, region), cast(qb, amp, region), cast(pw, amp, region),
            cast(pb, amp, region), ls1, n2w, n2b, cast(w1, amp, region), cast(b1, amp, region),
            cast(w2, amp, region), cast(b2, amp, region), ls2)


# Positions of the inputs of BlockFn.apply (for ctx.needs_input_grad).
_X, _N1W, _N1B, _QW, _QB, _PW, _PB, _LS1, _N2W, _N2B, _W1, _B1, _W2, _B2, _LS2 = range(6, 21)
_SS1, _SS2 = 2, 3


class BlockFn(torch.autograd.Function):
    """The fused Block forward and backward (see the module docstring); non-differentiable
    arguments first: step, scalars, ss1, ss2, seed, segment_ids, then x and the parameters."""

    @staticmethod
    def forward(ctx, step, scalars, ss1, ss2, seed, segment_ids, x, *params):
        eps1, eps2, scale, drop = scalars
        amp = step.amp
        if amp is not None:
            params = _amp_casts(amp, params)
        n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = params
        lp = qw.dtype  # the GEMMs' dtype
        y1 = residual_layer_norm_fwd(x, n1w, n1b, eps1, out_dtype=lp, stats=False)[0]
        qkv = F.linear(y1, qw, qb)
        del y1
        o, lse = attention_forward(qkv, step.heads, scale, drop, seed, segment_ids, step.policy)
        p = F.linear(o, pw, pb)
        h, s = residual_layer_norm_fwd(p, n2w, n2b, eps2, x, ls1, ss1, out_dtype=lp,
                                       stats=False)[:2]
        save_pre = True
        if amp is not None:
            out, pre = step.mlp_fwd(h, w1, b1, w2, b2, step.approximate, s, ls2, ss2, save_pre,
                                    out_dtype=s.dtype, choose=step.chooser)
        else:
            out, pre = step.mlp_fwd(h, w1, b1, w2, b2, step.approximate, s, ls2, ss2, save_pre)
        need_p = ls1 is not None or (ss1 is not None and ss1.requires_grad)
        ctx.save_for_backward(x, qkv, o, lse, s, pre, p if need_p else None, n1w, n1b, qw, pw,
                              n2w, n2b, w1, w2, b2, ls1, ls2, ss1, ss2, seed, segment_ids)
        ctx.step, ctx.scalars = step, scalars
        ctx.bias_dtypes = (n1b.dtype if n1b is not None else None,
                           n2b.dtype if n2b is not None else None, b1 is not None,
                           qb is not None, pb is not None)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dout):
        if dout is None:
            return (None,) * 21
        (x, qkv, o, lse, s, pre, p, n1w, n1b, qw, pw, n2w, n2b, w1, w2, b2, ls1, ls2, ss1, ss2,
         seed, segment_ids) = ctx.saved_tensors
        step = ctx.step
        eps1, eps2, scale, drop = ctx.scalars
        n1b_dtype, n2b_dtype, has_b1, has_qb, has_pb = ctx.bias_dtypes
        need = ctx.needs_input_grad
        lp = qw.dtype
        C = x.shape[-1]

        # residual -> LN2 -> MLP (vit_fast/ops/residual_layer_norm_mlp.py's backward)
        g = dout.contiguous()
        h, _, mean, rstd = residual_layer_norm_fwd(s, n2w, n2b, eps2, out_dtype=lp)
        wanted = _mlp.MlpGrads(fc1_bias=need[_B1] and has_b1, fc2_bias=need[_B2] and b2 is not None,
                               layer_scale=need[_LS2] and ls2 is not None,
                               sample_scale=need[_SS2] and ss2 is not None)
        g_lp, ls_lp, k = gemm_grad(g, ls2, lp)
        dh, dw1, db1, dw2, db2, dls2, dss2 = step.mlp_bwd(
            g_lp, h, w1, w2, b2, pre, ls_lp, ss2.to(lp) if ss2 is not None else None,
            approximate=step.approximate, has_residual=True, **_mlp.wanted_kwargs(wanted))
        del h
        if k is not None and dls2 is not None and dls2.numel():
            dls2 = dls2.float() / k  # exact: k is a power of two
        p32 = p.to(s.dtype) if p is not None else None
        dp, dres, dn2w, dn2b, dls1 = residual_layer_norm_bwd(
            dh.to(s.dtype), g, s, mean, rstd, n2w, has_residual=True,
            need_bias_grad=n2b is not None and need[_N2B], x=p32 if ls1 is not None else None,
            layer_scale=ls1, sample_scale=ss1, residual_dtype=x.dtype, bias_dtype=n2b_dtype)
        dss1 = sample_scale_grad(dres, p32, ls1, ss1) if (need[_SS1] and ss1 is not None) else None
        del dh, g, g_lp

        # proj (F.linear's backward, in the GEMMs' dtype)
        gp = dp.to(lp).reshape(-1, C)
        dpw = gp.t().mm(o.reshape(-1, C)) if need[_PW] else None
        dpb = gp.sum(0) if (has_pb and need[_PB]) else None
        do = gp.mm(pw).reshape(o.shape)
        del gp, dp

        # attention
        dqkv = _attention.backward_kernels(do, qkv, o, lse, step.heads, scale, drop, seed,
                                           segment_ids, step.policy)
        del do

        # LN1 -> qkv (vit_fast/ops/layer_norm_linear.py's backward)
        g3 = dqkv.reshape(-1, 3 * C)
        y1, _, mean, rstd = residual_layer_norm_fwd(x, n1w, n1b, eps1, out_dtype=lp)
        dqw = g3.t().mm(y1.reshape(-1, C)) if need[_QW] else None
        del y1
        dqb = g3.sum(0) if (has_qb and need[_QB]) else None
        dy1 = g3.mm(qw).reshape(x.shape).to(x.dtype)
        del g3, dqkv
        dx, _, dn1w, dn1b, _ = residual_layer_norm_bwd(
            dy1, None, x, mean, rstd, n1w, has_residual=False,
            need_bias_grad=n1b is not None and need[_N1B], bias_dtype=n1b_dtype)
        dx.add_(dres)

        def kept(grad, i):
            return grad if (need[i] and grad is not None and grad.numel()) else None
        return (None, None, dss1, kept(dss2, _SS2), None, None, dx,
                kept(dn1w, _N1W), kept(dn1b, _N1B), dqw, dqb, dpw, dpb, kept(dls1, _LS1),
                kept(dn2w, _N2W), kept(dn2b, _N2B), dw1, kept(db1, _B1), dw2, kept(db2, _B2),
                kept(dls2, _LS2))
