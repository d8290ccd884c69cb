"""Launchers of the gated (GLU) MLP with a SiLU gate: timm's GluMlp(act_layer=nn.SiLU) and SwiGLU,

    y = residual + fc2(norm(silu(gate)·value))·layer_scale·sample_scale[b]

with the optional LayerNorm over the H hidden units (EVA02 base's SwiGLU, scale_mlp) and the
residual / LayerScale / drop-path of kernels/gelu_mlp.py.

fc1 comes in timm's two layouts:
  packed  fc1_weight [2H, C], fc1_bias [2H] (GluMlp): fc1's output x1 | x2 is chunked in two;
          the gate is x1 (gate_last=False: SwiGLUPacked, EVA02 small) or x2 (GluMlp's default);
  pair    (gate_weight, value_weight), each [H, C], biases (gate_bias, value_bias) or None
          (SwiGLU's fc1_g and fc1_x, EVA02 base).
The weight gradients come back in the layout given.

Forward (M rows):
  W1i = the gate and value rows interleaved, [2H, C] (a weight-sized copy), so that each fc1
        GEMM tile holds the gate and the value of the same hidden units;
  fc1:  matmul epilogue "glu": act = silu(gate)·value [M, H] and, training, pre = gate | value
        [M, 2H]: the only [M, hidden] tensor kept for backward (the activation never is);
  norm: n = LayerNorm(act) (kernels/layer_norm.py, fp32 statistics), or n = act without one;
  fc2:  out = residual + (n W2ᵀ + b2)·ls·ss[b] (the epilogue gelu_mlp's fc2 uses).
Backward, g = d_out [M, C_out], w2s = ls·W2 (weight-sized), ss = sample_scale[b] (1 if absent):
  without norm: d_pre, act_s, rowdot = g @ w2s with epilogue "dglu" (dSiLU from pre; act_s =
                act·ss recomputed for dW2; rowdot for d ss);
  with norm:    act = glu(pre) (elementwise), n, mean, rstd = LayerNorm(act) with the forward's
                kernel (bit-identical, nothing of the norm saved), d_n, n_s, rowdot = g @ w2s with
                epilogue "dident" (·ss), d_act = LayerNorm backward(d_n), d_pre = dglu(d_act, pre)
                (elementwise);
  then as gelu_mlp: E = gᵀ @ act_s, dW2 = ls·E, db2 = ls·Σ g·ss,
  dls = Σ_h W2∘E + b2·Σ g·ss, dss = Σ_{m∈b} (rowdot + g·(ls·b2)); dx = d_pre @ W1 (gate | value
  order), dW1 = d_preᵀ @ x, db1 = Σ_m d_pre. Deterministic: no atomics, per-tile sums reduced in
  a fixed order.

Saved-for-backward contract (what an autograd op keeps): x, fc1_weight (as given), fc2_weight,
fc2_bias, pre [M, 2H] (gate | value, x's dtype), norm_weight, norm_bias (and eps), layer_scale,
sample_scale. fc1's bias is not needed (it is in pre); no statistic of the norm is kept.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ._device import on_tensor_device
from .gelu_mlp import _rows, _rows_per_sample, fc2_side_grads
from .glu_elementwise import glu_backward, glu_forward
from .layer_norm import MAX_C, residual_layer_norm_bwd, residual_layer_norm_fwd
from .matmul import colsum, matmul


class GluMlpGrads(NamedTuple):
    """Which optional gradients glu_mlp_bwd computes (dx, dW1 and dW2 always are). A wanted
    gradient of an absent tensor (no norm, no fc2 bias, no residual branch to scale) is still
    None; fc1's bias is not among the saved tensors, so ask for its gradient only when fc1 has
    one."""
    fc1_bias: bool = True
    fc2_bias: bool = True
    norm_weight: bool = True
    norm_bias: bool = True
    layer_scale: bool = True
    sample_scale: bool = True


class GluMlpGradients(NamedTuple):
    """glu_mlp_bwd's result; fc1_weight and fc1_bias in the layout fc1 was given in (a [2H, ...]
    tensor, or a (gate, value) pair), None where not wanted or absent."""
    x: torch.Tensor
    fc1_weight: object
    fc1_bias: object
    norm_weight: torch.Tensor | None
    norm_bias: torch.Tensor | None
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor | None
    layer_scale: torch.Tensor | None
    sample_scale: torch.Tensor | None


_FC1_FORMS = "fc1_weight: a [2H, C] tensor or a (gate, value) pair of [H, C] tensors"


def _is_pair(t):
    return isinstance(t, (tuple, list))


def check_fc1(x, fc1_weight, fc1_bias, norm_weight=None, norm_bias=None, norm_eps=None):
    """H, after checking fc1's layout against x (ValueError/TypeError naming the argument)."""
    C = x.shape[-1]
    if _is_pair(fc1_weight):
        if len(fc1_weight) != 2 or not all(isinstance(w, torch.Tensor) for w in fc1_weight):
            raise TypeError(_FC1_FORMS)
        gate, value = fc1_weight
        if gate.dim() != 2 or gate.shape != value.shape or gate.shape[1] != C:
            raise ValueError(f"fc1_weight: gate {tuple(gate.shape)} and value "
                             f"{tuple(value.shape)} must both be [H, C] with C = {C}")
        H = gate.shape[0]
        if fc1_bias is not None and (not _is_pair(fc1_bias) or len(fc1_bias) != 2 or any(
                not isinstance(b, torch.Tensor) or b.shape != (H,) for b in fc1_bias)):
            raise ValueError(f"fc1_bias: with a (gate, value) fc1_weight, None or a pair of [{H}] "
                             "tensors (SwiGLU's fc1_g and fc1_x both have a bias or neither)")
    else:
        if not isinstance(fc1_weight, torch.Tensor):
            raise TypeError(_FC1_FORMS)
        if fc1_weight.dim() != 2 or fc1_weight.shape[0] % 2 or fc1_weight.shape[1] != C:
            raise ValueError(f"fc1_weight: packed gate/value weight must be [2H, {C}], got "
                             f"{tuple(fc1_weight.shape)}")
        H = fc1_weight.shape[0] // 2
        if fc1_bias is not None and (not isinstance(fc1_bias, torch.Tensor)
                                     or fc1_bias.shape != (2 * H,)):
            raise ValueError(f"fc1_bias: with a packed fc1_weight, None or a [{2 * H}] tensor")
    if norm_eps is None:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_eps: the hidden LayerNorm's parameters come without its eps")
    else:
        if H > MAX_C:
            raise ValueError(f"fc1_weight: the hidden LayerNorm kernel takes H <= {MAX_C}, got {H}")
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if t is not None and t.shape != (H,):
                raise ValueError(f"{name}: expected [{H}], got {tuple(t.shape)}")
    return H


