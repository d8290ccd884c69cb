"""A converted vit-pytorch transformer's decisions, made once per configuration, and its layers'
one-node steps.

A converted vit-pytorch transformer (vit_fast/vit_pytorch_modules.FusedTransformer) runs each
[attention, feed-forward] pair as vit_fast's Block math: LN, qkv, the fused attention, to_out,
one residual_layer_norm, gelu_mlp with the residual. Whether a pair may, and everything else
that depends on the configuration only, is kept in a :class:`TransformerPlan` by
vit_fast/block_plan.py's lookup (key and hook rules: x's type, shape, dtype and device, grad
mode, training, policy, autocast, fusion.STRUCTURE -- the attention and feed-forward are fused
modules --, hooks on any submodule). Once the configuration has run forward and backward on the
op-level path (block_plan.warm_up), every pair takes the Block's one-node step
(vit_fast/block_step.py) with its parameters as they are: vit-pytorch keeps one qkv Linear, so
nothing is concatenated. The final norm stays the op-level LayerNorm.

Per call: the parameters (a replaced or cast one plans the configuration again), eps, the
attention dropout, and whether a dropout the step does not run is active (to_out's or the
feed-forward's in training: the op-level path then, with their draws). A configuration where
some pair is not the plain pre-norm form -- no LayerNorm on the attention's input, q/k RMS norms,
no output projection (project_out False), a pair that runs module by module, the reference ops,
fake tensors -- takes the op-level path for every call (``stepless`` says why).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import functional, plans
from .block_plan import attention_kernel, forget
from .block_step import BlockStep
from .fused_block_ops import kernel_reasons
from .ops.attention import dropout_seed


class TransformerPlan:
    """What one configuration of a converted transformer runs: per pair its modules and the
    step once made. ``plan(transformer, x)``: the output before the final norm, or None where
    this call takes the op-level path."""
    __slots__ = ("pairs", "dropouts", "attn_drops", "scales", "heads", "approximate", "amp",
                 "policy", "attn_kernel", "steps", "warming", "stepless", "hooked",
                 "__weakref__")

    def changed(self) -> bool:
        """Nothing the key does not hold: structure moves fusion.STRUCTURE, hooks the count."""
        return False

    def params(self):
        """Per pair (LN1, qkv, proj, ls1, LN2, fc1, fc2, ls2), as the modules hold them now."""
        out = []
        for n1, qkv, proj, n2, fc1, fc2 in self.pairs:
            n1p, qp, pp, n2p = n1._parameters, qkv._parameters, proj._parameters, n2._parameters
            f1p, f2p = fc1._parameters, fc2._parameters
            out.append((n1p["weight"], n1p["bias"], qp["weight"], qp["bias"], pp["weight"],
                        pp["bias"], None, n2p["weight"], n2p["bias"], f1p["weight"], f1p["bias"],
                        f2p["weight"], f2p["bias"], None))
        return out

    def __call__(self, transformer, x):
        steps = self.steps
        if steps is None:
            return None  # stepless, or warming up: the op-level path runs
        if any(m.training and m.p > 0 for m in self.dropouts):
            return None  # to_out's or the feed-forward's dropout: the op-level path's draws
        params = self.params()
        if not all(map(BlockStep.holds, steps, params)):
            # A parameter replaced or cast (.to(), .half()): the plan's dtype decisions may be
            # stale; the configuration is planned and warmed up again.
            self.steps = None
            forget(transformer)
            return None
        if not all(step.takes(x) for step in steps):
            return None
        drops = [read() for read in self.attn_drops]
        if not self.attn_kernel and any(drops):
            return None  # the reference attention draws its own mask, in the call's order
        for step, p, (n1, _, _, n2, _, _), drop, scale in zip(
                steps, params, self.pairs, drops, self.scales):
            seed = dropout_seed(x.device) if drop > 0.0 else None
            x = step.forward(x, p, (float(n1.eps), float(n2.eps), scale(), drop), None, None,
                             seed, None)
        return x

    def _make_step(self, transformer, x_shape, x_dtype, device):
        """Every pair's step, made once the configuration ran forward and backward on the
        op-level path (block_plan.warm_up), with the parameters as the modules hold them now."""
        self.warming = False
        params = self.params()
        steps = [BlockStep.make(None, self, tuple(x_shape), x_dtype, device, p) for p in params]
        if any(s is None for s in steps):
            self.stepless = "a pair the bound launches do not take"
            return
        self.steps = steps


def make(transformer, x):
    """The TransformerPlan of this configuration of a converted ``transformer``; where some pair
    is not one the step takes, a plan that sends every call to the op-level path."""
    plan = TransformerPlan()
    plan.steps, plan.warming, plan.hooked = None, False, False
    plan.pairs, plan.dropouts, plan.attn_drops, plan.scales = [], [], [], []
    plan.stepless = _build_pairs(plan, transformer, x)
    if not plan.stepless:
        plan.amp = functional._autocast_dtype(x.device)
        plan.policy = plans.state(x.device.type)[0]
        plan.warming = True
    return plan


def _build_pairs(plan, transformer, x) -> str:
    """Fill plan's per-pair modules and readers; why the step does not take it, or ''."""
    if x.dim() != 3:
        return "an input that is not [B, N, C]"
    heads_seen, approximate, qkv_dtype, head_dim = set(), set(), set(), set()
    for i, layer in enumerate(transformer.layers):
        attn, ff = layer
        if transformer._pair_reason(i, attn, ff, x):
            plan.hooked = True  # (the op-level path forgets the plan once every pair fuses)
            return f"layer {i} runs module by module"
        form, ff_form = attn._vit_fast_form, ff._vit_fast_form
        if not form.norm or form.qk_norm or form.rank != 3:
            return f"layer {i}: no LayerNorm on the attention's input, or q/k norms"
        outs = _out_modules(attn, form)
        if outs is None:
            return f"layer {i}: the attention's output is not a Linear and dropouts"
        proj, out_drops = outs
        net = ff.net
        drops = [m for m in net if isinstance(m, nn.Dropout)]
        if len(drops) + 4 != len(net):
            return f"layer {i}: the feed-forward's net holds more than LN, Linear, GELU, Linear"
        n1, qkv, n2 = getattr(attn, form.norm), getattr(attn, form.qkv), net[ff_form.norm]
        fc1, fc2 = net[ff_form.fc1], net[ff_form.fc2]
        heads = getattr(attn, form.heads)
        plan.pairs.append((n1, qkv, proj, n2, fc1, fc2))
        plan.dropouts += out_drops + drops
        plan.attn_drops.append(attn._dropout_p)  # read per call, as the op-level path reads it
        plan.scales.append(_scale_reader(attn, form.scale))
        heads_seen.add(heads)
        approximate.add(ff_form.approximate)
        qkv_dtype.add(qkv.weight.dtype)
        head_dim.add(qkv.out_features // (3 * heads))
        ln = (x, n1.weight, n1.bias, n2.weight, n2.bias, qkv.weight, qkv.bias)
        mm = (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if not plans.eager(*ln, *mm[1:], proj.weight):
            return "fake tensors or tensor subclasses"
        reasons = kernel_reasons(x, ln, mm)
        if reasons:
            return "; ".join(reasons)
    if not plan.pairs or len(heads_seen) != 1 or len(approximate) != 1 or len(qkv_dtype) != 1:
        return "no pairs, or pairs that differ in heads, GELU form or dtype"
    plan.heads, plan.approximate = heads_seen.pop(), approximate.pop()
    plan.attn_kernel = all(attention_kernel(x, d, hd) for d in qkv_dtype for hd in head_dim)
    return ""


def _out_modules(attn, form):
    """(the projection Linear, the dropouts after it) where the attention's output runs through
    exactly those (to_out = Sequential(Linear, Dropout), or proj then proj_drop), else None."""
    mods = []
    for name in form.out:
        m = getattr(attn, name)
        mods += list(m) if type(m) is nn.Sequential else [m]
    if not mods or type(mods[0]) is not nn.Linear or mods[0].weight.dim() != 2:
        return None
    if not all(type(m) is nn.Dropout for m in mods[1:]):
        return None
    return mods[0], mods[1:]


def _scale_reader(attn, scale):
    """The attention's scale for a call: an attribute read each call, or the form's constant."""
    if isinstance(scale, str):
        if scale in attn.__dict__:  # a float attribute (vit-pytorch's self.scale)
            d = attn.__dict__
            return lambda: float(d[scale])
        return lambda: float(getattr(attn, scale))
    value = float(scale)
    return lambda: value
