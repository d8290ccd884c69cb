"""Swap vit_fast's fused ops into lucidrains' vit-pytorch ``ViT`` and ``SimpleViT``, in place.

vit-pytorch's Transformer is pre-norm like timm's, with the norms inside the branches::

    x = attn(x) + x        attn: norm -> to_qkv -> softmax(q kᵀ·scale) v -> to_out (Linear, Dropout)
    x = ff(x) + x          ff.net: LayerNorm, Linear, GELU, [Dropout], Linear, [Dropout]
    out = norm(x)

to_qkv's output splits (3, heads, dim_head) along its last dim, the layout the fused attention
reads. The converted Transformer runs each layer as vit_fast's Block does: LN, fused attention,
one residual_layer_norm for "add the attention branch + ff's LayerNorm", one gelu_mlp with the
residual in its epilogue. The LayerNorms keep their own eps (1e-5 in vit-pytorch). Dropout is kept:
attention dropout becomes the op's dropout_p, and an FF whose dropout is active (training with
p > 0) runs its Sequential eagerly for that call.

The same submodule objects move into the new modules under the same names, so parameters and
state_dict keys are unchanged. vit-pytorch is imported only when a model from it is converted.
"""
from __future__ import annotations

import torch.nn as nn

from . import functional

__all__ = ["VitPytorchAttention", "VitPytorchFeedForward", "VitPytorchTransformer",
           "is_vit_pytorch_model", "convert_vit_pytorch"]


def _supported_classes():
    """{Transformer class: (Attention class, FeedForward class)} of vit_pytorch.vit / simple_vit."""
    from vit_pytorch import simple_vit, vit
    return {vit.Transformer: (vit.Attention, vit.FeedForward),
            simple_vit.Transformer: (simple_vit.Attention, simple_vit.FeedForward)}


def _layer_norm_args(norm):
    return norm.weight, norm.bias, norm.eps


def _plain_layer_norm(m, dim):
    return type(m) is nn.LayerNorm and tuple(m.normalized_shape) == (dim,)


class VitPytorchAttention(nn.Module):
    """vit-pytorch's Attention (norm, to_qkv, attend, dropout, to_out) on the fused attention op.

    ``fused_attn = False`` takes the materialized path through ``attend`` (nn.Softmax) and
    ``dropout``, as the original forward does, so attention maps can be recorded.
    """

    fused_attn = True

    def attend_qkv(self, qkv):
        """[B, N, 3·H·D] -> [B, N, H·D] (before to_out)."""
        dropout = getattr(self, "dropout", None)
        p = dropout.p if (dropout is not None and self.training) else 0.0
        if self.fused_attn:
            return functional.fused_qkv_attention(qkv, self.heads, scale=self.scale, dropout_p=p)
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.attend((q @ k.transpose(-1, -2)) * self.scale)
        if dropout is not None:
            attn = dropout(attn)
        return (attn @ v).transpose(1, 2).reshape(B, N, -1)

    def branch(self, h):
        """to_out(attention(to_qkv(h))) for an already normalized h."""
        return self.to_out(self.attend_qkv(self.to_qkv(h)))

    def forward(self, x):
        return self.branch(functional.residual_layer_norm(x, *_layer_norm_args(self.norm))[0])


class VitPytorchFeedForward(nn.Module):
    """vit-pytorch's FeedForward, net = LayerNorm, Linear, GELU, [Dropout], Linear, [Dropout]."""

    def _dropouts(self):
        return [m for m in self.net if isinstance(m, nn.Dropout)]

    def fused_approximate(self):
        """The GELU form for gelu_mlp when this call can be fused, else None (dropout active)."""
        if self.training and any(d.p > 0 for d in self._dropouts()):
            return None
        return self.net[2].approximate

    def mlp(self, h, residual=None):
        """net without its LayerNorm on an already normalized h, plus residual when given."""
        fc1 = self.net[1]
        fc2 = self.net[-2] if isinstance(self.net[-1], nn.Dropout) else self.net[-1]
        approximate = self.fused_approximate()
        if approximate is not None:
            return functional.gelu_mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                                       approximate=approximate, residual=residual)
        out = self.net[1:](h)
        return out if residual is None else residual + out

    def forward(self, x):
        return self.mlp(functional.residual_layer_norm(x, *_layer_norm_args(self.net[0]))[0])


