"""vit_fast.Block: timm's pre-norm transformer Block with one fused path.

    qkv = Linear(LN1(x))                                   layer_norm_linear
    p   = proj(attention(qkv))                             attn.attend (fused attention op)
    out = s + drop_path(ls2·MLP(LN2(s))),  s = x + drop_path(ls1·p)     residual_layer_norm_mlp

The fused path reads the norms', qkv's, MLP's and LayerScales' parameters instead of calling those
modules, so it runs only when nothing attached to them could notice (vit_fast/fusion.py).
:meth:`Block.why_not_fused` says why the plain path runs. The plain path is timm's Block.forward,
also what TorchScript and torch.fx see.

A call looks its decisions up in a per-configuration plan (vit_fast/block_plan.py: one tuple,
then the three fused ops); what the plan does not cover (an attention mask, q/k norms, the
reference backend, torch.compile tracing) takes :meth:`Block._forward_general`, which decides as
it goes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention as _TimmAttention
from timm.layers import DropPath, register_notrace_module
from timm.layers import LayerScale as _TimmLayerScale
from timm.layers import Mlp as _TimmMlp

from . import block_plan, fused_block_ops
from .block_plan import drop_path_scale
from .fusion import FusedModule, forward_is
from .segments import segment_attention_mask
from .layers import (Attention, LayerNorm, LayerScale, Mlp, _gelu_approximate, _plain_layer_norm,
                      _tracing)

__all__ = ["Block"]

_LAYER_SCALE_FORWARDS = (nn.Identity.forward, LayerScale.forward, _TimmLayerScale.forward)
_DROP_PATH_FORWARDS = (nn.Identity.forward, DropPath.forward)


def _layer_scale_gamma(ls):
    return None if forward_is(ls, nn.Identity.forward) else ls.gamma


def _own_layer(layer, kind):
    """Map timm's default Mlp/Attention classes (as VisionTransformer passes them) to ours."""
    if kind == "mlp":
        return Mlp if layer in (None, _TimmMlp) else layer
    return Attention if layer in (None, "attn", _TimmAttention) else layer


