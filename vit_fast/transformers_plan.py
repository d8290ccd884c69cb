"""A converted transformers layer's decisions, made once per configuration, and its one-node step.

A converted ViT/DeiT/DINOv2/CLIP/SigLIP layer (vit_fast/convert_transformers.py) runs vit_fast's
Block math. Whether a call may take it -- the attention implementation, hooks on the modules the
fused path skips, an adapter in place of q/k/v/proj, whether the kernels take the call -- depends
on the configuration, not on the call: vit_fast/block_plan.lookup keeps that decision in a
:class:`LayerPlan` (made by :func:`make`) by its key and hook rules (x's type, shape, dtype and
device, grad mode, training, policy and autocast; a hook registered on the layer or a submodule
rebuilds it), and checks per call only what the key cannot hold: a submodule replaced, a
``forward`` set on one, the attention implementation switched (:meth:`LayerPlan.changed`).

Once a configuration has run forward and backward on the op-level fused path (kernels built, tuning
choices made: vit_fast/block_plan.warm_up, as a Block warms up), a plan runs the Block's one-node
step (vit_fast/block_step.py) with the layer's parameters: q, k and v weights (and biases)
concatenated by one differentiable ``cat`` each, whose backward hands the step's qkv gradient to
the three Parameters, which stay the only ones. LN1, the qkv GEMM, the attention, proj, the
residual with LayerScale and drop-path, LN2 and the MLP are then one autograd node forward and
backward, as in a vit_fast.Block.

Per call, as the op-level path reads them: the parameters (a replaced one plans the configuration
again), LayerNorm eps, the attention's scale and dropout, DINOv2's drop-path masks (drawn as
transformers draws them, after the attention's dropout seed), and hidden dropout (active in
training: the op-level path decides, which sends such a call to transformers' forward). What the
step does not take -- CLIP's quick_gelu or an unknown MLP, q/k/v with some biases missing, the
reference ops (no kernels), fake tensors -- runs the op-level path as before.
"""
from __future__ import annotations

import torch

from . import functional, plans
from .block_plan import attention_kernel, forget
from .block_step import BlockStep, _storages
from .fused_block_ops import kernel_reasons
from .ops.attention import dropout_seed


class LayerPlan:
    """What one configuration of a converted layer runs: its modules (by identity), the choices
    the step is made with, and the step once made. ``plan(layer, x)``: the layer's output, or
    None where this call takes the op-level path."""
    __slots__ = ("slots", "children", "dicts", "config", "impl", "norms", "attn", "linears",
                 "layer_scales", "drop_path", "dropout", "dropout_name", "scale_name", "heads",
                 "approximate", "amp", "policy", "attn_kernel", "step", "ptrs", "warming",
                 "stepless", "__weakref__")

    def changed(self) -> bool:
        """A submodule replaced (an adapter), a ``forward`` set on one, or the attention
        implementation switched since the plan was made. (A stepless plan runs nothing: the
        op-level path decides per call.)"""
        if self.stepless:
            return False
        return (any(d[n] is not m for (d, n), m in zip(self.slots, self.children))
                or any("forward" in d for d in self.dicts)
                or getattr(self.config, "_attn_implementation", None) != self.impl)

    def params(self):
        """The parameters as the modules hold them now: LN1, q/k/v weights, q/k/v biases, proj,
        ls1, LN2, fc1, fc2, ls2."""
        (n1, n2), (q, k, v, o, fc1, fc2) = self.norms, self.linears
        n1p, n2p = n1._parameters, n2._parameters
        qp, kp, vp, op = q._parameters, k._parameters, v._parameters, o._parameters
        f1p, f2p = fc1._parameters, fc2._parameters
        ls1, ls2 = ((m._parameters["lambda1"] for m in self.layer_scales) if self.layer_scales
                    else (None, None))
        return (n1p["weight"], n1p["bias"], qp["weight"], kp["weight"], vp["weight"],
                qp["bias"], kp["bias"], vp["bias"], op["weight"], op["bias"], ls1,
                n2p["weight"], n2p["bias"], f1p["weight"], f1p["bias"], f2p["weight"],
                f2p["bias"], ls2)

    def __call__(self, layer, x):
        if self.stepless:
            return None
        attn = self.attn
        if self.dropout is not None and self.dropout.training and self.dropout.p > 0:
            return None  # hidden dropout: the op-level path sends it to transformers' forward
        step = self.step
        if step is None:
            return None  # warming up: the op-level path runs (convert_transformers)
        p = self.params()
        if _storages(p) != self.ptrs:
            # A parameter replaced -- or all of them moved or cast (.to(), .half()), which the
            # key, unlike a Block's, does not see: the plan's dtype decisions may be stale. The
            # configuration is planned and warmed up again.
            self.step = None
            forget(layer)
            return None
        drop = float(attn.__dict__[self.dropout_name]) if attn.training else 0.0
        if not (step.takes(x) and (drop == 0.0 or self.attn_kernel)):
            return None
        n1w, n1b, qw, kw, vw, qb, kb, vb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = p
        qkv_w = torch.cat((qw, kw, vw))
        qkv_b = torch.cat((qb, kb, vb)) if qb is not None else None
        seed = dropout_seed(x.device) if drop > 0.0 else None
        ss1 = drop_path_scale(self.drop_path, x)  # in the op-level path's order
        ss2 = drop_path_scale(self.drop_path, x)
        n1, n2 = self.norms
        scalars = (float(n1.eps), float(n2.eps), float(attn.__dict__[self.scale_name]), drop)
        return step.forward(x, (n1w, n1b, qkv_w, qkv_b, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2,
                                ls2), scalars, ss1, ss2, seed, None)

    def _make_step(self, layer, x_shape, x_dtype, device):
        """The step, made once the configuration ran forward and backward on the op-level path
        (block_plan.warm_up: kernels built, tuning choices made), with the parameters as the
        modules hold them now. (make reads the LayerNorm and LayerScale vectors and the qkv
        weight's dtype: q's stands for the concatenation; the plan keeps its own storages.)"""
        self.warming = False
        p = self.params()
        n1w, n1b, qw, _, _, qb, _, _, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = p
        self.step = BlockStep.make(None, self, tuple(x_shape), x_dtype, device,
                                   (n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2))
        self.ptrs = _storages(p)


