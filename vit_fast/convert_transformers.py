"""Swap vit_fast's fused ops into Hugging Face transformers' ViT-family encoder layers, in place.

The five layer classes below (transformers >= 5) are pre-norm blocks with the same math::

    x = x + drop_path(ls1 · proj(attention(q_proj(LN1 x), k_proj(LN1 x), v_proj(LN1 x))))
    x = x + drop_path(ls2 · fc2(act(fc1(LN2 x))))

ViT/DeiT add a hidden Dropout on each branch, DINOv2 has LayerScale and drop-path, CLIP/SigLIP
neither. A converted layer runs it as vit_fast's Block does: LN1, one qkv GEMM, the fused
attention, proj, one residual_layer_norm (residual + LayerScale + drop-path + LN2), one gelu_mlp with
the residual in its epilogue.

Conversion changes only the layer's class, to a subclass made here (named as the layer's class,
so lookups by class name still match; ``VitFast<Layer>`` is its qualname): the module object,
its submodules, Parameters, hooks and train/eval mode are the same, so optimizers, state_dict
keys, save_pretrained/from_pretrained and transformers' output capture (its forward hooks on the
layer and attention classes, matched by isinstance) are unchanged. transformers keeps q, k and v
as three Linears; the fused path concatenates their weights on each forward (a 3·C²
copy, small next to the GEMM that reads B·N·C activations, and autograd sends the gradient back
to the three original Parameters, which stay the only ones). That copy is saved for the qkv GEMM's
backward in place of nothing: 3·C² elements per layer.

A call the fused path cannot do exactly runs transformers' own forward (``fallback_reason``
says why): an attention implementation other than eager/sdpa, an attention_mask, output_attentions
(its hooks record the attention module's weights), head_mask/is_causal, active hidden dropout,
hooks on the submodules the fused path bypasses, or a q/k/v/proj that is no longer a plain
nn.Linear (a LoRA adapter added after conversion). Attention dropout runs inside the fused
attention (its own random stream, so not bit-equal to torch's). An activation the MLP kernel does
not have (quick_gelu, SwiGLU) runs the layer's MLP eagerly, the rest stays fused.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import dispatch, functional, reference, transformers_plan
from .block_plan import forget, lookup, warm_up
from .transformers_autograd import qkv_linear, quick_gelu_mlp
from .transformers_plan import drop_path_scale

__all__ = ["is_transformers_model", "convert_transformers", "fallback_reason"]


@dataclass(frozen=True)
class _Layout:
    """Where one family's layer keeps each piece (attribute names in transformers >= 5)."""
    module: str                # transformers module that defines the layer class
    norm1: str
    attn: str
    norm2: str
    proj: str                  # the attention's output Linear
    layer_scales: tuple = ()   # (ls1, ls2) modules with a ``lambda1`` Parameter
    drop_path: str = ""        # one module applied to both branches (DINOv2)
    dropout: str = ""          # nn.Dropout applied to both branches (ViT, DeiT)


_VIT = dict(norm1="layernorm_before", attn="attention", norm2="layernorm_after", proj="o_proj",
            dropout="dropout")
_CLIP = dict(norm1="layer_norm1", attn="self_attn", norm2="layer_norm2", proj="out_proj")
LAYOUTS = {
    "ViTLayer": _Layout("transformers.models.vit.modeling_vit", **_VIT),
    "DeiTLayer": _Layout("transformers.models.deit.modeling_deit", **_VIT),
    "Dinov2Layer": _Layout("transformers.models.dinov2.modeling_dinov2", norm1="norm1",
                           attn="attention", norm2="norm2", proj="o_proj",
                           layer_scales=("layer_scale1", "layer_scale2"), drop_path="drop_path"),
    "CLIPEncoderLayer": _Layout("transformers.models.clip.modeling_clip", **_CLIP),
    "SiglipEncoderLayer": _Layout("transformers.models.siglip.modeling_siglip", **_CLIP),
}
_ATTN_IMPLEMENTATIONS = ("eager", "sdpa")  # both compute plain softmax(q kᵀ·scale) v here


def is_transformers_model(model: nn.Module) -> bool:
    """True when some submodule of ``model`` comes from transformers (without importing it)."""
    return any(type(m).__module__.split(".")[0] == "transformers" for m in model.modules())


def _layout_of(module):
    """The _Layout of ``module``'s exact class, or None (subclasses may have their own forward)."""
    layout = LAYOUTS.get(type(module).__name__)
    return layout if layout is not None and type(module).__module__ == layout.module else None


# --- the MLP activation ---------------------------------------------------------------------