@register_notrace_module
class Block(FusedModule):
    """Pre-norm transformer block (timm.models.vision_transformer.Block), fused where it can be."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, proj_bias=True, proj_drop=0.,
                 attn_drop=0., init_values=None, drop_path=0., act_layer=nn.GELU,
                 norm_layer=LayerNorm, mlp_layer=Mlp, attn_layer=Attention, depth=0, device=None,
                 dtype=None, *, qk_scale=None, drop=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if drop is not None:  # pre-1.0 name of proj_drop
            proj_drop = drop
        mlp_layer, attn_layer = _own_layer(mlp_layer, "mlp"), _own_layer(attn_layer, "attn")
        attn_kwargs = dict(num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                           scale_norm=scale_attn_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                           proj_drop=proj_drop, norm_layer=norm_layer, **dd)
        self.norm1 = norm_layer(dim, **dd)
        if attn_layer is Attention:
            self.attn = Attention(dim, qk_scale=qk_scale, **attn_kwargs)
        else:
            from timm.models.vision_transformer import _create_attn
            self.attn = _create_attn(attn_layer, dim, depth=depth, **attn_kwargs)
            if qk_scale is not None and hasattr(self.attn, "scale"):
                self.attn.scale = qk_scale
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio),
                             act_layer=act_layer, norm_layer=norm_layer if scale_mlp_norm else None,
                             bias=proj_bias, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    # --- the fusion decision (vit_fast/fusion.py caches it per configuration) --------------------

    # qkv is read, not called; a gate would need LN1's output, which the fused path never has.
    bypassed_paths = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2",
                      "attn.qkv", "attn.gate") + tuple(f"mlp.{p}" for p in Mlp.bypassed_paths)

    def _class_reasons(self):
        """Reasons in the kinds of layers (convert leaves such a Block as it is)."""
        norm1 = self.norm1
        dim = norm1.normalized_shape[0] if isinstance(norm1, nn.LayerNorm) else None
        if not (_plain_layer_norm(norm1, dim) and _plain_layer_norm(self.norm2, dim)):
            return ["norm_layer is not a plain LayerNorm"]
        if not forward_is(self.attn, Attention.forward):
            return [f"attn_layer {type(self.attn).__name__} is not vit_fast's Attention"]
        if not forward_is(self.mlp, Mlp.forward):
            return [f"mlp_layer {type(self.mlp).__name__} is not vit_fast's Mlp"]
        reasons = [f"mlp.{r}" for r in self.mlp._class_reasons()]
        if getattr(self.attn, "gate", None) is not None:
            reasons.append("attn.gate is set: the gate reads LN1's output, which the fused path "
                           "does not keep")
        for name in ("ls1", "ls2"):
            if not forward_is(getattr(self, name), *_LAYER_SCALE_FORWARDS):
                reasons.append(f"{name} is {type(getattr(self, name)).__name__}, not a LayerScale")
        return reasons

    def _structure_reasons(self):
        reasons = self._class_reasons()
        if reasons:
            return reasons
        qkv = self.attn.qkv
        if not forward_is(qkv, nn.Linear.forward):
            reasons.append(f"attn.qkv is {type(qkv).__name__} with its own forward (an adapter?)")
        reasons += [f"mlp.{r}" for r in self.mlp._structure_reasons()]  # its kinds passed above
        for name in ("drop_path1", "drop_path2"):
            m = getattr(self, name)
            if not forward_is(m, *_DROP_PATH_FORWARDS):
                reasons.append(f"{name} is {type(m).__name__}, not timm's DropPath")
        return reasons

    def fusable(self):
        """(True, '') when this Block's kinds of layers allow the fused path (hooks and adapters
        attached later may still make a call take the plain path), else (False, reason)."""
        reasons = self._class_reasons()
        return (not reasons, "; ".join(reasons))

    def why_not_fused(self):
        """Why forward runs the plain submodules now; [] when it takes the fused path."""
        reasons = self.fusion_reasons()
        if not reasons:
            reasons = [f"mlp.{r}" for r in self.mlp.call_reasons()]
        return reasons

    # --- forward --------------------------------------------------------------------------------

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if torch.jit.is_scripting():
            return self.forward_plain(x, attn_mask, is_causal)
        if attn_mask is None and not is_causal:
            plan = block_plan.lookup(self, x)
            if plan is not None:
                return plan(self, x, None)
        return self._forward_general(x, attn_mask, is_causal)

    def _forward_general(self, x, attn_mask, is_causal, segment_ids=None):
        """The fused path deciding as it goes, or the plain path (what the plan does not take)."""
        if _tracing(x) or self.why_not_fused():
            if segment_ids is not None:
                attn_mask = segment_attention_mask(segment_ids)
            return self.forward_plain(x, attn_mask, is_causal)
        block_plan.forget(self)  # fusable again (a hook removed): the next call makes a plan
        return self._forward_fused(x, attn_mask, is_causal, segment_ids)

    def forward_segments(self, x, segment_ids):
        """forward for a packed batch: segment_ids int [B, N], -1 = padding (vit_fast/segments.py).
        The fused path hands them to the attention op and never builds an N×N mask; the plain
        path runs timm's math with the equivalent dense mask."""
        plan = block_plan.lookup(self, x)
        if plan is not None:
            return plan(self, x, segment_ids)
        return self._forward_general(x, None, False, segment_ids)

    def forward_plain(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """timm's Block.forward: every submodule called (scriptable, traceable)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask,
                                                   is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _rebuilds_ln_outputs(self, x):
        """Whether this call runs the Block ops as kernels, whose backward rebuilds the LayerNorm
        outputs instead of saving them (docs/design.md, training memory)."""
        a, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        if x.dim() != 3 or x.shape[-1] != n1.normalized_shape[0]:
            return False  # the functional ops raise the ValueError that names the mismatch
        ln = [x, n1.weight, n1.bias, n2.weight, n2.bias, a.qkv.weight, a.qkv.bias,
              _layer_scale_gamma(self.ls1), _layer_scale_gamma(self.ls2)]
        mm = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
        return not fused_block_ops.kernel_reasons(x, ln, mm)

    def _forward_fused(self, x, attn_mask, is_causal, segment_ids=None):
        a, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        kernels = self._rebuilds_ln_outputs(x)
        amp = fused_block_ops.functional._autocast_dtype(x.device) if kernels else None
        qkv_w, qkv_b, fc1_w, fc1_b, fc2_w, fc2_b = (
            t if amp is None else fused_block_ops.amp_weight(t, amp)
            for t in (a.qkv.weight, a.qkv.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                      mlp.fc2.bias))
        qkv = fused_block_ops.layer_norm_linear(x, n1.weight, n1.bias, n1.eps, qkv_w, qkv_b,
                                                kernels=kernels)
        p = a.proj_drop(a.proj(a.norm(a.attend(qkv, attn_mask, is_causal, segment_ids))))
        # Drop-path masks drawn in timm's order: after the attention branch's dropouts.
        ss1 = drop_path_scale(self.drop_path1, x)
        ss2 = drop_path_scale(self.drop_path2, x)
        return fused_block_ops.residual_layer_norm_mlp(
            p, x, _layer_scale_gamma(self.ls1), ss1, n2.weight, n2.bias, n2.eps, fc1_w, fc1_b,
            fc2_w, fc2_b, _gelu_approximate(mlp.act),
            _layer_scale_gamma(self.ls2), ss2, kernels=kernels)
