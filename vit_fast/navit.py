"""lucidrains' vit-pytorch NaViT on the fused ops: packed images kept apart by segment ids.

NaViT packs images of different resolutions into one sequence per batch row and keeps them apart
with a [B, 1, N, N] block-diagonal mask (same image id, key not padding). Converted, the same
packing gives per-token segment ids instead -- the image's index in its row, -1 for padding -- and
every self-attention layer runs as

    h  = LayerNorm(x)                                  residual_layer_norm (NaViT's bias-free LN)
    qkv = h · [W_q; W_kv]ᵀ                             one GEMM over the concatenated weights
    qkv = RMSNorm(q), RMSNorm(k), v                    qk_norm(kind="rms"), gamma [H, D]
    o  = attention(qkv, segment_ids), scale 1          fused_qkv_attention: no N×N mask or scores
    x  = x + to_out(o);  x = x + FF(x)                 residual_layer_norm + gelu_mlp

The parameters are the original Parameter objects, read at call time (no copies, no
parametrizations), so state_dict keys and values, optimizer state and checkpoints are unchanged.
The attention pooling at the end (num_images queries over the N tokens: a [B, 1, Q, N] mask and
Q×N scores) stays vit-pytorch's eager Attention; it is small next to the N×N self-attention.

Padding tokens carry segment id -1: their attention output is 0 where vit-pytorch's is an average
over image 0's tokens; neither ever reaches a real token (keys are masked, the MLP is per token,
the pool masks them), so the logits and every parameter gradient are the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from vit_pytorch import na_vit

from . import functional
from .fusion import _global_hooks as global_hooks
from .fusion import notice_reason
from .segments import segment_attention_mask

__all__ = ["PackedImages", "pack_images", "FusedNaViTTransformer", "FusedNaViT"]

_LN_EPS = 1e-5  # F.layer_norm's default, which vit-pytorch's bias-free LayerNorm uses
# qk_norm's rms is x·rsqrt(mean(x²) + eps); NaViT's F.normalize(x)·sqrt(D) is that with eps 0
# (for ‖x‖ > 1e-12). A tiny eps keeps an all-zero q or k finite, as F.normalize does.
_RMS_EPS = 1e-24


@dataclass
class PackedImages:
    """One packed batch: patches [B, N, C·p·p], positions [B, N, 2] (row, col of each patch),
    segment_ids [B, N] (index of the image in its row, -1 for padding), num_images (B ints)."""
    patches: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor
    num_images: list


def _patchify(image, p):
    """[C, H, W] -> [(H/p)·(W/p), C·p·p], patches in row-major order, each flattened (c, p1, p2)."""
    c, h, w = image.shape
    return image.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c * p * p)


def pack_images(batched_images, patch_size, channels, *, token_dropout=None):
    """NaViT's packing: each inner list of [C, H, W] images becomes one row of patches.

    token_dropout: NaViT's calc_token_dropout(height, width) -> fraction, applied (as NaViT draws
    it, one torch.randn per image, in order) only when given.
    """
    if not batched_images:
        raise ValueError("NaViT: batched_images is empty")
    if torch.is_tensor(batched_images[0]):
        batched_images = [batched_images]
    rows_patches, rows_positions, rows_ids, num_images = [], [], [], []
    for row, images in enumerate(batched_images):
        patches, positions = [], []
        for i, image in enumerate(images):
            if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] != channels:
                raise ValueError(f"NaViT: batched_images[{row}][{i}] must be a [{channels}, H, W] "
                                 f"tensor, got {getattr(image, 'shape', type(image).__name__)}")
            h, w = image.shape[-2:]
            if h % patch_size or w % patch_size:
                raise ValueError(f"NaViT: batched_images[{row}][{i}] is {h}x{w}, not divisible by "
                                 f"the patch size {patch_size}")
            patches.append(_patchify(image, patch_size))
            positions.append(na_vit.posemb_grid(h // patch_size, w // patch_size, image.device))
        if token_dropout is not None:
            for i, image in enumerate(images):
                n = patches[i].shape[0]
                keep = max(1, int(n * (1 - token_dropout(*image.shape[-2:]))))
                kept = torch.randn((n,), device=image.device).topk(keep, dim=-1).indices
                patches[i], positions[i] = patches[i][kept], positions[i][kept]
        # Built from the known lengths (no data-dependent op), so fake tensors can trace it too.
        rows_ids.append(torch.cat([torch.full((t.shape[0],), i, device=t.device)
                                   for i, t in enumerate(patches)]))
        rows_patches.append(torch.cat(patches))
        rows_positions.append(torch.cat(positions))
        num_images.append(len(images))
    return PackedImages(
        patches=pad_sequence(rows_patches, batch_first=True),
        positions=pad_sequence(rows_positions, batch_first=True),
        segment_ids=pad_sequence(rows_ids, batch_first=True, padding_value=-1),
        num_images=num_images)


def _layer_norm(x, norm, residual=None):
    """NaViT's LayerNorm (gamma, a zero beta buffer) through residual_layer_norm: (y, sum)."""
    return functional.residual_layer_norm(x, norm.gamma, norm.beta, _LN_EPS, residual=residual)


