"""Recognise vit-pytorch's attention, feed-forward and transformer modules by what they compute.

vit-pytorch defines its Attention / FeedForward / Transformer anew in each of its ~70 files, so a
class name says little: the same softmax attention appears under ViT, SimpleViT, PiT, ViViT,
MobileViT, CCT..., and modules named Attention compute talking heads, re-attention, LSA's masked
scores or cross-attention. An attention or feed-forward is recognised when its submodules have
the right shape (vit_pytorch_forms.py) and its own forward, run once on a probe
(vit_pytorch_probe.py), computes the formula the fused path runs. The probe's verdict is kept per
class and configuration (submodule kinds, shapes, plain attributes), so a model runs it once per
kind of layer.

A transformer is recognised by its forward's source (``canonical_layer_loop``): exactly

    for attn, ff in self.layers:  x = attn(x) + x;  x = ff(x) + x
    return self.norm(x)           (or return x)

which is what lets convert run each layer pair fused (the residual add and the next LayerNorm in
one op) instead of module by module.
"""
from __future__ import annotations

import ast
import inspect
import textwrap

from .vit_pytorch_forms import (attention_structure_reason, feed_forward_indices,
                                feed_forward_structure_reason, structural_form)
from .vit_pytorch_probe import probe_attention, probe_feed_forward

__all__ = ["attention_form", "feed_forward_form", "canonical_layer_loop"]


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
    form = structural_form(m)
    key = ("attention", form, _config_key(m))
    if key not in _VERDICTS:
        _VERDICTS[key] = probe_attention(m, form)
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
        _VERDICTS[key] = probe_feed_forward(m)
    why = _VERDICTS[key]
    return (None, why) if why else (feed_forward_indices(m), "")


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
