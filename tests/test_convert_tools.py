"""Converted models behave like timm's under the tools users apply to them (issue 13).

Every test applies the same modification to a timm ViT and to its vit_fast.convert copy and
compares outputs and gradients, in eval and in train mode (drop-path on, seeded). The rule under
test: the fused path runs only when nothing attached could notice it is bypassed; otherwise the
plain submodules run for that call, and why_not_fused() says why.
"""
import copy
import io
import pickle
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize, prune

import vit_fast
from vit_fast.convert import why_not_fused

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning",
    "ignore:Full backward hook is firing when gradients are computed with respect to module outputs")


def _vit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5,
                init_values=0.1, drop_path_rate=0.1)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


def _pair(**kw):
    timm_model = _vit(**kw)
    return timm_model, vit_fast.convert(copy.deepcopy(timm_model))


X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _run(model, train, x=X, seed=1):
    """(output, {name: grad}) of one forward/backward; drop-path draws seeded."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, want, tol=1e-5):
    (y, g), (y0, g0) = got, want
    torch.testing.assert_close(y, y0, rtol=tol, atol=tol)
    assert g.keys() == g0.keys()
    for name, ref in g0.items():
        assert g[name] is not None, f"{name}: no gradient"
        scale = ref.abs().max().clamp_min(1e-3)
        assert ((g[name] - ref).abs().max() / scale).item() <= 1e-4, name


def _same_in_both_modes(timm_model, converted):
    for train in (False, True):
        _assert_same(_run(converted, train), _run(timm_model, train))


# --- hooks -------------------------------------------------------------------------------------

HOOK_SITES = ["blocks.0.norm1", "blocks.0.norm2", "blocks.0.attn.qkv", "blocks.0.attn.proj",
              "blocks.0.mlp.fc1", "blocks.0.mlp.act", "blocks.0.mlp.fc2", "blocks.0.ls1",
              "blocks.0.ls2", "patch_embed.proj", "blocks.1.attn", "blocks.1.mlp"]


def _attach(model, site, kind, calls):
    sub = model.get_submodule(site)
    if kind == "forward":
        return sub.register_forward_hook(lambda m, a, out: (calls.append(site), out * 1.5 + 0.1)[1])
    if kind == "pre":
        return sub.register_forward_pre_hook(lambda m, a: (calls.append(site), (a[0] * 0.5,))[1])
    return sub.register_full_backward_hook(
        lambda m, gin, gout: (calls.append(site), tuple(None if g is None else 2 * g for g in gin))[1])


@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
@pytest.mark.parametrize("site", HOOK_SITES)
def test_hooks_on_any_submodule_are_honoured(site, kind):
    timm_model, converted = _pair()
    calls_t, calls_c = [], []
    _attach(timm_model, site, kind, calls_t)
    handle = _attach(converted, site, kind, calls_c)
    _same_in_both_modes(timm_model, converted)
    assert calls_c == calls_t and calls_c
    block = site.split(".")[1] if site.startswith("blocks.") else None
    if site == "blocks.0.attn.proj":  # the fused path calls proj itself: it stays fused
        assert not why_not_fused(converted).get("blocks.0")
    elif block is not None:
        assert any(site.split(".", 2)[2] in r for r in why_not_fused(converted)[f"blocks.{block}"])
    handle.remove()  # the fused path comes back
    assert not why_not_fused(converted).get("blocks.0")


def test_global_module_hooks_see_the_same_calls_as_timm():
    timm_model, converted = _pair()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: seen.append(type(m).__name__))
    try:
        timm_model.eval()(X)
        want, seen[:] = list(seen), []
        converted.eval()(X)
        assert seen == want
        assert "global module hooks" in " ".join(why_not_fused(converted)["blocks.0"])
    finally:
        handle.remove()
    assert not why_not_fused(converted).get("blocks.0")


def test_fusability_is_decided_once_per_configuration(monkeypatch):
    _, converted = _pair()
    counted = []
    real = vit_fast.Block._structure_reasons
    monkeypatch.setattr(vit_fast.Block, "_structure_reasons",
                        lambda self: (counted.append(1), real(self))[1])
    converted.eval()
    with torch.no_grad():
        for _ in range(3):
            converted(X)
    assert len(counted) == 0  # decided when convert wrote its summary
    converted.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: out)
    with torch.no_grad():
        for _ in range(3):
            converted(X)
    assert len(counted) == 1  # the changed Block only, once
    assert converted.blocks[0].why_not_fused() == ["mlp.fc1 has forward hooks"]


# --- adapters (LoRA) ---------------------------------------------------------------------------

class LoRALinear(nn.Linear):
    """loralib/peft-style adapter: an nn.Linear subclass with its own forward."""

    def __init__(self, base, r=2, alpha=4.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, r) * 0.3)
        self.scaling = alpha / r

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


def _add_lora(model, site):
    torch.manual_seed(7)
    for block in model.blocks:
        parent, _, name = site.rpartition(".")
        owner = block.get_submodule(parent)
        setattr(owner, name, LoRALinear(getattr(owner, name)))


@pytest.mark.parametrize("order", ["after_convert", "before_convert"])
@pytest.mark.parametrize("site", ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
def test_lora_linear_is_used_and_trained(site, order):
    timm_model = _vit()
    if order == "before_convert":
        _add_lora(timm_model, site)
        converted = vit_fast.convert(copy.deepcopy(timm_model))
    else:
        converted = vit_fast.convert(copy.deepcopy(timm_model))
        _add_lora(timm_model, site)
        _add_lora(converted, site)
    _same_in_both_modes(timm_model, converted)
    grads = _run(converted, True)[1]
    assert grads[f"blocks.0.{site}.lora_a"].abs().sum() > 0
    assert f"blocks.0.{site}.weight" not in grads  # frozen base weight: no gradient, as in timm


def test_peft_lora_trains_exactly_as_on_timm():
    peft = pytest.importorskip("peft", reason="peft is a test-only extra (requirements-dev.txt)")
    config = dict(r=2, lora_alpha=4, target_modules=["qkv", "fc1", "fc2"], init_lora_weights=False)
    timm_model, converted = _pair()
    torch.manual_seed(3)
    timm_peft = peft.get_peft_model(timm_model, peft.LoraConfig(**config))
    conv_peft = peft.get_peft_model(converted, peft.LoraConfig(**config))
    conv_peft.load_state_dict(timm_peft.state_dict())
    for model in (timm_peft, conv_peft):
        model.forward = model.base_model.model.forward  # plain image input, no HF kwargs
    for train in (False, True):
        got, want = _run(conv_peft, train), _run(timm_peft, train)
        _assert_same(got, want)
        assert any("lora_A" in n and g.abs().sum() > 0 for n, g in got[1].items())


# --- parametrizations, pruning, weight norm ----------------------------------------------------

class Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


def _modify(model, how):
    b = model.blocks[0]
    if how == "prune":
        prune.l1_unstructured(b.mlp.fc1, "weight", amount=0.3)
    elif how == "parametrize":
        parametrize.register_parametrization(b.attn.qkv, "weight", Halve())
        parametrize.register_parametrization(b.norm2, "weight", Halve())
    elif how == "weight_norm_hook":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(b.mlp.fc2)
        with torch.no_grad():
            b.mlp.fc2.weight_g.mul_(2.0)  # must change the output
    elif how == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(b.mlp.fc1)
        with torch.no_grad():
            b.mlp.fc1.parametrizations.weight.original0.mul_(2.0)


@pytest.mark.parametrize("order", ["after_convert", "before_convert"])
@pytest.mark.parametrize("how", ["prune", "parametrize", "weight_norm_hook", "weight_norm"])
def test_parametrizations_pruning_weight_norm(how, order):
    timm_model = _vit()
    if order == "before_convert":  # (a pruned model cannot be deep-copied: build it twice)
        _modify(timm_model, how)
        converted = _vit()
        _modify(converted, how)
        vit_fast.convert(converted)
    else:
        converted = vit_fast.convert(copy.deepcopy(timm_model))
        _modify(timm_model, how)
        _modify(converted, how)
    unmodified = _run(_vit(), False)[0]
    assert not torch.allclose(_run(timm_model, False)[0], unmodified, atol=1e-4)
    # Two optimizer steps: each must see the modification's current weights.
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (timm_model, converted)]
    for _ in range(2):
        got, want = _run(converted, True), _run(timm_model, True)
        _assert_same(got, want)
        for opt in opts:
            opt.step()
    _assert_same(_run(converted, False), _run(timm_model, False))


# --- drop-path, modes, idempotence -------------------------------------------------------------

class HalfPath(nn.Module):
    """A user's own drop-path: deterministic, so both models must give the same result."""

    def forward(self, x):
        return x * 0.5 if self.training else x


