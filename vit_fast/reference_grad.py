"""The kernel ops that run in a backward (and the Block's fused forward ops), recomputed with
reference math from the same arguments.

Each function takes the arguments of one custom op (vit_fast/ops/*) and returns what that op
returns, so vit_fast.fallback can answer the op with it when the op's kernel cannot run on the
device. Gradients come from autograd through vit_fast.reference (or aten's LayerNorm backward,
which takes the saved statistics as the kernel does), in float32, cast to the kernel's output
dtypes. Only the tensors the forward saved are needed: that is what a backward has.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import reference
from .dropout_mask import attention_keep_mask


@contextlib.contextmanager
def _autograd():
    """Grad mode, also inside a custom op's body: an op's kernel runs below autograd (its dispatch
    keys excluded), where enable_grad alone records nothing. Lifts that exclusion for the
    reference's own graph (checked on torch 2.11 to 2.15 by make compat)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality) | \
        torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView)
    excluded = torch._C._dispatch_tls_local_exclude_set() - keys
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), \
            torch.enable_grad():
        yield


def _leaf(t):
    return None if t is None else t.detach().float().requires_grad_()


def _grads(outputs, grad_outputs, inputs):
    """autograd.grad over the inputs that are not None; None in their place otherwise."""
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, present, grad_outputs, allow_unused=True))
    out = []
    for t in inputs:
        g = next(got) if t is not None else None
        out.append(torch.zeros_like(t) if (t is not None and g is None) else g)
    return out


def _per_row(sample_scale, rows):
    """sample_scale [B] repeated for each of a sample's rows: [M, 1] for M = B·rows."""
    return sample_scale.float().repeat_interleave(rows)[:, None]


def _empty_for_none(grads, like):
    return [g if g is not None else like.new_empty(0) for g in grads]


def fused_qkv_attention_backward(dout, qkv, out, lse, num_heads, scale, dropout_p=0.0, seed=None,
                                 segment_ids=None, policy=None):
    """vit_fast::fused_qkv_attention_backward: dqkv (padding rows of segment_ids get 0). With
    dropout, the kernels' own mask, redrawn from the forward's seed. (policy: which kernels the
    forward allowed; the reference has one way.)"""
    keep = None
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, qkv.shape[0], num_heads, qkv.shape[1], dropout_p)
    with _autograd():
        q = _leaf(qkv)
        o = reference.fused_qkv_attention(q, num_heads, scale=scale, dropout_p=dropout_p,
                                          segment_ids=segment_ids, dropout_keep=keep)
        (dq,) = torch.autograd.grad(o, q, dout.float())
    return dq.to(qkv.dtype)


def biased_qkv_attention_backward(dout, qkv, out, lse, bias, num_heads, scale, dropout_p=0.0,
                                  seed=None, segment_ids=None, bias_grad=False):
    """kernels.attention.attention_bwd with a bias, recomputed: dqkv, and (dqkv, dbias) with
    bias_grad (dbias in bias's shape and dtype). With dropout, the kernels' own mask."""
    keep = None
    if dropout_p > 0.0:
        keep = attention_keep_mask(seed, qkv.shape[0], num_heads, qkv.shape[1], dropout_p)
    with _autograd():
        q, b = _leaf(qkv), _leaf(bias)
        o = reference.biased_qkv_attention(q, num_heads, b, scale=scale, dropout_p=dropout_p,
                                           segment_ids=segment_ids, dropout_keep=keep)
        dq, db = torch.autograd.grad(o, (q, b), dout.float())
    return (dq.to(qkv.dtype), db.to(bias.dtype)) if bias_grad else dq.to(qkv.dtype)


def rotary_qk_backward(dout, num_heads, sin, cos, num_prefix_tokens=0, half=False,
                       sin_cos_grad=False, qkv=None):
    """kernels.rope.rope_bwd recomputed: (dqkv, dsin, dcos), the last two None without
    sin_cos_grad (which needs the forward's input qkv here)."""
    if sin_cos_grad and qkv is None:
        raise ValueError("rotary_qk_backward: sin_cos_grad needs the forward's input qkv")
    with _autograd():
        x = _leaf(qkv) if qkv is not None else dout.detach().float().new_zeros(dout.shape).requires_grad_()
        s, c = (_leaf(sin), _leaf(cos)) if sin_cos_grad else (sin.float(), cos.float())
        y = reference.rotary_qk(x, num_heads, s, c, num_prefix_tokens=num_prefix_tokens, half=half)
        wanted = (x, s, c) if sin_cos_grad else (x,)
        grads = torch.autograd.grad(y, wanted, dout.float())
    dx = grads[0].to(dout.dtype)
    if not sin_cos_grad:
        return dx, None, None
    return dx, grads[1].to(sin.dtype), grads[2].to(cos.dtype)


