"""Recognise vit-pytorch's attention and feed-forward modules by what they compute.

vit-pytorch defines its Attention / FeedForward / Transformer anew in each of its ~70 files, so a
class name says little: the same softmax attention appears under ViT, SimpleViT, PiT, ViViT,
MobileViT, CCT..., and modules named Attention compute talking heads, re-attention, LSA's masked
scores or cross-attention. A module is taken as

    attention     out(attention(qkv(norm(x))))  with attention = softmax(q kᵀ·scale)·v per head
                  over the tokens of x itself (optional RMS q/k norm, dropout on the probabilities)
    feed-forward  net(x), net = [LayerNorm], Linear, GELU, [Dropout], Linear, [Dropout]

when two checks agree. Its structure: the submodules those formulas read (``to_qkv`` or ``qkv`` a
plain Linear, ``heads``, ``scale``, ``norm`` a LayerNorm, ``attend`` an nn.Softmax, ``dropout`` /
``attn_drop``, ``to_out`` or ``proj`` [+ ``proj_drop``], optional ``q_norm``/``k_norm``) and
nothing else that could enter the result (an extra parameter or submodule names the form that
cannot fuse). And its forward, run once on a probe: a hook-free copy of the module with random
float64 weights on the CPU, in eval and in training mode (every nn.Dropout replaced by a marker
that passes its input through and records it), must give the formula's result to 1e-9, and the
attention dropout must be the one applied to the probabilities. The probe's verdict is kept per
class and configuration (submodule kinds, shapes, plain attributes), so a model runs it once per
kind of layer. A forward that branches on something the probe cannot see (the sequence length,
the values of x) could still differ; vit-pytorch's do not.

Transformers are recognised by their forward's source (``canonical_layer_loop``): exactly

    for attn, ff in self.layers:  x = attn(x) + x;  x = ff(x) + x
    return self.norm(x)           (or return x)

which is what lets convert run each layer pair fused (the residual add and the next LayerNorm in
one op) instead of module by module.
"""
from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dispatch

__all__ = ["AttentionForm", "FeedForwardForm", "attention_form", "feed_forward_form",
           "attention_structure_reason", "feed_forward_structure_reason", "canonical_layer_loop",
           "looks_like_attention", "looks_like_feed_forward", "RMS_EPS"]

# vit-pytorch's RMSNorm is F.normalize(x)·sqrt(D)·gamma = x·rsqrt(mean(x²))·gamma: qk_norm's rms
# with eps 0; a tiny eps keeps an all-zero q or k finite, as F.normalize's clamp does.
RMS_EPS = 1e-24
_PROBE_TOKENS = 5
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class AttentionForm:
    """Where one attention module keeps each piece of out(softmax(q kᵀ·scale)·v)."""
    qkv: str                    # "to_qkv" | "qkv": Linear dim -> 3·heads·dim_head, laid out (3, H, D)
    heads: str                  # attribute with the head count: "heads" | "num_heads"
    scale: object               # attribute name holding the scale, or the constant (float)
    norm: object                # "norm" (a LayerNorm on the input) or None
    qk_norm: bool               # q_norm / k_norm are vit-pytorch's RMSNorm(heads, dim_head)
    out: tuple                  # modules applied to the attention output, in order
    attn_dropout: object = None  # child nn.Dropout on the probabilities ("dropout" | "attn_drop")
    dropout_p: object = None    # float attribute used as SDPA's dropout_p in training instead
    rank: int = 3               # x is [B, N, C] (3) or [B, P, N, C] (4, MobileViT)


@dataclass(frozen=True)
class FeedForwardForm:
    """net = [LayerNorm], Linear, GELU, [Dropout], Linear, [Dropout]: the index of each piece."""
    norm: object                # index of the LayerNorm in net, or None
    fc1: int
    act: int
    fc2: int
    approximate: str            # gelu_mlp's GELU form ("none" | "tanh")


# --- structure ------------------------------------------------------------------------------

def _plain_linear(m):
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _plain_layer_norm(m, dim):
    return (isinstance(m, nn.LayerNorm) and type(m).forward is nn.LayerNorm.forward
            and tuple(m.normalized_shape) == (dim,) and m.elementwise_affine)


def _is_rms_norm(m, heads, head_dim):
    """vit-pytorch's RMSNorm(heads, dim): gamma [heads, 1, dim], scale = dim ** 0.5, nothing else
    (its forward, F.normalize(x)·scale·gamma, is checked by the probe)."""
    params = dict(m.named_parameters(recurse=False))
    gamma = params.get("gamma")
    return (set(params) == {"gamma"} and not list(m.children())
            and tuple(gamma.shape) == (heads, 1, head_dim)
            and isinstance(getattr(m, "scale", None), (int, float))
            and math.isclose(m.scale, head_dim ** 0.5, rel_tol=1e-6))


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTENTION_PARTS = {"norm", "attend", "dropout", "attn_drop", "to_qkv", "qkv", "to_out", "proj",
                    "proj_drop", "q_norm", "k_norm"}


