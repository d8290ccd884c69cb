"""vit_fast.record_attention: post-softmax attention maps of chosen blocks, fused path restored."""
import pytest
import torch
import torch.nn as nn

import vit_fast
from tiny_models import tiny_vit


def _vit(**kw):
    return tiny_vit(img_size=24, depth=3, **kw).eval()


MODELS = {"converted": lambda: vit_fast.convert(_vit(init_values=0.1)),
          "block_fn": lambda: _vit(block_fn=vit_fast.Block),
          "timm": lambda: _vit()}


def _expected_maps(model, x):
    """softmax(q kᵀ·scale) of every block, computed here from the qkv Linear outputs."""
    qkvs = []
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o: qkvs.append(o)) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    maps = []
    for blk, qkv in zip(model.blocks, qkvs):
        B, N, _ = qkv.shape
        q, k, _v = qkv.reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        maps.append(((q @ k.transpose(-2, -1)) * blk.attn.scale).softmax(-1))
    return maps


@pytest.mark.parametrize("kind", list(MODELS))
def test_maps_are_the_attention_probabilities(kind):
    model = MODELS[kind]()
    x = torch.randn(2, 3, 24, 24)
    flags = [b.attn.fused_attn for b in model.blocks]
    with torch.no_grad():
        want_logits = model(x)
        with vit_fast.record_attention(model) as maps:
            logits = model(x)
            assert not any(b.attn.fused_attn for b in model.blocks)
    assert [b.attn.fused_attn for b in model.blocks] == flags, "fused_attn was not restored"
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert maps.names == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    expected = _expected_maps(model, x)
    N = 1 + 3 * 3
    for got, want in zip(maps, expected):
        assert got.shape == (2, 2, N, N)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 2, N))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert maps.stack().shape == (2, 3, 2, N, N)


def test_only_chosen_blocks_switch_path_and_record():
    model = MODELS["converted"]()
    seen = []
    with vit_fast.record_attention(model, blocks=[-1, "blocks.0"]) as maps:
        seen = [b.attn.fused_attn for b in model.blocks]
        model(torch.randn(1, 3, 24, 24))
    assert seen == [False, True, False]
    assert maps.names == ["blocks.0.attn", "blocks.2.attn"]  # call order, not request order
    with vit_fast.record_attention(model, blocks=1) as maps:
        model(torch.randn(1, 3, 24, 24))
    assert maps.names == ["blocks.1.attn"]
    assert all(b.attn.fused_attn for b in model.blocks)


def test_recording_keeps_gradients_when_asked():
    model = MODELS["converted"]()
    with vit_fast.record_attention(model, blocks=0, detach=False) as maps:
        model(torch.randn(1, 3, 24, 24))
    maps[0].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_restored_after_an_exception():
    model = MODELS["converted"]()
    with pytest.raises(RuntimeError, match="boom"):
        with vit_fast.record_attention(model):
            raise RuntimeError("boom")
    assert all(b.attn.fused_attn for b in model.blocks)
    hooks = [b.attn.attn_drop._forward_pre_hooks for b in model.blocks]
    assert all(len(h) == 0 for h in hooks), "hooks were left behind"


def test_errors():
    with pytest.raises(ValueError, match="no vit_fast or timm Attention"):
        with vit_fast.record_attention(nn.Sequential(nn.Linear(4, 4), nn.ReLU())):
            pass
    model = MODELS["converted"]()
    with pytest.raises(ValueError, match="out of range"):
        with vit_fast.record_attention(model, blocks=[3]):
            pass
    with pytest.raises(ValueError, match="names no attention"):
        with vit_fast.record_attention(model, blocks="head"):
            pass
    with pytest.raises(TypeError):
        with vit_fast.record_attention(model, blocks=[1.5]):
            pass
    assert all(b.attn.fused_attn for b in model.blocks)


def test_unconverted_vit_pytorch_model_raises():
    vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed")
    model = vit_pytorch.SimpleViT(image_size=16, patch_size=8, num_classes=3, dim=16, depth=1,
                                  heads=2, mlp_dim=32, dim_head=8)
    with pytest.raises(ValueError, match="vit_fast.convert"):
        with vit_fast.record_attention(model):
            pass
    vit_fast.convert(model)
    with vit_fast.record_attention(model) as maps:
        model(torch.randn(1, 3, 16, 16))
    assert [m.shape for m in maps] == [(1, 2, 4, 4)]
