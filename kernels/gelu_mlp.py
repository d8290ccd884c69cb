"""Launchers of the GELU MLP, y = residual + fc2(gelu(fc1(x)))·layer_scale·sample_scale[b].

Forward: two GEMMs (``matmul.matmul_kernel``). fc1's epilogue adds the bias and applies GELU,
writing the activation that fc2 reads and, when training, the pre-activation that backward keeps;
the activation is never kept. fc2's epilogue adds bias, LayerScale, drop-path and the residual.

Backward, with g = d_out [M, C_out] and ls, ss optional (1 when absent), b = m // rows_per_sample:
  d_pre = ((g @ (ls·W2)) · ss[b]) · gelu'(pre)       one GEMM, dGELU in its epilogue, which also
  act_s = gelu(pre) · ss[b]                           recomputes GELU from the saved pre for dW2
  E     = gᵀ @ act_s          dW2 = ls·E,  db2 = ls·Σ_m g·ss[b]
  dls   = Σ_h W2∘E + b2·Σ_m g·ss[b]                  (= Σ_m g·ss·fc2_out without rebuilding it)
  dss   = Σ_{m∈b} (Σ_h act·(g @ ls·W2) + g·(ls·b2))   (ROW_DOT epilogue output)
  dx = d_pre @ W1,  dW1 = d_preᵀ @ x,  db1 = Σ_m d_pre,  dresidual = g.
Everything is deterministic: no atomics; sums are per-tile then reduced in a fixed order.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._device import on_tensor_device
from .matmul import colsum, matmul
from .matmul_bound import bind, bind_colsum


class MlpGrads(NamedTuple):
    """Which optional gradients the MLP backward computes (dx, dW1 and dW2 always are). A wanted
    gradient of an absent tensor (no bias, no residual branch to scale) is still None."""
    fc1_bias: bool = True
    fc2_bias: bool = True
    layer_scale: bool = True
    sample_scale: bool = True


def _rows_per_sample(x):
    # From the shape alone: x[0] does not exist for an empty batch, and C may be 0.
    return 1 if x.dim() < 2 else max(1, math.prod(x.shape[1:-1]))


def _rows(t, C):
    """[..., C] -> [M, C]; M spelled out since reshape(-1, 0) is ambiguous for C = 0."""
    return t.reshape(math.prod(t.shape[:-1]), C)


class Gemms:
    """The MLP's GEMM and column-sum launches: through matmul / colsum per call (the chooser
    asked each time), or, with ``bound`` (a dict this object's owner keeps for one configuration),
    each bound on its first call to that call's configuration (kernels/matmul_bound.py) and then
    only allocated and launched; matmul itself where a launch cannot be bound (see bind)."""
    __slots__ = ("choose", "bound")

    def __init__(self, choose=None, bound=None):
        self.choose, self.bound = choose, bound

    def fc1(self, x2, w1, b1, approximate, save_pre):
        """(gelu(x2 @ w1ᵀ + b1), pre or None)"""
        return self._run("fc1", x2, w1, False, True, x2.dtype, bias=b1, epilogue="gelu",
                         approximate=approximate, store_pre=save_pre)

    def fc2(self, act, w2, out_dtype, b2, res2, ls, ss, rps):
        """res2 + (act @ w2ᵀ + b2)·ls·ss[b] (res2 None: act @ w2ᵀ + b2)"""
        return self._run("fc2", act, w2, False, True, out_dtype, bias=b2, residual=res2,
                         layer_scale=ls, sample_scale=ss, rows_per_sample=rps)[0]

    def dgelu(self, g, w2s, pre, approximate, row_dot, ss, rps):
        """(d_pre, gelu(pre)·ss, rowdot): see matmul_kernel's dgelu epilogue."""
        return self._run("dgelu", g, w2s, False, False, g.dtype, epilogue="dgelu",
                         approximate=approximate, pre=pre, store_act=True, row_dot=row_dot,
                         sample_scale=ss, rows_per_sample=rps)

    def tn(self, name, a, b, out_dtype):
        """aᵀ @ b (the weight gradients: a [M, N_out], b [M, K_out])"""
        return self._run(name, a, b, True, False, out_dtype)[0]

    def nn(self, name, a, b, out_dtype):
        """a @ b"""
        return self._run(name, a, b, False, False, out_dtype)[0]

    def colsum(self, name, x, ss=None, rps=1):
        if self.bound is None:
            return colsum(x, ss, rps)
        fn = self.bound.get(name)
        if fn is None:
            fn = self.bound[name] = bind_colsum(x, ss, rps) or False
        return fn(x, ss) if fn else colsum(x, ss, rps)

    def _run(self, name, a, b, a_t, b_t, out_dtype, **kw):
        if self.bound is not None:
            fn = self.bound.get(name)
            if fn is None:
                fn = self.bound[name] = bind(a.t() if a_t else a, b.t() if b_t else b,
                                             out_dtype, choose=self.choose, a_t=a_t, b_t=b_t,
                                             **kw) or False
            if fn:
                return fn(a, b, kw.get("bias"), kw.get("pre"), kw.get("residual"),
                          kw.get("layer_scale"), kw.get("sample_scale"))
        return matmul(a.t() if a_t else a, b.t() if b_t else b, out_dtype, choose=self.choose,
                      **kw)


@on_tensor_device
def gelu_mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                 layer_scale, sample_scale, save_pre, *, out_dtype=None, choose=None):
    """x [..., C], fc1_weight [H, C], fc2_weight [C_out, H] (nn.Linear layout), biases [H]/[C_out]
    or None, residual [..., C_out] or None, layer_scale [C_out], sample_scale [x.shape[0]].

    Returns (out [..., C_out] in out_dtype (default x's dtype), pre [M, H] when save_pre else an
    empty tensor). AMP passes an fp32 residual and out_dtype: fc2's epilogue adds into the stream.
    """
    return mlp_forward(Gemms(choose), x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate,
                       residual, layer_scale, sample_scale, save_pre, out_dtype)