def _has_conv(m):
    return any(isinstance(s, _CONV) for s in m.modules())


def _named_form_reason(m, children, params):
    """The attention forms that cannot fuse, named for what they compute."""
    names = set(children) | set(params)
    if "temperature" in params:
        return ("LSA (vit_for_small_dataset): a learned temperature and a diagonal mask on the "
                "scores; stays eager")
    if any(n.startswith("reattn") for n in names):
        return ("re-attention (DeepViT): the heads' attention maps are mixed before they weight "
                "the values; stays eager")
    if any(n.startswith(("mix_heads", "talking")) or n in ("proj_l", "proj_w") for n in names):
        return ("talking heads (CaiT): the heads' scores are mixed before and after the softmax; "
                "stays eager")
    if any(children.get(n) is not None and _has_conv(children[n])
           for n in ("to_qkv", "qkv", "to_q", "to_k", "to_v", "to_kv")):
        return "convolutional q/k/v projections (CvT-style); stays eager"
    if "to_q" in children and ("to_kv" in children or "to_k" in children):
        return ("separate to_q / to_kv projections: cross-attention to a context (or a query "
                "layout vit_fast does not read); stays eager")
    if any("window" in n or "rel_pos" in n or "pos_bias" in n for n in names):
        return ("windowed attention or a position bias on the scores; not one fused softmax(q kᵀ)·v "
                "over all tokens; stays eager")
    return ""


