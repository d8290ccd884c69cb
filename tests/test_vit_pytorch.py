"""vit_fast.convert on lucidrains' vit-pytorch ViT and SimpleViT (a test dependency, pinned in
requirements-dev.txt), and convert on a model with nothing to convert."""
import copy
import random

import pytest
import torch
import torch.nn as nn

import vit_fast

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed "
                                  "(pip install -r requirements-dev.txt)")
from vit_pytorch import SimpleViT, ViT  # noqa: E402
from vit_pytorch.recorder import Recorder  # noqa: E402

COMMON = dict(image_size=(24, 32), patch_size=8, num_classes=7, dim=40, depth=2, mlp_dim=72)
MODELS = {
    # heads·dim_head (60) != dim (40): to_qkv is not square; attention/ff/emb dropout all present.
    "vit_cls_dropout": lambda: ViT(heads=3, dim_head=20, dropout=0.1, emb_dropout=0.1, **COMMON),
    # heads == 1 and dim_head == dim: vit-pytorch drops to_out (nn.Identity); mean pooling.
    "vit_mean_no_proj": lambda: ViT(heads=1, dim_head=40, pool="mean", **COMMON),
    "simple_vit": lambda: SimpleViT(heads=4, dim_head=10, **COMMON),
}


def _build(name):
    torch.manual_seed(0)
    return MODELS[name]()


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_identical_and_fused(name, op_calls):
    model = _build(name).eval()
    x = torch.randn(3, 3, 24, 32)
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    converted = vit_fast.convert(model)
    assert converted is model
    layers = [f"transformer.layers.{i}.{j}" for i in range(COMMON["depth"]) for j in (0, 1)]
    assert model.vit_fast_summary.swapped == layers + ["transformer"], str(model.vit_fast_summary)
    assert type(model.transformer).__name__ == "Transformer"  # same class name, same isinstance
    assert isinstance(model.transformer.layers[0][0], type(_build(name).transformer.layers[0][0]))
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert [id(p) for p in model.parameters()] == params, "parameters were copied, not adopted"
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    depth = COMMON["depth"]
    # Per layer: one attention, one MLP (residual in its epilogue), the attention's LayerNorm and
    # one fused "residual add + ff LayerNorm"; then the final norm.
    assert op_calls == {"fused_qkv_attention": depth, "gelu_mlp": depth,
                        "residual_layer_norm": 2 * depth + 1}, op_calls


def test_layer_norm_eps_is_kept():
    model = vit_fast.convert(_build("simple_vit").eval())
    for layer in model.transformer.layers:
        assert layer[0].norm.eps == 1e-5 and layer[1].net[0].eps == 1e-5
    assert model.transformer.norm.eps == 1e-5
    # A different eps must change the output: the converted model really reads it.
    x = torch.randn(2, 3, 24, 32) * 1e-3
    with torch.no_grad():
        before = model(x)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-1
        after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ["vit_mean_no_proj", "simple_vit"])
def test_gradients_match(name):
    model = _build(name).train()  # no dropout in these: training is deterministic
    converted = vit_fast.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 24, 32)
    for m in (model, converted):
        m(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), converted.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_dropout_is_kept_in_training():
    model = vit_fast.convert(_build("vit_cls_dropout")).train()
    x = torch.randn(2, 3, 24, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b), "dropout had no effect in training mode"
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    ff = model.transformer.layers[0][1]
    assert not ff.dropout_active()  # eval: the fused MLP
    model.train()
    assert ff.dropout_active()      # training with dropout: the eager Sequential


def test_attention_maps_match_vit_pytorch_recorder():
    model = _build("vit_cls_dropout").eval()
    x = torch.randn(2, 3, 24, 32)
    _, want = Recorder(copy.deepcopy(model))(x)         # [B, depth, H, N, N]
    converted = vit_fast.convert(model)
    with vit_fast.record_attention(converted) as maps:
        converted(x)
    assert maps.names == ["transformer.layers.0.0", "transformer.layers.1.0"]
    torch.testing.assert_close(maps.stack(), want, rtol=1e-5, atol=1e-6)
    assert all(layer[0].fused_attn for layer in converted.transformer.layers)


def test_feed_forward_without_gelu_is_left_with_reason_and_the_rest_fused(op_calls):
    model = _build("simple_vit").eval()
    model.transformer.layers[1][1].net[2] = nn.ReLU()
    original = copy.deepcopy(model)
    vit_fast.convert(model)
    summary = model.vit_fast_summary
    assert "transformer.layers.1.1" not in summary.swapped
    assert "transformer.layers.1.0" in summary.swapped and "transformer" in summary.swapped
    why = dict(summary.left)["transformer.layers.1.1"]
    assert "activation ReLU" in why and "GELU" in why, why
    x = torch.randn(2, 3, 24, 32)
    op_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    assert op_calls["fused_qkv_attention"] == 2 and op_calls["gelu_mlp"] == 1, op_calls


def test_convert_with_nothing_to_convert_returns_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    model(torch.randn(1, 3, 8, 8))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model.children())
    out = vit_fast.convert(model)
    assert out is model and list(model.children()) == children
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    summary = model.vit_fast_summary
    assert summary.swapped == []
    assert len(summary.left) == 1 and "has no transformer block" in summary.left[0][1]
    assert "swapped 0 module(s)" in str(summary)


