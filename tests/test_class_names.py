"""Converted layers keep the class names that libraries look layers up by (issue 27, item 13).

transformers' ``_no_split_modules``, accelerate's infer_auto_device_map / get_balanced_memory and
FSDP's auto-wrap by ``transformer_layer_cls_to_wrap`` compare ``module.__class__.__name__`` with
names of the original classes. Converting must not change any module's class name, and the class
those lookups then find must still match every converted layer (isinstance, for the wrap policy).
"""
import functools

import pytest
import timm
import torch
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

import vit_fast

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed")


def _vit_hf():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    return transformers.ViTModel(cfg)


def _dinov2_hf():
    cfg = transformers.Dinov2Config(image_size=16, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2)
    torch.manual_seed(0)
    return transformers.Dinov2Model(cfg)


def _timm():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, init_values=0.1)


def _vit_pytorch():
    torch.manual_seed(0)
    return vit_pytorch.ViT(image_size=16, patch_size=8, num_classes=5, dim=32, depth=2, heads=2,
                           dim_head=16, mlp_dim=48)


def _navit():
    from vit_pytorch.na_vit import NaViT
    torch.manual_seed(0)
    return NaViT(image_size=16, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16,
                 mlp_dim=48)


def _naflexvit():
    from timm.models.naflexvit import NaFlexVit
    torch.manual_seed(0)
    return NaFlexVit(embed_dim=24, depth=2, num_heads=3, patch_size=4, num_classes=5,
                     pos_embed_grid_size=(5, 5))


MODELS = {"transformers_vit": _vit_hf, "transformers_dinov2": _dinov2_hf, "timm": _timm,
          "vit_pytorch": _vit_pytorch, "navit": _navit, "naflexvit": _naflexvit}
# The layer class each library's users name (no-split lists, FSDP's transformer_layer_cls_to_wrap).
LAYER_NAMES = {"transformers_vit": "ViTLayer", "transformers_dinov2": "Dinov2Layer",
               "timm": "Block", "vit_pytorch": "Attention", "navit": "Transformer",
               "naflexvit": "Block"}


def _names(model):
    return [(name, type(m).__name__) for name, m in model.named_modules()]


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_module_keeps_its_class_name(kind):
    model = MODELS[kind]()
    before = _names(model)
    vit_fast.convert(model)
    assert model.vit_fast_summary.swapped or model.vit_fast_summary.fused, kind
    assert _names(model) == before


def _class_named(model, name):
    """accelerate's get_module_class_from_name: the class of the first module with that name."""
    for m in model.modules():
        if m.__class__.__name__ == name:
            return m.__class__
    return None


@pytest.mark.parametrize("kind", list(MODELS))
def test_fsdp_wrap_by_class_name_wraps_every_converted_layer(kind):
    model = MODELS[kind]()
    name = LAYER_NAMES[kind]
    want = [n for n, m in model.named_modules() if type(m).__name__ == name]
    vit_fast.convert(model)
    cls = _class_named(model, name)
    assert cls is not None, f"no module is called {name} after convert"
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={cls})
    wrapped = [n for n, m in model.named_modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert wrapped == want and want


@pytest.mark.parametrize("kind", ["transformers_vit", "transformers_dinov2"])
def test_no_split_modules_match_converted_layers(kind):
    model = MODELS[kind]()
    vit_fast.convert(model)
    present = {type(m).__name__ for m in model.modules()}
    layer = LAYER_NAMES[kind]
    assert layer in model._no_split_modules and layer in present


@pytest.mark.parametrize("kind", ["transformers_vit", "transformers_dinov2"])
def test_accelerate_device_maps_do_not_split_converted_layers(kind):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import get_balanced_memory
    original, model = MODELS[kind](), MODELS[kind]()
    vit_fast.convert(model)
    layers = [n for n, m in original.named_modules() if type(m).__name__ == LAYER_NAMES[kind]]
    per_layer = sum(p.numel() * 4 for p in original.get_submodule(layers[0]).parameters())
    # Room for about one and a half layers per device: a split is only avoided by name.
    budget = {0: int(per_layer * 1.5), 1: int(per_layer * 1.5), "cpu": 10 ** 9}
    maps = []
    assert len(layers) == 2
    for m in (original, model):
        kw = dict(no_split_module_classes=m._no_split_modules)
        maps.append(accelerate.infer_auto_device_map(m, max_memory=budget, **kw))
        assert get_balanced_memory(m, max_memory=budget, **kw) == \
            get_balanced_memory(original, max_memory=budget, **kw)
    assert maps[1] == maps[0]
    assert not any(k.startswith(f"{layer}.") for k in maps[1] for layer in layers), maps[1]
