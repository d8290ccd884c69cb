"""vit_fast.convert on vit-pytorch's systems, recognised by what their modules compute
(issue 28, item 5): every system whose attention is softmax attention over its own tokens converts
fused and matches vit-pytorch's outputs and gradients (fp32, reference path; two under the Triton
interpreter), its hooks fire, and the attention forms that cannot fuse stay eager with the reason.
"""
import copy
import importlib
import os

import pytest
import torch
import torch.nn as nn

import vit_fast

pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed "
                    "(pip install -r requirements-dev.txt)")
from vit_fast.vit_pytorch_modules import FusedAttention, FusedFeedForward  # noqa: E402


def _cls(module, name="ViT"):
    return getattr(importlib.import_module(f"vit_pytorch.{module}"), name)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# dim 32, two heads of 16 (PiT: 16 = 2 x 8, doubled by its pooling): tiny, non-square to_qkv.
KW = dict(num_classes=5, dim=32, heads=2, dim_head=16, mlp_dim=48)
IMAGE = (lambda: _x(2, 3, 16, 16))
VIDEO = (lambda: _x(2, 3, 4, 16, 16))
SERIES = (lambda: _x(2, 3, 32))
SYSTEMS = {
    # name: (build, input, attention calls per forward)
    "vit": (lambda: _cls("vit")(image_size=16, patch_size=8, depth=2, **KW), IMAGE, 2),
    "simple_vit": (lambda: _cls("simple_vit", "SimpleViT")(image_size=16, patch_size=8, depth=2,
                                                           **KW), IMAGE, 2),
    "simple_vit_qk_norm": (lambda: _cls("simple_vit_with_qk_norm", "SimpleViT")(
        image_size=16, patch_size=8, depth=2, **KW), IMAGE, 2),
    "simple_vit_register_tokens": (lambda: _cls("simple_vit_with_register_tokens", "SimpleViT")(
        image_size=16, patch_size=8, depth=2, num_register_tokens=2, **KW), IMAGE, 2),
    "simple_vit_3d": (lambda: _cls("simple_vit_3d", "SimpleViT")(
        image_size=16, image_patch_size=8, frames=4, frame_patch_size=2, depth=2, **KW), VIDEO, 2),
    "simple_vit_1d": (lambda: _cls("simple_vit_1d", "SimpleViT")(seq_len=32, patch_size=4,
                                                                 depth=2, **KW), SERIES, 2),
    "simple_vit_fft": (lambda: _cls("simple_vit_with_fft", "SimpleViT")(
        image_size=16, patch_size=8, freq_patch_size=8, depth=2, **KW), IMAGE, 2),
    "simple_vit_patch_dropout": (lambda: _cls("simple_vit_with_patch_dropout", "SimpleViT")(
        image_size=16, patch_size=4, depth=2, **KW), IMAGE, 2),
    "vit_patch_dropout": (lambda: _cls("vit_with_patch_dropout")(image_size=16, patch_size=4,
                                                                 depth=2, **KW), IMAGE, 2),
    "vit_1d": (lambda: _cls("vit_1d")(seq_len=32, patch_size=4, depth=2, **KW), SERIES, 2),
    "vit_3d": (lambda: _cls("vit_3d")(image_size=16, image_patch_size=8, frames=4,
                                      frame_patch_size=2, depth=2, **KW), VIDEO, 2),
    "pit": (lambda: _cls("pit", "PiT")(image_size=16, patch_size=4, num_classes=5, dim=16,
                                       depth=(1, 1), heads=2, dim_head=8, mlp_dim=32), IMAGE, 2),
    "vivit": (lambda: _cls("vivit", "ViViT")(image_size=16, image_patch_size=8, frames=4,
                                             frame_patch_size=2, spatial_depth=1,
                                             temporal_depth=1, **KW), VIDEO, 2),
    "vivit_factorized_self_attention": (lambda: _cls("vivit", "ViViT")(
        image_size=16, image_patch_size=8, frames=4, frame_patch_size=2, spatial_depth=1,
        temporal_depth=1, variant="factorized_self_attention", use_flash_attn=False, **KW),
        VIDEO, 2),
    # MobileViT's attention reads [B, P, N, C] (rank 4); its feed-forward is SiLU (left).
    "mobile_vit": (lambda: _cls("mobile_vit", "MobileViT")(
        image_size=(64, 64), dims=[16, 16, 16], channels=[8] * 10 + [16], num_classes=5,
        depths=(1, 1, 1)), lambda: _x(2, 3, 64, 64), 3),
    "parallel_vit": (lambda: _cls("parallel_vit")(image_size=16, patch_size=8, depth=2, **KW),
                     IMAGE, 4),
    "patch_merger": (lambda: _cls("vit_with_patch_merger")(image_size=16, patch_size=4, depth=2,
                                                           patch_merge_layer=1,
                                                           patch_merge_num_tokens=4, **KW),
                     IMAGE, 2),
    # CCT: qkv / attn_drop / proj names, scale applied to q; its layer is post-norm with an
    # inline MLP (left, attention fused inside it).
    "cct": (lambda: _cls("cct", "CCT")(img_size=16, embedding_dim=32, n_conv_layers=1,
                                       kernel_size=3, stride=1, padding=1, num_layers=2,
                                       num_heads=2, mlp_ratio=1.5, num_classes=5,
                                       positional_embedding="learnable"), IMAGE, 2),
}
# What each system leaves, besides vit-pytorch's patch embedding (prefix of the reason).
EXPECTED_LEFT = {"mobile_vit": "activation SiLU", "cct": "TransformerEncoderLayer: its attention"}
PAIR_FUSED = {"vit", "simple_vit", "simple_vit_qk_norm", "simple_vit_register_tokens",
              "simple_vit_3d", "simple_vit_1d", "simple_vit_fft", "simple_vit_patch_dropout",
              "vit_patch_dropout", "vit_1d", "vit_3d", "pit"}