class ScaledDropPath(timm.layers.DropPath):
    def forward(self, x):
        return super().forward(x) * 0.75


@pytest.mark.parametrize("cls", [HalfPath, ScaledDropPath])
def test_custom_drop_path_is_not_dropped(cls):
    timm_model, converted = _pair()
    for model in (timm_model, converted):
        model.blocks[0].drop_path1 = cls() if cls is HalfPath else cls(0.2)
        model.blocks[1].drop_path2 = cls() if cls is HalfPath else cls(0.2)
    _same_in_both_modes(timm_model, converted)
    assert "drop_path1" in why_not_fused(converted)["blocks.0"][0]


def test_convert_keeps_each_submodule_mode_and_is_idempotent():
    timm_model = _vit(proj_drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.0).train()
    for m in timm_model.modules():  # train, but with every dropout turned off by hand
        if isinstance(m, nn.Dropout):
            m.eval()
    modes = {n: m.training for n, m in timm_model.named_modules()}
    converted = vit_fast.convert(copy.deepcopy(timm_model))
    assert {n: m.training for n, m in converted.named_modules()} == modes
    torch.manual_seed(0)
    want = timm_model(X)
    torch.manual_seed(0)
    torch.testing.assert_close(converted(X), want, rtol=1e-5, atol=1e-5)
    first = converted.vit_fast_summary
    again = vit_fast.convert(converted).vit_fast_summary
    assert sorted(again.already) == sorted(n for n in first.swapped if n.startswith(("blocks.", "patch")))
    assert not again.swapped and "has no transformer block" not in str(again)
    assert "already blocks.0" in str(again)
    assert {n: m.training for n, m in converted.named_modules()} == modes
    torch.manual_seed(0)
    torch.testing.assert_close(converted(X), want, rtol=1e-5, atol=1e-5)