def residual_layer_norm_backward(dy, ds, s, x, mean, rstd, weight, layer_scale, sample_scale,
                                 residual_dtype, bias_dtype):
    """vit_fast::residual_layer_norm_backward: [dx, dresidual, dweight, dbias, dlayer_scale]."""
    C = s.shape[-1]
    s2, dy2 = s.reshape(-1, C).float(), dy.reshape(-1, C).float()
    M = s2.shape[0]
    w = weight.float() if weight is not None else None
    d_s, d_w, _ = torch.ops.aten.native_layer_norm_backward(
        dy2, s2, [C], mean.reshape(M, 1), rstd.reshape(M, 1), w, None,
        [True, weight is not None, False])
    d_b = dy2.sum(0).to(bias_dtype) if bias_dtype is not None else None
    d_w = d_w.to(weight.dtype) if weight is not None else None
    if residual_dtype is None:  # s is x itself
        return _empty_for_none([d_s.to(s.dtype).reshape(s.shape), None, d_w, d_b, None], s)
    if ds is not None:
        d_s = d_s + ds.reshape(-1, C).float()
    # s = residual + x·layer_scale·sample_scale[b]
    factor = torch.ones((), device=s.device)
    if layer_scale is not None:
        factor = factor * layer_scale.float()
    if sample_scale is not None:
        factor = factor * _per_row(sample_scale, M // sample_scale.shape[0])
    d_x = (d_s * factor).to(s.dtype).reshape(s.shape)
    d_ls = None
    if layer_scale is not None:
        branch = x.reshape(-1, C).float()
        if sample_scale is not None:
            branch = branch * _per_row(sample_scale, M // sample_scale.shape[0])
        d_ls = (d_s * branch).sum(0).to(layer_scale.dtype)
    return _empty_for_none([d_x, d_s.to(residual_dtype).reshape(s.shape), d_w, d_b, d_ls], s)


def gelu_mlp_backward(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                      approximate, has_residual, needs_fc1_bias, needs_fc2_bias, needs_layer_scale,
                      needs_sample_scale):
    """vit_fast::gelu_mlp_backward (and its cuBLAS/tuned variants): [dx, dW1, db1, dW2, db2,
    dlayer_scale, dsample_scale]. The fc1 pre-activation was saved, so fc1's bias is not needed."""
    c_out = fc2_weight.shape[0]
    ls, ss = (layer_scale, sample_scale) if has_residual else (None, None)
    with _autograd():
        p, w2 = _leaf(pre), _leaf(fc2_weight)
        b2 = _leaf(fc2_bias) if needs_fc2_bias else None
        ls_ = _leaf(ls) if needs_layer_scale else None
        ss_ = _leaf(ss) if needs_sample_scale else None
        bias = b2 if b2 is not None else (fc2_bias.float() if fc2_bias is not None else None)
        branch = F.linear(F.gelu(p, approximate=approximate), w2, bias)
        branch = branch.reshape(*x.shape[:-1], c_out)
        if has_residual:  # the residual's own gradient is grad itself, left to the caller
            branch = reference.add_branch(0.0, branch,
                                          ls_ if ls_ is not None else _float(ls),
                                          ss_ if ss_ is not None else _float(ss))
        d_pre, d_w2, d_b2, d_ls, d_ss = _grads(branch, grad.float(), [p, w2, b2, ls_, ss_])
    x2 = x.reshape(-1, x.shape[-1]).float()
    d_x = (d_pre @ fc1_weight.float()).to(x.dtype).reshape(x.shape)
    d_w1 = (d_pre.t() @ x2).to(fc1_weight.dtype)
    d_b1 = d_pre.sum(0).to(x.dtype) if needs_fc1_bias else None
    cast = [(d_w2, fc2_weight), (d_b2, fc2_bias), (d_ls, ls), (d_ss, ss)]
    d_w2, d_b2, d_ls, d_ss = (g.to(t.dtype) if g is not None else None for g, t in cast)
    return _empty_for_none([d_x, d_w1, d_b1, d_w2, d_b2, d_ls, d_ss], x)


def _float(t):
    return None if t is None else t.float()


def residual_layer_norm(x, weight, bias, eps, residual, layer_scale, sample_scale):
    """vit_fast::residual_layer_norm (the forward op, which the Block's fused backward reruns):
    (y, s or an empty placeholder without a residual, mean [M], rstd [M]); y and s in x's dtype."""
    y, s = reference.residual_layer_norm(x, weight, bias, eps, residual=residual,
                                         layer_scale=layer_scale, sample_scale=sample_scale)
    C = s.shape[-1]
    _, mean, rstd = torch.ops.aten.native_layer_norm(s.reshape(-1, C).float(), [C], None, None, eps)
    return (y.to(x.dtype), s.to(x.dtype) if residual is not None else x.new_empty(0),
            mean.reshape(-1), rstd.reshape(-1))


# The Block's fused forward ops (vit_fast/ops/layer_norm_linear.py, residual_layer_norm_mlp.py):
# the Block calls them directly, with no dispatch.run around, so they fall back here too.

def layer_norm_linear(x, ln_weight, ln_bias, eps, weight, bias):
    """vit_fast::layer_norm_linear: (out, mean, rstd); h in weight's dtype (AMP's GEMM dtype)."""
    h, _, mean, rstd = residual_layer_norm(x, ln_weight, ln_bias, eps, None, None, None)
    return F.linear(h.to(weight.dtype), weight, bias), mean, rstd


def residual_layer_norm_mlp(x, residual, layer_scale1, sample_scale1, ln_weight, ln_bias, eps,
                            fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, layer_scale2,
                            sample_scale2, save_pre):
    """vit_fast::residual_layer_norm_mlp: (out, s, mean, rstd, pre or empty). s and out in the
    stream's (residual's) dtype, the GEMMs in fc1_weight's."""
    s = reference.add_branch(residual, x.to(residual.dtype), layer_scale1, sample_scale1)
    h, _, mean, rstd = residual_layer_norm(s, ln_weight, ln_bias, eps, None, None, None)
    pre = F.linear(h.to(fc1_weight.dtype), fc1_weight, fc1_bias)
    branch = F.linear(F.gelu(pre, approximate=approximate), fc2_weight, fc2_bias)
    out = reference.add_branch(s, branch.to(s.dtype), layer_scale2, sample_scale2)
    return (out, s, mean, rstd,
            pre.reshape(-1, pre.shape[-1]) if save_pre else x.new_empty(0))
