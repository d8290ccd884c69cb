"""A converted transformers layer's per-configuration plan and one-node step
(vit_fast/transformers_plan.py): from a configuration's second call on, the layer is one autograd
node (the Block's step) with the op-level fused path's results, its calls decide nothing that
only the configuration decides, and whatever could change the fused path (an adapter, a hook,
hidden dropout, the attention implementation, a replaced parameter) is still seen."""
import copy
import pickle

import pytest
import torch

import vit_fast
from converted_copy import converted_copy
from vit_fast.block_step import BlockFn

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(test-only dependency: pip install -r requirements-dev.txt)")
from vit_fast import convert_transformers as ct  # noqa: E402

STEP = BlockFn.__name__ + "Backward"


def _layers(family, depth=2, **kw):
    """A stack of ``depth`` converted layers of ``family`` (and the unconverted originals)."""
    T = transformers
    torch.manual_seed(0)
    base = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                num_hidden_layers=depth)
    if family == "dinov2":
        base.update(layerscale_value=0.5, mlp_ratio=2)
        base.pop("intermediate_size")
        cfg, cls = T.Dinov2Config(**{**base, **kw}), T.models.dinov2.modeling_dinov2.Dinov2Layer
    elif family == "siglip":
        cfg, cls = T.SiglipVisionConfig(**{**base, **kw}), \
            T.models.siglip.modeling_siglip.SiglipEncoderLayer
    elif family == "clip":
        cfg, cls = T.CLIPVisionConfig(**{**base, **kw}), \
            T.models.clip.modeling_clip.CLIPEncoderLayer
    else:
        base.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg, cls = T.ViTConfig(**{**base, **kw}), T.models.vit.modeling_vit.ViTLayer
    cfg._attn_implementation = "sdpa"
    model, original = converted_copy(torch.nn.ModuleList(cls(cfg) for _ in range(depth)))
    assert all(isinstance(m, ct._FusedLayerMixin) for m in model)
    return model, original


def _call(layers, x, seed=3, amp=False):
    """(output, grads of x and every parameter, the last layer's output node's class); the
    kernels forced (on CPU they run only so, under the interpreter)."""
    torch.manual_seed(seed)
    params = list(layers.parameters())
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), vit_fast.use_backend("triton"):
        h = x
        for layer in layers:
            h = layer(h, None)
    node = type(h.grad_fn).__name__
    weight = torch.arange(h.numel(), dtype=torch.float32).reshape(h.shape).sin()
    grads = torch.autograd.grad((h.float() * weight).sum(), [x, *params])
    return h.detach(), grads, node


def _close(a, b, tol):
    torch.testing.assert_close(a[0], b[0], atol=tol, rtol=tol)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


