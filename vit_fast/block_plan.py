"""The fused Block's forward, decided once per configuration (vit_fast/plans.py).

    qkv = Linear(LN1(x))            LayerNormLinearFn                 (vit_fast/ops/layer_norm_linear.py)
    o   = attention(qkv)            AttentionFn                       (vit_fast/ops/attention.py)
    p   = proj(o)                   F.linear (cuBLAS)
    out = s + ls2·MLP(LN2(s)),  s = x + ls1·p                 ResidualLayerNormMlpFn

Everything :meth:`Block.forward` used to re-derive on each call -- whether the fused path may run
(nothing attached to the modules it skips), whether the kernels take the call (dispatch: device,
dtypes, policy, earlier failures), AMP's dtype, whether the ops' eager twins may run (plain
tensors) or their registered ops must (fake tensors, subclasses), which of attn.norm /
attn.proj_drop are no-ops -- is decided by :func:`build` and kept in a :class:`BlockPlan`, looked
up by :func:`lookup` with one tuple: x's type, shape, dtype and device, grad mode, the Block's
training flag, vit_fast.plans.state (policy, autocast, failures) and two counters that move when
the modules' structure may have changed (a submodule set or deleted on a fused module, ``.to()`` /
``.half()`` through one: vit_fast.fusion.STRUCTURE) -- and, when torch's count of hook handles
(RemovableHandle.next_id, less the plans' own warm-up hooks) has moved since, the hooks the
plan reads: module hooks on the Block and its submodules, global module hooks
(fusion.hooks_attached; a tensor's hook, which training loops register per step, changes none).
A ``forward`` set on a skipped module's instance (accelerate's hooks do that) is checked per
call.

What depends on the call's data or on values a training loop changes stays per call: the
parameters are read from the modules on every call (a swapped Parameter is used at once), so are
LayerNorm eps, attention and projection dropout probabilities, the scale override and the
drop-path masks. Under AMP the GEMM weights are cast once per autocast region
(vit_fast/fused_block_ops.AmpWeights). Anything else -- an attention mask, q/k norms, fused_attn off, torch.fx or
torch.compile tracing -- takes Block's general path.
"""
from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from . import dispatch, functional, plans
from .fused_block_ops import AMP_WEIGHTS
from .fusion import STRUCTURE, forward_is, hooks_attached

_PLAIN = plans.PLAIN_TENSORS


def lookup(block, x, build_plan=None):
    """The BlockPlan for this call of ``block`` (built on first sight of its configuration), or
    None where the call takes Block's general path. ``build_plan(block, x)``: the plan builder of
    another kind of layer kept by the same rules (default: :func:`build`; a converted
    transformers layer's is convert_transformers._plan, a vit-pytorch transformer's
    vit_pytorch_plan.make); its plans say by ``changed()`` that something the key does not hold
    changed since they were built."""
    if type(x) not in _PLAIN or torch.compiler.is_compiling():
        return None
    key = (x.shape, x.dtype, x.device, torch.is_grad_enabled(), block.training,
           *plans.state(x.device.type), STRUCTURE.generation)
    handles = RemovableHandle.next_id - _OWN_HOOKS[0]
    cached = block.__dict__.get("_block_plan")
    if cached is None or cached[0] != key:
        cached = _switch(block.__dict__, cached, key)
    if cached is not None:
        plan = cached[1]
        if cached[2] != handles:  # a hook registered somewhere: is it one the plan reads?
            if hooks_attached(block) != cached[3]:
                return _rebuild(block, x, key, handles, build_plan)
            block.__dict__["_block_plan"] = (key, plan, handles, cached[3])
        if plan is None or not plan.changed():
            return plan
    return _rebuild(block, x, key, handles, build_plan)


# Plans a Block keeps besides its current one: configurations a loop takes in turn -- reentrant
# checkpointing's no-grad forward and its recompute with grad, training steps and evaluation --
# each keep their plan (and step) instead of rebuilding it at every switch.
_OTHER_PLANS = 4


def _switch(d, current, key):
    """The kept entry of ``key``'s configuration made the current one, or None; the current one
    is kept in its place (the oldest dropped past _OTHER_PLANS)."""
    kept = d.get("_block_plans")
    entry = kept.pop(key, None) if kept else None
    if current is not None:
        if kept is None:
            kept = d["_block_plans"] = {}
        kept[current[0]] = current
        if len(kept) > _OTHER_PLANS:
            del kept[next(iter(kept))]
    if entry is not None:
        d["_block_plan"] = entry
    return entry


