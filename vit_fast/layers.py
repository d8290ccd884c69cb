"""The layers of vit_fast's drop-in modules (timm 1.0.31's constructors, forward signatures and
state_dict keys): LayerNorm, LayerScale, Attention, Mlp, PatchEmbed. vit_fast.Block is built from
them (vit_fast/block.py); vit_fast.modules is the public name of all six.

A module holds parameters and calls the functional ops. It runs its plain submodules instead,
for that call, when the fused op would not reproduce them or would skip something the user
attached (hooks, an adapter, a parametrization: vit_fast/fusion.py); ``why_not_fused()`` says
why. Under TorchScript and torch.fx tracing the modules run the same eager math as timm's, so
``torch.jit.script`` and timm's FX feature extraction work on converted models (the fused modules
are registered as timm FX leaf modules, so traced graphs still call the fused path).

Pre-1.0 keywords still passed by much copied ViT code are accepted: ``qk_scale`` overrides the
attention scale and ``drop`` means ``proj_drop``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm as _TimmLayerNorm
from timm.layers import PatchEmbed as _TimmPatchEmbed
from timm.layers import RmsNorm as _TimmRmsNorm
from timm.layers import RmsNormFp32 as _TimmRmsNormFp32
from timm.layers import register_notrace_module, use_fused_attn
from timm.layers.activations import GELU as _TimmGELU
from timm.layers.activations import GELUTanh as _TimmGELUTanh
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.layers.format import Format, nchw_to

from . import functional
from .fusion import FusedModule, forward_is
from .segments import segment_attention_mask

__all__ = ["LayerNorm", "LayerScale", "Attention", "Mlp", "PatchEmbed"]


class InputSizeError(ValueError, AssertionError):
    """An image size PatchEmbed does not take: a ValueError, and an AssertionError like timm's
    ``_assert`` raises, so either ``except`` a caller already has catches it."""


def _tracing(x) -> bool:
    """True while torch.fx traces through us: no data-dependent decisions, plain math."""
    return isinstance(x, torch.fx.Proxy)


@register_notrace_module
class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with timm's ViT default eps of 1e-6 (timm.layers.LayerNorm's default)."""

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x):
        # Two ifs, not one `or`: TorchScript drops the rest only after a bare is_scripting() test.
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if _tracing(x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return functional.residual_layer_norm(x, self.weight, self.bias, self.eps)[0]


_LAYER_NORM_FORWARDS = (nn.LayerNorm.forward, LayerNorm.forward, _TimmLayerNorm.forward)


def _plain_layer_norm(m, dim):
    """True when ``m`` is a LayerNorm over the last ``dim`` channels that the fused op reproduces."""
    return (isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,)
            and forward_is(m, *_LAYER_NORM_FORWARDS) and not getattr(m, "_fast_norm", False))


_RMS_NORM_FORWARDS = (_TimmRmsNorm.forward, _TimmRmsNormFp32.forward, nn.RMSNorm.forward)


def _qk_norm_kind(m, head_dim):
    """(kind, eps) of vit_fast.functional.qk_norm that reproduces q/k norm ``m`` over head_dim
    (LayerNorm -> "layer", timm RmsNorm / RmsNormFp32 / nn.RMSNorm -> "rms"), else None."""
    if _plain_layer_norm(m, head_dim):
        return "layer", float(m.eps)
    if (forward_is(m, *_RMS_NORM_FORWARDS) and tuple(m.normalized_shape) == (head_dim,)
            and m.eps is not None and not getattr(m, "_fast_norm", False)):
        return "rms", float(m.eps)
    return None


def _gelu_approximate(act):
    """'none'/'tanh' when ``act`` is a GELU the fused MLP computes, else None."""
    if forward_is(act, nn.GELU.forward):
        return act.approximate
    if forward_is(act, _TimmGELU.forward):
        return "none"
    if forward_is(act, _TimmGELUTanh.forward):
        return "tanh"
    return None


