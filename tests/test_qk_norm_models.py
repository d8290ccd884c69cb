"""qk_norm in the modules: vit_fast.Attention(qk_norm=True) and converted timm models with
qk_norm run q_norm/k_norm as the fused qk_norm op before the fused attention, and match timm
(fp32, CPU: the reference backend, and the Triton kernels under the interpreter)."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.layers import RmsNorm

import vit_fast
from tiny_models import tiny_vit
from vit_fast import functional


@pytest.fixture
def qk_calls(monkeypatch):
    calls = []
    real = functional.qk_norm

    def counted(*args, **kwargs):
        calls.append(kwargs.get("kind"))
        return real(*args, **kwargs)
    monkeypatch.setattr(functional, "qk_norm", counted)
    return calls


def _rel(ours, ref, floor=1e-12):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(floor)).item()


def _grads_match(a_params, b_params, tol=1e-5):
    a_params, b_params = dict(a_params), dict(b_params)
    assert list(a_params) == list(b_params)
    # k_norm.bias's gradient is zero analytically (softmax cancels a shift of every key):
    # compare its rounding noise against the largest gradient instead of itself.
    largest = max(p.grad.abs().max().item() for p in b_params.values())
    for key, p in b_params.items():
        floor = largest if key.endswith("k_norm.bias") else 1e-12
        assert _rel(a_params[key].grad, p.grad, floor) <= tol, key


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("norm_layer,kind", [(nn.LayerNorm, "layer"), (RmsNorm, "rms")])
def test_attention_matches_timm(norm_layer, kind, backend, qk_calls):
    torch.manual_seed(0)
    timm_attn = TimmAttention(48, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=norm_layer)
    for p in list(timm_attn.q_norm.parameters()) + list(timm_attn.k_norm.parameters()):
        nn.init.normal_(p)  # not the identity init: the affine must be applied
    ours = vit_fast.Attention(48, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=norm_layer)
    assert list(ours.state_dict()) == list(timm_attn.state_dict())
    ours.load_state_dict(timm_attn.state_dict())
    assert ours.why_not_fused() == []
    x = torch.randn(2, 7, 48)
    for train in (True, False):
        timm_attn.train(train)
        ours.train(train)
        for m in (timm_attn, ours):
            m.zero_grad()
        with vit_fast.use_backend(backend):
            out = ours(x)
        ref = timm_attn(x)
        assert (out - ref).abs().max().item() <= 1e-5
        out.square().sum().backward()
        ref.square().sum().backward()
        _grads_match(ours.named_parameters(), timm_attn.named_parameters())
    assert qk_calls == [kind, kind]


def test_converted_timm_qk_norm_model_runs_fused_and_matches(qk_calls):
    original = tiny_vit(qk_norm=True)
    for name, p in original.named_parameters():
        if "q_norm" in name or "k_norm" in name:
            nn.init.normal_(p)
    converted = vit_fast.convert(copy.deepcopy(original))
    assert converted.vit_fast_summary.not_fused == [] and not converted.vit_fast_summary.left
    from vit_fast.convert import why_not_fused
    assert why_not_fused(converted) == {}
    x = torch.randn(2, 3, 16, 16)
    for train in (True, False):
        original.train(train)
        converted.train(train)
        original.zero_grad()
        converted.zero_grad()
        a, b = original(x), converted(x)
        assert (a - b).abs().max().item() <= 1e-5
        a.sum().backward()
        b.sum().backward()
        _grads_match(converted.named_parameters(), original.named_parameters())
    assert qk_calls == ["layer"] * 4  # two blocks, twice


def test_converted_model_on_the_triton_kernels(qk_calls):
    original = tiny_vit(qk_norm=True, depth=1).train()
    converted = vit_fast.convert(copy.deepcopy(original))
    x = torch.randn(2, 3, 16, 16)
    with vit_fast.use_backend("triton"):
        b = converted(x)
        b.sum().backward()
    a = original(x)
    a.sum().backward()
    assert (a - b).abs().max().item() <= 1e-5
    _grads_match(converted.named_parameters(), original.named_parameters())
    assert qk_calls == ["layer"]


def test_unsupported_or_hooked_q_k_norms_run_plain_and_say_why(qk_calls):
    attn = vit_fast.Attention(32, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm)
    x = torch.randn(1, 3, 32)
    handle = attn.q_norm.register_forward_hook(lambda m, i, o: None)
    assert any("q_norm has forward hooks" in r for r in attn.why_not_fused())
    attn(x)
    handle.remove()
    assert attn.why_not_fused() == []
    attn.k_norm = nn.LayerNorm(16, eps=1e-3)  # another eps than q_norm's
    assert any("differ" in r for r in attn.why_not_fused())
    attn.k_norm = nn.Identity()  # q normed, k not: no single fused op does that
    assert any("k_norm is Identity" in r for r in attn.why_not_fused())
    attn(x)
    assert qk_calls == []  # every call above ran timm's eager q/k norms


def test_compiled_fullgraph_qk_norm_attention_on_the_kernels():
    """torch.compile(fullgraph=True) over Attention(qk_norm=True) on the Triton kernels: no graph
    break, the qk_norm op (forward and backward) in the graphs, eager's outputs and gradients."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    model = vit_fast.Attention(32, num_heads=2, qk_norm=True, norm_layer=nn.LayerNorm)
    x = torch.randn(2, 5, 32)

    def step(fn):
        model.zero_grad()
        with vit_fast.use_backend("triton"):
            y = fn(x)
            y.square().sum().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    got = step(torch.compile(model, fullgraph=True, backend=backend))
    want = step(model)
    torch._dynamo.reset()
    graphs = "".join(str(g.graph) for g in backend.fw_graphs + backend.bw_graphs)
    assert "vit_fast.qk_norm.default" in graphs and "vit_fast.qk_norm_backward.default" in graphs
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6)