def _rebuild(block, x, key, handles, build_plan):
    plan = (build_plan or build)(block, x)
    block.__dict__["_block_plan"] = (key, plan, handles, hooks_attached(block))
    return plan


def forget(block):
    """Drop block's plans (the general path found it fusable again: a hook was removed). Not
    while torch.compile traces: no plan is used there (lookup), and torch 2.11's dynamo cannot
    trace a pop from a module's __dict__ (a graph break in every compiled Block)."""
    if not torch.compiler.is_compiling():
        block.__dict__.pop("_block_plan", None)
        block.__dict__.pop("_block_plans", None)


class BlockPlan:
    """What one configuration of a Block runs; ``plan(block, x, segment_ids)`` runs it. The
    modules and parameters are read on each call (straight from the modules' dicts: attribute
    access through nn.Module.__getattr__ is a Python call each)."""
    __slots__ = ("amp", "eager", "heads", "default_scale", "norm_skip", "proj_direct",
                 "proj_drop_skip", "leaf_dicts", "approximate", "no_autocast", "drop_path",
                 "lnl", "attn", "mlp_block", "save_pre", "policy", "warming", "step",
                 "attn_kernel",
                 "__weakref__")

    def changed(self) -> bool:
        """Whether a ``forward`` was set on a skipped module's instance since the plan was made
        (what the lookup key does not hold)."""
        return any(map(dict.__contains__, self.leaf_dicts, _FORWARD))

    def __call__(self, block, x, segment_ids):
        mods = block._modules
        a, mlp, n1, n2 = mods["attn"], mods["mlp"], mods["norm1"], mods["norm2"]
        am, mm = a._modules, mlp._modules
        qkv_p, fc1_p, fc2_p = (am["qkv"]._parameters, mm["fc1"]._parameters,
                               mm["fc2"]._parameters)
        qw, qb = qkv_p["weight"], qkv_p["bias"]
        w1, b1, w2, b2 = fc1_p["weight"], fc1_p["bias"], fc2_p["weight"], fc2_p["bias"]
        n1p, n2p = n1._parameters, n2._parameters
        drop = am["attn_drop"].p if a.training else 0.0
        scale = self.default_scale if a.qk_scale is None else float(a.qk_scale)
        step = self.step
        if step is not None:
            pp = am["proj"]._parameters
            params = (n1p["weight"], n1p["bias"], qw, qb, pp["weight"], pp["bias"],
                      mods["ls1"]._parameters.get("gamma"), n2p["weight"], n2p["bias"], w1, b1,
                      w2, b2, mods["ls2"]._parameters.get("gamma"))
            pd = am["proj_drop"]
            if not step.holds(params):  # a parameter replaced: warm up again
                self.step, self.warming = None, True
            elif (step.takes(x) and (not pd.training or pd.p == 0)  # (proj_drop: not in the step)
                  and (drop == 0.0 or self.attn_kernel)):  # (the reference's dropout: its order)
                seed = _dropout_seed(x.device) if drop > 0.0 else None
                ss1, ss2 = self._drop_path_scales(mods, x)
                return step.forward(x, params, (float(n1.eps), float(n2.eps), scale, float(drop)),
                                    ss1, ss2, seed, segment_ids)
        amp = self.amp
        if amp is not None:
            cast = AMP_WEIGHTS.cast
            region = AMP_WEIGHTS.region(x.device, amp)
            qw, qb = cast(qw, amp, region), cast(qb, amp, region)
            w1, b1, w2, b2 = (cast(w1, amp, region), cast(b1, amp, region),
                              cast(w2, amp, region), cast(b2, amp, region))
            torch.set_autocast_enabled(self.no_autocast, False)
        try:
            qkv = self.lnl(x, n1p["weight"], n1p["bias"], float(n1.eps), qw, qb)[0]
            seed = _dropout_seed(x.device) if drop > 0.0 and self.attn_kernel else None
            o = self.attn(qkv, self.heads, scale, float(drop), seed, segment_ids)[0]
        finally:
            if amp is not None:
                torch.set_autocast_enabled(self.no_autocast, True)
        if not self.norm_skip:
            o = am["norm"](o)
        if self.proj_direct:
            pp = am["proj"]._parameters
            pw, pb = pp["weight"], pp["bias"]
            if amp is not None:
                pw, pb = cast(pw, amp, region), cast(pb, amp, region)
            p = F.linear(o, pw, pb)
        else:
            p = am["proj"](o)
        pd = am["proj_drop"]
        if not (self.proj_drop_skip and (not pd.training or pd.p == 0)):
            p = pd(p)
        # Drop-path masks drawn in timm's order: after the attention branch's dropouts.
        ss1, ss2 = self._drop_path_scales(mods, x)
        ls1, ls2 = mods["ls1"]._parameters.get("gamma"), mods["ls2"]._parameters.get("gamma")
        args = (p, x, ls1, ss1, n2p["weight"], n2p["bias"], float(n2.eps), w1, b1, w2, b2,
                self.approximate, ls2, ss2)
        if self.save_pre:
            save_pre = torch.is_grad_enabled() and (
                x.requires_grad or p.requires_grad or w1.requires_grad
                or any(t is not None and t.requires_grad for t in args[2:14]))
        else:
            save_pre = False
        if amp is not None:
            torch.set_autocast_enabled(self.no_autocast, False)
        try:
            out = self.mlp_block(*args, save_pre)[0]
        finally:
            if amp is not None:
                torch.set_autocast_enabled(self.no_autocast, True)
        if self.warming:
            self._warm_up(block, x, qkv)
        return out

    def _drop_path_scales(self, mods, x):
        if not self.drop_path:
            return None, None
        return drop_path_scale(mods["drop_path1"], x), drop_path_scale(mods["drop_path2"], x)

    def _warm_up(self, block, x, qkv):
        warm_up(self, block, x, qkv)

    def _make_step(self, block, x_shape, x_dtype, device):
        from .block_step import BlockStep
        self.warming = False
        self.step = BlockStep.make(block, self, tuple(x_shape), x_dtype, device)