def _gelu_form(act):
    """gelu_mlp's ``approximate`` for the activation module ``act``, or (None, why not)."""
    from transformers import activations as A
    kind = type(act)
    if kind is nn.GELU:
        return act.approximate, ""
    if kind is A.GELUActivation:  # F.gelu or its erf formula in Python: both exact GELU
        return "none", ""
    if kind in (A.GELUTanh, A.NewGELUActivation, A.FastGELUActivation):  # tanh-form GELU
        return "tanh", ""
    if kind is A.QuickGELUActivation:
        return "quick", ("quick_gelu (x·sigmoid(1.702x)) is not one of gelu_mlp's epilogues "
                         "(erf, tanh): the MLP runs as PyTorch ops, not a fused kernel (saving "
                         "only its input and pre-activation); attention and norms stay fused")
    return None, f"activation {kind.__name__} has no gelu_mlp epilogue; the MLP runs eagerly"


def _mlp_form(mlp):
    """(form, why the MLP is not one gelu_mlp): form is gelu_mlp's approximate ('none',
    'tanh'), 'quick' (quick_gelu_mlp) or None (the layer's own MLP module)."""
    if not (isinstance(getattr(mlp, "fc1", None), nn.Linear)
            and isinstance(getattr(mlp, "fc2", None), nn.Linear) and hasattr(mlp, "activation_fn")
            and type(mlp).__name__.endswith("MLP")):
        return None, f"{type(mlp).__name__} is not fc1 -> activation -> fc2; the MLP runs eagerly"
    return _gelu_form(mlp.activation_fn)


# --- what a layer needs for the fused path --------------------------------------------------

def _plain_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _plain_layer_norm(m, dim):
    return type(m) is nn.LayerNorm and tuple(m.normalized_shape) == (dim,)


def _attention_shape(attn):
    """(num_heads, head_dim, scale, dropout) of a transformers ViT-family attention module."""
    heads = getattr(attn, "num_attention_heads", getattr(attn, "num_heads", None))
    scale = getattr(attn, "scaling", getattr(attn, "scale", None))
    dropout = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
    return heads, getattr(attn, "head_dim", None), scale, dropout


def _why_not(layer, layout):
    """Why ``layer`` cannot take the fused path at all, or '' when it can."""
    attn = getattr(layer, layout.attn)
    if type(getattr(attn, "config", None)).__name__.endswith("TextConfig"):
        return "a text encoder layer (vit_fast converts the vision tower only)"
    names = ("q_proj", "k_proj", "v_proj", layout.proj)
    if not all(_plain_linear(getattr(attn, n, None)) for n in names):
        return (f"{type(attn).__name__} does not hold q_proj/k_proj/v_proj/{layout.proj} as plain "
                "nn.Linear (a layout other than transformers >= 5, or adapters)")
    q, k, v, proj = (getattr(attn, n) for n in names)
    dim = q.in_features
    heads, head_dim, scale, dropout = _attention_shape(attn)
    if not isinstance(heads, int) or not isinstance(head_dim, int) or scale is None:
        return f"{type(attn).__name__} has no num_heads/head_dim/scale this code recognizes"
    width = heads * head_dim
    if (k.in_features, v.in_features) != (dim, dim) or {q.out_features, k.out_features,
                                                        v.out_features, proj.in_features} != {width}:
        return f"q/k/v/{layout.proj} shapes do not match {heads} heads x {head_dim}"
    if head_dim > dispatch.MAX_HEAD_DIM:
        return f"head_dim {head_dim} is above the fused attention's maximum {dispatch.MAX_HEAD_DIM}"
    if proj.out_features != dim:
        return f"{layout.proj} does not map back to the hidden size {dim}"
    for name in (layout.norm1, layout.norm2):
        if not _plain_layer_norm(getattr(layer, name), dim):
            return f"{name} is not a plain nn.LayerNorm({dim})"
    for name in layout.layer_scales:
        ls = getattr(layer, name)
        gamma = getattr(ls, "lambda1", None)
        if not (isinstance(gamma, nn.Parameter) and tuple(gamma.shape) == (dim,)):
            return f"{name} is not a LayerScale with a [{dim}] lambda1"
    if layout.drop_path:
        dp = getattr(layer, layout.drop_path)
        if not (type(dp) is nn.Identity or type(dp).__name__ == "Dinov2DropPath"):
            return f"{layout.drop_path} is a {type(dp).__name__}, not a drop-path vit_fast maps"
    if layout.dropout and type(getattr(layer, layout.dropout)) is not nn.Dropout:
        return f"{layout.dropout} is not an nn.Dropout"
    return ""


