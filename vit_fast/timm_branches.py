"""The pieces of timm's other pre-norm blocks (EvaBlock, BEiT's Block) that their fused modules
share: which of timm's layers the public ops reproduce (the reasons when not), the packed qkv
weight and bias of their attention, the MLP branch as one op, and drop-path's per-sample scale.

Everything here reads the submodules' parameters; nothing calls a skipped submodule. Whether
skipping them could be noticed (hooks...) is vit_fast/fusion.py's decision, made by the block.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as TF
from timm.layers import DropPath
from timm.layers import GluMlp as _TimmGluMlp
from timm.layers import Mlp as _TimmMlp
from timm.layers import SwiGLU as _TimmSwiGLU

from . import functional
from .fusion import forward_is
from .layers import _gelu_approximate, _plain_layer_norm

__all__ = ["MLP_PATHS", "norm_reasons", "mlp_reasons", "mlp_call_reasons", "linear_reasons",
           "packed_qkv", "scaled_projection", "mlp_branch", "drop_path_scale"]

# The MLP submodules a fused block reads instead of calling, for every MLP kind below.
MLP_PATHS = tuple(f"mlp.{p}" for p in ("fc1", "fc1_g", "fc1_x", "act", "drop1", "norm", "fc2",
                                       "drop2"))
_DROP_PATH_FORWARDS = (nn.Identity.forward, DropPath.forward)


def norm_reasons(block, dim):
    return [f"{n} is {type(getattr(block, n)).__name__}, not a plain LayerNorm over {dim}"
            for n in ("norm1", "norm2") if not _plain_layer_norm(getattr(block, n), dim)]


def _hidden_norm(mlp):
    """(norm module or None, reason or None) for the norm between the MLP's activation and fc2."""
    norm = mlp.norm
    if forward_is(norm, nn.Identity.forward):
        return None, None
    hidden = mlp.fc2.in_features if isinstance(mlp.fc2, nn.Linear) else None
    if hidden is not None and _plain_layer_norm(norm, hidden):
        return norm, None
    return None, f"mlp.norm is {type(norm).__name__}, not a plain LayerNorm over the hidden units"


def _silu(act):
    return forward_is(act, nn.SiLU.forward)


def mlp_reasons(mlp):
    """Why the MLP branch cannot run as gelu_mlp / glu_mlp ([] when it can): its class and layers."""
    kind = type(mlp)
    if kind not in (_TimmMlp, _TimmGluMlp, _TimmSwiGLU):
        return [f"its MLP is {kind.__name__}, not timm's Mlp, GluMlp or SwiGLU"]
    fcs = ("fc1_g", "fc1_x", "fc2") if kind is _TimmSwiGLU else ("fc1", "fc2")
    reasons = [f"mlp.{n} is {type(getattr(mlp, n)).__name__}, not nn.Linear" for n in fcs
               if not isinstance(getattr(mlp, n), nn.Linear)]
    if reasons:
        return reasons
    _, why = _hidden_norm(mlp)
    if why:
        reasons.append(why)
    if kind is _TimmMlp:
        if _gelu_approximate(mlp.act) is None:
            reasons.append(f"mlp.act is {type(mlp.act).__name__}: the fused Mlp computes GELU")
        if why is None and mlp.norm is not None and not forward_is(mlp.norm, nn.Identity.forward):
            reasons.append("a LayerNorm inside a GELU Mlp (the fused gelu_mlp has no hidden norm)")
    else:
        if not _silu(mlp.act):
            reasons.append(f"mlp.act is {type(mlp.act).__name__}: the fused gated MLP computes "
                           "SiLU(gate)·value")
        if kind is _TimmGluMlp and getattr(mlp, "chunk_dim", -1) != -1:
            reasons.append("GluMlp chunks fc1's output over a dim other than the last")
        if kind is _TimmSwiGLU and (mlp.fc1_g.bias is None) != (mlp.fc1_x.bias is None):
            reasons.append("SwiGLU's fc1_g and fc1_x differ in having a bias")
    return reasons


