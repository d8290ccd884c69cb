"""Shared by tests/test_eva_blocks.py and tests/test_beit_blocks.py: a tiny timm model and its
vit_fast-converted copy, run side by side in fp32 on one backend, outputs and every gradient
(input and parameters) compared."""
import copy

import timm
import torch

import vit_fast
from vit_fast import functional

# Tiny: img 32, patch 16 -> 4 patches (+ prefix tokens), dim 32, 2 heads of 16, one block.
TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)


def _randomize(model):
    """Parameters timm initialises to constants (zeros, LayerScale's 1e-5, norms' ones) made
    random, so a term that went missing shows in the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and (p.dim() == 1 or "relative_position" in name):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name and "weight" in name
                                                      else 0.0))
    return model


def pair(name, **kwargs):
    """(timm's model, the converted copy, its conversion summary)."""
    torch.manual_seed(0)
    theirs = _randomize(timm.create_model(name, pretrained=False, **{**TINY, **kwargs}))
    ours = vit_fast.convert(copy.deepcopy(theirs))
    return theirs, ours, ours.vit_fast_summary


def _run(model, x, g):
    x = x.detach().clone().requires_grad_()
    out = model.forward_features(x)
    out.backward(g)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def check(name, backend, train, block_class, monkeypatch, **kwargs):
    """Converted with every block fused (summary: left 0), the fused ops called, and timm's
    outputs and gradients matched."""
    theirs, ours, summary = pair(name, **kwargs)
    assert not summary.left, str(summary)
    assert all(type(b) is block_class for b in ours.blocks), [type(b) for b in ours.blocks]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.train(train), ours.train(train)
    calls = {}
    for op in ("fused_qkv_attention", "qk_norm", "rotary_qk", "gelu_mlp", "glu_mlp"):
        real = getattr(functional, op)

        def counted(*a, _real=real, _op=op, **kw):
            calls[_op] = calls.get(_op, 0) + 1
            return _real(*a, **kw)
        monkeypatch.setattr(functional, op, counted)
    assert vit_fast.convert.why_not_fused(ours.blocks) == {}
    x = torch.randn(2, 3, 32, 32)
    g = torch.randn_like(theirs.forward_features(x))
    ref = _run(theirs, x, g)
    with vit_fast.use_backend(backend):
        got = _run(ours, x, g)
    assert calls.get("fused_qkv_attention") == len(ours.blocks), calls
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-5)
    assert got[2].keys() == ref[2].keys()
    for n, r in ref[2].items():
        assert (got[2][n] is None) == (r is None), n
        if r is not None:
            torch.testing.assert_close(got[2][n], r, rtol=1e-4, atol=2e-5, msg=lambda m: f"{n}: {m}")
    return calls, ours


def check_amp(name, **kwargs):
    """Under CPU autocast (bf16) on the Triton kernels: the output and every gradient within
    docs/design.md's tolerance rule, timm's own autocast run as the same-dtype reference and timm
    in float64 as the truth."""
    from tolerance import assert_close_by_rule
    theirs, ours, _ = pair(name, **kwargs)
    t64 = copy.deepcopy(theirs).double()
    x = torch.randn(2, 3, 32, 32)
    y64 = t64.forward_features(x.double())
    y64.square().sum().backward()
    runs = []
    for model, backend in ((theirs, "reference"), (ours, "triton")):
        with vit_fast.use_backend(backend), torch.autocast("cpu", torch.bfloat16):
            y = model.forward_features(x)
        y.float().square().sum().backward()
        runs.append((y.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (same, same_g), (got, got_g) = runs
    assert_close_by_rule(got.to(torch.bfloat16), same.to(torch.bfloat16), y64, "output")
    for n, p in t64.named_parameters():
        if p.grad is not None:
            assert_close_by_rule(got_g[n].to(torch.bfloat16), same_g[n].to(torch.bfloat16),
                                 p.grad, f"d {n}")