def _heads(m):
    for name in ("heads", "num_heads"):
        value = getattr(m, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None, None


def attention_structure_reason(m, form=None):
    """Why ``m``'s submodules are not those of a fusable attention ('' when they are). With
    ``form`` (a converted module), also that they still sit where ``form`` says."""
    children = dict(m.named_children())
    params = dict(m.named_parameters(recurse=False))
    why = _named_form_reason(m, children, params)
    if why:
        return why
    qkv_name = "to_qkv" if "to_qkv" in children else "qkv" if "qkv" in children else None
    if qkv_name is None:
        return "no to_qkv / qkv projection: not an attention vit_fast reads"
    qkv = children[qkv_name]
    if not _plain_linear(qkv):
        return f"{qkv_name} is {type(qkv).__name__}, not a plain nn.Linear (an adapter?)"
    extra = [n for n in children if n not in _ATTENTION_PARTS]
    if extra:
        return (f"submodules {extra} beyond norm / to_qkv / attend / dropout / to_out enter the "
                "attention; stays eager")
    if params:
        return f"its own parameters {sorted(params)} enter the attention; stays eager"
    heads_attr, heads = _heads(m)
    if heads is None:
        return "no integer heads / num_heads attribute"
    width = qkv.out_features
    if width % (3 * heads):
        return f"{qkv_name} width {width} is not 3 x heads ({heads}) x dim_head"
    head_dim = width // (3 * heads)
    if head_dim > dispatch.MAX_HEAD_DIM:
        return f"dim_head {head_dim} is above the fused attention's maximum {dispatch.MAX_HEAD_DIM}"
    norm = children.get("norm")
    if norm is not None and not isinstance(norm, nn.Identity) \
            and not _plain_layer_norm(norm, qkv.in_features):
        return f"norm is {type(norm).__name__}, not an nn.LayerNorm({qkv.in_features})"
    attend = children.get("attend")
    if attend is not None and not (type(attend) is nn.Softmax and attend.dim in (-1, 3, 4)):
        return (f"attend is {type(attend).__name__}, not nn.Softmax(dim=-1) (a custom attention "
                "function); stays eager")
    q_norm, k_norm = children.get("q_norm"), children.get("k_norm")
    plain_qk = all(n is None or isinstance(n, nn.Identity) for n in (q_norm, k_norm))
    if not plain_qk and not all(n is not None and _is_rms_norm(n, heads, head_dim)
                                for n in (q_norm, k_norm)):
        return (f"q_norm / k_norm are {type(q_norm).__name__} / {type(k_norm).__name__}, not "
                "vit-pytorch's RMSNorm(heads, dim_head)")
    for name in ("dropout", "attn_drop", "proj_drop"):
        d = children.get(name)
        if d is not None and type(d) is not nn.Dropout:
            return f"{name} is {type(d).__name__}, not nn.Dropout"
    if form is not None:
        if form.qkv != qkv_name or form.heads != heads_attr or form.qk_norm == plain_qk \
                or (form.norm is None) != (norm is None or isinstance(norm, nn.Identity)):
            return "its submodules changed since convert"
    return ""


def _structural_form(m):
    children = dict(m.named_children())
    qkv_name = "to_qkv" if "to_qkv" in children else "qkv"
    heads_attr, heads = _heads(m)
    head_dim = children[qkv_name].out_features // (3 * heads)
    norm = children.get("norm")
    q_norm = children.get("q_norm")
    qk_norm = q_norm is not None and not isinstance(q_norm, nn.Identity)
    scale = getattr(m, "scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        scale = "scale"
    else:  # no scale attribute: qk-norm's dots are unscaled; otherwise dim_head ** -0.5
        scale = 1.0 if qk_norm else head_dim ** -0.5
    if "to_out" in children:
        out = ("to_out",)
    elif "proj" in children:
        out = ("proj",) + (("proj_drop",) if "proj_drop" in children else ())
    else:
        out = ()
    return AttentionForm(qkv=qkv_name, heads=heads_attr, scale=scale,
                         norm="norm" if norm is not None and not isinstance(norm, nn.Identity)
                         else None, qk_norm=qk_norm, out=out)


_FF_ACTIVATIONS = {nn.GELU}


def feed_forward_structure_reason(m):
    """Why ``m`` is not a feed-forward net(x) gelu_mlp can run ('' when it is)."""
    children = dict(m.named_children())
    if set(children) != {"net"} or dict(m.named_parameters(recurse=False)):
        return "not a feed-forward holding only its ``net``"
    net = children["net"]
    if type(net) is not nn.Sequential:
        return f"net is {type(net).__name__}, not an nn.Sequential"
    layers = list(net)
    if _has_conv(net):
        return "a convolutional feed-forward (Conv layers in net); stays eager"
    kinds = [type(layer) for layer in layers]
    i = 1 if kinds and issubclass(kinds[0], nn.LayerNorm) else 0
    body = kinds[i:]
    dropouts = [k for k in body if k is nn.Dropout]
    core = [k for k in body if k is not nn.Dropout]
    if len(core) != 3 or not (issubclass(core[0], nn.Linear) and issubclass(core[2], nn.Linear)):
        return ("net is not [LayerNorm], Linear, activation, [Dropout], Linear, [Dropout] "
                f"({', '.join(k.__name__ for k in kinds)})")
    if len(dropouts) > 2 or (body and body[0] is nn.Dropout):
        return "net's dropouts are not after the activation and the last Linear"
    act = layers[i + 1]
    if type(act) not in _FF_ACTIVATIONS:
        return (f"activation {type(act).__name__}: the fused MLP (gelu_mlp) has GELU epilogues "
                "only (erf, tanh); the feed-forward runs eagerly")
    if act.approximate not in ("none", "tanh"):
        return f"GELU approximate={act.approximate!r} has no gelu_mlp epilogue"
    fc1 = layers[i]
    fc2 = layers[i + 2] if kinds[i + 2] is not nn.Dropout else layers[i + 3]
    if not (_plain_linear(fc1) and _plain_linear(fc2)):
        return "net's Linears are not plain nn.Linear (an adapter?)"
    if fc2.in_features != fc1.out_features:
        return "net's Linears do not chain"
    if i and not _plain_layer_norm(layers[0], fc1.in_features):
        return f"net[0] is not a plain nn.LayerNorm({fc1.in_features})"
    return ""


def _feed_forward_form(m):
    layers = list(m.net)
    i = 1 if isinstance(layers[0], nn.LayerNorm) else 0
    fc2 = i + 2 if type(layers[i + 2]) is not nn.Dropout else i + 3
    return FeedForwardForm(norm=0 if i else None, fc1=i, act=i + 1, fc2=fc2,
                           approximate=layers[i + 1].approximate)


# --- the probe ------------------------------------------------------------------------------

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
    """out(softmax(q kᵀ·scale)·v) of probe copy ``c`` in float64, the formula the fused path runs."""
    qkv_lin = getattr(c, form.qkv)
    h = x
    if form.norm:
        n = getattr(c, form.norm)
        h = F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)
    qkv = F.linear(h, qkv_lin.weight, qkv_lin.bias)
    heads = getattr(c, form.heads)
    lead, N = qkv.shape[:-2], qkv.shape[-2]
    q, k, v = qkv.reshape(*lead, N, 3, heads, -1).movedim(-3, 0).transpose(-2, -3).unbind(0)
    if form.qk_norm:
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True)) * c.q_norm.gamma
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True)) * c.k_norm.gamma
    scale = getattr(c, form.scale) if isinstance(form.scale, str) else form.scale
    p = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
    o = (p @ v).transpose(-2, -3).reshape(*lead, N, -1)
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


def _probe_attention(m, form):
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


def _probe_feed_forward(m):
    gen = torch.Generator().manual_seed(0)
    markers = {}
    c = _probe_copy(m, gen, markers)
    dim = m.net[_feed_forward_form(m).fc1].in_features
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