def _attention_why_not(i, attn):
    if type(attn) is not na_vit.Attention:
        return f"layer {i}: {type(attn).__name__} is not vit-pytorch NaViT's Attention"
    h, d = attn.heads, attn.q_norm.gamma.shape[-1]
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name)
        if type(norm) is not na_vit.RMSNorm or tuple(norm.gamma.shape) != (h, 1, d):
            return f"layer {i}: attn.{name} is not NaViT's RMSNorm(heads, dim_head)"
    if type(attn.norm) is not na_vit.LayerNorm:
        return f"layer {i}: attn.norm is not NaViT's LayerNorm"
    if (type(attn.to_q) is not nn.Linear or type(attn.to_kv) is not nn.Linear
            or attn.to_q.bias is not None or attn.to_kv.bias is not None
            or attn.to_kv.out_features != 2 * attn.to_q.out_features
            or attn.to_q.out_features != h * d):
        return f"layer {i}: to_q / to_kv are not bias-free [dim -> heads·dim_head (·2)] Linears"
    return ""


def _feed_forward_why_not(i, ff):
    kinds = [type(m) for m in ff] if isinstance(ff, nn.Sequential) else None
    if kinds != [na_vit.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout]:
        return f"layer {i}: FeedForward is not LayerNorm, Linear, GELU, Dropout, Linear, Dropout"
    return ""


def navit_transformer_why_not(transformer):
    """Why this NaViT Transformer cannot be converted ('' when it can)."""
    if type(transformer.norm) is not na_vit.LayerNorm:
        return "its final norm is not NaViT's LayerNorm"
    for i, layer in enumerate(transformer.layers):
        if len(layer) != 2:
            return f"layer {i} is not an [Attention, FeedForward] pair"
        why = _attention_why_not(i, layer[0]) or _feed_forward_why_not(i, layer[1])
        if why:
            return why
    return ""