def _build(name):
    build, inputs, _ = SYSTEMS[name]
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # LayerNorm affine parameters away from (1, 0)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, inputs()


def _run(model, x, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # patch dropout, drop-path: the same draws in both models
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_same(got, want):
    (y, grads), (y0, grads0) = got, want
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads0.keys()
    # A gradient near zero analytically (a bias before a BatchNorm, which cancels it) is held to
    # the model's largest gradient, not to its own rounding noise.
    largest = max(g.abs().max().item() for g in grads0.values() if g is not None)
    for n, g0 in grads0.items():
        if g0 is None:
            assert grads[n] is None, n
            continue
        scale = max(g0.abs().max().item(), 1e-2 * largest, 1e-6)
        assert ((grads[n] - g0).abs().max() / scale).item() <= 1e-4, n


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_system_converts_fused_and_matches(name, op_calls):
    original, x = _build(name)
    model = vit_fast.convert(copy.deepcopy(original))
    summary = model.vit_fast_summary
    left = [(n, why) for n, why in summary.left if n != "to_patch_embedding"]
    assert all(why.startswith(EXPECTED_LEFT[name]) for _, why in left) if name in EXPECTED_LEFT \
        else not left, str(summary)
    attentions = [m for m in model.modules() if isinstance(m, FusedAttention)]
    assert attentions and all(type(m).__name__ == type(o).__name__ for m, o in zip(
        model.modules(), original.modules()))
    assert (name in PAIR_FUSED) == any(n for n, _ in summary.fused), str(summary)
    assert not vit_fast.convert.why_not_fused(model)
    for train in (False, True):
        original.train(train)
        model.train(train)
        want = _run(original, x)
        op_calls.clear()
        got = _run(model, x)
        assert op_calls.get("fused_qkv_attention") == SYSTEMS[name][2], op_calls
        if any(isinstance(m, FusedFeedForward) for m in model.modules()):
            assert op_calls.get("gelu_mlp"), op_calls
        _assert_same(got, want)


@pytest.mark.parametrize("name", ["simple_vit_qk_norm", "pit", "vivit", "mobile_vit", "cct",
                                  "parallel_vit"])
def test_system_hooks_fire(name):
    original, x = _build(name)
    model = vit_fast.convert(copy.deepcopy(original))
    first = next(n for n, m in model.named_modules() if isinstance(m, FusedAttention))
    calls = {"original": [], "converted": []}
    for key, m in (("original", original), ("converted", model)):
        attn = m.get_submodule(first)
        attn.register_forward_hook(lambda mod, a, out, key=key: (calls[key].append(1), out * 2)[1])
        inner = getattr(attn, "to_qkv", None) or getattr(attn, "qkv", None)
        inner.register_forward_hook(lambda mod, a, out, key=key: (calls[key].append(2), out)[1])
    _assert_same(_run(model.eval(), x), _run(original.eval(), x))
    assert calls["converted"] == calls["original"] and 1 in calls["converted"] \
        and 2 in calls["converted"]
    assert first in vit_fast.convert.why_not_fused(model)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="TRITON_INTERPRET=1 is not set (tests/conftest.py sets it first)")