# --- hooks and vit-pytorch's own tools (issue 27, item 9) ----------------------------------------

from vit_pytorch.accept_video_wrapper import AcceptVideoWrapper  # noqa: E402
from vit_pytorch.dino import Dino  # noqa: E402
from vit_pytorch.extractor import Extractor  # noqa: E402

SMALL = dict(image_size=16, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16,
             mlp_dim=48)
IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _small(seed=0):
    torch.manual_seed(seed)
    return ViT(**SMALL)


@pytest.mark.parametrize("warm", [False, True])
def test_recorder_returns_the_attention_maps_after_convert(warm):
    want = Recorder(_small().eval())(IMG)[1]
    recorder = Recorder(_small().eval())
    if warm:
        recorder(IMG)  # registers its hooks on ``attend`` before convert
    vit_fast.convert(recorder.vit)
    logits, attns = recorder(IMG)
    assert attns is not None and attns.shape == (2, SMALL["depth"], 2, 5, 5)
    torch.testing.assert_close(attns, want, rtol=1e-5, atol=1e-6)
    vit = recorder.eject()
    assert not vit_fast.convert.why_not_fused(vit), "ejected hooks still hold the eager path"


@pytest.mark.parametrize("wrap", ["extractor", "video"])
def test_extractor_and_video_wrapper_hooked_before_convert(wrap):
    def build():
        vit = _small().eval()
        extractor = Extractor(vit, return_embeddings_only=True)
        if wrap == "extractor":
            return vit, extractor, IMG
        video = AcceptVideoWrapper(extractor, add_time_pos_emb=True, dim_emb=32, time_seq_len=3)
        return vit, video, torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    _, want_net, x = build()
    vit, net, _ = build()
    with torch.no_grad():
        want = want_net(x)
        net(x)  # the Extractor registers its hook on ``transformer`` here
        vit_fast.convert(vit)
        got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dino_hidden_layer_transformer_after_convert():
    def loss(convert):
        vit = _small()
        torch.manual_seed(1)
        random.seed(1)  # Dino's augmentations draw from Python's random too
        learner = Dino(vit, image_size=16, hidden_layer="transformer", projection_hidden_size=16,
                       num_classes_K=32, projection_layers=2)  # runs a forward: hooks registered
        if convert:
            vit_fast.convert(vit)
        torch.manual_seed(2)
        random.seed(2)
        return learner(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)))
    torch.testing.assert_close(loss(True), loss(False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
@pytest.mark.parametrize("site", ["transformer", "transformer.layers.0.0", "transformer.layers.0.1",
                                  "transformer.layers.1.0.attend", "transformer.layers.1.0.norm",
                                  "transformer.layers.1.1.net.2", "transformer.norm"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_hooks_fire_and_change_the_result_as_in_vit_pytorch(site, kind, when):
    def hooked(model, calls):
        sub = model.get_submodule(site)
        if kind == "forward":
            return sub.register_forward_hook(lambda m, a, out: (calls.append(site), out * 1.5)[1])
        if kind == "pre":
            return sub.register_forward_pre_hook(
                lambda m, a: (calls.append(site), (a[0] * 0.5,))[1])
        return sub.register_full_backward_hook(
            lambda m, gin, gout: (calls.append(site), tuple(2 * g for g in gin))[1])

    def run(model):
        model.zero_grad()
        y = model(IMG)
        y.square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters()]

    want_calls, got_calls = [], []
    original = _small().train()
    hooked(original, want_calls)
    model = _small().train()
    if when == "after":
        vit_fast.convert(model)
    handle = hooked(model, got_calls)
    if when == "before":
        vit_fast.convert(model)
    (y, grads), (y0, grads0) = run(model), run(original)
    assert got_calls == want_calls and got_calls
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-5)
    handle.remove()
    assert not vit_fast.convert.why_not_fused(model)


def test_why_not_fused_names_what_hooks_hold_eager():
    model = vit_fast.convert(_small())
    handle = model.transformer.layers[1][0].attend.register_forward_hook(lambda m, a, out: None)
    reasons = vit_fast.convert.why_not_fused(model)
    assert any("attend has forward hooks" in r for r in reasons["transformer.layers.1.0"]), reasons
    handle.remove()
    assert not vit_fast.convert.why_not_fused(model)


def test_why_not_fused_names_active_feed_forward_dropout():
    model = vit_fast.convert(_build("vit_cls_dropout"))
    model.train()
    reasons = vit_fast.convert.why_not_fused(model)
    assert "dropout is active" in reasons["transformer.layers.0.1"][0], reasons
    assert "transformer" not in reasons  # the pair stays fused, its MLP eager
    model.eval()
    assert not vit_fast.convert.why_not_fused(model)


def test_second_convert_lists_every_converted_module_as_already():
    model = vit_fast.convert(_small())
    first = model.vit_fast_summary
    again = vit_fast.convert(model).vit_fast_summary
    assert sorted(again.already) == sorted(first.swapped) and not again.swapped, str(again)
