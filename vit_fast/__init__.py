"""vit_fast: fused kernels for Vision Transformers in PyTorch, drop-in for timm.

    import timm, vit_fast
    model = timm.create_model("vit_base_patch16_224", block_fn=vit_fast.Block)
    model = vit_fast.convert(timm.create_model("vit_base_patch16_224"))   # existing models
"""
from . import checkpoint_replay
from .convert import convert
from .dispatch import use_backend
from .functional import fused_qkv_attention, gelu_mlp, patch_embed, qk_norm, residual_layer_norm
from .modules import Attention, Block, LayerScale, Mlp, PatchEmbed
from .record import record_attention

__all__ = ["Attention", "Block", "Mlp", "LayerScale", "PatchEmbed", "convert",
           "fused_qkv_attention", "qk_norm", "residual_layer_norm", "gelu_mlp", "patch_embed",
           "use_backend",
           "record_attention"]
# a checkpoint recomputes its forward under the policies that forward ran under
checkpoint_replay.install()

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it
