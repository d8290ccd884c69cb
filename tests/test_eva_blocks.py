"""timm's EvaBlock converted fused (vit_fast/eva_block.py): tiny DINOv3, EVA02 small and base,
RoPE-ViT axial and mixed (learnable frequencies) and PE-core match timm's outputs and gradients
in fp32, on the reference backend and on the Triton kernels under the interpreter, in train
(dropout 0) and eval; hooks and unhandled configurations keep timm's path with the reason."""
import pytest
import torch

import vit_fast
from block_match import check, pair
from vit_fast.eva_block import EvaBlock

MODELS = {
    # name: (timm model, extra kwargs, the ops its blocks must run)
    "dinov3": ("vit_small_patch16_dinov3", {}, {"rotary_qk", "gelu_mlp"}),  # half-split, 4 regs
    "eva02_small": ("eva02_small_patch14_224", {}, {"rotary_qk", "glu_mlp"}),  # packed GluMlp
    "eva02_base": ("eva02_base_patch14_224", {}, {"rotary_qk", "glu_mlp"}),  # q/k/v, SwiGLU+LN
    "rope_axial": ("vit_base_patch16_rope_224", {}, {"rotary_qk", "gelu_mlp"}),
    "rope_mixed": ("vit_base_patch16_rope_mixed_224", {}, {"rotary_qk", "gelu_mlp"}),
    "pe_core": ("vit_pe_core_tiny_patch16_384", {}, {"rotary_qk", "gelu_mlp"}),
    "rope_qk_norm": ("vit_base_patch16_rope_224", {"qk_norm": True},
                     {"qk_norm", "rotary_qk", "gelu_mlp"}),  # norm, then rope (timm's order)
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("model", list(MODELS))
def test_converted_eva_models_match_timm(model, backend, train, monkeypatch):
    name, kwargs, ops = MODELS[model]
    calls, ours = check(name, backend, train, EvaBlock, monkeypatch, **kwargs)
    assert ops <= set(calls), calls


def test_eva02_base_keeps_its_k_projection_without_bias():
    theirs, ours, _ = pair("eva02_base_patch14_224")
    attn = ours.blocks[0].attn
    assert attn.qkv is None and attn.k_proj.bias is None and attn.q_proj.bias is not None
    assert "blocks.0.attn.k_proj.bias" not in ours.state_dict()


def test_mixed_rope_frequencies_get_their_gradient():
    theirs, ours, _ = pair("vit_base_patch16_rope_mixed_224")
    with vit_fast.use_backend("triton"):
        ours.forward_features(torch.randn(1, 3, 32, 32)).square().sum().backward()
    freqs = [p for n, p in ours.named_parameters() if n.startswith("rope.")]
    assert freqs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in freqs)


@pytest.mark.parametrize("where", ["attn", "attn.proj"])  # proj: gamma_1 is folded into it
def test_a_hook_keeps_timms_path_and_fires(where):
    theirs, ours, _ = pair("vit_small_patch16_dinov3")
    seen = []
    ours.blocks[0].get_submodule(where).register_forward_hook(
        lambda m, a, out: seen.append(out.shape))
    assert vit_fast.convert.why_not_fused(ours).get("blocks.0") == [f"{where} has forward hooks"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x))
    assert seen


def test_an_unhandled_configuration_stays_timms_with_the_reason():
    theirs, ours, summary = pair("vit_base_patch16_rope_224", attn_type="rope", qkv_fused=False,
                                 num_kv_heads=1)
    left = dict(summary.left)
    assert "grouped-query" in left["blocks.0"] and "EvaBlock" in left["blocks.0"], str(summary)
    assert type(ours.blocks[0]) is type(theirs.blocks[0])


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) through the converted blocks (the new ops are registered
    custom ops with fake implementations), kernels under the interpreter."""
    theirs, ours, _ = pair("eva02_base_patch14_224")
    x = torch.randn(2, 3, 32, 32)
    with vit_fast.use_backend("triton"):
        out = torch.compile(ours.forward_features, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, theirs.forward_features(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "eva02_small_patch14_224"])
def test_bench_memory_counts_the_eva_block_with_its_rope(name):
    """`bench memory --model <eva> --scope block`: the block is called with the model's rope;
    the kernel path saves less than timm's and no [.., N, N] tensor (fake CUDA, counted)."""
    from vit_fast.bench.memory import measure
    rows, notes = measure(name, batch=2, what=("block",))
    assert not notes, notes
    by = {r["impl"]: r for r in rows}
    assert by["vit_fast"]["ratio"] < 0.7, rows
    n = by["vit_fast"]["shapes"][0][0][1]  # x [B, N, C]
    assert not any(len(s) >= 2 and s[-1] == s[-2] == n for s, _ in by["vit_fast"]["shapes"])


def test_converting_again_names_the_blocks_already_converted():
    theirs, ours, _ = pair("eva02_small_patch14_224")
    ours.blocks[0].mlp.fc2.register_forward_hook(lambda m, a, out: None)
    summary = vit_fast.convert(ours).vit_fast_summary
    assert "blocks.0" in summary.already and not summary.swapped and not summary.left
    model = pair("eva02_small_patch14_224")[0]
    model.blocks[0].mlp.fc2.register_forward_hook(lambda m, a, out: None)
    summary = vit_fast.convert(model).vit_fast_summary
    assert dict(summary.not_fused)["blocks.0"] == ["mlp.fc2 has forward hooks"], str(summary)


@pytest.mark.parametrize("name", ["eva02_small_patch14_224", "vit_small_patch16_dinov3"])
def test_autocast_bf16_within_the_tolerance_rule(name):
    from block_match import check_amp
    check_amp(name)


@pytest.mark.parametrize("name,kwargs", [
    ("eva02_small_patch14_224", dict(scale_attn_inner=True)),  # attn.norm before proj
    ("vit_base_patch16_rope_224", dict(attn_only_layer_scale=True, init_values=0.1)),  # no gamma_2
    ("eva02_base_patch16_clip_224", {}),
], ids=["scale_attn_inner", "attn_only_layer_scale", "eva02_clip"])
def test_more_eva_configurations_on_the_kernels(name, kwargs, monkeypatch):
    check(name, "triton", True, EvaBlock, monkeypatch, **kwargs)


def test_an_adapter_on_a_projection_keeps_timms_path():
    """A Linear subclass with its own forward (LoRA style) on a projection the fused path reads
    instead of calling: that block runs timm's forward, and says why."""
    class Adapted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    theirs, ours, _ = pair("eva02_base_patch14_224")  # separate q/k/v projections
    for m in (theirs, ours):
        m.blocks[0].attn.k_proj.__class__ = Adapted
    assert vit_fast.convert.why_not_fused(ours)["blocks.0"] == [
        "attn.k_proj is Adapted with its own forward (an adapter?)"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x))