_FORWARD = itertools.repeat("forward")


def warm_up(plan, block, x, first):
    """After a call on the general path: once its backward has run too (kernels built, tuning
    choices made), ``plan._make_step(block, x's shape, dtype, device)`` makes the one-node step
    the next calls take. ``first``: an output of the call's first op, whose node's backward runs
    last -- after an activation checkpoint's recompute of the call too, which must take the path
    its forward took."""
    node = first.grad_fn
    shape = (x.shape, x.dtype, x.device)
    if node is None:  # nothing to differentiate: the forward was the whole call
        plan._make_step(block, *shape)
        return
    # a hook per call while warming: a graph may be dropped without a backward
    plan_ref, block_ref = weakref.ref(plan), weakref.ref(block)

    def backward_done(grad_inputs, grad_outputs):
        me, blk = plan_ref(), block_ref()
        if me is not None and blk is not None and me.warming:
            me._make_step(blk, *shape)
    before = RemovableHandle.next_id
    node.register_hook(backward_done)
    # Its handle moved the counter of hooks registered anywhere, which every plan's key holds:
    # this hook changes nothing a plan depends on.
    _OWN_HOOKS[0] += RemovableHandle.next_id - before


# Hook handles taken by the plans' own warm-up hooks (_warm_up): lookup counts hooks registered
# anywhere less these, so that one Block's warm-up does not read, in every other Block's lookup,
# as a hook that might concern it (before, a model of several Blocks rebuilt every plan on every
# call and never reached a step; now that would only cost a hooks_attached per call).
_OWN_HOOKS = [0]


def _dropout_seed(device):
    from .ops.attention import dropout_seed
    return dropout_seed(device)


def drop_path_scale(drop_path, x):
    """Per-sample keep mask / keep_prob [B] for a DropPath in training, else None.

    Drawn exactly as timm's drop_path draws it (bernoulli_ over B values), so with the same seed
    the fused Block drops the same samples as timm's Block."""
    prob = getattr(drop_path, "drop_prob", 0.0)
    if not prob or not drop_path.training:
        return None
    keep_prob = 1 - prob
    mask = x.new_empty((x.shape[0],)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep_prob)
    return mask


