"""vit_fast.convert on Hugging Face transformers' ViT, DeiT, DINOv2, CLIP and SigLIP vision models
(transformers is a test-only dependency, pinned in requirements-dev.txt).

Tiny random configs: the converted layers must give the original's last_hidden_state and every
parameter's gradient (within 1e-4), keep the same Parameter objects and state_dict keys, fall
back per call where the fused path cannot be exact, and save fewer bytes for backward.
"""
import ast
import copy
import io
import os
import pathlib

import pytest
import torch

import vit_fast

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(test-only dependency: pip install -r requirements-dev.txt)")
from vit_fast import convert_transformers as ct  # noqa: E402

IMG = 16
SMALL = dict(image_size=IMG, patch_size=8, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=2)


def _config(family, **kw):
    """A tiny random config of ``family`` (dropout 0 unless kw says otherwise)."""
    T = transformers
    base = {**SMALL, **kw}
    if family in ("vit", "deit"):
        base.setdefault("intermediate_size", 72)
        base.setdefault("hidden_dropout_prob", 0.0)
        base.setdefault("attention_probs_dropout_prob", 0.0)
        return (T.ViTModel if family == "vit" else T.DeiTModel), \
            (T.ViTConfig if family == "vit" else T.DeiTConfig)(**base)
    if family == "dinov2":
        base.setdefault("mlp_ratio", 3)
        base.setdefault("layerscale_value", 0.5)
        return T.Dinov2Model, T.Dinov2Config(**base)
    base.setdefault("intermediate_size", 72)
    if family == "clip":  # quick_gelu (CLIP's default): the MLP runs eagerly
        return T.CLIPVisionModel, T.CLIPVisionConfig(**base)
    return T.SiglipVisionModel, T.SiglipVisionConfig(**base)  # gelu_pytorch_tanh


FAMILIES = ["vit", "deit", "dinov2", "clip", "siglip"]
ACT = {"vit": "gelu", "deit": "gelu", "dinov2": "gelu", "clip": "quick_gelu",
       "siglip": "gelu_pytorch_tanh"}


def _build(family, **kw):
    cls, cfg = _config(family, **kw)
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _layers(model):
    return [m for m in model.modules() if ct._layout_of(m) is not None
            or isinstance(m, ct._FusedLayerMixin)]