def mlp_forward(gemms, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                layer_scale, sample_scale, save_pre, out_dtype=None):
    """gelu_mlp_fwd with its launches made by ``gemms`` (a :class:`Gemms`), on the current
    device."""
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    x2 = _rows(x, C)
    if residual is None:  # the contract scales only the residual branch
        layer_scale = sample_scale = None
    act, pre, _ = gemms.fc1(x2, fc1_weight, fc1_bias, approximate, save_pre)
    res2 = _rows(residual, c_out) if residual is not None else None
    out = gemms.fc2(act, fc2_weight, out_dtype or x.dtype, fc2_bias, res2, layer_scale,
                    sample_scale, _rows_per_sample(x))
    return out.reshape(*x.shape[:-1], c_out), (pre if save_pre else x.new_empty(0))


def fc2_side_grads(g, g_sum, e, rowdot, x, fc2_weight, fc2_bias, ls, ss, needs_fc2_bias,
                   needs_layer_scale, needs_sample_scale):
    """(d_fc2_bias, d_layer_scale, d_sample_scale) of out = residual + (act·W2ᵀ + b2)·ls·ss[b]
    (the GELU and the gated MLP's backward alike), each None where not needed: g [M, C_out] the
    output's gradient, g_sum = Σ_m g·ss (fp32 [C_out]), e = gᵀ·(act·ss) (fp32 when ls is given),
    rowdot the fc2 GEMM epilogue's per-row partial dots [tiles, M], x the MLP input [B, ..., C]."""
    d_b2 = None
    if needs_fc2_bias and fc2_bias is not None:
        d_b2 = (g_sum if ls is None else g_sum * ls.float()).to(fc2_bias.dtype)
    d_ls = None
    if needs_layer_scale:
        d_ls = (fc2_weight.float() * e).sum(1)
        if fc2_bias is not None:
            d_ls = d_ls + fc2_bias.float() * g_sum
        d_ls = d_ls.to(ls.dtype)
    d_ss = None
    if needs_sample_scale:
        per_row = rowdot.sum(0)
        if fc2_bias is not None:
            lsb = fc2_bias.float() * (ls.float() if ls is not None else 1.0)
            per_row = per_row + g.float() @ lsb
        d_ss = per_row.reshape(x.shape[0], math.prod(x.shape[1:-1])).sum(1).to(ss.dtype)
    return d_b2, d_ls, d_ss


@on_tensor_device
def gelu_mlp_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale, *,
                 approximate, has_residual, wanted=MlpGrads(), choose=None):
    """Gradients (dx, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, d_layer_scale,
    d_sample_scale); the optional ones not in ``wanted`` (MlpGrads) are None. pre is fwd's
    saved [M, H]. dresidual is grad itself and is left to the caller.
    """
    return mlp_backward(Gemms(choose), grad, x, fc1_weight, fc2_weight, fc2_bias, pre,
                        layer_scale, sample_scale, approximate, has_residual, wanted)


def mlp_backward(gemms, grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale,
                 sample_scale, approximate, has_residual, wanted):
    """gelu_mlp_bwd with its launches made by ``gemms`` (a :class:`Gemms`), on the current
    device."""
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    dtype = x.dtype
    x2 = _rows(x, C)
    g = _rows(grad, c_out)
    ls = layer_scale if has_residual else None
    ss = sample_scale if has_residual else None
    rps = _rows_per_sample(x)
    needs_fc1_bias, needs_fc2_bias = wanted.fc1_bias, wanted.fc2_bias
    needs_layer_scale = wanted.layer_scale and ls is not None
    needs_sample_scale = wanted.sample_scale and ss is not None

    # LayerScale folded into fc2's weight (weight-sized, cheap) so the dGELU GEMM reads g as is.
    w2s = fc2_weight if ls is None else (fc2_weight.float() * ls.float()[:, None]).to(dtype)
    d_pre, act_s, rowdot = gemms.dgelu(g, w2s, pre, approximate, needs_sample_scale, ss, rps)
    e = gemms.tn("e", g, act_s, torch.float32 if ls is not None else dtype)
    del act_s
    d_w2 = e if ls is None else (e * ls.float()[:, None]).to(dtype)
    g_sum = gemms.colsum("g_sum", g, ss, rps) if (needs_fc2_bias or needs_layer_scale) else None
    d_b2, d_ls, d_ss = fc2_side_grads(g, g_sum, e, rowdot, x, fc2_weight, fc2_bias, ls, ss,
                                      needs_fc2_bias, needs_layer_scale, needs_sample_scale)
    d_x = gemms.nn("dx", d_pre, fc1_weight, dtype)
    d_w1 = gemms.tn("dw1", d_pre, x2, dtype)
    d_b1 = gemms.colsum("d_b1", d_pre).to(dtype) if needs_fc1_bias else None
    return d_x.reshape(x.shape), d_w1, d_b1, d_w2, d_b2, d_ls, d_ss