def linear_reasons(block, paths):
    """Adapters: a Linear the block reads whose class has its own forward (LoRA...). A path
    that is not there (timm sets the unused projections to None) is skipped."""
    reasons = []
    for path in paths:
        m = _submodule(block, path)
        if m is not None and not forward_is(m, nn.Linear.forward):
            reasons.append(f"{path} is {type(m).__name__} with its own forward (an adapter?)")
    return reasons


def _submodule(block, path):
    m = block
    for name in path.split("."):
        m = getattr(m, name, None)
        if m is None:
            return None
    return m


def mlp_call_reasons(mlp):
    """Reasons that depend on the mode: an MLP dropout that is active runs the plain path."""
    return [f"mlp.{n} is active (training, p={d.p})" for n in ("drop1", "drop2")
            for d in [getattr(mlp, n)] if d.training and d.p > 0]


def structure_reasons(block):
    """What could change after convert: drop-path kinds, the MLP's dropout kinds, adapters."""
    reasons = []
    for n in ("drop_path1", "drop_path2"):
        if not forward_is(getattr(block, n), *_DROP_PATH_FORWARDS):
            reasons.append(f"{n} is {type(getattr(block, n)).__name__}, not timm's DropPath")
    for n in ("drop1", "drop2"):
        if not forward_is(getattr(block.mlp, n), nn.Dropout.forward):
            reasons.append(f"mlp.{n} is {type(getattr(block.mlp, n)).__name__}, not nn.Dropout")
    return reasons


def packed_qkv(attn, x):
    """timm's packed qkv [B, N, 3·H·D] of ``x`` from a fused ``qkv`` Linear (with EVA / BEiT's
    q_bias, k_bias, v_bias beside it) or separate q/k/v projections (EVA02 base: k without a
    bias): one GEMM, over the projections' weights concatenated (weight-sized) when separate."""
    if getattr(attn, "qkv", None) is not None:
        weight, bias = attn.qkv.weight, attn.qkv.bias
        if getattr(attn, "q_bias", None) is not None:
            extra = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            bias = extra if bias is None else bias + extra
        return TF.linear(x, weight, bias)
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    weight = torch.cat((q.weight, k.weight, v.weight))
    biases = (q.bias, k.bias, v.bias)
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else p.weight.new_zeros(p.out_features)
                          for b, p in zip(biases, (q, k, v))])
    return TF.linear(x, weight, bias)


def scaled_projection(proj, o, gamma):
    """proj(o)·gamma, LayerScale folded into proj's weight and bias (weight-sized products):
    the residual LayerNorm that adds the branch then has no layer_scale, so it keeps no copy of
    the branch for gamma's gradient (autograd takes that through the products instead)."""
    weight, bias = proj.weight, proj.bias
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = None if bias is None else bias * gamma
    return TF.linear(o, weight, bias)


def mlp_branch(mlp, h, residual, layer_scale, sample_scale):
    """residual + mlp(h)·layer_scale·sample_scale[b], as one gelu_mlp or glu_mlp op."""
    norm, _ = _hidden_norm(mlp)
    extra = dict(residual=residual, layer_scale=layer_scale, sample_scale=sample_scale)
    if type(mlp) is _TimmMlp:
        return functional.gelu_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                                   approximate=_gelu_approximate(mlp.act), **extra)
    if norm is not None:
        extra.update(norm_weight=norm.weight, norm_bias=norm.bias, norm_eps=float(norm.eps))
    if type(mlp) is _TimmSwiGLU:
        g, v = mlp.fc1_g, mlp.fc1_x
        bias = None if g.bias is None else (g.bias, v.bias)
        return functional.glu_mlp(h, (g.weight, v.weight), bias, mlp.fc2.weight, mlp.fc2.bias,
                                  **extra)
    return functional.glu_mlp(h, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                              gate_last=bool(mlp.gate_last), **extra)