class LayerScale(nn.Module):
    """x · gamma, gamma [dim] initialised to init_values (timm.layers.LayerScale)."""

    def __init__(self, dim, init_values=1e-5, inplace=False, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


@register_notrace_module
class Attention(FusedModule):
    """Multi-head self-attention with a packed qkv Linear (timm.layers.Attention).

    ``fused_attn`` keeps timm's meaning: False materializes softmax(q kᵀ·scale) in eager PyTorch
    (and calls ``attn_drop`` on it), so attention-map tools keep working. Like timm, the fused
    path does not read ``scale`` (timm's SDPA call uses head_dim**-0.5); ``qk_scale`` (the
    pre-1.0 keyword) sets the scale of both paths. ``qk_norm=True`` norms (LayerNorm, or timm's
    RmsNorm, over head_dim) run as the fused :func:`vit_fast.functional.qk_norm` on the packed
    qkv before the fused attention.
    """

    def __init__(self, dim, num_heads=8, attn_head_dim=None, dim_out=None, qkv_bias=False,
                 qk_norm=False, scale_norm=False, proj_bias=True, gated=False, attn_drop=0.,
                 proj_drop=0., norm_layer=None, device=None, dtype=None, *, qk_scale=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("Attention: norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.qk_scale = qk_scale
        self.scale = qk_scale if qk_scale is not None else head_dim ** -0.5
        self.fused_attn = use_fused_attn()

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    bypassed_paths = ("q_norm", "k_norm")

    def _structure_reasons(self):
        if all(forward_is(m, nn.Identity.forward) for _, m in self._bypassed()):
            return []
        kinds = [_qk_norm_kind(m, self.head_dim) for _, m in self._bypassed()]
        reasons = [f"{name} is {type(m).__name__}: the fused q/k norm takes LayerNorm or RmsNorm "
                   f"over head_dim ({self.head_dim})"
                   for (name, m), kind in zip(self._bypassed(), kinds) if kind is None]
        if not reasons and kinds[0] != kinds[1]:
            reasons.append(f"q_norm and k_norm differ ({kinds[0]} vs {kinds[1]}): the fused q/k "
                           "norm takes one kind and eps")
        return reasons

    def _norm_qk(self, qkv):
        """qkv with q_norm/k_norm applied by the fused op (fusability already checked)."""
        q, k = self.q_norm, self.k_norm
        if forward_is(q, nn.Identity.forward):
            return qkv
        kind, eps = _qk_norm_kind(q, self.head_dim)
        return functional.qk_norm(qkv, self.num_heads, q.weight, k.weight,
                                  getattr(q, "bias", None), getattr(k, "bias", None),
                                  kind=kind, eps=eps)

    def why_not_fused(self, attn_mask=None, is_causal=False):
        """Why a call with these arguments does not use the fused attention op; [] when it does."""
        reasons = [] if self.fused_attn else ["fused_attn is False (materialized softmax)"]
        if attn_mask is not None or is_causal:
            reasons.append("attn_mask / is_causal given")
        return reasons + self.fusion_reasons()

    def uses_fused_op(self, attn_mask=None, is_causal=False):
        """Whether a call with these arguments goes through vit_fast's fused attention op."""
        return not self.why_not_fused(attn_mask, is_causal)

    def attend(self, qkv, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
               segment_ids: Optional[torch.Tensor] = None):
        """Attention core: packed qkv [B, N, 3·H·D] -> [B, N, H·D], before norm/gate/proj.
        segment_ids: int [B, N] of a packed batch (vit_fast/segments.py), instead of a mask."""
        if segment_ids is not None and (attn_mask is not None or is_causal):
            raise ValueError("Attention: pass segment_ids or attn_mask/is_causal, not both")
        if torch.jit.is_scripting():
            return self.attend_plain(qkv, attn_mask, is_causal, segment_ids)
        if _tracing(qkv) or not self.uses_fused_op(attn_mask, is_causal):
            return self.attend_plain(qkv, attn_mask, is_causal, segment_ids)
        dropout_p = self.attn_drop.p if self.training else 0.0
        qkv = self._norm_qk(qkv)
        return functional.fused_qkv_attention(qkv, self.num_heads, scale=self.qk_scale,
                                              dropout_p=dropout_p, segment_ids=segment_ids)

    def attend_plain(self, qkv, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     segment_ids: Optional[torch.Tensor] = None):
        """timm's attention math, step by step (scriptable, traceable)."""
        if segment_ids is not None:
            attn_mask = segment_attention_mask(segment_ids)
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.,
                is_causal=is_causal, scale=self.qk_scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        x = self.norm(self.attend(self.qkv(x), attn_mask, is_causal))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@register_notrace_module
class Mlp(FusedModule):
    """fc1 -> act -> drop1 -> norm -> fc2 -> drop2 (timm.layers.Mlp); one fused op when it can."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 norm_layer=None, bias=True, drop=0., use_conv=False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = bias if isinstance(bias, (tuple, list)) else (bias, bias)
        drop_probs = drop if isinstance(drop, (tuple, list)) else (drop, drop)
        if use_conv:
            def linear(i, o, b):
                return nn.Conv2d(i, o, kernel_size=1, bias=b, **dd)
        else:
            def linear(i, o, b):
                return nn.Linear(i, o, bias=b, **dd)
        self.fc1 = linear(in_features, hidden_features, bias[0])
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear(hidden_features, out_features, bias[1])
        self.drop2 = nn.Dropout(drop_probs[1])

    bypassed_paths = ("fc1", "act", "drop1", "norm", "fc2", "drop2")

    def _class_reasons(self):
        """Reasons in the layers' kinds (these never change for a given model)."""
        reasons = [f"{n} is {type(m).__name__}, not nn.Linear" for n, m in self._bypassed()
                   if n in ("fc1", "fc2") and not isinstance(m, nn.Linear)]
        if _gelu_approximate(self.act) is None:
            reasons.append(f"act is {type(self.act).__name__}: the fused MLP computes GELU")
        if not forward_is(self.norm, nn.Identity.forward):
            reasons.append(f"norm is {type(self.norm).__name__}: the fused MLP has no hidden norm")
        return reasons

    def _structure_reasons(self):
        reasons = self._class_reasons()
        for n, m in self._bypassed():
            if n in ("fc1", "fc2") and isinstance(m, nn.Linear) and not forward_is(m, nn.Linear.forward):
                reasons.append(f"{n} is {type(m).__name__} with its own forward (an adapter?)")
            if n in ("drop1", "drop2") and not forward_is(m, nn.Dropout.forward):
                reasons.append(f"{n} is {type(m).__name__}, not nn.Dropout")
        return reasons

    def call_reasons(self):
        """Reasons that depend on the mode: dropout that is active runs eagerly."""
        return [f"{n} is active (training, p={d.p})" for n, d in (("drop1", self.drop1),
                                                                   ("drop2", self.drop2))
                if d.training and d.p > 0]

    def why_not_fused(self):
        """Why forward runs fc1, act, ..., drop2 one by one now; [] when it runs the fused op."""
        return self.fusion_reasons() + self.call_reasons()

    def fused_approximate(self):
        """The GELU form of the fused op when this MLP (as configured, now) can use it, else None."""
        return None if self.why_not_fused() else _gelu_approximate(self.act)

    def forward(self, x):
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        approximate = None if _tracing(x) else self.fused_approximate()
        if approximate is None:
            return self.forward_plain(x)
        return functional.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                   self.fc2.bias, approximate=approximate)

    def forward_plain(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


@register_notrace_module
class PatchEmbed(_TimmPatchEmbed, FusedModule):
    """Image to patch embedding (timm.layers.PatchEmbed: same constructor, same ``proj`` Conv2d key).

    The conv + flatten runs as vit_fast's patch_embed op (the C++ extension when available) when
    the output is flattened NLC and ``proj`` is the plain non-overlapping conv; otherwise timm's
    math. A border that is not a whole patch is cropped, as timm's strided conv drops it.
    """

    bypassed_paths = ("proj",)

    def _structure_reasons(self):
        p, patch = self.proj, tuple(self.patch_size)
        if not self.flatten:
            return [f"output_fmt is {self.output_fmt.value}: the op writes flattened NLC"]
        if not forward_is(p, nn.Conv2d.forward):
            return [f"proj is {type(p).__name__}, not a plain nn.Conv2d"]
        if (tuple(p.kernel_size) != patch or tuple(p.stride) != patch or p.groups != 1
                or tuple(p.dilation) != (1, 1) or p.padding not in ((0, 0), "valid")):
            return ["proj is not a non-overlapping patch conv (kernel = stride = patch_size)"]
        return []

    def why_not_fused(self):
        return self.fusion_reasons()

    def _size_error(self, H, W):
        """timm's input-size rules: the message of the one broken, or ''."""
        if self.img_size is None:
            return ""
        if self.strict_img_size and (H, W) != tuple(self.img_size):
            return (f"PatchEmbed: input size {H}x{W} does not match the model's img_size "
                    f"{self.img_size[0]}x{self.img_size[1]} (strict_img_size)")
        ph, pw = self.patch_size
        if not self.strict_img_size and not self.dynamic_img_pad and (H % ph or W % pw):
            return (f"PatchEmbed: input size {H}x{W} is not divisible by the patch size {ph}x{pw} "
                    "(set dynamic_img_pad=True to pad)")
        return ""

    def _assert_size(self, H: int, W: int):
        """The same rules as torch._assert, which TorchScript compiles and torch.fx records."""
        if self.img_size is not None:
            if self.strict_img_size:
                torch._assert(H == self.img_size[0], "PatchEmbed: input height != img_size")
                torch._assert(W == self.img_size[1], "PatchEmbed: input width != img_size")
            elif not self.dynamic_img_pad:
                torch._assert(H % self.patch_size[0] == 0, "PatchEmbed: height % patch != 0")
                torch._assert(W % self.patch_size[1] == 0, "PatchEmbed: width % patch != 0")

    def _check_and_pad(self, x):
        """Check the input size (ValueError in eager), then the dynamic bottom/right padding."""
        H, W = x.shape[-2], x.shape[-1]
        if torch.jit.is_scripting():
            self._assert_size(H, W)
        elif _tracing(x):
            self._assert_size(H, W)
        else:
            msg = self._size_error(H, W)
            if msg:
                raise InputSizeError(msg)
        if self.dynamic_img_pad:
            ph, pw = self.patch_size[0], self.patch_size[1]
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        return x

    def forward(self, x):
        if torch.jit.is_scripting():
            return self.forward_plain(x)
        if _tracing(x) or self.fusion_reasons():
            return self.forward_plain(x)
        x = self._check_and_pad(x)
        ph, pw = self.patch_size
        H, W = x.shape[-2:]
        if H % ph or W % pw:
            x = x[..., : H - H % ph, : W - W % pw]
        out = functional.patch_embed(x, self.proj.weight, self.proj.bias, patch_size=(ph, pw))
        return self.norm(out)

    def forward_plain(self, x):
        """timm's PatchEmbed.forward (scriptable, traceable)."""
        x = self.proj(self._check_and_pad(x))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)