def _gate_value(t, gate_last):
    """(gate, value) halves of a packed [2H, ...] fc1 tensor, or the pair itself."""
    if _is_pair(t):
        return tuple(t)
    first, second = t.chunk(2, dim=0)
    return (second, first) if gate_last else (first, second)


def _interleaved(t, gate_last):
    """[2H, ...]: row 2j the gate of hidden unit j, 2j+1 its value (the "glu" epilogue's B)."""
    gate, value = _gate_value(t, gate_last)
    return torch.stack((gate, value), dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])


def _gate_first(t, gate_last):
    """[2H, ...] as gate | value (pre's column order): the tensor itself where it already is."""
    if not _is_pair(t) and not gate_last:
        return t
    return torch.cat(_gate_value(t, gate_last))


def _as_given(grad, like, gate_last):
    """A gate | value ordered [2H, ...] gradient in the layout of ``like`` (fc1's argument)."""
    gate, value = grad.chunk(2, dim=0)
    if _is_pair(like):
        return gate, value
    return torch.cat((value, gate)) if gate_last else grad


@on_tensor_device
def glu_mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                sample_scale, save_pre, *, gate_last=False, norm_weight=None, norm_bias=None,
                norm_eps=None, out_dtype=None, choose=None):
    """x [..., C]; fc1_weight packed [2H, C] or a (gate, value) pair of [H, C], fc1_bias alike or
    None (see the module docstring; gate_last picks the packed gate half); fc2_weight [C_out, H],
    fc2_bias [C_out] or None; residual [..., C_out] or None, layer_scale [C_out],
    sample_scale [x.shape[0]] (both apply only with a residual); norm_eps not None adds the
    hidden LayerNorm (norm_weight, norm_bias [H] or None; x's dtype, or fp32 under AMP).

    Returns (out [..., C_out] in out_dtype (default x's dtype), pre [M, 2H] = gate | value in
    x's dtype when save_pre, else an empty tensor). AMP passes an fp32 residual (and its fp32
    scales) and out_dtype fp32: fc2's epilogue adds into the stream.
    """
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    check_fc1(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_eps)
    x2 = _rows(x, C)
    if residual is None:  # the contract scales only the residual branch
        layer_scale = sample_scale = None
    bias = _interleaved(fc1_bias, gate_last) if fc1_bias is not None else None
    act, pre, _ = matmul(x2, _interleaved(fc1_weight, gate_last).t(), x.dtype, bias=bias,
                         epilogue="glu", store_pre=save_pre, choose=choose)
    if norm_eps is not None:
        act = residual_layer_norm_fwd(act, norm_weight, norm_bias, norm_eps)[0]
    res2 = _rows(residual, c_out) if residual is not None else None
    out, _, _ = matmul(act, fc2_weight.t(), out_dtype or x.dtype, bias=fc2_bias, residual=res2,
                       layer_scale=layer_scale, sample_scale=sample_scale,
                       rows_per_sample=_rows_per_sample(x), choose=choose)
    return out.reshape(*x.shape[:-1], c_out), (pre if save_pre else x.new_empty(0))