def _run(model, x, gy, seed=5):
    """(last_hidden_state, {name: grad}) of one forward/backward, drop-path draws seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x).last_hidden_state
    out.backward(gy)
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _assert_grads_close(got, want, tol=1e-4):
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:
            assert got[name] is None, f"{name}: gradient where the original has none"
            continue
        assert got[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(got[name], g, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_swaps_layers_and_matches(family, op_calls):
    kw = {"drop_path_rate": 0.4} if family == "dinov2" else {}  # drop-path: same draws, seeded
    model = _build(family, **kw)
    assert model.config.hidden_act == ACT[family]
    original = copy.deepcopy(model)
    keys, params = list(model.state_dict()), [id(p) for p in model.parameters()]
    assert vit_fast.convert(model) is model
    summary = model.vit_fast_summary
    assert len(summary.swapped) == 2 and f"swapped {len(summary.swapped)} module(s)" in str(summary)
    assert all(isinstance(m, ct._FusedLayerMixin) for m in _layers(model))
    assert all(isinstance(m, type(o)) for m, o in zip(_layers(model), _layers(original)))
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert [id(p) for p in model.parameters()] == params, "parameters were copied, not kept"
    left = dict(summary.left)
    if family == "clip":
        assert "quick_gelu" in left["encoder.layers.0.mlp"]
    else:
        assert not left, str(summary)

    x = torch.randn(3, 3, IMG, IMG)
    for mode in ("eval", "train"):
        getattr(model, mode)(), getattr(original, mode)()
        gy = torch.randn_like(original(x).last_hidden_state)
        want, want_grads = _run(original, x, gy)
        op_calls.clear()
        got, got_grads = _run(model, x, gy)
        assert op_calls.get("fused_qkv_attention") == 2, (mode, op_calls)
        assert op_calls.get("gelu_mlp", 0) == (0 if family == "clip" else 2)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        _assert_grads_close(got_grads, want_grads)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="TRITON_INTERPRET=1 is not set (tests/conftest.py sets it first)")
@pytest.mark.parametrize("family", ["vit", "deit", "dinov2", "clip", "siglip"])
def test_triton_backend_matches(family):
    kw = ({"drop_path_rate": 0.3} if family == "dinov2" else
          {"qkv_bias": False} if family == "vit" else {})
    original = _build(family, **kw).train()
    model = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():  # the token count differs per family (SigLIP has no class token)
        gy = torch.randn_like(original(x).last_hidden_state)
    want, want_grads = _run(original, x, gy)
    with vit_fast.use_backend("triton"):
        got, got_grads = _run(model, x, gy)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _assert_grads_close(got_grads, want_grads)


def test_output_attentions_and_hidden_states_fall_back(op_calls):
    original = _build("vit", attn_implementation="eager").eval()
    model = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, IMG, IMG)
    want = original(x, output_attentions=True, output_hidden_states=True)
    got = model(x, output_attentions=True, output_hidden_states=True)
    assert "fused_qkv_attention" not in op_calls  # transformers' forward, for its hooks
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b)
    # hidden states alone are recorded by hooks on the (converted) layers: still fused
    got = model(x, output_hidden_states=True)
    assert op_calls["fused_qkv_attention"] == 2
    assert len(got.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # output_attentions from the config (no argument reaches the layer) falls back too
    model.config.output_attentions = True
    assert len(model(x).attentions) == 2 and op_calls["fused_qkv_attention"] == 2


def test_fallback_reasons():
    model = vit_fast.convert(_build("vit", hidden_dropout_prob=0.1))
    layer = model.layers[0]
    x = torch.randn(2, 5, SMALL["hidden_size"])
    model.eval()
    assert ct.fallback_reason(layer, x, None, {}) == ""
    assert "attention_mask" in ct.fallback_reason(layer, x, torch.zeros(2, 1, 5, 5), {})
    assert "output_attentions" in ct.fallback_reason(layer, x, None, {"output_attentions": True})
    model.train()
    assert "hidden dropout" in ct.fallback_reason(layer, x, None, {})
    model.eval()
    model.set_attn_implementation("eager")
    assert ct.fallback_reason(layer, x, None, {}) == ""
    layer.attention.config._attn_implementation_internal = "flex_attention"
    assert "flex_attention" in ct.fallback_reason(layer, x, None, {})
    layer.attention.config._attn_implementation_internal = "sdpa"
    handle = layer.mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in ct.fallback_reason(layer, x, None, {})
    handle.remove()
    assert ct.fallback_reason(layer, x, None, {}) == ""

    class Adapter(torch.nn.Linear):  # e.g. a LoRA wrapper put in after conversion
        def forward(self, h):
            return super().forward(h) * 2
    q = layer.attention.q_proj
    layer.attention.q_proj = Adapter(q.in_features, q.out_features)
    assert "adapter" in ct.fallback_reason(layer, x, None, {})


def test_hidden_dropout_in_training_runs_the_original_forward(op_calls):
    original = _build("vit", hidden_dropout_prob=0.2).train()
    model = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, IMG, IMG)
    gy = torch.randn(2, 5, SMALL["hidden_size"])
    want, want_grads = _run(original, x, gy)
    got, got_grads = _run(model, x, gy)
    assert "fused_qkv_attention" not in op_calls
    torch.testing.assert_close(got, want)  # the same forward, the same dropout draws
    _assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_attention_dropout_runs_fused(family, op_calls):
    kw = {"attention_probs_dropout_prob": 0.5} if family == "vit" else {"attention_dropout": 0.5}
    original = _build(family, **kw)
    model = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        model.eval(), original.eval()  # eval: no dropout, identical to the original
        torch.testing.assert_close(model(x).last_hidden_state, original(x).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
        model.train()
        op_calls.clear()
        outs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            outs.append(model(x).last_hidden_state)
    assert op_calls["fused_qkv_attention"] == 6  # the fused attention, with its dropout
    torch.testing.assert_close(outs[0], outs[1])  # seeded: reproducible
    assert not torch.allclose(outs[0], outs[2])   # another seed: another mask
    with torch.no_grad():
        assert not torch.allclose(outs[0], model.eval()(x).last_hidden_state)
    model.train()
    out = model(x).last_hidden_state
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_save_pretrained_round_trip(tmp_path):
    original = _build("dinov2")
    keys = list(original.state_dict())
    model = vit_fast.convert(copy.deepcopy(original)).eval()
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    reloaded = type(original).from_pretrained(tmp_path).eval()
    assert list(reloaded.state_dict()) == keys
    for name, t in original.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], t, atol=0, rtol=0)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x).last_hidden_state
        # the one-liner for a pretrained model
        again = vit_fast.convert(type(original).from_pretrained(tmp_path)).eval()
        assert len(again.vit_fast_summary.swapped) == 2
        torch.testing.assert_close(again(x).last_hidden_state, want)
        torch.testing.assert_close(reloaded(x).last_hidden_state, want, atol=1e-4, rtol=1e-4)


def test_copy_and_pickle_keep_the_fused_layers():
    model = vit_fast.convert(_build("siglip")).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = model(x).last_hidden_state
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert all(isinstance(m, ct._FusedLayerMixin) for m in _layers(other))
        with torch.no_grad():
            torch.testing.assert_close(other(x).last_hidden_state, want)
    assert ct.VitFastSiglipEncoderLayer is type(model.encoder.layers[0])


def test_gradient_checkpointing(op_calls):
    original = _build("deit").train()
    model = vit_fast.convert(copy.deepcopy(original))
    original.activation_checkpointing_enable()
    model.activation_checkpointing_enable()
    x = torch.randn(2, 3, IMG, IMG)
    gy = torch.randn(2, 6, SMALL["hidden_size"])  # DeiT: cls + distillation tokens
    want, want_grads = _run(original, x, gy)
    got, got_grads = _run(model, x, gy)
    assert op_calls["fused_qkv_attention"] == 4  # forward + recompute in the backward
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _assert_grads_close(got_grads, want_grads)


def test_clip_text_layers_are_left():
    T = transformers
    cfg = T.CLIPConfig(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=8),
                       vision_config=dict(SMALL, intermediate_size=64), projection_dim=16)
    model = vit_fast.convert(T.CLIPModel(cfg))
    summary = model.vit_fast_summary
    assert summary.swapped == ["vision_model.encoder.layers.0", "vision_model.encoder.layers.1"]
    assert "text encoder" in dict(summary.left)["text_model.encoder.layers.0"]


@pytest.mark.parametrize("family", ["vit", "dinov2", "siglip", "clip"])
def test_saves_fewer_bytes_for_backward(family):
    """Counted on fake CUDA tensors in bf16 with the triton backend forced (vit_fast.bench.memory;
    transformers' sdpa counted as the flash kernel it runs on sm80+)."""
    from vit_fast.bench.memory import _run_fake
    original = _build(family, image_size=32, patch_size=4, hidden_size=64).train()
    model = vit_fast.convert(copy.deepcopy(original))
    shape = (8, 3, 32, 32)
    before = _run_fake(original, shape, torch.bfloat16).bytes
    after = _run_fake(model, shape, torch.bfloat16).bytes
    assert after < before, (family, before, after)


def test_vit_fast_imports_transformers_lazily():
    """No module of vit_fast imports transformers at import time (only inside functions)."""
    root = pathlib.Path(vit_fast.__file__).parent
    for path in root.rglob("*.py"):
        if "kernels" in path.parts:
            continue
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "transformers" for n in names), path


