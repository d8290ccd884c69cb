"""Drop-in nn.Modules with timm 1.0.31's constructors, forward signatures and state_dict keys.

A module holds parameters and calls the functional ops. Options the fused ops do not cover
(attn_mask, is_causal, qk_norm, scale norms, a non-GELU act_layer, a foreign mlp_layer/attn_layer,
dropout inside the MLP) run the same eager math timm runs, for that call only.

Pre-1.0 keywords still passed by much copied ViT code are accepted: ``qk_scale`` overrides the
attention scale and ``drop`` means ``proj_drop``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers import PatchEmbed as _TimmPatchEmbed
from timm.layers import use_fused_attn

from . import dispatch, functional, reference

__all__ = ["LayerNorm", "LayerScale", "Attention", "Mlp", "Block", "PatchEmbed"]


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with timm's ViT default eps of 1e-6 (timm.layers.LayerNorm's default)."""

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x):
        return functional.residual_layer_norm(x, self.weight, self.bias, self.eps)[0]


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


def _plain_layer_norm(m, dim):
    """True when ``m`` is a LayerNorm over the last ``dim`` channels that the fused op reproduces."""
    return (isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,)
            and type(m).forward in (nn.LayerNorm.forward, LayerNorm.forward, _timm_ln_forward()))


def _timm_ln_forward():
    from timm.layers import LayerNorm as TimmLayerNorm
    return TimmLayerNorm.forward


def _gelu_approximate(act):
    """'none'/'tanh' when ``act`` is a GELU the fused MLP computes, else None."""
    if type(act) is nn.GELU:
        return act.approximate
    try:
        from timm.layers.activations import GELU as TimmGELU, GELUTanh
    except ImportError:  # pragma: no cover - older timm
        return None
    if type(act) is TimmGELU:
        return "none"
    if type(act) is GELUTanh:
        return "tanh"
    return None


class Attention(nn.Module):
    """Multi-head self-attention with a packed qkv Linear (timm.layers.Attention).

    ``fused_attn`` keeps timm's meaning: False materializes softmax(q kᵀ) in eager PyTorch (and
    calls ``attn_drop`` on it), so attention-map tools keep working.
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

    def uses_fused_op(self, attn_mask=None, is_causal=False):
        """Whether a call with these arguments goes through vit_fast's fused attention op."""
        return (self.fused_attn and attn_mask is None and not is_causal
                and isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))

    def attend(self, qkv, attn_mask=None, is_causal=False):
        """Attention core: packed qkv [B, N, 3·H·D] -> [B, N, H·D], before norm/gate/proj."""
        B, N, _ = qkv.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.uses_fused_op(attn_mask, is_causal):
            return functional.fused_qkv_attention(qkv, self.num_heads, scale=self.scale,
                                                  dropout_p=dropout_p)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=self.scale)
        else:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
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


class Mlp(nn.Module):
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

    def fused_approximate(self):
        """The GELU form of the fused op when this MLP (as configured, now) can use it, else None."""
        if not (isinstance(self.fc1, nn.Linear) and isinstance(self.fc2, nn.Linear)
                and isinstance(self.norm, nn.Identity)):
            return None
        if self.training and (self.drop1.p > 0 or self.drop2.p > 0):
            return None
        return _gelu_approximate(self.act)

    def forward(self, x, *, residual=None, layer_scale=None, sample_scale=None):
        approximate = self.fused_approximate()
        if approximate is not None:
            return functional.gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                       self.fc2.bias, approximate=approximate, residual=residual,
                                       layer_scale=layer_scale, sample_scale=sample_scale)
        out = self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
        if residual is None:
            return out
        return reference.add_branch(residual, out, layer_scale, sample_scale)