@on_tensor_device
def glu_mlp_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale, *,
                has_residual, gate_last=False, norm_weight=None, norm_bias=None, norm_eps=None,
                wanted=GluMlpGrads(), choose=None):
    """GluMlpGradients of glu_mlp_fwd's inputs from grad = d out [..., C_out] and the saved
    tensors (x, fc1_weight as given to the forward, fc2_weight, fc2_bias, pre [M, 2H], the norm's
    parameters and eps, layer_scale, sample_scale); all in x's dtype but the norm's parameters
    (fp32 under AMP, whose op casts grad, layer_scale and sample_scale to x's dtype). The
    optional gradients not in ``wanted`` (GluMlpGrads) are None; dresidual is grad itself and
    is left to the caller.
    """
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    H = check_fc1(x, fc1_weight, None, norm_weight, norm_bias, norm_eps)
    dtype = x.dtype
    x2 = _rows(x, C)
    g = _rows(grad, c_out)
    M = x2.shape[0]
    if pre.shape != (M, 2 * H):
        raise ValueError(f"pre: expected the forward's saved [{M}, {2 * H}], got {tuple(pre.shape)}"
                         " (did the forward run with save_pre=False?)")
    ls = layer_scale if has_residual else None
    ss = sample_scale if has_residual else None
    rps = _rows_per_sample(x)
    needs_layer_scale = wanted.layer_scale and ls is not None
    needs_sample_scale = wanted.sample_scale and ss is not None

    # LayerScale folded into fc2's weight (weight-sized, cheap) so the first GEMM reads g as is.
    w2s = fc2_weight if ls is None else (fc2_weight.float() * ls.float()[:, None]).to(dtype)
    d_norm_weight = d_norm_bias = None
    if norm_eps is None:
        d_pre, act_s, rowdot = matmul(g, w2s, dtype, epilogue="dglu", pre=pre, store_act=True,
                                      row_dot=needs_sample_scale, sample_scale=ss,
                                      rows_per_sample=rps, choose=choose)
    else:
        act = glu_forward(pre)
        n, _, mean, rstd = residual_layer_norm_fwd(act, norm_weight, norm_bias, norm_eps)
        d_n, act_s, rowdot = matmul(g, w2s, dtype, epilogue="dident", pre=n,
                                    store_act=ss is not None, row_dot=needs_sample_scale,
                                    sample_scale=ss, rows_per_sample=rps, choose=choose)
        if ss is None:
            act_s = n
        del n
        need_norm_bias = wanted.norm_bias and norm_bias is not None
        d_act, _, d_norm_weight, d_norm_bias, _ = residual_layer_norm_bwd(
            d_n, None, act, mean, rstd, norm_weight, has_residual=False,
            need_bias_grad=need_norm_bias, bias_dtype=norm_bias.dtype if need_norm_bias else None)
        del d_n, act
        if not wanted.norm_weight:
            d_norm_weight = None
        d_pre = glu_backward(d_act, pre)
        del d_act
    e, _, _ = matmul(g.t(), act_s, torch.float32 if ls is not None else dtype, choose=choose)
    del act_s
    d_w2 = e if ls is None else (e * ls.float()[:, None]).to(dtype)
    g_sum = colsum(g, ss, rps) if (wanted.fc2_bias or needs_layer_scale) else None
    d_b2, d_ls, d_ss = fc2_side_grads(g, g_sum, e, rowdot, x, fc2_weight, fc2_bias, ls, ss,
                                      wanted.fc2_bias, needs_layer_scale, needs_sample_scale)
    d_x, _, _ = matmul(d_pre, _gate_first(fc1_weight, gate_last), dtype, choose=choose)
    d_w1, _, _ = matmul(d_pre.t(), x2, dtype, choose=choose)
    d_b1 = _as_given(colsum(d_pre).to(dtype), fc1_weight, gate_last) if wanted.fc1_bias else None
    return GluMlpGradients(d_x.reshape(x.shape), _as_given(d_w1, fc1_weight, gate_last), d_b1,
                           d_norm_weight, d_norm_bias, d_w2, d_b2, d_ls, d_ss)