def test_autograd_functions_gradcheck():
    from vit_fast.transformers_autograd import qkv_linear, quick_gelu_mlp

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(qkv_linear, (t(2, 3, 4), t(6, 4), t(6, 4), t(6, 4), t(18)))
    assert torch.autograd.gradcheck(qkv_linear, (t(2, 3, 4), t(6, 4), t(6, 4), t(6, 4), None))
    assert torch.autograd.gradcheck(quick_gelu_mlp, (t(2, 3, 4), t(7, 4), t(7), t(5, 7), t(5)))
    assert torch.autograd.gradcheck(quick_gelu_mlp, (t(3, 4), t(7, 4), None, t(5, 7), None))


@pytest.mark.parametrize("family", ["vit", "clip"])
def test_autocast_matches_eager_autocast(family):
    """Under CPU autocast (bf16) the converted layers take the plain F.linear / MLP-module path;
    docs/design.md's tolerance rule against the original under the same autocast."""
    from tolerance import assert_close_by_rule
    original = _build(family).eval()
    model = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref64 = copy.deepcopy(original).double()(x.double()).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = original(x).last_hidden_state
            ours = model(x).last_hidden_state
    assert ours.dtype == same.dtype
    assert_close_by_rule(ours, same, ref64, "last_hidden_state")


