"""A converted vit-pytorch transformer's per-configuration plan and its pairs' one-node steps
(vit_fast/vit_pytorch_plan.py): once warmed up, each [attention, feed-forward] pair is one
autograd node (the Block's step) with the op-level path's results, and whatever could change the
fused path (a hook, an active dropout, a replaced parameter) is still seen."""
import copy

import pytest
import torch

import vit_fast
from converted_copy import converted_copy
from vit_fast import block_step

pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed (test-only dependency)")
from vit_pytorch.vit import ViT, Transformer  # noqa: E402


@pytest.fixture
def steps_run(monkeypatch):
    """Calls of BlockStep.forward (one per pair that took the step)."""
    calls = []
    real = block_step.BlockStep.forward

    def counted(self, *args):
        calls.append(1)
        return real(self, *args)
    monkeypatch.setattr(block_step.BlockStep, "forward", counted)
    return calls


def _transformer(depth=2, dim=16, heads=2, dim_head=8, **kw):
    torch.manual_seed(0)
    model, original = converted_copy(Transformer(dim=dim, depth=depth, heads=heads,
                                                 dim_head=dim_head, mlp_dim=2 * dim, **kw))
    assert not model.why_not_fused()
    return model, original


def _call(model, x, amp=False, seed=3):
    """(output, grads of x and every parameter); the kernels forced (on CPU: the interpreter)."""
    torch.manual_seed(seed)
    params = list(model.parameters())
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), vit_fast.use_backend("triton"):
        y = model(x)
    weight = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape).sin()
    grads = torch.autograd.grad((y.float() * weight).sum(), [x, *params])
    return y.detach(), grads


def _close(a, b, tol):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


@pytest.mark.parametrize("amp", [False, True])
def test_once_warmed_up_every_pair_is_one_node(amp, steps_run):
    model, original = _transformer()
    x = torch.randn(2, 5, 16)
    first = _call(model, x, amp)  # the op-level path; its backward makes the steps
    assert steps_run == []
    stepped = _call(model, x, amp)
    assert len(steps_run) == 2  # both pairs
    _close(stepped, first, 1e-5 if not amp else 2e-2)
    _close(stepped, _call(original, x, amp), 1e-4 if not amp else 5e-2)


def test_what_could_change_the_fused_path_is_still_seen(steps_run):
    model, original = _transformer(depth=1)
    x = torch.randn(2, 5, 16)
    _call(model, x), _call(model, x)
    assert len(steps_run) == 1
    attn, ff = model.layers[0]
    seen = []
    handle = attn.to_qkv.register_forward_hook(lambda *a: seen.append(1))
    steps_run.clear()
    _close(_call(model, x), _call(original, x), 1e-4)
    assert steps_run == [] and seen == [1]
    handle.remove()  # fusable again: the op-level path, a new plan, then its step
    for _ in range(3):
        out = _call(model, x)
    assert len(steps_run) == 1
    _close(out, _call(original, x), 1e-4)
    # the feed-forward's dropout active in training: the op-level path with its draws
    drop = [m for m in ff.net if isinstance(m, torch.nn.Dropout)][0]
    drop.p = 0.5
    steps_run.clear()
    _call(model, x)
    assert steps_run == []
    drop.p = 0.0
    # a parameter replaced: planned again, warmed up, then the step with it
    for m in (model, original):
        torch.manual_seed(7)
        m.layers[0][0].to_qkv.weight = torch.nn.Parameter(torch.randn(48, 16) * 0.1)
    want = _call(original, x)
    steps_run.clear()
    outs = [_call(model, x) for _ in range(3)]
    assert len(steps_run) == 1
    for out in outs:
        _close(out, want, 1e-4)


def test_a_whole_vit_reaches_the_steps(steps_run):
    torch.manual_seed(0)
    original = ViT(image_size=16, patch_size=8, num_classes=5, dim=16, depth=2, heads=2,
                   mlp_dim=32, dim_head=8)
    model = vit_fast.convert(copy.deepcopy(original))
    img = torch.randn(2, 3, 16, 16)
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            out = model(img)
            out.sum().backward()
    assert len(steps_run) == 2
    torch.testing.assert_close(out, original(img), atol=1e-4, rtol=1e-4)


def test_on_the_gpu_path_a_converted_transformer_costs_less_host_work(vit_fast_imports):
    """The host benchmark's harness (sm_90 path, launches counted as no-ops), AMP fwd+bwd:
    fewer aten ops than vit-pytorch's own transformer, a Block step's 19 launches a pair, no
    import from vit_fast's code per call."""
    from vit_fast.bench import host
    model, original = _transformer(depth=2, dim=12, heads=12, dim_head=1)
    x = torch.randn(2, 8, 12)
    counts = {}
    with host.one_thread(), host.gpu_path("sm_90") as launches:
        for name, m in (("vit_fast", model), ("vit-pytorch", original)):
            params = list(m.parameters())
            xi = x.detach().requires_grad_()

            def step(m=m, params=params, xi=xi):
                with torch.autocast("cpu", dtype=torch.bfloat16), \
                        vit_fast.use_backend("triton"):
                    y = m(xi)
                torch.autograd.grad(y, [xi, *params], torch.ones_like(y))
            step(), step()
            launches[:] = [0, 0]
            with vit_fast_imports() as imports:
                step()
            counts[name] = (launches[0], imports, host.count_aten_ops(step))
    ours, theirs = counts["vit_fast"], counts["vit-pytorch"]
    # 19 a pair, and the final LayerNorm's forward and backward (3 launches)
    assert ours[0] == 2 * 19 + 3 and theirs[0] == 0, (ours[0], theirs[0])
    assert ours[1] == [], ours[1]
    assert ours[2] < 0.8 * theirs[2], (ours[2], theirs[2])


def test_fused_attn_turned_off_after_the_step_is_obeyed(steps_run):
    """``attn.fused_attn = False`` (timm's switch, which vit_fast's attentions keep) is read at
    once, also by a configuration that already has its step: the original attention runs."""
    model, original = _transformer(depth=1)
    x = torch.randn(2, 5, 16)
    _call(model, x), _call(model, x)
    assert len(steps_run) == 1
    model.layers[0][0].fused_attn = False
    steps_run.clear()
    _close(_call(model, x), _call(original, x), 1e-4)
    assert steps_run == []

