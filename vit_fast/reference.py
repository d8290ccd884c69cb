"""Eager PyTorch reference of every vit_fast op.

This is the ground truth for tests and benchmarks, and the path taken on CPU and for options the
kernels do not support. Each function follows the contract in docs/design.md exactly and is written
with plain PyTorch ops so autograd differentiates it.

``upcast=True`` computes in float64 and casts the results back to the input dtype, which is what
the tolerance rule needs as "ref64" (FlashAttention's tests use the same trick).
Inputs are assumed valid: ``vit_fast.functional`` checks them before any backend runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_qkv_attention", "biased_qkv_attention", "qk_norm", "rotary_qk",
           "residual_layer_norm", "gelu_mlp", "glu_mlp", "patch_embed", "add_branch",
           "result_dtype"]


def _up(t, upcast):
    return t.double() if (upcast and t is not None and t.is_floating_point()) else t


def result_dtype(*tensors):
    """The dtype torch's elementwise ops give these tensors (None skipped): a float64 residual
    added to a float32 branch is float64, as ``residual + branch`` is in eager code."""
    dtypes = [t.dtype for t in tensors if t is not None]
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


def add_branch(residual, branch, layer_scale=None, sample_scale=None):
    """residual + branch·layer_scale·sample_scale[b]: a residual block's add with LayerScale and
    drop-path (sample_scale = per-sample keep mask / keep probability, b = first dim)."""
    if layer_scale is not None:
        branch = branch * layer_scale
    if sample_scale is not None:
        branch = branch * sample_scale.reshape((-1,) + (1,) * (branch.dim() - 1))
    return residual + branch


def fused_qkv_attention(qkv, num_heads, *, scale=None, dropout_p=0.0, segment_ids=None,
                        upcast=False, dropout_keep=None):
    """softmax(q kᵀ·scale) v per head, from timm's packed qkv [B, N, 3·H·D] -> [B, N, H·D].

    Without dropout this is F.scaled_dot_product_attention, what timm's Attention runs, so the CPU
    path keeps its speed and memory. With dropout the probabilities are materialized and dropped
    as timm's non-fused path does (SDPA's CPU dropout draws its mask differently).

    segment_ids (int [B, N], optional): query i attends to key j iff both carry the same id and
    it is >= 0, which is each image of a packed batch attended on its own; tokens with a negative
    id are padding, with output rows exactly 0 (and so exactly 0 gradient).

    dropout_keep (bool [B, H, N, N], optional): the keep mask to drop with instead of a fresh
    F.dropout one (the kernels' own mask, vit_fast/dropout_mask.py, for the backward fallback).
    """
    dtype = qkv.dtype
    qkv = _up(qkv, upcast)
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None
    if segment_ids is not None:
        # [B, 1, N, N] "same id". A padding query then attends to the padding keys of its own id,
        # itself at least, so no row is empty: no NaN in the softmax or its gradient, and the
        # rows are zeroed below, which keeps the gradient reaching padding tokens exactly 0.
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if dropout_p > 0.0:
        logits = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        if dropout_keep is None:
            out = F.dropout(probs, p=dropout_p) @ v
        else:
            out = (probs * dropout_keep / (1.0 - dropout_p)) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if segment_ids is not None:
        out = torch.where((segment_ids >= 0)[:, None, :, None], out, out.new_zeros(()))
    return out.transpose(1, 2).reshape(B, N, num_heads * head_dim).to(dtype)


def biased_qkv_attention(qkv, num_heads, bias, *, scale=None, dropout_p=0.0, segment_ids=None,
                         upcast=False, dropout_keep=None):
    """fused_qkv_attention with an additive bias on the scaled logits, as timm's BEiT adds its
    relative position bias: softmax(q kᵀ·scale + bias) v per head.

    bias: [H, N, N] (shared by the batch) or [1 or B, H, N, N]; added in the logits' dtype
    (qkv's, float64 with upcast). segment_ids, dropout_p and dropout_keep as in
    fused_qkv_attention (padding rows of segment_ids come out 0).
    """
    dtype = qkv.dtype
    qkv, bias = _up(qkv, upcast), _up(bias, upcast)
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * scale) @ k.transpose(-2, -1) + bias.to(q.dtype)
    if segment_ids is not None:  # as fused_qkv_attention: no row is empty, padding rows zeroed
        same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        logits = logits.masked_fill(~same, float("-inf"))
    probs = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = (F.dropout(probs, p=dropout_p) if dropout_keep is None
                 else probs * dropout_keep / (1.0 - dropout_p))
    out = probs @ v
    if segment_ids is not None:
        out = torch.where((segment_ids >= 0)[:, None, :, None], out, out.new_zeros(()))
    return out.transpose(1, 2).reshape(B, N, num_heads * head_dim).to(dtype)


def rotary_qk(qkv, num_heads, sin, cos, *, num_prefix_tokens=0, half=False, upcast=False):
    """timm's packed qkv [B, N, 3·H·D] with rotary position embeddings applied to q and k as
    timm's EvaAttention / AttentionRope apply them (apply_rot_embed_cat), v as it was.

    Tokens n >= num_prefix_tokens are rotated with sin/cos row n - num_prefix_tokens; the prefix
    (class, register) tokens pass through. sin, cos: [..., N - num_prefix_tokens, D],
    broadcasting against [B, H, N - num_prefix_tokens, D] (timm's shapes: [N', D] axial,
    [H, N', D] mixed, [B, 1, N', D] NaFlexViT). half=False: the interleaved layout,
    rot(x) = [-x1, x0, -x3, x2, ...]; half=True: the half-split one, rot(x) = [-x_hi, x_lo].
    y = x·cos + rot(x)·sin in at least float32 (float64 with upcast), cast to qkv's dtype.
    """
    dtype = qkv.dtype
    math_dtype = torch.float64 if upcast else torch.promote_types(dtype, torch.float32)
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    x = qkv.to(math_dtype).reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    sin, cos = sin.to(math_dtype), cos.to(math_dtype)
    npt = num_prefix_tokens

    def rotate(t):  # t: [B, H, N', D]
        if half:
            lo, hi = t.chunk(2, dim=-1)
            turned = torch.cat([-hi, lo], dim=-1)
        else:
            turned = torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
        return t * cos + turned * sin

    q, k = (torch.cat([t[:, :, :npt], rotate(t[:, :, npt:])], dim=2) for t in (x[0], x[1]))
    out = torch.stack([q, k, x[2]]).permute(1, 3, 0, 2, 4).reshape(B, N, three_c)
    return out.to(dtype)


def qk_norm(qkv, num_heads, q_weight, k_weight, q_bias=None, k_bias=None, *, kind="layer",
            eps=1e-6, upcast=False):
    """timm's packed qkv [B, N, 3·H·D] with q and k normalized over head_dim, v as it was.

    kind "layer": (x - mean)·rsqrt(var + eps) (nn.LayerNorm); "rms": x·rsqrt(mean(x²) + eps)
    (timm's RmsNorm). Then ·weight + bias per slot; weights/biases are [D] (shared by the heads)
    or [H, D] (per head), or None. Statistics in at least float32; the result has qkv's dtype.
    """
    dtype = qkv.dtype
    stat = torch.float64 if upcast else torch.promote_types(dtype, torch.float32)
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    x = qkv.to(stat).reshape(B, N, 3, num_heads, head_dim)
    slots = []
    for i, (weight, bias) in enumerate(((q_weight, q_bias), (k_weight, k_bias))):
        weight, bias = (p.to(stat) if p is not None else None for p in (weight, bias))
        # torch's own norm ops (what timm's q_norm runs) take a shared [D] affine; a per-head
        # [H, D] one, or a bias after a per-head weight, is applied after them.
        w_in = weight if weight is None or weight.dim() == 1 else None
        b_in = bias if kind == "layer" and w_in is weight and (bias is None or bias.dim() == 1) \
            else None
        if kind == "layer":
            t = F.layer_norm(x[:, :, i], (head_dim,), w_in, b_in, eps)
        else:
            t = F.rms_norm(x[:, :, i], (head_dim,), w_in, eps)
        if weight is not None and w_in is None:
            t = t * weight
        if bias is not None and b_in is None:
            t = t + bias
        slots.append(t)
    return torch.stack(slots + [x[:, :, 2]], dim=2).reshape(B, N, three_c).to(dtype)


def residual_layer_norm(x, weight, bias, eps, *, residual=None, layer_scale=None,
                        sample_scale=None, upcast=False):
    """(y, s): s = x, or residual + x·layer_scale·sample_scale[b]; y = LayerNorm(s)·weight + bias.

    Statistics are computed in at least float32, as nn.LayerNorm does for half inputs. y and s
    have the dtype torch gives s (x's, promoted with residual and the scales when given).
    """
    dtype = x.dtype if residual is None else result_dtype(x, residual, layer_scale, sample_scale)
    x, weight, bias = _up(x, upcast), _up(weight, upcast), _up(bias, upcast)
    residual, layer_scale, sample_scale = (_up(t, upcast) for t in (residual, layer_scale, sample_scale))
    s = x if residual is None else add_branch(residual, x, layer_scale, sample_scale)
    if all(t is None or t.dtype == s.dtype for t in (weight, bias)):
        # nn.LayerNorm's own call: fp32 statistics inside for half inputs, one fused op.
        y = F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    else:  # mixed dtypes: normalize in the wider float, then the affine in promoted types
        stat_dtype = torch.promote_types(s.dtype, torch.float32)
        y = F.layer_norm(s.to(stat_dtype), s.shape[-1:], None, None, eps)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
    return y.to(dtype), s.to(dtype)


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, approximate="none", residual=None,
             layer_scale=None, sample_scale=None, upcast=False):
    """fc2(gelu(fc1(x))), then residual + that·layer_scale·sample_scale[b] when residual is given
    (in the dtype torch promotes that sum to)."""
    dtype = x.dtype if residual is None else result_dtype(x, residual, layer_scale, sample_scale)
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
        _up(t, upcast) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    residual, layer_scale, sample_scale = (_up(t, upcast) for t in (residual, layer_scale, sample_scale))
    out = F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias), approximate=approximate),
                   fc2_weight, fc2_bias)
    if residual is not None:
        out = add_branch(residual, out, layer_scale, sample_scale)
    return out.to(dtype)


def glu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, gate_last=False, norm_weight=None,
            norm_bias=None, norm_eps=None, residual=None, layer_scale=None, sample_scale=None,
            upcast=False):
    """fc2(norm(silu(gate)·value)), timm's GluMlp with act_layer=nn.SiLU and its SwiGLU; then
    residual + that·layer_scale·sample_scale[b] when residual is given (in the dtype torch
    promotes that sum to).

    fc1_weight: packed [2H, C] (GluMlp: fc1's output chunked into x1 | x2; the gate is x2 with
    gate_last, else x1) or a (gate, value) pair of [H, C] weights (SwiGLU's fc1_g, fc1_x);
    fc1_bias in the same form, or None. norm_eps not None: a LayerNorm over the H hidden units
    (norm_weight, norm_bias [H] or None) between the gating and fc2 (EVA02's scale_mlp). Under
    AMP its parameters are fp32 and x half: it normalizes in fp32 and fc2 reads its output in
    x's dtype, as autocast runs it.
    """
    dtype = x.dtype if residual is None else result_dtype(x, residual, layer_scale, sample_scale)
    x, fc2_weight, fc2_bias, residual, layer_scale, sample_scale = (
        _up(t, upcast) for t in (x, fc2_weight, fc2_bias, residual, layer_scale, sample_scale))
    if isinstance(fc1_weight, (tuple, list)):
        biases = fc1_bias if fc1_bias is not None else (None, None)
        gate, value = (F.linear(x, _up(w, upcast), _up(b, upcast))
                       for w, b in zip(fc1_weight, biases))
    else:
        x1, x2 = F.linear(x, _up(fc1_weight, upcast), _up(fc1_bias, upcast)).chunk(2, dim=-1)
        gate, value = (x2, x1) if gate_last else (x1, x2)
    hidden = F.silu(gate) * value
    if norm_eps is not None:
        hidden, _ = residual_layer_norm(hidden, _up(norm_weight, upcast), _up(norm_bias, upcast),
                                        norm_eps)
    out = F.linear(hidden, fc2_weight, fc2_bias)
    if residual is not None:
        out = add_branch(residual, out, layer_scale, sample_scale)
    return out.to(dtype)


def patch_embed(images, weight, bias, *, patch_size, pos_embed=None, mean=None, std=None,
                upcast=False):
    """Non-overlapping patch projection, [B, C, H, W] (or uint8 [B, H, W, C]) -> [B, Np, D].

    uint8 images are normalized as (images/255 - mean)/std per channel first, in weight's dtype.
    """
    ph, pw = patch_size
    if images.dtype == torch.uint8:
        # Decoded images arrive NHWC; normalize in fp32 before any cast, like torchvision's
        # ToTensor + Normalize would.
        imgs = images.permute(0, 3, 1, 2).float().div(255.0)
        m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
        sd = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(1, -1, 1, 1)
        images = ((imgs - m) / sd).to(weight.dtype)
    dtype = result_dtype(images, pos_embed)
    images, weight, bias, pos_embed = (_up(t, upcast) for t in (images, weight, bias, pos_embed))
    out = F.conv2d(images, weight, bias, stride=(ph, pw)).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        out = out + pos_embed
    return out.to(dtype)
