"""Run a module's own forward once on a probe, to tell what it computes.

A hook-free copy of the module -- same class and plain attributes, fresh random float64 weights
on the CPU, every nn.Dropout replaced by a marker that passes its input through and records it --
runs in eval and in training mode, and must give what the fused path would compute (the
composition of vit_fast/reference.py's ops) to 1e-9; the attention dropout must be the one
applied to the probabilities. Random weights, not the model's: a zero-initialized projection
would make any two formulas agree. A forward that branches on something the probe cannot see
(the sequence length, the values of x) could still differ; vit-pytorch's do not.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .vit_pytorch_forms import RMS_EPS, AttentionForm, feed_forward_indices

__all__ = ["probe_attention", "probe_feed_forward"]

_PROBE_TOKENS = 5
_TOLERANCE = 1e-9


class _DropoutMarker(nn.Module):
    """Stands in for an nn.Dropout during the probe: passes x through, records what it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach())
        return x


def _random_like(name, p, gen):
    if p.dim() >= 2:
        return torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64) / math.sqrt(
            p.shape[-1])
    noise = 0.5 * torch.randn(tuple(p.shape), generator=gen, dtype=torch.float64)
    return noise + 1.0 if name in ("weight", "gamma") else noise


def _probe_copy(m, gen, markers, path=""):
    """A copy of ``m`` with no hooks, the same class and plain attributes, fresh random float64
    parameters on the CPU, and every nn.Dropout replaced by a _DropoutMarker (in ``markers``)."""
    if type(m) is nn.Dropout:
        markers[path] = _DropoutMarker()
        return markers[path]
    new = type(m).__new__(type(m))
    nn.Module.__init__(new)
    for key, value in vars(m).items():
        if key not in vars(new):
            new.__dict__[key] = value
    new.training = m.training
    for name, p in m._parameters.items():
        new._parameters[name] = None if p is None else nn.Parameter(_random_like(name, p, gen))
    for name, b in m._buffers.items():
        if b is not None:
            b = torch.zeros(b.shape, dtype=b.dtype) if b.is_meta else b.detach().cpu()
            b = b.to(torch.float64) if b.is_floating_point() else b.clone()
        new._buffers[name] = b
    for name, child in m._modules.items():
        new._modules[name] = None if child is None else _probe_copy(
            child, gen, markers, f"{path}.{name}" if path else name)
    return new


def _close(got, want):
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    scale = want.abs().max().item() or 1.0
    return bool(((got - want).abs().max() <= _TOLERANCE * scale).item())


def _attention_reference(c, form, x):
    """What the fused path computes for probe copy ``c``, from vit_fast/reference.py's ops."""
    lin = getattr(c, form.qkv)
    h = x
    if form.norm:
        n = getattr(c, form.norm)
        h = reference.residual_layer_norm(x, n.weight, n.bias, n.eps)[0]
    lead, N = h.shape[:-2], h.shape[-2]
    qkv = F.linear(h.reshape(-1, N, h.shape[-1]), lin.weight, lin.bias)
    heads = getattr(c, form.heads)
    if form.qk_norm:
        d = qkv.shape[-1] // (3 * heads)
        qkv = reference.qk_norm(qkv, heads, c.q_norm.gamma.reshape(heads, d),
                                c.k_norm.gamma.reshape(heads, d), kind="rms", eps=RMS_EPS)
    scale = getattr(c, form.scale) if isinstance(form.scale, str) else form.scale
    o = reference.fused_qkv_attention(qkv, heads, scale=scale)
    o = o.reshape(*lead, N, o.shape[-1])
    for name in form.out:
        o = getattr(c, name)(o)
    return o


def _probe_inputs(dim, gen):
    yield 3, torch.randn(2, _PROBE_TOKENS, dim, generator=gen, dtype=torch.float64)
    yield 4, torch.randn(2, 2, _PROBE_TOKENS, dim, generator=gen, dtype=torch.float64)


def _drop_attributes(c, value=None):
    """The float attributes named like dropout rates (ViViT's ``dropout_p``): {name: value}; with
    ``value``, set them to it."""
    found = {k: v for k, v in vars(c).items()
             if "drop" in k and isinstance(v, float) and not k.startswith("_")}
    if value is not None:
        for k in found:
            setattr(c, k, value)
    return found


def _is_probabilities(t, n):
    return t.shape[-2:] == (n, n) and bool(torch.allclose(t.sum(-1), torch.ones((), dtype=t.dtype)))


def probe_attention(m, form):
    """(form with rank and dropout filled in, '') when ``m``'s forward computes ``form``'s formula
    in eval and in training mode, else (None, why not)."""
    gen = torch.Generator().manual_seed(0)
    markers = {}
    c = _probe_copy(m, gen, markers)
    dim = getattr(m, form.qkv).in_features
    c.eval()
    failure, ran, rank, x = None, [], None, None
    with torch.no_grad():
        for r, probe in _probe_inputs(dim, gen):
            try:
                got = c(probe)
            except Exception as e:  # noqa: BLE001 -- any failure means "not this input rank"
                failure = failure or f"{type(e).__name__}: {e}"
                continue
            ran.append(probe)
            if _close(got, _attention_reference(c, form, probe)):
                rank, x = r, probe
                break
        if rank is None:
            rates = _drop_attributes(c)
            if ran and any(rates.values()):
                _drop_attributes(c, 0.0)
                if _close(c(ran[0]), _attention_reference(c, form, ran[0])):
                    return None, (f"applies attention dropout ({', '.join(rates)}) in eval mode "
                                  "too; stays eager")
            if not ran:
                return None, f"its forward fails on a probe [B, N, {dim}] input ({failure[:80]})"
            return None, ("its forward does not compute softmax(q kᵀ·scale)·v over its own tokens "
                          "(checked on a probe input); stays eager")
        # Training mode, every dropout passing its input through: the same formula, and the
        # attention dropout applied to the probabilities (or SDPA's dropout_p), nowhere else.
        c.train()
        rates = _drop_attributes(c, 0.0)
        for marker in markers.values():
            marker.seen.clear()
        if not _close(c(x), _attention_reference(c, form, x)):
            return None, "in training mode its forward computes something else; stays eager"
    attn_dropout = None
    for name in ("dropout", "attn_drop"):
        marker = markers.get(name)
        if marker is None or not marker.seen:
            continue
        if len(marker.seen) != 1 or not _is_probabilities(marker.seen[0], _PROBE_TOKENS):
            return None, f"its {name} is applied to something other than the attention weights"
        attn_dropout = name
    dropout_p = next(iter(rates), None) if attn_dropout is None else None
    return AttentionForm(**{**form.__dict__, "rank": rank, "attn_dropout": attn_dropout,
                            "dropout_p": dropout_p}), ""


def probe_feed_forward(m):
    """'' when ``m``'s forward is net(x) in eval and training mode, else why not."""
    gen = torch.Generator().manual_seed(0)
    markers = {}
    c = _probe_copy(m, gen, markers)
    dim = m.net[feed_forward_indices(m).fc1].in_features
    x = torch.randn(2, _PROBE_TOKENS, dim, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        for mode in (False, True):
            c.train(mode)
            try:
                got = c(x)
            except Exception as e:  # noqa: BLE001
                return f"its forward fails on a probe [B, N, {dim}] input ({type(e).__name__})"
            if not _close(got, c.net(x)):
                return "its forward is not net(x); stays eager"
    return ""