class FusedNaViTTransformer(na_vit.Transformer):
    """NaViT's Transformer whose forward also takes ``segment_ids`` [B, N] (image index, -1 for
    padding) and then runs the fused ops; with ``mask``/``attn_mask`` it is vit-pytorch's forward.
    """

    vit_fast_reports = True  # convert.why_not_fused asks it

    def why_not_fused(self):
        """Why a segment_ids call runs the eager layers now: a layer swapped since convert (an
        adapter), or something attached that would notice the fused path skip it (hooks, a
        forward set on the instance, global module hooks); [] if nothing."""
        why = navit_transformer_why_not(self)
        reasons = [why] if why else []
        reasons += [notice_reason(name, m) for name, m in self.named_modules() if m is not self]
        if global_hooks():
            reasons.append("global module hooks are registered")
        return [r for r in reasons if r]

    def forward(self, x, mask=None, attn_mask=None, *, segment_ids=None):
        if segment_ids is None:
            return super().forward(x, mask=mask, attn_mask=attn_mask)
        if mask is not None or attn_mask is not None:
            raise ValueError("FusedNaViTTransformer: pass segment_ids or mask/attn_mask, not both")
        if self.why_not_fused():
            return super().forward(x, attn_mask=segment_attention_mask(segment_ids))
        for attn, ff in self.layers:
            h = _layer_norm(x, attn.norm)[0]
            # x + attention branch, and the FeedForward's LayerNorm of that sum, in one op.
            h, x = _layer_norm(self._attention(attn, h, segment_ids), ff[0], residual=x)
            x = self._feed_forward(ff, h, x)
        return _layer_norm(x, self.norm)[0]

    @staticmethod
    def _attention(attn, h, segment_ids):
        """to_out(attention) of NaViT's Attention for the normalized input h [B, N, dim]."""
        heads = attn.heads
        dim_head = attn.q_norm.gamma.shape[-1]
        # One GEMM: [W_q; W_kv] gives q, k, v laid out (3, H, D) as the fused ops read them.
        qkv = F.linear(h, torch.cat((attn.to_q.weight, attn.to_kv.weight)))
        qkv = functional.qk_norm(qkv, heads, attn.q_norm.gamma.reshape(heads, dim_head),
                                 attn.k_norm.gamma.reshape(heads, dim_head), kind="rms",
                                 eps=_RMS_EPS)
        # RMSNorm multiplies by sqrt(dim_head), so NaViT's SDPA runs with scale 1.
        p = attn.dropout_p if attn.training else 0.0
        o = functional.fused_qkv_attention(qkv, heads, scale=1.0, dropout_p=p,
                                           segment_ids=segment_ids)
        return attn.to_out(o)

    @staticmethod
    def _feed_forward(ff, h, residual):
        """residual + FeedForward without its LayerNorm (h is already normalized)."""
        if ff.training and (ff[3].p > 0 or ff[5].p > 0):
            return residual + ff[1:](h)  # active dropout: the eager layers, with their RNG draws
        return functional.gelu_mlp(h, ff[1].weight, ff[1].bias, ff[4].weight, ff[4].bias,
                                   approximate=ff[2].approximate, residual=residual)


class FusedNaViT(na_vit.NaViT):
    """vit-pytorch's NaViT packed with segment ids instead of a [B, 1, N, N] mask (``transformer``
    is a FusedNaViTTransformer). Same arguments, same logits, same parameters."""

    vit_fast_fused = ("packed qkv GEMM, fused RMS q/k norm, segment attention "
                      "(no N×N mask), residual LayerNorm and GELU MLP ops")

    def forward(self, batched_images, group_images=False, group_max_seq_len=2048):
        dropout = self.calc_token_dropout if self.training else None
        if group_images:
            batched_images = na_vit.group_images_by_max_seq_len(
                batched_images, patch_size=self.patch_size, calc_token_dropout=dropout,
                max_seq_len=group_max_seq_len)
        packed = pack_images(batched_images, self.patch_size, self.channels, token_dropout=dropout)
        ids = packed.segment_ids
        x = self.to_patch_embedding(packed.patches)
        rows, cols = packed.positions.unbind(dim=-1)
        x = self.dropout(x + self.pos_embed_height[rows] + self.pos_embed_width[cols])
        x = self.transformer(x, segment_ids=ids)
        # Attention pooling, eager: query q of row b reads the tokens of image q of that row.
        B, queries = x.shape[0], max(packed.num_images)
        image = torch.arange(queries, device=x.device)
        pool_mask = (image[:, None] == ids[:, None, :])[:, None]           # [B, 1, Q, N]
        q = self.attn_pool_queries.expand(B, queries, -1)
        x = self.attn_pool(q, context=x, attn_mask=pool_mask) + q
        # The rows of real images, in order (an index list: no data-dependent boolean mask).
        rows = [b * queries + i for b, n in enumerate(packed.num_images) for i in range(n)]
        x = x.reshape(B * queries, -1)[torch.tensor(rows, device=x.device)]
        return self.mlp_head(self.to_latent(x))


# Lookups by class name (FSDP's transformer_layer_cls_to_wrap, accelerate's no-split lists) and
# print(model) see vit-pytorch's names; __qualname__ keeps ours, so pickle finds these classes.
FusedNaViTTransformer.__name__ = na_vit.Transformer.__name__
FusedNaViT.__name__ = na_vit.NaViT.__name__
