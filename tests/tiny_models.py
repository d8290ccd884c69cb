"""The small timm ViT the tests build, in one place (each test file used to carry its own copy)."""
import timm
import torch


def tiny_vit(img_size=16, embed_dim=24, depth=2, num_heads=2, num_classes=5, **kw):
    """timm's ViT at test size, built from seed 0 so two calls give the same weights.
    Keyword arguments go to timm.create_model (init_values, drop_path_rate, block_fn...)."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                             patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             num_classes=num_classes, **kw)