@pytest.mark.parametrize("act,form", [("gelu", "none"), ("gelu_python", "none"),
                                      ("gelu_pytorch_tanh", "tanh"), ("gelu_new", "tanh"),
                                      ("gelu_fast", "tanh"), ("quick_gelu", "quick"),
                                      ("relu", None), ("silu", None)])
def test_activation_forms(act, form):
    fn = transformers.activations.ACT2FN[act]
    assert ct._gelu_form(fn)[0] == form
    if form in ("none", "tanh"):  # the form computes what the activation computes
        a = torch.randn(1000, dtype=torch.float64) * 3
        torch.testing.assert_close(fn(a), torch.nn.functional.gelu(a, approximate=form),
                                   atol=1e-6, rtol=1e-6)


def test_dinov2_swiglu_runs_its_own_mlp(op_calls):
    original = _build("dinov2", use_swiglu_ffn=True).train()
    model = vit_fast.convert(copy.deepcopy(original))
    assert len(model.vit_fast_summary.swapped) == 2
    assert "Dinov2SwiGLUFFN" in dict(model.vit_fast_summary.left)["encoder.layer.0.mlp"]
    x = torch.randn(2, 3, IMG, IMG)
    gy = torch.randn(2, 5, SMALL["hidden_size"])
    want, want_grads = _run(original, x, gy)
    got, got_grads = _run(model, x, gy)
    assert op_calls["fused_qkv_attention"] == 2 and "gelu_mlp" not in op_calls
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    _assert_grads_close(got_grads, want_grads)


def test_transformers_4_layers_are_left(monkeypatch):
    """4.x layers return tuples (CLIP's keeps the same submodule names): refused by version."""
    model = _build("clip")
    monkeypatch.setattr(ct, "_transformers_version", lambda: "4.57.1")
    vit_fast.convert(model)
    summary = model.vit_fast_summary
    assert summary.swapped == [] and len(summary.left) == 2
    assert all("transformers >= 5" in why for _, why in summary.left)
    assert not any(isinstance(m, ct._FusedLayerMixin) for m in model.modules())


def test_second_convert_lists_the_layers_as_already_converted():
    """issue 27, item 12 (minor): converting again says what is already converted."""
    model = vit_fast.convert(_build("vit"))
    first = model.vit_fast_summary
    again = vit_fast.convert(model).vit_fast_summary
    assert sorted(again.already) == sorted(first.swapped) and len(again.already) == 2
    assert not again.swapped and not again.left, str(again)
    assert "has no transformer block" not in str(again) and "2 already converted" in str(again)