def _attentions_requested(kwargs):
    """Whether this forward must produce attention weights (output_attentions as an argument, or
    transformers' output capture collecting ``attentions`` because the config asks for them)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a transformers without output capture passes output_attentions instead
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def _user_hooks(module):
    """Forward (pre-)hooks other than transformers' own output capture, which is inactive unless
    the collector asks for its key (and the attentions key sends the call to the fallback)."""
    hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
    return [h for h in hooks if getattr(h, "__name__", "") != "output_capturing_hook"]


def fallback_reason(layer, hidden_states, attention_mask, kwargs):
    """Why this call of a converted ``layer`` runs transformers' own forward, or '' if fused."""
    layout, attn = layer._vit_fast_layout, getattr(layer, layer._vit_fast_layout.attn)
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if impl not in _ATTN_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} (fused: {', '.join(_ATTN_IMPLEMENTATIONS)})"
    if attention_mask is not None:
        return "an attention_mask is given (the fused attention takes none)"
    if _attentions_requested(kwargs):
        return "output_attentions: the attention weights are materialized"
    if kwargs.get("head_mask") is not None or kwargs.get("is_causal"):
        return "head_mask or is_causal is given"
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        return "hidden_states is not a [B, N, C] tensor"
    if layout.dropout:
        drop = getattr(layer, layout.dropout)
        if drop.training and drop.p > 0:
            return f"hidden dropout p={drop.p} in training (no fused dropout on the branches)"
    names = ("q_proj", "k_proj", "v_proj", layout.proj)
    if not all(_plain_linear(getattr(attn, n, None)) for n in names):
        return "q/k/v/proj is no longer a plain nn.Linear (an adapter was added)"
    bypassed = [attn, getattr(layer, layout.norm1), getattr(layer, layout.norm2)]
    bypassed += [getattr(attn, n) for n in names]
    if layer._vit_fast_mlp_form is not None:
        bypassed += [layer.mlp, layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn]
    if any(_user_hooks(m) for m in bypassed):
        return "forward hooks on a submodule the fused path does not call"
    return ""


# --- the fused forward ----------------------------------------------------------------------

def _qkv(attn, h1):
    """q/k/v Linears applied as one GEMM: [B, N, 3·H·D], laid out (3, H, D) like timm's qkv.

    Their weights are concatenated per forward (3·C² elements, cheap next to the GEMM);
    qkv_linear saves the Parameters instead of that copy. Under autocast, or with mixed dtypes,
    F.linear on the copy (autocast casts it), whose backward also reaches the three Parameters.
    """
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    bias = None
    if any(m.bias is not None for m in lins):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in lins])
    if _plain_autograd(h1, *(m.weight for m in lins)):
        return qkv_linear(h1, *(m.weight for m in lins), bias)
    return nn.functional.linear(h1, torch.cat([m.weight for m in lins]), bias)


def _plain_autograd(x, *tensors):
    """Whether transformers_autograd's Functions apply: one dtype, autocast off."""
    return (functional._autocast_dtype(x.device) is None
            and all(t is None or t.dtype == x.dtype for t in tensors))


def _fused_forward(layer, x, warming=None):
    """The op-level fused path; ``warming``: the configuration's plan, warmed up by this call
    (vit_fast/transformers_plan.py)."""
    layout = layer._vit_fast_layout
    attn = getattr(layer, layout.attn)
    n1, n2 = getattr(layer, layout.norm1), getattr(layer, layout.norm2)
    heads, _, scale, dropout = _attention_shape(attn)
    proj = getattr(attn, layout.proj)
    ls1, ls2 = (getattr(layer, n).lambda1 for n in layout.layer_scales) if layout.layer_scales \
        else (None, None)
    dp = getattr(layer, layout.drop_path) if layout.drop_path else None

    h1 = functional.residual_layer_norm(x, n1.weight, n1.bias, n1.eps)[0]
    if warming is not None:
        warm_up(warming, layer, x, h1)
    qkv = _qkv(attn, h1)
    o = functional.fused_qkv_attention(qkv, heads, scale=scale,
                                       dropout_p=float(dropout) if attn.training else 0.0)
    p = nn.functional.linear(o, proj.weight, proj.bias)
    h2, x1 = functional.residual_layer_norm(p, n2.weight, n2.bias, n2.eps, residual=x,
                                            layer_scale=ls1, sample_scale=drop_path_scale(dp, x))
    ss2 = drop_path_scale(dp, x)  # drawn second, as transformers draws it after the MLP
    approximate = layer._vit_fast_mlp_form
    if approximate is None:  # no fc1 -> activation -> fc2 this code knows: the layer's own MLP
        return reference.add_branch(x1, layer.mlp(h2), ls2, ss2)
    fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
    if approximate == "quick":  # CLIP's quick_gelu: PyTorch ops, activation recomputed
        tensors = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        mlp = quick_gelu_mlp(h2, *tensors) if _plain_autograd(h2, *tensors) else layer.mlp(h2)
        return reference.add_branch(x1, mlp, ls2, ss2)
    return functional.gelu_mlp(h2, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                               approximate=approximate, residual=x1, layer_scale=ls2,
                               sample_scale=ss2)