def test_summary_reports_blocks_that_run_plain_and_left_blocks():
    model = _vit()
    model.blocks[1].mlp.fc1 = LoRALinear(model.blocks[1].mlp.fc1)
    vit_fast.convert(model)
    summary = model.vit_fast_summary
    assert "blocks.1" in summary.swapped
    assert dict(summary.not_fused)["blocks.1"] == ["mlp.fc1 is LoRALinear with its own forward "
                                                   "(an adapter?)"]
    assert "plain   blocks.1" in str(summary)
    parallel = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, img_size=16,
                                 patch_size=8, embed_dim=24, depth=1, num_heads=2)
    left = dict(vit_fast.convert(parallel).vit_fast_summary.left)
    assert "ParallelThingsBlock" in left["blocks.0"]


# --- input sizes, attention scale --------------------------------------------------------------

@pytest.mark.parametrize("kw,size", [
    (dict(img_size=(70, 50)), (70, 50)),                       # timm crops the border
    (dict(img_size=(64, 48), dynamic_img_size=True, dynamic_img_pad=True), (70, 50)),
    (dict(img_size=(64, 48), dynamic_img_size=True), (64, 80)),
])
def test_input_sizes_that_are_not_a_multiple_of_the_patch(kw, size):
    timm_model, converted = _pair(patch_size=16, **kw)
    x = torch.randn(2, 3, *size)
    for train in (False, True):
        _assert_same(_run(converted, train, x), _run(timm_model, train, x))


