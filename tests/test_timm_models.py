"""timm's model tests (tests/test_models.py: forward, backward, forward_intermediates, FX, jit),
adapted to converted models: 14 ViT-family models at tiny sizes, each compared with the same
timm model. Blocks convert cannot fuse (parallel blocks, QuickGELU) stay timm's, with a reason,
and the converted model must still pass.
"""
import copy
import functools

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules, set_scriptable

import vit_fast

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TINY = dict(embed_dim=32, depth=2, num_heads=2)
P8 = dict(img_size=32, patch_size=8, **TINY)
MODELS = {
    "vit_tiny_patch16_224": P8,                                  # plain ViT, class token
    "deit3_small_patch16_224": P8,                               # LayerScale, no_embed_class
    "vit_small_patch14_reg4_dinov2": dict(img_size=28, **TINY),  # registers + LayerScale
    "vit_base_patch16_clip_224": P8,                             # CLIP: pre-norm, no patch bias
    "vit_base_patch16_siglip_224": P8,                           # SigLIP: attention pool
    "vit_tiny_r_s16_p8_224": dict(img_size=64, **TINY),          # hybrid: ResNetV2 stem
    "vit_small_patch16_18x2_224": dict(P8, depth=1),             # ParallelThingsBlock (left)
    "vit_pwee_patch16_reg1_gap_256": P8,                         # ParallelScalingBlock (left)
    "deit_tiny_distilled_patch16_224": P8,                       # distillation token
    "vit_betwixt_patch16_reg4_gap_256": P8,                      # registers, avg pool
    "vit_base_patch32_clip_quickgelu_224": P8,                   # QuickGELU MLP (left)
    "vit_so150m_patch16_reg4_map_256": P8,                       # attention pool + registers
    "flexivit_small": P8,
    "vit_small_patch16_224": dict(P8, qk_norm=True, init_values=1e-5),  # qk_norm attention
}
# Models whose blocks convert leaves as timm's (the reason is checked below).
LEFT = {"vit_small_patch16_18x2_224": "ParallelThingsBlock",
        "vit_pwee_patch16_reg1_gap_256": "ParallelScalingBlock",
        "vit_base_patch32_clip_quickgelu_224": "QuickGELU"}


@functools.lru_cache(maxsize=None)
def _built(name, scriptable=False):
    with set_scriptable(scriptable):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=42, **MODELS[name])
    converted = vit_fast.convert(copy.deepcopy(model))
    summary = converted.vit_fast_summary
    if name in LEFT:
        assert summary.left and all(LEFT[name] in why for _, why in summary.left)
    else:
        assert not summary.left and not summary.not_fused
        assert all(isinstance(b, vit_fast.Block) for b in converted.blocks)
    return model, converted


def _models(name, scriptable=False):
    """Fresh copies of (timm model, converted model) for one test."""
    return tuple(copy.deepcopy(m) for m in _built(name, scriptable))


def _input(name, batch):
    size = MODELS[name]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_forward(name):
    timm_model, model = (m.eval() for m in _models(name))
    x = _input(name, 1)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, timm_model(x), rtol=1e-4, atol=1e-5)
        assert out.shape == (1, 42) and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_backward(name):
    timm_model, model = (m.train() for m in _models(name))
    x = _input(name, 2)
    for m in (timm_model, model):
        m(x).mean().backward()
    grads = dict(timm_model.named_parameters())
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        ref = grads[n].grad
        assert (p.grad - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-3), n


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_intermediates(name):
    timm_model, model = (m.eval() for m in _models(name))
    x = _input(name, 1)
    with torch.no_grad():
        out, inter = model.forward_intermediates(x, output_fmt="NCHW")
        out_t, inter_t = timm_model.forward_intermediates(x, output_fmt="NCHW")
        torch.testing.assert_close(out, model.forward_features(x))
        torch.testing.assert_close(out, out_t, rtol=1e-4, atol=1e-5)
        assert len(inter) == len(inter_t) == len(model.blocks)
        for a, b in zip(inter, inter_t):
            assert a.shape == b.shape and a.shape[1] == 32
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _fx_model(model, train):
    """timm's _create_fx_model: torchvision's feature extractor with timm's leaf modules."""
    from torchvision.models.feature_extraction import (NodePathTracer, create_feature_extractor,
                                                       get_graph_node_names)
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    train_return = [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**kw).trace(model).nodes))
        outputs = [n.name for n in graph_nodes[0]._input_nodes.keys()]
        names = [n.name for n in graph_nodes]
        train_return = [train_nodes[-names.index(o)] for o in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return,
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)


@pytest.mark.parametrize("name", list(MODELS))
def test_fx(name):
    _, model = _models(name)
    x = _input(name, 2)
    with torch.inference_mode():
        want = model.eval()(x)
        got = torch.cat(tuple(_fx_model(model, train=False)(x).values()))
    assert torch.equal(got, want)  # timm's bar: the traced model computes the same bits
    fx_model = _fx_model(model.train(), train=True)
    out = torch.cat(tuple(fx_model(x).values()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert all(p.grad is not None for p in fx_model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript(name):
    timm_model, model = (m.eval() for m in _models(name, scriptable=True))
    scripted = torch.jit.script(model)
    x = _input(name, 1)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), timm_model(x), rtol=1e-4, atol=1e-5)
