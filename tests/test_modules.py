"""vit_fast's modules against timm 1.0.31's own: signatures, state_dict keys, defaults, outputs."""
import inspect

import pytest
import timm.layers
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block as TimmBlock

import vit_fast


def _params(fn):
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("ours,theirs", [
    (vit_fast.Block, TimmBlock), (vit_fast.Attention, timm.layers.Attention),
    (vit_fast.Mlp, timm.layers.Mlp), (vit_fast.LayerScale, timm.layers.LayerScale),
    (vit_fast.PatchEmbed, timm.layers.PatchEmbed)])
def test_signatures_match_timm(ours, theirs):
    # Same positional order and defaults for every timm argument; ours may add keyword-only ones.
    sig_o, sig_t = inspect.signature(ours.__init__), inspect.signature(theirs.__init__)
    names_t = _params(theirs.__init__)
    assert _params(ours.__init__)[: len(names_t)] == names_t
    for name in names_t:
        po, pt = sig_o.parameters[name], sig_t.parameters[name]
        if pt.default is not inspect.Parameter.empty and not isinstance(pt.default, type):
            assert po.default == pt.default, name
    fwd_t = _params(theirs.forward)
    assert _params(ours.forward)[: len(fwd_t)] == fwd_t
    extra = list(inspect.signature(ours.forward).parameters.values())[len(fwd_t):]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)