def make(layer, x, layout, attn, heads, head_dim):
    """The LayerPlan of this configuration of ``layer`` (one convert_transformers found fusable:
    its ``layout``, attention module and shape); where the step does not take it, a plan that
    sends every call to the op-level path (``stepless`` says why)."""
    plan = LayerPlan()
    plan.stepless = _stepless(layer, x, layout, attn)
    if plan.stepless:
        plan.warming = False
        return plan
    q, mlp = attn.q_proj, layer.mlp
    n1, n2 = getattr(layer, layout.norm1), getattr(layer, layout.norm2)
    plan.norms, plan.attn = (n1, n2), attn
    plan.linears = (q, attn.k_proj, attn.v_proj, getattr(attn, layout.proj), mlp.fc1, mlp.fc2)
    plan.layer_scales = tuple(getattr(layer, n) for n in layout.layer_scales)
    plan.drop_path = getattr(layer, layout.drop_path) if layout.drop_path else None
    plan.dropout = getattr(layer, layout.dropout) if layout.dropout else None
    plan.dropout_name = ("attention_dropout" if "attention_dropout" in attn.__dict__
                         else "dropout")
    plan.scale_name = "scaling" if "scaling" in attn.__dict__ else "scale"
    # Identity of every module the step reads or skips, by its parent's slot.
    named = [(layer, layout.norm1), (layer, layout.norm2), (layer, layout.attn), (layer, "mlp"),
             (attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, layout.proj),
             (mlp, "fc1"), (mlp, "fc2"), (mlp, "activation_fn")]
    named += [(layer, n) for n in layout.layer_scales]
    if layout.drop_path:
        named.append((layer, layout.drop_path))
    plan.slots = tuple((parent._modules, name) for parent, name in named)
    plan.children = tuple(d[n] for d, n in plan.slots)
    plan.dicts = tuple(m.__dict__ for m in plan.children)
    plan.config = getattr(attn, "config", None)
    plan.impl = getattr(plan.config, "_attn_implementation", None)
    plan.heads, plan.approximate = heads, layer._vit_fast_mlp_form
    plan.amp = functional._autocast_dtype(x.device)
    plan.policy = plans.state(x.device.type)[0]
    plan.attn_kernel = attention_kernel(x, q.weight.dtype, head_dim)
    plan.step, plan.ptrs, plan.warming = None, None, True
    return plan


def _stepless(layer, x, layout, attn) -> str:
    """Why this configuration's calls do not take the step (they take the op-level path), or ''."""
    if layer._vit_fast_mlp_form not in ("none", "tanh"):
        return "an MLP the step does not run (quick_gelu or the layer's own)"
    biases = [m.bias is None for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    if any(biases) and not all(biases):
        return "q/k/v with some biases missing (the op-level path fills them with zeros)"
    n1, n2, mlp = getattr(layer, layout.norm1), getattr(layer, layout.norm2), layer.mlp
    ls = [getattr(layer, n).lambda1 for n in layout.layer_scales] or [None, None]
    ln = (x, n1.weight, n1.bias, n2.weight, n2.bias, attn.q_proj.weight, attn.q_proj.bias, *ls)
    mm = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    if not plans.eager(*ln, *mm[1:]):
        return "fake tensors or tensor subclasses"
    reasons = kernel_reasons(x, ln, mm)
    return "; ".join(reasons)


def drop_path_scale(dp, x):
    """DINOv2's drop-path as sample_scale [B] (keep mask / keep prob), drawn as transformers draws
    it (torch.rand over B values in x's dtype), or None when it is inactive."""
    p = getattr(dp, "drop_prob", 0.0) if dp is not None else 0.0
    if p == 0.0 or not dp.training:
        return None
    keep = 1 - p
    return torch.floor(torch.rand(x.shape[0], dtype=x.dtype, device=x.device) + keep) / keep