def _quiet(m) -> bool:
    """Nothing attached to m that a skipped call would miss (hooks; a forward on the instance)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or "forward" in m.__dict__)


def build(block, x):
    """A BlockPlan for this call, or None where it takes Block's general path (it says why:
    Block.why_not_fused)."""
    from . import fused_block_ops
    from .layers import _gelu_approximate
    if x.dim() != 3 or x.shape[-1] != getattr(block.norm1, "normalized_shape", (None,))[0]:
        return None  # the general path's ops raise the error that names the mismatch
    if block.why_not_fused():
        return None
    a, mlp = block.attn, block.mlp
    if not a.fused_attn or not all(forward_is(m, nn.Identity.forward)
                                   for m in (a.q_norm, a.k_norm)):
        return None  # q/k norms and materialized attention: the general path's Attention.attend
    if not block._rebuilds_ln_outputs(x):
        return None  # the reference: the general path (its ops are planned too)
    ln = [block.norm1.weight, block.norm1.bias, block.norm2.weight, block.norm2.bias,
          a.qkv.weight, a.qkv.bias, block.ls1._parameters.get("gamma"),
          block.ls2._parameters.get("gamma")]
    mm = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    plan = BlockPlan()
    amp = fused_block_ops.functional._autocast_dtype(x.device)
    plan.amp = amp
    plan.no_autocast = x.device.type
    plan.eager = plans.eager(x, *ln, *mm)
    plan.heads = a.num_heads
    plan.default_scale = float(a.head_dim ** -0.5)
    plan.approximate = _gelu_approximate(mlp.act)
    plan.norm_skip = forward_is(a.norm, nn.Identity.forward) and _quiet(a.norm)
    proj = a.proj
    plan.proj_direct = forward_is(proj, nn.Linear.forward) and _quiet(proj)
    plan.proj_drop_skip = forward_is(a.proj_drop, nn.Dropout.forward) and _quiet(a.proj_drop)
    plan.drop_path = any(hasattr(m, "drop_prob") for m in (block.drop_path1, block.drop_path2))
    # whether a backward could ever run (the call decides the rest): no grad mode, no pre
    plan.save_pre = torch.is_grad_enabled()
    plan.leaf_dicts = tuple(m.__dict__ for _, m in block._bypassed() if m is not None) + tuple(
        m.__dict__ for m in (a.norm, a.proj, a.proj_drop))
    _ops(plan)
    # Where dispatch sends the attention to the reference (fp32 on CUDA: no build is shipped),
    # the plan calls it through the public op, which draws its own dropout mask.
    plan.attn_kernel = attention_kernel(x, a.qkv.weight.dtype, a.head_dim)
    if not plan.attn_kernel:
        plan.attn = _public_attention
    plan.policy = plans.state(x.device.type)[0]
    plan.step = None
    # The one-node step (vit_fast/block_step.py) takes the calls once the configuration has run
    # on the general path, if everything it skips is a no-op.
    plan.warming = plan.eager and plan.norm_skip and plan.proj_direct and plan.proj_drop_skip
    return plan


def _public_attention(qkv, num_heads, scale, dropout_p, seed, segment_ids):
    """The attention as the public op runs it (dispatch's choice, the reference's own dropout
    mask: seed unused), shaped as the kernel op's (out, lse) for the plan."""
    return functional.fused_qkv_attention(qkv, num_heads, scale=scale, dropout_p=dropout_p,
                                          segment_ids=segment_ids), None


def attention_kernel(x, weight_dtype, head_dim) -> bool:
    """Whether dispatch runs the attention of a layer whose qkv weight is in ``weight_dtype`` as
    the kernel (the plan calls it directly): qkv comes out in the autocast dtype, else in the
    weight's."""
    dtype = functional._autocast_dtype(x.device) or weight_dtype
    qkv = torch.empty(0, device=x.device, dtype=dtype)
    return dispatch.choose("fused_qkv_attention", [qkv], head_dim=head_dim, dropout_p=0.0,
                           segmented=False).backend == "triton"


def _ops(plan):
    """The three op calls: the eager twins (plain tensors) or the registered ops."""
    from .ops import attention, layer_norm_linear, residual_layer_norm_mlp
    if plan.eager:
        plan.lnl = layer_norm_linear.LayerNormLinearFn.apply
        plan.attn = attention.AttentionFn.apply
        plan.mlp_block = residual_layer_norm_mlp.ResidualLayerNormMlpFn.apply
    else:
        plan.lnl = layer_norm_linear.layer_norm_linear_op
        plan.attn = attention.fused_qkv_attention_op
        plan.mlp_block = residual_layer_norm_mlp.residual_layer_norm_mlp_op