@pytest.mark.parametrize("name", ["simple_vit_qk_norm", "vit"])
def test_system_matches_on_the_triton_kernels(name):
    build = SYSTEMS[name][0]
    torch.manual_seed(0)
    original = build() if name != "vit" else _cls("vit")(image_size=16, patch_size=8, depth=1,
                                                         **KW)
    original.train()
    model = vit_fast.convert(copy.deepcopy(original))
    x = IMAGE()
    want = _run(original, x)
    with vit_fast.use_backend("triton"):
        got = _run(model, x)
    _assert_same(got, want)


LEFT = {
    "cait": (lambda: _cls("cait", "CaiT")(image_size=16, patch_size=8, depth=1, cls_depth=1, **KW),
             "talking heads"),
    "deepvit": (lambda: _cls("deepvit", "DeepViT")(image_size=16, patch_size=8, depth=1, **KW),
                "re-attention"),
    "lsa": (lambda: _cls("vit_for_small_dataset")(image_size=16, patch_size=8, depth=1, **KW),
            "LSA"),
    "cross_vit": (lambda: _cls("cross_vit", "CrossViT")(
        image_size=16, num_classes=5, sm_dim=16, lg_dim=32, sm_patch_size=4, sm_enc_depth=1,
        sm_enc_heads=2, sm_enc_mlp_dim=32, sm_enc_dim_head=8, lg_patch_size=8, lg_enc_depth=1,
        lg_enc_heads=2, lg_enc_mlp_dim=32, lg_enc_dim_head=8, cross_attn_depth=1,
        cross_attn_heads=2, cross_attn_dim_head=8, depth=1), "cross-attention to a context"),
    "cvt": (lambda: _cls("cvt", "CvT")(num_classes=5, s1_emb_dim=16, s1_heads=1, s1_depth=1,
                                       s2_emb_dim=16, s2_heads=2, s2_depth=1, s3_emb_dim=32,
                                       s3_heads=2, s3_depth=1), "convolutional q/k/v"),
}


@pytest.mark.parametrize("name", list(LEFT))
def test_attention_that_cannot_fuse_stays_eager_with_the_reason(name, op_calls):
    build, words = LEFT[name]
    torch.manual_seed(0)
    original = build().eval()
    model = vit_fast.convert(copy.deepcopy(original))
    x = _x(2, 3, 32, 32) if name == "cvt" else IMAGE()
    reasons = dict(model.vit_fast_summary.left)
    assert any(words in why for why in reasons.values()), str(model.vit_fast_summary)
    op_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    assert not op_calls.get("fused_qkv_attention")


def test_copied_vit_pytorch_code_in_a_user_module_converts():
    """By structure, not by where the class lives: a user's copy of SimpleViT's attention."""
    class MyAttention(nn.Module):
        def __init__(self, dim, heads, dim_head):
            super().__init__()
            self.heads, self.scale = heads, dim_head ** -0.5
            self.norm = nn.LayerNorm(dim)
            self.attend = nn.Softmax(dim=-1)
            self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

        def forward(self, x):
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                       for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
            attn = self.attend(torch.einsum("bhid,bhjd->bhij", q, k) * self.scale)
            return self.to_out((attn @ v).transpose(1, 2).flatten(2))

    class Causal(MyAttention):  # a mask the probe must catch
        def forward(self, x):
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                       for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
            s = (q @ k.transpose(-1, -2)) * self.scale
            mask = torch.ones(s.shape[-2:], dtype=torch.bool).triu(1)
            attn = self.attend(s.masked_fill(mask, float("-inf")))
            return self.to_out((attn @ v).transpose(1, 2).flatten(2))

    torch.manual_seed(0)
    model = nn.Sequential(MyAttention(32, 2, 16), Causal(32, 2, 16))
    original = copy.deepcopy(model)
    vit_fast.convert(model)
    summary = model.vit_fast_summary
    assert summary.swapped == ["0"] and isinstance(model[0], MyAttention)
    assert "does not compute softmax" in dict(summary.left)["1"]
    x = _x(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def test_probe_runs_once_per_kind_of_layer(monkeypatch):
    from vit_fast import vit_pytorch_match
    calls = []
    real = vit_pytorch_match.probe_attention
    monkeypatch.setattr(vit_pytorch_match, "probe_attention",
                        lambda m, form: (calls.append(1), real(m, form))[1])
    vit_pytorch_match._VERDICTS.clear()
    torch.manual_seed(0)
    vit_fast.convert(_cls("vit")(image_size=16, patch_size=8, depth=3, **KW))
    assert len(calls) == 1


def test_pickle_and_deepcopy_keep_the_converted_classes(tmp_path):
    original, x = _build("simple_vit_qk_norm")
    model = vit_fast.convert(original).eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        assert type(copied.transformer.layers[0][0]) is type(model.transformer.layers[0][0])
        with torch.no_grad():
            torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