def test_input_size_errors_match_timm():
    timm_model, converted = _pair(patch_size=16, img_size=(64, 48), dynamic_img_size=True)
    x = torch.randn(1, 3, 70, 50)  # not a multiple, no padding: timm asserts
    with pytest.raises(AssertionError):
        timm_model(x)
    with pytest.raises(AssertionError, match="70x50 is not divisible"):
        converted(x)
    with pytest.raises(ValueError):
        converted(x)
    pe_t = timm.layers.PatchEmbed(None, 8, 3, 16)  # img_size=None: any size, border cropped
    pe_c = vit_fast.PatchEmbed(None, 8, 3, 16)
    pe_c.load_state_dict(pe_t.state_dict())
    x = torch.randn(2, 3, 30, 45)
    torch.testing.assert_close(pe_c(x), pe_t(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_attention_scale_set_by_the_user_matches_timm(fused_attn):
    timm_model, converted = _pair()
    for model in (timm_model, converted):
        for b in model.blocks:
            b.attn.scale = 2.0
            b.attn.fused_attn = fused_attn
    _same_in_both_modes(timm_model, converted)
    if not fused_attn:  # the materialized path reads scale: the change must show
        ref = _vit()
        for b in ref.blocks:
            b.attn.fused_attn = False
        assert not torch.allclose(_run(ref, False)[0], _run(converted, False)[0], atol=1e-4)


# --- FX, TorchScript, export, copies -----------------------------------------------------------

def _timm_fx_model(model, train):
    """What timm's own FX tests build: torchvision's feature extractor with timm's leaf modules."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import (create_feature_extractor,
                                                       get_graph_node_names)
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                     eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)


def test_fx_symbolic_trace_and_timm_feature_extraction():
    timm_model, converted = _pair()
    graph = torch.fx.symbolic_trace(converted.eval())
    with torch.no_grad():
        torch.testing.assert_close(graph(X), timm_model.eval()(X), rtol=1e-5, atol=1e-5)
    fx_model = _timm_fx_model(converted, train=False)
    with torch.inference_mode():
        want = converted(X)
        assert torch.equal(next(iter(fx_model(X).values())), want)  # timm's bar: identical
    assert "blocks.0" in dict(fx_model.named_modules())  # the fused Block is a leaf
    fx_model.train()
    out = next(iter(fx_model(X).values()))
    out.mean().backward()
    assert all(p.grad is not None for p in fx_model.parameters())
    features = timm.models.create_feature_extractor(converted.eval(), {"blocks.1": "last"})
    assert features(X)["last"].shape == (3, 5, 24)


def test_torchscript_matches_timm():
    timm_model, converted = _pair()
    timm_model.eval()
    scripted = torch.jit.script(converted.eval())
    timm_scripted = torch.jit.script(copy.deepcopy(timm_model).eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), timm_scripted(X), rtol=1e-5, atol=1e-5)
    fx_scripted = torch.jit.script(_timm_fx_model(converted, train=False))
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx_scripted(X).values())), timm_model(X),
                                   rtol=1e-5, atol=1e-5)
    # Scripting leaves the eager model converted and fused.
    assert isinstance(converted.blocks[0], vit_fast.Block) and not why_not_fused(converted)


def test_export_deepcopy_pickle_save_load():
    timm_model, converted = _pair()
    converted.eval()
    with torch.no_grad():
        want = converted(X)
        exported = torch.export.export(converted, (X,))
        torch.testing.assert_close(exported.module()(X), want, rtol=1e-5, atol=1e-5)
        copies = [copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))]
        buf = io.BytesIO()
        torch.save(converted, buf)
        buf.seek(0)
        copies.append(torch.load(buf, weights_only=False))
        for c in copies:
            assert isinstance(c.blocks[0], vit_fast.Block)
            torch.testing.assert_close(c(X), want, rtol=0, atol=0)
        # state_dict round trip to a plain timm model
        buf = io.BytesIO()
        torch.save(converted.state_dict(), buf)
        buf.seek(0)
        fresh = _vit().eval()
        fresh.load_state_dict(torch.load(buf))
        torch.testing.assert_close(fresh(X), want, rtol=1e-5, atol=1e-5)
    # A copy made with a hook attached re-derives its own decision.
    converted.blocks[0].norm1.register_forward_hook(lambda m, a, out: out)
    converted(X)
    assert not copy.deepcopy(converted).blocks[1].why_not_fused()
    assert copy.deepcopy(converted).blocks[0].why_not_fused() == ["norm1 has forward hooks"]


def test_compiled_model_sees_hooks_added_later():
    """A hook added after torch.compile reaches the compiled converted model as it reaches a
    compiled timm model: under skip_nnmodule_hook_guards=False, torch's switch for hooks added or
    removed after compiling. Under torch's default (True) Dynamo guards no module's hooks, timm's
    or ours, and keeps running the graph compiled without them: on torch 2.11 both models then miss
    the hook (torch 2.14 happens to guard the hook read in vit_fast's fusion decision)."""
    timm_model, converted = _pair()
    timm_model.eval()
    converted.eval()
    with torch.no_grad(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        converted(X)  # an eager call first: the compiled calls change no state of vit_fast's
        compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
        compiled_timm = torch.compile(timm_model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(X), timm_model(X), rtol=1e-5, atol=1e-5)
        compiled_timm(X)
        for model in (timm_model, converted):
            model.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: out * 2)
        want = timm_model(X)
        torch.testing.assert_close(compiled_timm(X), want, rtol=1e-5, atol=1e-5)  # torch's own
        torch.testing.assert_close(compiled(X), want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_fused_path_runs_unless_something_is_attached(monkeypatch):
    from vit_fast import fused_block_ops
    calls = []
    real = fused_block_ops.residual_layer_norm_mlp
    monkeypatch.setattr(fused_block_ops, "residual_layer_norm_mlp",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _, converted = _pair()
    with torch.no_grad():
        converted.train()(X)
        assert len(calls) == 2  # both Blocks fused, in training too (drop-path, LayerScale)
        handle = converted.blocks[1].ls2.register_forward_pre_hook(lambda m, a: None)
        converted(X)
        assert len(calls) == 3  # blocks.1 ran its submodules
        handle.remove()
        converted(X)
        assert len(calls) == 5


# --- hooks registered before convert (issue 27, item 9) ------------------------------------------

BEFORE_SITES = ["blocks.0", "blocks.0.attn", "blocks.0.mlp", "blocks.0.ls1", "patch_embed", "norm"]


@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
@pytest.mark.parametrize("site", BEFORE_SITES)
def test_hooks_registered_before_convert_keep_firing(site, kind):
    """convert replaces these modules: their hooks move along, and their handles still work."""
    timm_model, copied = _vit(), _vit()
    calls_t, calls_c = [], []
    _attach(timm_model, site, kind, calls_t)
    handle = _attach(copied, site, kind, calls_c)
    converted = vit_fast.convert(copied)
    assert type(converted.get_submodule(site)).__module__.startswith("vit_fast"), site
    _same_in_both_modes(timm_model, converted)
    assert calls_c == calls_t and calls_c
    handle.remove()
    calls_c.clear()
    _run(converted, False)
    assert not calls_c, "the handle returned before convert no longer removes the hook"
    assert not why_not_fused(converted).get("blocks.0")


def test_kwargs_and_always_called_hooks_move_too():
    model = _vit()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a, kw: seen.append("pre_kw"),
                                              with_kwargs=True)
    model.blocks[0].register_forward_hook(lambda m, a, kw, out: seen.append("kw"), with_kwargs=True)
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.append("always"), always_call=True)
    state_hook = model.blocks[0].register_state_dict_post_hook(
        lambda m, sd, prefix, local: seen.append("state"))
    vit_fast.convert(model)
    model.eval()(X)
    assert seen == ["pre_kw", "kw", "always"]
    model.state_dict()
    assert seen[-1] == "state"
    state_hook.remove()