def _plan(layer, x):
    """The plan of a configuration whose calls are fusable (vit_fast/transformers_plan.py), or
    None: such calls decide per call, on the op-level path."""
    if fallback_reason(layer, x, None, {}):
        return None
    attn = getattr(layer, layer._vit_fast_layout.attn)
    heads, head_dim, _, _ = _attention_shape(attn)
    return transformers_plan.make(layer, x, layer._vit_fast_layout, attn, heads, head_dim)


class _FusedLayerMixin:
    """forward of a converted layer: its configuration's plan (the one-node step), the op-level
    fused path, or the original forward for this call."""

    def forward(self, hidden_states, *args, **kwargs):
        plain = not kwargs and (not args or (len(args) == 1 and args[0] is None))
        if plain:
            plan = lookup(self, hidden_states, _plan)
            if plan is not None:
                out = plan(self, hidden_states)
                if out is not None:
                    return out
        attention_mask = args[0] if args else kwargs.get("attention_mask")
        if len(args) > 1 or fallback_reason(self, hidden_states, attention_mask, kwargs):
            return super().forward(hidden_states, *args, **kwargs)
        if not plain:
            return _fused_forward(self, hidden_states)
        if plan is None:  # fusable again (a hook removed): the next call plans it
            forget(self)
        # transformers >= 5 layers return the hidden states tensor itself.
        return _fused_forward(self, hidden_states,
                              plan if plan is not None and plan.warming else None)

    def __getstate__(self):
        # The plans hold the step (launch decisions, the tuner it looked its choices up in): a
        # copy re-derives them on its first call.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.pop("_block_plan", None)
        state.pop("_block_plans", None)
        return state


_FUSED_CLASSES = {}


def _fused_class(cls):
    """The mixin's forward over transformers' layer class (made once per class).

    A subclass keeps isinstance true for transformers' output capture and gradient checkpointing
    (its __init_subclass__ wraps this forward, and only the outermost wrapper checkpoints). Its
    __name__ is the layer's own (``ViTLayer``): _no_split_modules, accelerate's device maps and
    FSDP's transformer_layer_cls_to_wrap match layers by class name. Its __qualname__ is
    VitFast<cls>, reachable as vit_fast.convert_transformers.VitFast<cls> so a pickled model
    loads again.
    """
    name = f"VitFast{cls.__name__}"
    if name not in _FUSED_CLASSES:
        fused = type(cls.__name__, (_FusedLayerMixin, cls), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"{cls.__name__}, fused by vit_fast."})
        _FUSED_CLASSES[name] = fused
    return _FUSED_CLASSES[name]


def __getattr__(name):  # PEP 562: unpickling a converted model builds its fused class on demand
    if name.startswith("VitFast") and name[len("VitFast"):] in LAYOUTS:
        base = name[len("VitFast"):]
        return _fused_class(getattr(importlib.import_module(LAYOUTS[base].module), base))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _transformers_version():
    import transformers
    return transformers.__version__


def convert_transformers(model: nn.Module, summary) -> None:
    """Convert every supported transformers encoder layer in ``model``; note it in ``summary``."""
    version = _transformers_version()
    too_old = int(version.split(".")[0]) < 5
    for name, module in model.named_modules():
        layout = _layout_of(module)
        if isinstance(module, _FusedLayerMixin):
            summary.already.append(name)
            continue
        if layout is None:
            continue
        # 4.x layers return tuples and take other arguments (CLIP's causal_attention_mask...),
        # some with the same submodule names: refuse them by version, not by layout alone.
        why = (f"transformers {version}: vit_fast converts the layers of "
               "transformers >= 5 (tensor outputs, q_proj/k_proj/v_proj)") if too_old \
            else _why_not(module, layout)
        if why:
            summary.left.append((name, why))
            continue
        approximate, mlp_why = _mlp_form(module.mlp)
        module._vit_fast_layout = layout
        module._vit_fast_mlp_form = approximate
        module.__class__ = _fused_class(type(module))
        summary.swapped.append(name)
        if mlp_why:
            summary.left.append((f"{name}.mlp", mlp_why))
    converted = [m for m in model.modules() if isinstance(m, _FusedLayerMixin)]
    impls = {getattr(getattr(m, m._vit_fast_layout.attn).config, "_attn_implementation", None)
             for m in converted}
    other = sorted(str(i) for i in impls - set(_ATTN_IMPLEMENTATIONS))
    if other:
        summary.left.append(("", f"attention implementation {', '.join(other)}: converted layers "
                                 "run transformers' forward until it is eager or sdpa"))