def _drop_path_scale(drop_path, x):
    """Per-sample keep mask / keep_prob [B] for a DropPath in training, else None.

    Drawn exactly as timm's drop_path draws it (bernoulli_ over B values), so with the same seed
    the fused Block drops the same samples as timm's Block.
    """
    if not isinstance(drop_path, DropPath) or not drop_path.training or drop_path.drop_prob == 0.:
        return None
    keep_prob = 1 - drop_path.drop_prob
    mask = x.new_empty((x.shape[0],)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and drop_path.scale_by_keep:
        mask.div_(keep_prob)
    return mask


def _layer_scale_gamma(ls):
    return None if isinstance(ls, nn.Identity) else ls.gamma


class Block(nn.Module):
    """Pre-norm transformer block (timm.models.vision_transformer.Block), fused where it can be.

    Fused forward (CUDA kernels, or the reference math elsewhere):
      h1 = LN1(x); p = attn(h1)                                    (qkv GEMM, fused attention, proj)
      h2, x1 = LN2(x + drop_path(ls1 · p)), x + drop_path(ls1 · p)   one residual_layer_norm
      out = x1 + drop_path(ls2 · fc2(gelu(fc1(h2))))               one gelu_mlp
    """

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

    def fusable(self, x=None, attn_mask=None, is_causal=False):
        """Whether forward takes the fused path; the reason when it does not (for convert)."""
        dim = self.norm1.normalized_shape[0] if isinstance(self.norm1, nn.LayerNorm) else None
        if not (_plain_layer_norm(self.norm1, dim) and _plain_layer_norm(self.norm2, dim)):
            return False, "norm_layer is not a plain LayerNorm"
        if not isinstance(self.attn, Attention):
            return False, f"attn_layer {type(self.attn).__name__} is not vit_fast's Attention"
        if not isinstance(self.mlp, Mlp):
            return False, f"mlp_layer {type(self.mlp).__name__} is not vit_fast's Mlp"
        for name in ("ls1", "ls2"):
            if not isinstance(getattr(self, name), (nn.Identity, LayerScale)):
                return False, f"{name} is not a LayerScale"
        return True, ""

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        ok, _ = self.fusable()
        if not ok:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask,
                                                       is_causal=is_causal)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self._rebuilds_ln_outputs(x):
            return self._forward_rebuilding_ln_outputs(x, attn_mask, is_causal)
        n1, n2 = self.norm1, self.norm2
        h1 = functional.residual_layer_norm(x, n1.weight, n1.bias, n1.eps)[0]
        p = self.attn(h1, attn_mask=attn_mask, is_causal=is_causal)
        h2, x1 = functional.residual_layer_norm(
            p, n2.weight, n2.bias, n2.eps, residual=x, layer_scale=_layer_scale_gamma(self.ls1),
            sample_scale=_drop_path_scale(self.drop_path1, x))
        return self.mlp(h2, residual=x1, layer_scale=_layer_scale_gamma(self.ls2),
                        sample_scale=_drop_path_scale(self.drop_path2, x))

    def _rebuilds_ln_outputs(self, x):
        """Whether the fused forward can run as two ops that save no LayerNorm output (DESIGN.md,
        training memory): only when the kernels run (dispatch picks triton for the block's
        tensors, no autocast) and nothing would notice the attention/MLP modules being bypassed
        (their own forward, no hooks, a plain qkv Linear, no gate)."""
        a, mlp = self.attn, self.mlp
        if (type(a).forward is not Attention.forward or a.gate is not None
                or type(a.qkv).forward is not nn.Linear.forward
                or type(mlp).forward is not Mlp.forward or mlp.fused_approximate() is None
                or any(m._forward_hooks or m._forward_pre_hooks for m in (a, a.qkv, mlp))
                or x.dim() < 2 or x.shape[-1] != self.norm1.normalized_shape[0]
                or functional._autocast_dtype(x.device) is not None):
            return False
        n1, n2 = self.norm1, self.norm2
        ln = [x, n1.weight, n1.bias, n2.weight, n2.bias, a.qkv.weight, a.qkv.bias,
              _layer_scale_gamma(self.ls1), _layer_scale_gamma(self.ls2)]
        mm = [x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
        return (dispatch.choose("residual_layer_norm", ln, dim=x.shape[-1]).backend == "triton"
                and dispatch.choose("gelu_mlp", mm).backend == "triton")

    def _forward_rebuilding_ln_outputs(self, x, attn_mask, is_causal):
        """The fused forward with LN1 -> qkv and LN2 -> MLP each one op (same kernels, same math,
        same drop-path draws in the same order) whose backward rebuilds the LayerNorm output."""
        from .ops.layer_norm_linear import layer_norm_linear
        from .ops.residual_layer_norm_mlp import residual_layer_norm_mlp
        a, mlp, n1, n2 = self.attn, self.mlp, self.norm1, self.norm2
        qkv = layer_norm_linear(x, n1.weight, n1.bias, n1.eps, a.qkv.weight, a.qkv.bias)
        p = a.proj_drop(a.proj(a.norm(a.attend(qkv, attn_mask, is_causal))))
        ss1 = _drop_path_scale(self.drop_path1, x)
        ss2 = _drop_path_scale(self.drop_path2, x)
        return residual_layer_norm_mlp(
            p, x, _layer_scale_gamma(self.ls1), ss1, n2.weight, n2.bias, n2.eps, mlp.fc1.weight,
            mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.fused_approximate(),
            _layer_scale_gamma(self.ls2), ss2)


def _own_layer(layer, kind):
    """Map timm's default Mlp/Attention classes (as VisionTransformer passes them) to ours."""
    if kind == "mlp":
        from timm.layers import Mlp as TimmMlp
        return Mlp if layer in (None, TimmMlp) else layer
    from timm.layers import Attention as TimmAttention
    return Attention if layer in (None, "attn", TimmAttention) else layer


class PatchEmbed(_TimmPatchEmbed):
    """Image to patch embedding (timm.layers.PatchEmbed: same constructor, same ``proj`` Conv2d key).

    The conv + flatten runs as vit_fast's patch_embed op (the C++ extension when available) when
    the output is flattened NLC; other output formats run timm's forward.
    """

    def forward(self, x):
        if not self.flatten:
            return super().forward(x)
        _B, _C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"PatchEmbed: input size {H}x{W} does not match the model's "
                             f"img_size {self.img_size[0]}x{self.img_size[1]} (strict_img_size)")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        elif H % ph or W % pw:
            raise ValueError(f"PatchEmbed: input size {H}x{W} is not divisible by the patch size "
                             f"{ph}x{pw}")
        out = functional.patch_embed(x, self.proj.weight, self.proj.bias, patch_size=(ph, pw))
        return self.norm(out)
