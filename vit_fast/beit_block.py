"""vit_fast.BeitBlock: BEiT's Block (timm.models.beit.Block) with one fused path, and its converter
(registered with vit_fast/timm_blocks.py).

    h    = LN1(x);  qkv = h Wᵀ + (q_bias | k_bias | v_bias)
    bias = table[relative_position_index] as [H, N, N] (+ the model's shared bias, if passed)
    s    = x + drop_path(gamma_1·proj(softmax(q kᵀ·scale + bias) v))
    out  = s + drop_path(gamma_2·MLP(LN2(s)))

The [H, N, N] bias is gathered from the learned table on every call, inside autograd, so the
table gets its gradient (the attention op returns d bias summed over the batch; no per-batch
N×N tensor is kept). Submodules, parameters and state_dict keys stay timm's; the fused path runs
only when nothing attached could notice the skipped calls, else timm's Block.forward runs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.models.beit import Attention as _TimmBeitAttention
from timm.models.beit import Block as _TimmBeitBlock

from . import functional, timm_blocks, timm_branches
from .adopt import adopt
from .block_plan import drop_path_scale
from .fusion import FusedModule
from .layers import _tracing

__all__ = ["BeitBlock", "convert_beit_block"]


class BeitBlock(FusedModule):
    """BEiT's Block, fused where it can be. Built by :func:`convert_beit_block` around a timm
    block (its submodules and parameters taken over, not copied)."""

    bypassed_paths = ("norm1", "attn", "attn.qkv", "attn.attn_drop", "attn.proj", "drop_path1",
                      "norm2",
                      "mlp", *timm_branches.MLP_PATHS, "drop_path2")

    def _class_reasons(self):
        dim = self.norm1.normalized_shape[0] if isinstance(self.norm1, nn.LayerNorm) else None
        reasons = timm_branches.norm_reasons(self, dim)
        if type(self.attn) is not _TimmBeitAttention:
            reasons.append(f"its attention is {type(self.attn).__name__}, not BEiT's Attention")
        return reasons + timm_branches.mlp_reasons(self.mlp)

    def _structure_reasons(self):
        reasons = self._class_reasons()
        if reasons:
            return reasons
        return (timm_branches.structure_reasons(self)
                + timm_branches.linear_reasons(self, ("attn.qkv", "attn.proj")))

    def fusable(self):
        """(True, '') when the kinds of layers allow the fused path, else (False, why)."""
        reasons = self._class_reasons()
        return (not reasons, "; ".join(reasons))

    def why_not_fused(self):
        """Why forward runs timm's submodules now; [] when it takes the fused path."""
        return self.fusion_reasons() or timm_branches.mlp_call_reasons(self.mlp)

    def forward(self, x, shared_rel_pos_bias: Optional[torch.Tensor] = None):
        if torch.jit.is_scripting() or _tracing(x) or self.why_not_fused():
            return self.forward_plain(x, shared_rel_pos_bias)
        return self._forward_fused(x, shared_rel_pos_bias)

    def forward_plain(self, x, shared_rel_pos_bias: Optional[torch.Tensor] = None):
        """timm's beit Block.forward: every submodule called."""
        return _TimmBeitBlock.forward(self, x, shared_rel_pos_bias=shared_rel_pos_bias)

    def attention_bias(self, shared_rel_pos_bias=None):
        """The additive bias of the scores, [H, N, N] or [1 or B, H, N, N], or None."""
        attn = self.attn
        bias = None
        if attn.relative_position_bias_table is not None:
            bias = attn._get_rel_pos_bias()[0]  # [H, N, N], gathered from the table
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return bias

    def _forward_fused(self, x, shared_rel_pos_bias):
        attn, n1, n2 = self.attn, self.norm1, self.norm2
        h = functional.residual_layer_norm(x, n1.weight, n1.bias, n1.eps)[0]
        qkv = timm_branches.packed_qkv(attn, h)
        bias = self.attention_bias(shared_rel_pos_bias)
        if bias is not None and bias.dim() == 4 and bias.shape[0] == 1:
            bias = bias[0]
        # timm's fused path (SDPA) scales by head_dim**-0.5, as the op does by default
        o = functional.fused_qkv_attention(
            qkv, attn.num_heads, dropout_p=attn.attn_drop.p if attn.training else 0.0,
            bias=bias)
        # gamma_1 folded into proj (dropout is per element, so it commutes with the scale)
        p = attn.proj_drop(timm_branches.scaled_projection(attn.proj, o, self.gamma_1))
        ss1 = drop_path_scale(self.drop_path1, x)
        h2, s = functional.residual_layer_norm(p, n2.weight, n2.bias, n2.eps, residual=x,
                                               sample_scale=ss1)
        ss2 = drop_path_scale(self.drop_path2, x)
        return timm_branches.mlp_branch(self.mlp, h2, s, self.gamma_2, ss2)


def convert_beit_block(block, model):
    """vit_fast's BeitBlock around BEiT's ``block``, or why it stays timm's."""
    new = adopt(BeitBlock, block)
    ok, why = new.fusable()
    if ok:
        return new
    return f"BEiT's Block: not fused: {why}. It runs as timm's"


timm_blocks.register_block_converter(_TimmBeitBlock, convert_beit_block)
