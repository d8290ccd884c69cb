"""vit-pytorch's attention, feed-forward and transformer modules with a fused forward.

convert (convert_vit_pytorch.py) changes the class of a recognised module (vit_pytorch_match.py)
to ``type(Original.__name__, (Mixin, Original))`` (vit_fast/reclass.py): the same object, its
submodules, Parameters and hooks, isinstance(module, Original) for vit-pytorch's Recorder and
anything matching the class, the same class name for lookups by name. Its forward runs

    attention     LN (residual_layer_norm), qkv Linear, [qk_norm "rms"], fused_qkv_attention,
                  then to_out (or proj, proj_drop) called as modules
    feed-forward  LN, gelu_mlp
    transformer   per layer: LN, the attention, one residual_layer_norm for "x + attention, and
                  the feed-forward's LayerNorm of that sum", gelu_mlp with the residual in its
                  epilogue; the final norm

only while nothing attached could notice the modules it does not call (vit_fast/fusion.py: hooks
on ``norm``, ``to_qkv``, ``attend``, ``dropout``, ``net`` or its layers, an adapter swapped in,
global hooks; a transformer also calls each attention / feed-forward that has hooks of its own).
Otherwise, and for any call it cannot do exactly (a mask or context argument, an input rank the
probe did not see, active feed-forward dropout, TorchScript / FX tracing), the call runs the
original forward -- vit-pytorch's own eager math, every submodule called. ``why_not_fused()``
says why. Attention dropout runs inside the fused attention (its own random stream).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional, vit_pytorch_plan
from .block_plan import forget, lookup, warm_up
from .fusion import FusedModule, notice_reason
from .fusion import _global_hooks as global_hooks
from .reclass import class_from_key, subclass_keeping_name
from .vit_pytorch_forms import (MAX_NET_LAYERS, RMS_EPS, attention_structure_reason,
                                feed_forward_structure_reason)

__all__ = ["FusedAttention", "FusedFeedForward", "FusedTransformer", "fused_class"]


def _layer_norm(x, norm, residual=None):
    return functional.residual_layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


def _extra_arguments(args, kwargs):
    """Arguments beyond x that change the call (a mask, a context): anything but None."""
    return any(a is not None for a in args) or any(v is not None for v in kwargs.values())


def _eager(x):
    """Calls that run the original forward whatever is attached: not a tensor, or traced."""
    return not isinstance(x, torch.Tensor) or isinstance(x, torch.fx.Proxy)


class FusedAttention(FusedModule):
    """Mixin over a vit-pytorch-shaped attention; ``_vit_fast_form`` (an AttentionForm) says
    where each piece is. ``fused_attn = False`` runs the original forward (as timm's flag)."""

    fused_attn = True
    bypassed_paths = ("norm", "to_qkv", "qkv", "attend", "dropout", "attn_drop", "q_norm",
                      "k_norm")

    def _structure_reasons(self):
        why = attention_structure_reason(self, self._vit_fast_form)
        return [why] if why else []

    def call_reasons(self, x):
        """Why this call runs the original forward ([] when fused)."""
        if not self.fused_attn:
            return ["fused_attn is False"]
        if x.dim() != self._vit_fast_form.rank:
            return [f"input of rank {x.dim()} (converted for rank {self._vit_fast_form.rank})"]
        return self.fusion_reasons()

    def why_not_fused(self):
        """Why forward runs the original math now; [] when it takes the fused path."""
        return (["fused_attn is False"] if not self.fused_attn else []) + self.fusion_reasons()

    def attention_input(self, x):
        """The attention's input normalized by its ``norm`` (or x itself)."""
        form = self._vit_fast_form
        return _layer_norm(x, getattr(self, form.norm))[0] if form.norm else x

    def _dropout_p(self):
        form = self._vit_fast_form
        if form.attn_dropout:
            d = getattr(self, form.attn_dropout)
            return float(d.p) if d.training else 0.0
        if form.dropout_p:
            return float(getattr(self, form.dropout_p)) if self.training else 0.0
        return 0.0

    def attention_branch(self, h):
        """out(softmax(q kᵀ·scale)·v) for the normalized input h [..., N, dim]."""
        form = self._vit_fast_form
        lin = getattr(self, form.qkv)
        heads = getattr(self, form.heads)
        lead, N = h.shape[:-2], h.shape[-2]
        qkv = nn.functional.linear(h.reshape(-1, N, h.shape[-1]), lin.weight, lin.bias)
        if form.qk_norm:
            d = qkv.shape[-1] // (3 * heads)
            qkv = functional.qk_norm(qkv, heads, self.q_norm.gamma.reshape(heads, d),
                                     self.k_norm.gamma.reshape(heads, d), kind="rms", eps=RMS_EPS)
        scale = getattr(self, form.scale) if isinstance(form.scale, str) else form.scale
        o = functional.fused_qkv_attention(qkv, heads, scale=float(scale),
                                           dropout_p=self._dropout_p())
        o = o.reshape(*lead, N, o.shape[-1])
        for name in form.out:
            o = getattr(self, name)(o)
        return o

    def forward(self, x, *args, **kwargs):
        if _eager(x) or _extra_arguments(args, kwargs) or self.call_reasons(x):
            return super().forward(x, *args, **kwargs)
        return self.attention_branch(self.attention_input(x))


class FusedFeedForward(FusedModule):
    """Mixin over a feed-forward holding ``net`` = [LayerNorm], Linear, GELU, [Dropout], Linear,
    [Dropout]; ``_vit_fast_form`` (a FeedForwardForm) gives the indices."""

    bypassed_paths = ("net",) + tuple(f"net.{i}" for i in range(MAX_NET_LAYERS))

    def _structure_reasons(self):
        why = feed_forward_structure_reason(self)
        return [why] if why else []

    def why_not_fused(self):
        """Why forward runs the original net now; [] when it takes the fused path."""
        reasons = list(self.fusion_reasons())
        if self.dropout_active():
            reasons.append("dropout is active (training, p > 0): net runs eagerly with its draws")
        return reasons

    def dropout_active(self):
        return any(type(m) is nn.Dropout and m.training and m.p > 0 for m in self.net)

    def mlp(self, h, residual=None):
        """net without its LayerNorm on a normalized h (plus residual): gelu_mlp, or the
        Sequential's own layers while a dropout is active (their random draws)."""
        form, net = self._vit_fast_form, self.net
        if self.dropout_active():
            out = net[0 if form.norm is None else form.norm + 1:](h)  # everything after the LN
            return out if residual is None else residual + out
        fc1, fc2 = net[form.fc1], net[form.fc2]
        return functional.gelu_mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                   approximate=form.approximate, residual=residual)

    def forward(self, x, *args, **kwargs):
        if (_eager(x) or _extra_arguments(args, kwargs) or self.dropout_active()
                or self.fusion_reasons()):
            return super().forward(x, *args, **kwargs)
        form = self._vit_fast_form
        h = _layer_norm(x, self.net[form.norm])[0] if form.norm is not None else x
        return self.mlp(h)