class VitPytorchTransformer(nn.Module):
    """vit-pytorch's Transformer (``layers`` of [attn, ff] pairs, then ``norm``), fused."""

    def forward(self, x):
        for attn, ff in self.layers:
            h1 = functional.residual_layer_norm(x, *_layer_norm_args(attn.norm))[0]
            # x + attention branch, and ff's LayerNorm of that sum, in one op.
            h2, x = functional.residual_layer_norm(attn.branch(h1), *_layer_norm_args(ff.net[0]),
                                                   residual=x)
            x = ff.mlp(h2, residual=x)
        return functional.residual_layer_norm(x, *_layer_norm_args(self.norm))[0]


def is_vit_pytorch_model(model: nn.Module) -> bool:
    """True when some submodule of ``model`` is a vit-pytorch class (without importing it)."""
    return any(type(m).__module__.split(".")[0] == "vit_pytorch" for m in model.modules())


def _why_not(transformer, attn_cls, ff_cls):
    """Why this vit-pytorch Transformer cannot be fused, or '' when it can."""
    norm = transformer.norm
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        return "its final norm is not a LayerNorm over the last dim"
    dim = norm.normalized_shape[0]
    if not _plain_layer_norm(norm, dim):
        return "its final norm is not a plain nn.LayerNorm"
    for i, layer in enumerate(transformer.layers):
        if len(layer) != 2 or type(layer[0]) is not attn_cls or type(layer[1]) is not ff_cls:
            return f"layer {i} is not an [Attention, FeedForward] pair of this vit-pytorch model"
        attn, ff = layer
        if not _plain_layer_norm(attn.norm, dim):
            return f"layer {i}: attention norm is not a plain nn.LayerNorm({dim})"
        if attn.to_qkv.in_features != dim or attn.to_qkv.out_features % (3 * attn.heads):
            return f"layer {i}: to_qkv is not [dim -> 3·heads·dim_head]"
        net = list(ff.net)
        kinds = [type(m) for m in net]
        shapes = ([nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout],
                  [nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear])
        if kinds not in shapes:
            return f"layer {i}: FeedForward.net is not LayerNorm, Linear, GELU, [Dropout], Linear"
        if not _plain_layer_norm(net[0], dim):
            return f"layer {i}: FeedForward norm is not a plain nn.LayerNorm({dim})"
    return ""


def convert_vit_pytorch(model: nn.Module, summary) -> None:
    """Swap every supported vit-pytorch Transformer in ``model``; note what was done in summary."""
    from .convert import _adopt
    supported = _supported_classes()
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, VitPytorchTransformer):
            continue
        kind = type(module)
        if kind in supported:
            attn_cls, ff_cls = supported[kind]
            why = _why_not(module, attn_cls, ff_cls)
            if why:
                summary.left.append((name, why))
                continue
            layers = nn.ModuleList(
                nn.ModuleList([_adopt(VitPytorchAttention, a), _adopt(VitPytorchFeedForward, f)])
                for a, f in module.layers)
            layers.training = module.layers.training  # not .train(): children keep their modes
            replacements.append((name, _adopt(VitPytorchTransformer, module, {"layers": layers})))
        elif kind.__name__ == "Transformer" and kind.__module__.startswith("vit_pytorch"):
            summary.left.append((name, f"{kind.__module__}.Transformer is not one vit_fast "
                                       "converts (supported: vit_pytorch.ViT and SimpleViT)"))
    for name, new in replacements:
        parent_name, _, attr = name.rpartition(".")
        if not attr:
            raise ValueError("convert: pass the model that contains the vit-pytorch Transformer")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        summary.swapped.append(name)
    if replacements and hasattr(model, "to_patch_embedding"):
        summary.left.append(("to_patch_embedding", "vit-pytorch's patch embedding (Rearrange, "
                             "LayerNorm, Linear, LayerNorm) is not a Conv2d; left as it is"))