def _pair(init_values=None, **kw):
    torch.manual_seed(0)
    theirs = TimmBlock(64, 4, init_values=init_values, qkv_bias=True, **kw)
    ours = vit_fast.Block(64, 4, init_values=init_values, qkv_bias=True, **kw)
    missing = ours.load_state_dict(theirs.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("kw", [dict(), dict(init_values=1e-5), dict(qk_norm=True),
                                dict(scale_attn_norm=True, scale_mlp_norm=True),
                                dict(act_layer=nn.SiLU), dict(mlp_ratio=2.5, proj_bias=False),
                                dict(act_layer=timm.layers.activations.GELUTanh)])
def test_block_matches_timm(kw):
    theirs, ours = _pair(**kw)
    x = torch.randn(2, 17, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    a, b = theirs(x), ours(x2)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    assert _rel_err(x2.grad, x.grad) <= 1e-5
    for (name, p1), (_, p2) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert _rel_err(p2.grad, p1.grad) <= 1e-5, name


def _rel_err(ours, ref):
    """Max abs error relative to the largest reference value, floored at 1: some gradients here
    are exactly zero in exact math (k_norm's bias shifts a whole softmax row) and only noise."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def test_block_defaults_and_layer_norm_eps():
    b = vit_fast.Block(32, 2)
    assert b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6
    assert isinstance(b.ls1, nn.Identity) and isinstance(b.drop_path1, nn.Identity)
    assert b.mlp.fc1.out_features == 128 and b.attn.qkv.bias is None
    assert b.fusable()[0]


def test_drop_path_same_samples_as_timm_with_same_seed():
    theirs, ours = _pair(init_values=0.1, drop_path=0.5)
    theirs.train()
    ours.train()
    x = torch.randn(8, 5, 64)
    torch.manual_seed(3)
    a = theirs(x)
    torch.manual_seed(3)
    b = ours(x)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_mask_and_causal_take_the_eager_attention():
    theirs, ours = _pair()
    x = torch.randn(2, 6, 64)
    mask = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x, is_causal=True), theirs(x, is_causal=True), atol=1e-5, rtol=1e-5)
    assert not ours.attn.uses_fused_op(mask) and not ours.attn.uses_fused_op(is_causal=True)


def test_fused_attn_false_materializes_softmax_like_timm():
    theirs, ours = _pair()
    theirs.attn.fused_attn = ours.attn.fused_attn = False
    seen = []
    ours.attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 6, 64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    assert seen and seen[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(seen[0].sum(-1), torch.ones(2, 4, 6))


def test_legacy_keywords_qk_scale_and_drop():
    b = vit_fast.Block(64, 4, mlp_ratio=4.0, qkv_bias=True, qk_scale=0.5, drop=0.1, attn_drop=0.2,
                       drop_path=0.1, act_layer=nn.GELU, norm_layer=nn.LayerNorm)
    assert b.attn.scale == 0.5 and b.attn.proj_drop.p == 0.1 and b.mlp.drop1.p == 0.1
    assert b.attn.attn_drop.p == 0.2 and b.drop_path1.drop_prob == 0.1
    assert set(b.state_dict()) == set(TimmBlock(64, 4, qkv_bias=True).state_dict())
    b.eval()
    x = torch.randn(1, 5, 64)
    qkv = b.attn.qkv(b.norm1(x))
    q, k, v = qkv.view(1, 5, 3, 4, 16).permute(2, 0, 3, 1, 4)
    expected = ((q @ k.transpose(-1, -2) * 0.5).softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 64)
    torch.testing.assert_close(b.attn.attend(qkv), expected, atol=1e-6, rtol=1e-5)


def test_mlp_and_layer_scale_match_timm():
    torch.manual_seed(0)
    theirs, ours = timm.layers.Mlp(24, 72, bias=(True, False)), vit_fast.Mlp(24, 72, bias=(True, False))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    ls_t, ls_o = timm.layers.LayerScale(24, 0.3), vit_fast.LayerScale(24, 0.3)
    assert list(ls_o.state_dict()) == list(ls_t.state_dict()) == ["gamma"]
    torch.testing.assert_close(ls_o(x), ls_t(x))


@pytest.mark.parametrize("kw,size", [(dict(), (32, 32)), (dict(bias=False), (32, 32)),
                                     (dict(dynamic_img_pad=True, strict_img_size=False), (30, 45)),
                                     (dict(output_fmt="NHWC"), (32, 32)),
                                     (dict(norm_layer=nn.LayerNorm), (32, 32))])
def test_patch_embed_matches_timm(kw, size):
    torch.manual_seed(0)
    theirs = timm.layers.PatchEmbed(32, 16, 3, 48, **kw)
    ours = vit_fast.PatchEmbed(32, 16, 3, 48, **kw)
    ours.load_state_dict(theirs.state_dict())
    assert ours.proj.weight.shape == (48, 3, 16, 16)
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_patch_embed_strict_size_error_names_sizes():
    pe = vit_fast.PatchEmbed(32, 16, 3, 48)
    with pytest.raises(ValueError, match="48x32"):
        pe(torch.randn(1, 3, 48, 32))


def _double(m, args, out):
    return out * 2


@pytest.mark.parametrize("which,site", [("mlp", "fc1"), ("mlp", "act"), ("mlp", "fc2"),
                                        ("attn", "q_norm"), ("attn", "qkv"), ("patch", "proj")])
def test_standalone_modules_honour_hooks_like_timm(which, site):
    torch.manual_seed(0)
    if which == "mlp":
        theirs, ours, x = timm.layers.Mlp(24, 48), vit_fast.Mlp(24, 48), torch.randn(2, 5, 24)
    elif which == "attn":
        theirs, ours = timm.layers.Attention(24, 2), vit_fast.Attention(24, 2)
        x = torch.randn(2, 5, 24)
    else:
        theirs, ours = timm.layers.PatchEmbed(16, 8, 3, 24), vit_fast.PatchEmbed(16, 8, 3, 24)
        x = torch.randn(2, 3, 16, 16)
    ours.load_state_dict(theirs.state_dict())
    assert ours.why_not_fused() == []
    for m in (theirs, ours):
        getattr(m, site).register_forward_hook(_double)
    # Attention calls qkv itself, so a hook there does not stop its fused op.
    bypassed = not (which == "attn" and site == "qkv")
    assert ours.why_not_fused() == ([f"{site} has forward hooks"] if bypassed else [])
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_block_why_not_fused_reasons():
    b = vit_fast.Block(32, 2, proj_drop=0.1).train()
    assert b.why_not_fused() == ["mlp.drop1 is active (training, p=0.1)",
                                 "mlp.drop2 is active (training, p=0.1)"]
    b.eval()
    assert b.why_not_fused() == []
    b.norm2.forward = lambda x: x  # a forward set on the instance is never bypassed
    assert b.why_not_fused() == ["norm2.forward is set on the instance"]
    x = torch.randn(1, 3, 32)
    expected = x + b.attn(b.norm1(x))
    expected = expected + b.mlp(expected)
    torch.testing.assert_close(b(x), expected)
    del b.norm2.forward
    b.mlp.act = nn.SiLU()
    assert b.why_not_fused() == ["mlp.act is SiLU: the fused MLP computes GELU"]
    assert b.fusable() == (False, "mlp.act is SiLU: the fused MLP computes GELU")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_block_wrong_input_width_raises_value_error(backend):
    b = vit_fast.Block(32, 2)
    with vit_fast.use_backend(backend), pytest.raises(ValueError, match="shape"):
        b(torch.randn(1, 3, 24))
