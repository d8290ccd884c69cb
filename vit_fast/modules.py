"""Drop-in nn.Modules with timm 1.0.31's constructors, forward signatures and state_dict keys:
LayerNorm, LayerScale, Attention, Mlp, PatchEmbed (vit_fast/layers.py) and Block (vit_fast/block.py).

A module holds parameters and calls the functional ops. It runs its plain submodules instead,
for that call, when the fused op would not reproduce them or would skip something the user
attached (hooks, an adapter, a parametrization: vit_fast/fusion.py); ``why_not_fused()`` says
why.
"""
from .block import Block, drop_path_scale as _drop_path_scale  # noqa: F401  (tests draw timm's masks with it)
from .layers import (Attention, InputSizeError, LayerNorm, LayerScale, Mlp,  # noqa: F401
                     PatchEmbed, _gelu_approximate, _plain_layer_norm, _qk_norm_kind, _tracing)

__all__ = ["LayerNorm", "LayerScale", "Attention", "Mlp", "Block", "PatchEmbed"]