def _config_key(m):
    """What the probe's verdict depends on: classes, shapes and plain attributes of the module
    and its submodules (not the weights' values, device or dtype)."""
    parts = []
    for name, sub in m.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(sub).items()
                             if type(v) in (bool, int, float, str)
                             and not k.startswith("_") and k != "training"))
        shapes = tuple((n, tuple(p.shape)) for n, p in sub.named_parameters(recurse=False))
        parts.append((name, type(sub), attrs, shapes))
    return tuple(parts)


_VERDICTS = {}  # config key -> (probe result, reason)


def attention_form(m):
    """(AttentionForm, '') when ``m`` is a softmax self-attention vit_fast can run fused, else
    (None, the reason in words)."""
    if "forward" in m.__dict__:
        return None, "forward is set on the instance"
    why = attention_structure_reason(m)
    if why:
        return None, why
    form = _structural_form(m)
    key = ("attention", form, _config_key(m))
    if key not in _VERDICTS:
        _VERDICTS[key] = _probe_attention(m, form)
    return _VERDICTS[key]


def feed_forward_form(m):
    """(FeedForwardForm, '') when ``m`` computes net(x) with a gelu_mlp-shaped net, else
    (None, the reason in words)."""
    if "forward" in m.__dict__:
        return None, "forward is set on the instance"
    why = feed_forward_structure_reason(m)
    if why:
        return None, why
    key = ("feed_forward", _config_key(m))
    if key not in _VERDICTS:
        _VERDICTS[key] = _probe_feed_forward(m)
    why = _VERDICTS[key]
    return (None, why) if why else (_feed_forward_form(m), "")


def looks_like_attention(m) -> bool:
    """Whether a user would call ``m`` an attention layer (for naming what convert leaves)."""
    name = type(m).__name__.lower()
    children = {n for n, _ in m.named_children()}
    return ("attention" in name or name in ("attn", "lsa") or name.endswith("attn")
            or bool(children & {"to_qkv", "to_q", "to_kv"}))


def looks_like_feed_forward(m) -> bool:
    name = type(m).__name__.lower()
    return "feedforward" in name or name in ("ff", "ffn")


# --- the transformer's forward --------------------------------------------------------------

def _name(node):
    return node.id if isinstance(node, ast.Name) else None


def _residual_call(stmt, fn, x):
    """``x = fn(x) + x`` or ``x = x + fn(x)``."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and _name(stmt.targets[0]) == x
            and isinstance(stmt.value, ast.BinOp) and isinstance(stmt.value.op, ast.Add)):
        return False
    for call, other in ((stmt.value.left, stmt.value.right), (stmt.value.right, stmt.value.left)):
        if (_name(other) == x and isinstance(call, ast.Call) and _name(call.func) == fn
                and len(call.args) == 1 and _name(call.args[0]) == x and not call.keywords):
            return True
    return False


def _self_attr(node, attr, self_name):
    return isinstance(node, ast.Attribute) and node.attr == attr and _name(node.value) == self_name


_CANONICAL = {}  # class -> (matches, has final norm)


def canonical_layer_loop(cls):
    """(True, uses_norm) when cls.forward is exactly the pre-norm layer loop (module docstring),
    else (False, False). Read from the source; no source -> not canonical."""
    if cls in _CANONICAL:
        return _CANONICAL[cls]
    result = (False, False)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        _CANONICAL[cls] = result
        return result
    fn = tree.body[0] if tree.body else None
    args = getattr(fn, "args", None)
    if (isinstance(fn, ast.FunctionDef) and not fn.decorator_list and len(args.args) == 2
            and not (args.vararg or args.kwarg or args.kwonlyargs or args.defaults
                     or args.posonlyargs)):
        self_name, x = args.args[0].arg, args.args[1].arg
        body = [s for s in fn.body if not (isinstance(s, ast.Expr)
                                           and isinstance(s.value, ast.Constant))]
        if len(body) == 2 and isinstance(body[0], ast.For) and isinstance(body[1], ast.Return):
            loop, ret = body
            target = loop.target
            names = ([_name(e) for e in target.elts] if isinstance(target, ast.Tuple)
                     and len(target.elts) == 2 else [None, None])
            if (None not in names and _self_attr(loop.iter, "layers", self_name)
                    and not loop.orelse and len(loop.body) == 2
                    and _residual_call(loop.body[0], names[0], x)
                    and _residual_call(loop.body[1], names[1], x) and x not in names):
                value = ret.value
                if _name(value) == x:
                    result = (True, False)
                elif (isinstance(value, ast.Call) and _self_attr(value.func, "norm", self_name)
                      and len(value.args) == 1 and _name(value.args[0]) == x
                      and not value.keywords):
                    result = (True, True)
    _CANONICAL[cls] = result
    return result
