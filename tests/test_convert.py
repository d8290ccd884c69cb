"""vit_fast.convert and block_fn= against the real timm 1.0.31 models (fp32, CPU)."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import vit_fast

CASES = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(), (224, 224)),
    "vit_small_ls_qknorm_reg_avg_dynamic": (
        "vit_small_patch16_224",
        dict(init_values=1e-5, qk_norm=True, reg_tokens=4, class_token=False, global_pool="avg",
             dynamic_img_size=True), (160, 224)),
}


def _rel_err(ours, ref, floor=1e-12):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_timm(case):
    name, kw, (h, w) = CASES[case]
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, drop_path_rate=0.0, **kw).train()
    converted = vit_fast.convert(copy.deepcopy(original))
    summary = converted.vit_fast_summary
    assert len([n for n in summary.swapped if n.startswith("blocks.")]) == len(original.blocks)
    assert "patch_embed" in summary.swapped and not summary.left
    assert isinstance(converted.norm if case == "vit_tiny" else converted.fc_norm, vit_fast.modules.LayerNorm)
    assert all(isinstance(b, vit_fast.Block) for b in converted.blocks)
    assert converted.training
    x = torch.randn(2, 3, h, w)
    a, b = original(x), converted(x)
    assert (a - b).abs().max().item() <= 1e-5
    a.sum().backward()
    b.sum().backward()
    params_o, params_c = dict(original.named_parameters()), dict(converted.named_parameters())
    assert list(params_o) == list(params_c)
    # k_norm.bias has a zero gradient analytically (a shift of every key adds the same q·b to a
    # query's logits, which softmax cancels): its rounding noise is measured against the largest
    # gradient of the model, not against itself.
    largest = max(p.grad.abs().max().item() for p in params_o.values())
    for key, p in params_o.items():
        floor = largest if key.endswith("k_norm.bias") else 1e-12
        assert _rel_err(params_c[key].grad, p.grad, floor) <= 1e-5, key


def test_convert_keeps_weights_device_dtype_mode_and_objects():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval().double()
    qkv_weight = model.blocks[0].attn.qkv.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vit_fast.convert(model)
    assert model.blocks[0].attn.qkv.weight is qkv_weight       # same Parameter: optimizers keep it
    assert not model.training and not model.blocks[3].training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


@pytest.mark.parametrize("name,kw", [
    ("deit_tiny_patch16_224", {}),
    ("vit_small_patch14_dinov2", dict(img_size=70)),
    ("vit_base_patch16_clip_224", dict(depth=2)),
    ("vit_small_patch16_224", dict(reg_tokens=4, depth=2)),
])
def test_convert_model_families(name, kw):
    torch.manual_seed(0)
    original = timm.create_model(name, pretrained=False, **kw).eval()
    converted = vit_fast.convert(copy.deepcopy(original))
    assert converted.vit_fast_summary.swapped and not converted.vit_fast_summary.left
    size = original.patch_embed.img_size
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert (original(x) - converted(x)).abs().max().item() <= 1e-4


def test_block_fn_builds_and_loads_timm_checkpoints_both_ways():
    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5)
    ours = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5,
                             block_fn=vit_fast.Block)
    assert all(isinstance(b, vit_fast.Block) for b in ours.blocks)
    result = ours.load_state_dict(timm_model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    back = timm.create_model("vit_tiny_patch16_224", pretrained=False, init_values=1e-5)
    result = back.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours.eval()(x) - timm_model.eval()(x)).abs().max().item() <= 1e-5


def test_convert_options_and_nothing_to_convert():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    vit_fast.convert(model, blocks=False)
    assert model.vit_fast_summary.swapped == ["patch_embed"]
    assert ("blocks.0", "blocks=False") in model.vit_fast_summary.left
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = copy.deepcopy(plain.state_dict())
    assert vit_fast.convert(plain) is plain
    assert not plain.vit_fast_summary.swapped
    assert "has no transformer block" in str(plain.vit_fast_summary)
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    with pytest.raises(TypeError, match="model"):
        vit_fast.convert("vit_tiny")


def test_convert_leaves_blocks_it_cannot_fuse_with_reason():
    from timm.layers import GluMlp
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, mlp_layer=GluMlp,
                              act_layer=nn.SiLU)
    vit_fast.convert(model)
    left = dict(model.vit_fast_summary.left)
    assert "GluMlp" in left["blocks.0"]


def test_documented_why_not_fused_spelling_works():
    """README: ``vit_fast.convert.why_not_fused(model)`` (vit_fast.convert is the function)."""
    model = vit_fast.convert(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1,
                                               img_size=32, patch_size=16))
    assert vit_fast.convert.why_not_fused(model) == {}
    model.blocks[0].norm1.register_forward_hook(lambda m, a, out: out)
    assert vit_fast.convert.why_not_fused(model) == {"blocks.0": ["norm1 has forward hooks"]}
    assert vit_fast.convert.ConversionSummary is type(model.vit_fast_summary)


# --- timm's other transformer blocks: named, with the reason (issue 28, item 6) ------------------

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
OTHER_BLOCKS = {
    # model: (kwargs, input size, words the reason must contain, blocks it names). EvaBlock and
    # BEiT's Block convert fused (tests/test_eva_blocks.py, tests/test_beit_blocks.py) except in
    # the configurations below, which their converters name.
    "vit_base_patch16_rope_224": (dict(img_size=32, use_post_norm=True, qk_norm=False), 32,
                                  ["EvaBlockPostNorm", "rotary position embeddings"], 2),
    "eva02_small_patch14_224": (dict(img_size=28, num_kv_heads=1, attn_type="rope",
                                     qkv_fused=False), 28, ["grouped-query attention"], 2),
    "vit_pe_core_tiny_patch16_384": (dict(img_size=32, use_post_norm=True, qk_norm=False), 32,
                                     ["EvaBlockPostNorm", "post-norm"], 2),
    "cait_xxs24_224": (dict(img_size=32, depth_token_only=1), 32, ["talking-heads"], 3),
}


@pytest.mark.parametrize("name", list(OTHER_BLOCKS))
def test_blocks_left_as_timm_are_named_with_the_reason(name):
    kw, size, words, count = OTHER_BLOCKS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY, **kw).eval()
    original = copy.deepcopy(model)
    vit_fast.convert(model)
    summary = model.vit_fast_summary
    left = dict(summary.left)
    blocks = [n for n in left if "blocks" in n]
    assert len(blocks) == count, str(summary)
    assert all(w in left["blocks.0"] for w in words), left["blocks.0"]
    assert f"left {len(summary.left)}" in str(summary) and len(summary.left) >= count
    assert not any(n.startswith("blocks.0.") for n in left)  # the block, not its parts
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)


def test_a_registered_block_converter_replaces_or_explains():
    from timm.models.eva import EvaBlock

    from vit_fast import timm_blocks

    class Wrapped(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, **kw):
            return self.block(x, **kw)

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, **TINY)
    registered = dict(timm_blocks._CONVERTERS)  # vit_fast's own (EvaBlock, BEiT), restored below
    try:
        timm_blocks.register_block_converter(EvaBlock, lambda block, m: Wrapped(block))
        vit_fast.convert(model)
        assert all(isinstance(b, Wrapped) for b in model.blocks)
        assert "blocks.0" in model.vit_fast_summary.swapped
        model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=32, **TINY)
        timm_blocks.register_block_converter(
            "timm.models.eva.EvaBlock", lambda block, m: "rotary position embeddings: not yet")
        vit_fast.convert(model)
        left = dict(model.vit_fast_summary.left)
        assert left["blocks.1"] == "rotary position embeddings: not yet"
    finally:
        timm_blocks._CONVERTERS.clear()
        timm_blocks._CONVERTERS.update(registered)
