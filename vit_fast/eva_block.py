"""vit_fast.EvaBlock: timm's EvaBlock (EVA02, DINOv3, RoPE-ViT, PE-core) with one fused path, and
its converter (registered with vit_fast/timm_blocks.py).

    h   = LN1(x);  qkv = h Wᵀ + b          (fused qkv, or q/k/v projections concatenated)
    qkv = rotary_qk(qkv, sin, cos)         (q, k of the non-prefix tokens rotated; timm's rope)
    s   = x + drop_path(proj'(norm(attention(qkv))))  proj' = proj with gamma_1 folded in;
                                                    residual_layer_norm gives LN2(s)
    out = s + drop_path(gamma_2·MLP(LN2(s)))                  gelu_mlp / glu_mlp with the residual

``rope`` is what timm's Eva passes each block: cat([sin, cos], -1) of shape [N', 2D] (axial),
[H, N', 2D] (mixed: from learnable frequencies, which get their gradient through it) or
[B, 1, N', 2D] (NaFlexViT). The module keeps timm's submodules and parameters as they are
(state_dict keys unchanged); the fused path reads them and runs only when nothing attached could
notice the skipped calls (vit_fast/fusion.py), else timm's EvaBlock.forward runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import AttentionRope as _TimmAttentionRope
from timm.models.eva import EvaAttention as _TimmEvaAttention
from timm.models.eva import EvaBlock as _TimmEvaBlock

from . import functional, timm_blocks, timm_branches
from .adopt import adopt
from .block_plan import drop_path_scale
from .fusion import FusedModule, forward_is
from .layers import _qk_norm_kind, _tracing
from .naflexvit import SegmentIds
from .segments import segment_attention_mask

__all__ = ["EvaBlock", "convert_eva_block"]

_ATTENTIONS = (_TimmEvaAttention, _TimmAttentionRope)
_QKV_PATHS = ("attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj")


class EvaBlock(FusedModule):
    """timm's EvaBlock, fused where it can be. Built by :func:`convert_eva_block` around a timm
    block (its submodules and parameters taken over, not copied)."""

    bypassed_paths = ("norm1", "attn", *_QKV_PATHS, "attn.q_norm", "attn.k_norm",
                      "attn.attn_drop", "attn.gate", "attn.proj", "drop_path1", "norm2", "mlp",
                      *timm_branches.MLP_PATHS, "drop_path2")

    def _class_reasons(self):
        """What the fused path does not compute, from the layers' kinds (convert leaves such a
        block as timm's, with these words)."""
        attn, dim = self.attn, self.norm1.normalized_shape[0] if isinstance(
            self.norm1, nn.LayerNorm) else None
        reasons = timm_branches.norm_reasons(self, dim)
        if type(attn) not in _ATTENTIONS:
            return reasons + [f"its attention is {type(attn).__name__}, not timm's EvaAttention "
                              "or AttentionRope"]
        if getattr(attn, "gate", None) is not None:
            reasons.append("a gated attention output (attn.gate reads LN1's output)")
        if getattr(attn, "num_kv_heads", attn.num_heads) != attn.num_heads:
            reasons.append("grouped-query attention (fewer k/v heads than q heads)")
        if _qk_norm(attn) is None:
            reasons.append(f"attn.q_norm / k_norm are {type(attn.q_norm).__name__} / "
                           f"{type(attn.k_norm).__name__}: the fused qk_norm takes a LayerNorm or "
                           "RmsNorm over head_dim, the same kind for both")
        if attn.head_dim % 2:
            reasons.append(f"head_dim {attn.head_dim} is odd (rotary pairs need an even one)")
        return reasons + timm_branches.mlp_reasons(self.mlp)

    def _structure_reasons(self):
        reasons = self._class_reasons()
        if reasons:
            return reasons
        return (timm_branches.structure_reasons(self)
                + timm_branches.linear_reasons(self, (*_QKV_PATHS, "attn.proj")))

    def fusable(self):
        """(True, '') when the kinds of layers allow the fused path, else (False, why)."""
        reasons = self._class_reasons()
        return (not reasons, "; ".join(reasons))

    def why_not_fused(self):
        """Why forward runs timm's submodules now; [] when it takes the fused path."""
        return self.fusion_reasons() or timm_branches.mlp_call_reasons(self.mlp)

    # A converted NaFlexVit hands this block segment ids (vit_fast/naflexvit.py's SegmentIds)
    # where timm passes its padding mask.
    vit_fast_segments = True

    def forward(self, x, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        segment_ids = None
        if isinstance(attn_mask, SegmentIds):
            segment_ids, attn_mask = attn_mask.ids, None
        if (torch.jit.is_scripting() or attn_mask is not None or is_causal or _tracing(x)
                or self.why_not_fused()):
            if segment_ids is not None:  # timm's math on the equivalent dense mask
                attn_mask = segment_attention_mask(segment_ids)
            return self.forward_plain(x, rope, attn_mask, is_causal)
        return self._forward_fused(x, rope, segment_ids)

    def forward_plain(self, x, rope: Optional[torch.Tensor] = None,
                      attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        """timm's EvaBlock.forward: every submodule called."""
        return _TimmEvaBlock.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)

    def _forward_fused(self, x, rope, segment_ids=None):
        attn, n1, n2 = self.attn, self.norm1, self.norm2
        h = functional.residual_layer_norm(x, n1.weight, n1.bias, n1.eps)[0]
        qkv = timm_branches.packed_qkv(attn, h)
        norm = _qk_norm(attn)
        if norm:  # timm's order: q/k norm, then the rotary embedding
            kind, eps = norm
            qn, kn = attn.q_norm, attn.k_norm
            qkv = functional.qk_norm(qkv, attn.num_heads, qn.weight, kn.weight,
                                     getattr(qn, "bias", None), getattr(kn, "bias", None),
                                     kind=kind, eps=eps)
        if rope is not None:
            sin, cos = rope.tensor_split(2, -1)
            qkv = functional.rotary_qk(qkv, attn.num_heads, sin, cos,
                                       num_prefix_tokens=int(attn.num_prefix_tokens),
                                       half=bool(getattr(attn, "rotate_half", False)))
        # timm's fused path (SDPA) scales by head_dim**-0.5, as the op does by default
        o = functional.fused_qkv_attention(
            qkv, attn.num_heads, dropout_p=attn.attn_drop.p if attn.training else 0.0,
            segment_ids=segment_ids)
        # gamma_1 folded into proj (dropout is per element, so it commutes with the scale)
        p = attn.proj_drop(timm_branches.scaled_projection(attn.proj, attn.norm(o), self.gamma_1))
        ss1 = drop_path_scale(self.drop_path1, x)  # timm's order: after attn
        h2, s = functional.residual_layer_norm(p, n2.weight, n2.bias, n2.eps, residual=x,
                                               sample_scale=ss1)
        ss2 = drop_path_scale(self.drop_path2, x)
        return timm_branches.mlp_branch(self.mlp, h2, s, self.gamma_2, ss2)


def _qk_norm(attn):
    """() without q/k norms, (kind, eps) of functional.qk_norm reproducing them, or None."""
    q, k = attn.q_norm, attn.k_norm
    if forward_is(q, nn.Identity.forward) and forward_is(k, nn.Identity.forward):
        return ()
    kind = _qk_norm_kind(q, attn.head_dim)
    return kind if kind is not None and kind == _qk_norm_kind(k, attn.head_dim) else None


def convert_eva_block(block, model):
    """vit_fast's EvaBlock around timm's ``block``, or why it stays timm's."""
    new = adopt(EvaBlock, block)
    ok, why = new.fusable()
    if ok:
        return new
    return f"timm's EvaBlock: not fused: {why}. It runs as timm's"


timm_blocks.register_block_converter(_TimmEvaBlock, convert_eva_block)