class FusedTransformer(nn.Module):
    """Mixin over a transformer whose forward is the pre-norm layer loop (vit_pytorch_match's
    canonical_layer_loop); ``_vit_fast_final_norm`` says whether it ends in ``self.norm``.
    Each layer pair runs fused when both modules are converted and would run fused themselves
    and neither has hooks of its own; otherwise that layer runs attn(x) + x, ff(x) + x."""

    vit_fast_reports = True  # convert.why_not_fused asks it

    def _pair_reason(self, i, attn, ff, x=None):
        if not (isinstance(attn, FusedAttention) and isinstance(ff, FusedFeedForward)):
            return f"layer {i} is not a converted [attention, feed-forward] pair"
        for j, m in ((0, attn), (1, ff)):
            attached = notice_reason(f"layers.{i}.{j}", m)  # it must be called: no pair fusion
            if attached:
                return attached
        if ff._vit_fast_form.norm is None:
            return f"layers.{i}.1 has no LayerNorm to fuse with the residual add"
        # ff's active dropout does not stop the pair: ff.mlp then runs net's own layers.
        reasons = (attn.why_not_fused() if x is None else attn.call_reasons(x)) \
            + ff.fusion_reasons()
        return f"layer {i}: {reasons[0]}" if reasons else ""

    def _final_norm_reason(self):
        norm = self.norm
        if type(norm) is not nn.LayerNorm or norm.weight is None:
            return "norm is not a plain nn.LayerNorm"
        return notice_reason("norm", norm) or ""

    def why_not_fused(self):
        """Why some layer pairs (or the final norm) run module by module now; [] if none."""
        reasons = [self._pair_reason(i, *layer) if len(layer) == 2 else
                   f"layer {i} is not an [attention, feed-forward] pair"
                   for i, layer in enumerate(self.layers)]
        if self._vit_fast_final_norm:
            reasons.append(self._final_norm_reason())
        if global_hooks():
            reasons.append("global module hooks are registered")
        return [r for r in reasons if r]

    def forward(self, x, *args, **kwargs):
        if _eager(x) or args or kwargs or global_hooks():
            return super().forward(x, *args, **kwargs)
        # The configuration's plan: every pair as the Block's one-node step once warmed up
        # (vit_fast/vit_pytorch_plan.py); else the op-level path below.
        plan = lookup(self, x, vit_pytorch_plan.make)
        if plan is not None:
            out = plan(self, x)
            if out is not None:
                return self._final_norm(out)
        warming = plan if plan is not None and plan.warming else None
        all_fused = True
        for i, layer in enumerate(self.layers):
            attn, ff = layer
            if self._pair_reason(i, attn, ff, x):
                all_fused = False
                x = attn(x) + x
                x = ff(x) + x
                continue
            h = attn.attention_input(x)
            if warming is not None:  # the first op of the call: its backward runs last
                warm_up(warming, self, x, h)
                warming = None
            a = attn.attention_branch(h)
            # x + attention branch, and the feed-forward's LayerNorm of that sum, in one op.
            h, x = _layer_norm(a, ff.net[ff._vit_fast_form.norm], residual=x)
            x = ff.mlp(h, residual=x)
        if all_fused and plan is not None and plan.hooked:  # fusable again: plan it anew
            forget(self)
        return self._final_norm(x)

    def _final_norm(self, x):
        if not self._vit_fast_final_norm:
            return x
        if self._final_norm_reason():
            return self.norm(x)
        return _layer_norm(x, self.norm)[0]


_MIXINS = {"attention": FusedAttention, "feed_forward": FusedFeedForward,
           "transformer": FusedTransformer}


def fused_class(role, base):
    """The fused class for a module of class ``base`` in ``role`` (attention, feed_forward,
    transformer), named base.__name__."""
    return subclass_keeping_name(_MIXINS[role], base, __name__, role)


def __getattr__(name):  # PEP 562: unpickling a converted model finds its fused classes
    cls = class_from_key(name, _MIXINS, __name__)
    if cls is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return cls