CASES = {
    "vit fp32": ("vit", {}, False),
    "vit amp": ("vit", {}, True),
    "vit attention dropout": ("vit", {"attention_probs_dropout_prob": 0.3}, False),
    "dinov2 LayerScale, drop-path": ("dinov2", {"drop_path_rate": 0.4}, False),
    "siglip tanh GELU": ("siglip", {}, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_repeat_call_is_one_node_with_the_op_level_paths_results(case):
    family, kw, amp = CASES[case]
    model, original = _layers(family, **kw)
    model.train(), original.train()
    x = torch.randn(2, 5, 16)
    first = _call(model, x, amp=amp)  # the op-level fused path; the plan makes its step
    stepped = _call(model, x, amp=amp)
    assert first[2] != STEP and stepped[2] == STEP, (first[2], stepped[2])
    # The same kernels in the same order: the op-level path's results (the qkv GEMM is one
    # GEMM here, three there: its weight gradients may round apart)
    _close(stepped, first, 1e-5 if not amp else 2e-2)
    if kw.get("attention_probs_dropout_prob"):
        return  # the fused attention's dropout draws its own stream (convert_transformers)
    _close(stepped, _call(original, x, amp=amp), 1e-4 if not amp else 5e-2)


def test_quick_gelu_layers_keep_the_op_level_path():
    model, original = _layers("clip")
    x = torch.randn(2, 5, 16)
    for _ in range(2):
        out = _call(model, x)
    assert out[2] != STEP
    _close(out, _call(original, x), 1e-4)


def test_what_could_change_the_fused_path_is_still_seen():
    model, original = _layers("vit", depth=1)
    layer, x = model[0], torch.randn(2, 5, 16)
    _call(model, x)
    assert _call(model, x)[2] == STEP
    # a hook on a submodule the fused path skips: transformers' own forward, hook called
    seen = []
    handle = layer.mlp.fc1.register_forward_hook(lambda *a: seen.append(1))
    assert _call(model, x)[2] != STEP and seen == [1]
    handle.remove()  # fusable again: the op-level path, a new plan, then its step
    assert [_call(model, x)[2] == STEP for _ in range(3)] == [False, False, True]
    assert seen == [1]
    # hidden dropout in training: transformers' forward (no fused dropout on the branches)
    layer.dropout.p = 0.5
    assert _call(model, x)[2] != STEP
    layer.dropout.p = 0.0
    # an adapter in place of q_proj: not a plain Linear any more
    q = layer.attention.q_proj

    class Adapter(torch.nn.Linear):
        def forward(self, h):
            return super().forward(h) * 2
    adapter = Adapter(16, 16)
    adapter.load_state_dict(q.state_dict())
    layer.attention.q_proj = adapter
    original[0].attention.q_proj = copy.deepcopy(adapter)
    for _ in range(2):
        out = _call(model, x)
    assert out[2] != STEP
    _close(out, _call(original, x), 1e-4)
    layer.attention.q_proj = q
    original[0].attention.q_proj = copy.deepcopy(q)
    # the attention implementation switched to one the fused path does not run
    layer.attention.config._attn_implementation = "flex_attention"
    assert ct.fallback_reason(layer, x, None, {})
    with vit_fast.use_backend("triton"):
        assert ct.lookup(layer, x, ct._plan) is None
    layer.attention.config._attn_implementation = "sdpa"
    for _ in range(3):  # the op-level path, a new plan, then its step
        out = _call(model, x)
    assert out[2] == STEP
    _close(out, _call(original, x), 1e-4)


def test_a_replaced_parameter_is_used_at_once():
    model, original = _layers("vit", depth=1)
    x = torch.randn(2, 5, 16)
    for _ in range(2):
        _call(model, x)
    for m in (model, original):
        torch.manual_seed(7)
        m[0].attention.v_proj.weight = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
    want = _call(original, x)
    outs = [_call(model, x) for _ in range(3)]  # planned again, warmed up, then the step
    assert [o[2] == STEP for o in outs] == [False, False, True]
    for out in outs:
        _close(out, want, 1e-4)
    # all of them cast (the key holds x's dtype, not the parameters'): planned again
    model.double(), original.double()
    x = x.double()
    want = _call(original, x)
    outs = [_call(model, x) for _ in range(3)]
    for out in outs:
        _close(out, want, 1e-6)


@pytest.mark.parametrize("amp", [False, True])
def test_eval_and_inference_take_the_step_too(amp):
    """Under inference_mode the concatenated q/k/v weights are inference tensors (no version
    counter): AMP casts them per call, never from the weight cache."""
    model, original = _layers("dinov2", drop_path_rate=0.4)
    model.eval(), original.eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        with vit_fast.use_backend("triton"):
            outs = [model[1](model[0](x, None), None) for _ in range(3)]
        want = original[1](original[0](x, None), None)
    assert model[0].__dict__["_block_plan"][1].step is not None
    for out in outs:
        torch.testing.assert_close(out.float(), want.float(), atol=1e-4 if not amp else 5e-2,
                                   rtol=1e-4 if not amp else 5e-2)
    torch.testing.assert_close(outs[2], outs[1], atol=0, rtol=0)  # the step's calls agree


def test_a_layer_with_its_step_copies_and_pickles():
    model, original = _layers("vit")
    x = torch.randn(2, 5, 16)
    for _ in range(2):
        _call(model, x)
    assert model[0].__dict__["_block_plan"][1].step is not None
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_block_plan" not in clone[0].__dict__
        _close(_call(clone, x), _call(original, x), 1e-4)


def _amp_step(layers, x):
    """One AMP forward+backward of the stack (nothing seeded: torch.manual_seed imports), the
    kernels forced; returns the output's node class."""
    params = list(layers.parameters())
    x = x.detach().requires_grad_()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16), vit_fast.use_backend("triton"):
            h = x
            for layer in layers:
                h = layer(h, None)
        torch.autograd.grad(h, [x, *params], torch.ones_like(h))
        return type(h.grad_fn).__name__
    return step


def test_on_the_gpu_path_a_converted_layer_costs_less_host_work_than_transformers(
        vit_fast_imports):
    """On the path an sm_90 GPU takes (CPU tensors, Triton launches counted as no-ops: the host
    benchmark's harness), a repeat AMP forward+backward of converted ViT layers dispatches fewer
    aten ops than transformers' own layers, launches what a vit_fast.Block's step launches per
    layer and imports nothing (torch's autograd.grad does). (Outside the interpreter those launches go past Triton's launch
    path: test_host_path.py's child-process test, for the same step.)"""
    from vit_fast.bench import host
    model, original = _layers("vit", depth=2, hidden_size=12, num_attention_heads=12,
                              intermediate_size=48)
    x = torch.randn(2, 8, 12)
    counts = {}
    with host.one_thread(), host.gpu_path("sm_90") as launches:
        for name, layers in (("vit_fast", model), ("transformers", original)):
            step = _amp_step(layers, x)
            step(), step()
            launches[:] = [0, 0]
            with vit_fast_imports() as imports:
                assert step() == (STEP if name == "vit_fast" else "AddBackward0")
            counts[name] = (host.count_aten_ops(step), launches[0] // 2, imports)
    ours, theirs = counts["vit_fast"], counts["transformers"]
    assert ours[0] < 0.8 * theirs[0], (ours[0], theirs[0])
    assert ours[1] == 2 * 19 and theirs[1] == 0, (ours[1], theirs[1])  # (both steps counted)
    assert ours[2] == [], ours[2]


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_take_the_step_and_match(reentrant):
    """Activation checkpointing (transformers' own wraps each layer the same way): the forward
    and its recompute take the step once warmed, with transformers' results."""
    from torch.utils.checkpoint import checkpoint
    model, original = _layers("dinov2", drop_path_rate=0.0)
    x = torch.randn(2, 5, 16)

    def run(layers, backend):
        params = list(layers.parameters())
        h0 = x.detach().requires_grad_()
        with vit_fast.use_backend(backend):
            h = h0
            for layer in layers:
                h = checkpoint(layer, h, None, use_reentrant=reentrant)
        for t in (h0, *params):
            t.grad = None
        h.sum().backward()  # (reentrant checkpointing refuses autograd.grad)
        return h.detach(), [t.grad for t in (h0, *params)]
    want = run(original, "auto")
    for _ in range(3):
        got = run(model, "triton")
    plan = model[0].__dict__["_block_plan"][1]
    assert plan.step is not None
    _close(got, want, 1e-4)


def test_a_whole_model_reaches_the_step():
    """ViTModel calls its layers as (hidden_states, attention_mask=None, **kwargs): its layers
    take the step (a hook on the layer itself is not one on a skipped module)."""
    T = transformers
    cfg = T.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    original = T.ViTModel(cfg)
    model = vit_fast.convert(copy.deepcopy(original))
    nodes = []
    last = [m for m in model.modules() if isinstance(m, ct._FusedLayerMixin)][-1]
    last.register_forward_hook(lambda m, i, out: nodes.append(type(out.grad_fn).__name__))
    x = torch.randn(2, 3, 16, 16)
    with vit_fast.use_backend("triton"):
        for _ in range(3):
            out = model(x).last_hidden_state
            out.sum().backward()
    assert nodes[0] != STEP and nodes[1:] == [STEP, STEP], nodes
    torch.testing.assert_close(out, original(x).last_hidden_state, atol=1e-4, rtol=1e-4)
