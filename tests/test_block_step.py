"""The one-node step (vit_fast/block_step.py): once a fused Block's configuration has run forward
and backward on the general path, its calls take one autograd node with the same kernels, the same
order and the same casts -- so the same bits as the general path (the registered custom ops), in
every configuration the step takes, and the general path again whenever it would not be exact."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import vit_fast
from vit_fast.block_step import BlockFn


def _block(init_values=0.5, attn_drop=0.0, drop_path=0.0):
    torch.manual_seed(0)
    return vit_fast.Block(16, 2, qkv_bias=True, init_values=init_values, attn_drop=attn_drop,
                          drop_path=drop_path).train()


def _plan(block):
    cached = block.__dict__.get("_block_plan")
    return None if cached is None else cached[1]


def _nodes(out):
    """The autograd node the output hangs from, by its class name."""
    return type(out.grad_fn).__name__


def _call(block, x, seed, amp=False, segment_ids=None, general=False):
    """Output and gradients of x and every parameter, with torch's generator at ``seed`` (the
    dropout seed and drop-path masks are drawn from it)."""
    torch.manual_seed(seed)
    params = list(block.parameters())
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        if general:
            out = block._forward_general(x, None, False, segment_ids)
        elif segment_ids is not None:
            out = block.forward_segments(x, segment_ids)
        else:
            out = block(x)
    weight = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape).sin()
    grads = torch.autograd.grad((out.float() * weight).sum(), [x, *params])
    return out, grads


def _assert_same(a, b):
    out_a, grads_a = a
    out_b, grads_b = b
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


CASES = {
    "fp32": dict(),
    "fp32 no LayerScale": dict(init_values=None),
    "amp": dict(amp=True),
    "dropout and drop-path": dict(attn_drop=0.25, drop_path=0.3),
    "segments": dict(segments=True),
    "cuBLAS MLP, drop-path": dict(backend="cublas", drop_path=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_gives_the_general_paths_bits(case):
    kw = dict(CASES[case])
    amp, segments = kw.pop("amp", False), kw.pop("segments", False)
    backend = kw.pop("backend", "triton")
    block = _block(**kw)
    x = torch.randn(2, 6, 16)
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]]) if segments else None
    with vit_fast.use_backend(backend):
        first = _call(block, x, 1, amp, seg)  # the general path; its backward makes the step
        assert _plan(block).step is not None
        stepped = _call(block, x, 1, amp, seg)
        general = _call(block, x, 1, amp, seg, general=True)
    assert _nodes(stepped[0]) == BlockFn.__name__ + "Backward"
    _assert_same(stepped, general)
    _assert_same(stepped, first)


def test_a_replaced_parameter_takes_the_general_path_until_it_has_run():
    block, x = _block(), torch.randn(2, 5, 16)
    step_node = BlockFn.__name__ + "Backward"
    with vit_fast.use_backend("triton"):
        _call(block, x, 0)
        assert _nodes(_call(block, x, 0)[0]) == step_node
        block.mlp.fc2.weight = nn.Parameter(torch.randn(16, 64) * 0.1)
        replaced = _call(block, x, 0)
        assert _nodes(replaced[0]) != step_node
        stepped = _call(block, x, 0)  # warmed up again by the call before
        assert _nodes(stepped[0]) == step_node
        _assert_same(stepped, replaced)
        with torch.no_grad():
            block.mlp.fc2.weight.data = torch.randn(16, 64) * 0.1  # .data swapped: new storage
        swapped = _call(block, x, 0)
        assert _nodes(swapped[0]) != step_node
        stepped = _call(block, x, 0)
        assert _nodes(stepped[0]) == step_node
        _assert_same(stepped, swapped)
        _assert_same(stepped, _call(block, x, 0, general=True))


def test_an_optimizer_step_keeps_the_step_and_its_math():
    block, x = _block(), torch.randn(2, 5, 16)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            out, grads = _call(block, x, 0)
            for p, g in zip(block.parameters(), grads[1:]):
                p.grad = g
            opt.step()
        assert _nodes(out) == BlockFn.__name__ + "Backward"
        _assert_same(_call(block, x, 0), _call(block, x, 0, general=True))


def _stack_call(blocks, x, general=False):
    """Outputs of each Block of a stack and the gradients of x and every parameter."""
    params = [p for b in blocks for p in b.parameters()]
    h = x = x.detach().requires_grad_()
    outs = []
    for b in blocks:
        h = b._forward_general(h, None, False, None) if general else b(h)
        outs.append(h)
    return outs, torch.autograd.grad((h * h.detach().sin()).sum(), [x, *params])


def test_every_block_of_a_stack_reaches_its_step():
    """A model is several Blocks: one Block's warm-up hook (on its general path's graph) is not a
    hook the others' plans must see. Before, each warm-up moved the hook counter in every other
    Block's plan key, so in a stack every call rebuilt every plan and stayed on the general path."""
    blocks = [_block() for _ in range(3)]
    x = torch.randn(2, 5, 16)
    step_node = BlockFn.__name__ + "Backward"
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            _stack_call(blocks, x)
        plans = [_plan(b) for b in blocks]
        outs, grads = _stack_call(blocks, x)
        assert [_nodes(o) for o in outs] == [step_node] * 3
        assert all(_plan(b) is p for b, p in zip(blocks, plans))  # no plan rebuilt
        general = _stack_call(blocks, x, general=True)
    _assert_same((outs[-1], grads), (general[0][-1], general[1]))


def test_a_tensor_hook_registered_every_call_keeps_the_plans_and_steps():
    """A training loop may register a hook on a tensor every step (FSDP2 does on each forward's
    outputs): it moves torch's hook counter, but no hook the Blocks' plans read (module hooks,
    global module hooks) changed, so the plans and their steps stay; a module hook registered
    the same way still reaches its module."""
    blocks = [_block() for _ in range(2)]
    x = torch.randn(2, 5, 16)
    seen = []
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            x.detach().requires_grad_().register_hook(lambda g: None)
            _stack_call(blocks, x)
        plans = [_plan(b) for b in blocks]
        x.detach().requires_grad_().register_hook(lambda g: None)
        outs, _ = _stack_call(blocks, x)
        assert [_nodes(o) for o in outs] == [BlockFn.__name__ + "Backward"] * 2
        assert all(_plan(b) is p for b, p in zip(blocks, plans))
        handle = blocks[1].mlp.fc1.register_forward_hook(lambda m, a, o: seen.append(1))
        _stack_call(blocks, x)
        handle.remove()
    assert seen == [1]


def test_reentrant_checkpointing_keeps_both_configurations_plans(monkeypatch):
    """Reentrant checkpointing runs each Block's forward without grad, then again with grad in
    the backward: two configurations in turn. Each keeps its plan (and the grad one its step);
    before, every call replaced the other's plan, so each step built two plans per Block and
    never reached a step."""
    from vit_fast import block_plan
    builds, real = [], block_plan.build
    monkeypatch.setattr(block_plan, "build", lambda *a: builds.append(1) or real(*a))
    blocks = [_block() for _ in range(2)]
    x = torch.randn(2, 5, 16)
    params = [p for b in blocks for p in b.parameters()]

    def step(checkpointed):
        h = leaf = x.detach().requires_grad_()
        for b in blocks:
            h = checkpoint(b, h, use_reentrant=True) if checkpointed else b._forward_general(
                h, None, False, None)
        for p in params:
            p.grad = None
        (h * h.detach().sin()).sum().backward()  # (reentrant checkpoint: no autograd.grad)
        return h, [leaf.grad, *(p.grad for p in params)]
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            step(True)
        builds.clear()
        got = step(True)
        assert builds == []
        assert all(_plan(b).step is not None for b in blocks)
        want = step(False)
    _assert_same(got, want)


def test_a_converted_timm_model_keeps_its_blocks_plans_and_steps():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = vit_fast.convert(VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=3,
                                               num_heads=2, num_classes=5))
    x = torch.randn(2, 3, 16, 16)
    with vit_fast.use_backend("triton"):
        for _ in range(2):
            model(x).sum().backward()
        plans = [_plan(b) for b in model.blocks]
        model(x).sum().backward()
    assert all(p is not None and p.step is not None for p in plans)
    assert all(_plan(b) is p for b, p in zip(model.blocks, plans))


def test_a_hook_added_after_the_step_fires():
    block, x = _block(), torch.randn(2, 5, 16)
    with vit_fast.use_backend("triton"):
        _call(block, x, 0)
        fired = []
        handle = block.mlp.fc1.register_forward_hook(lambda m, a, o: fired.append(1))
        _call(block, x, 0)
        assert fired == [1]
        handle.remove()


def test_inference_takes_the_step_at_once_and_checkpointing_recomputes_it():
    block, x = _block(), torch.randn(2, 5, 16)
    with vit_fast.use_backend("triton"):
        with torch.no_grad():
            want = block(x)
            assert _plan(block).step is not None  # nothing to differentiate: made after forward
            assert torch.equal(block(x), want)
        xs = x.clone().requires_grad_()
        out = checkpoint(block, xs, use_reentrant=False)
        out.sum().backward()
        ref = _call(block, x, 0, general=True)
    assert torch.equal(out, ref[0])
    direct = x.clone().requires_grad_()
    with vit_fast.use_backend("triton"):
        block(direct).sum().backward()
    assert torch.equal(xs.grad, direct.grad)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_the_step_saves_what_the_general_path_saves(amp):
    from vit_fast.bench.memory import count_saved
    block, x = _block(drop_path=0.2), torch.randn(2, 6, 16, requires_grad=True)
    counted = []
    with vit_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for _ in range(2):
            with count_saved(block.parameters()) as saved:
                out = block(x)
            out.float().sum().backward()
            counted.append((_nodes(out), saved.bytes))
    (general, general_bytes), (step, step_bytes) = counted
    assert general != step == BlockFn.__name__ + "Backward"
    assert step_bytes == general_bytes > 0


def test_a_copy_or_a_pickle_of_a_stepping_block_makes_its_own_plan():
    import copy
    import io
    block, x = _block(), torch.randn(2, 5, 16)
    with vit_fast.use_backend("triton"):
        want = _call(block, x, 0)
        _call(block, x, 0)
        assert _plan(block).step is not None
        twin = copy.deepcopy(block)
        buf = io.BytesIO()
        torch.save(block, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other in (twin, loaded):
            assert _plan(other) is None
            _assert_same(_call(other, x, 0), want)


def test_a_strided_input_takes_the_general_path_and_keeps_the_step():
    block = _block()
    x = torch.randn(2, 16, 5).transpose(1, 2)  # [2, 5, 16], not contiguous
    with vit_fast.use_backend("triton"):
        _call(block, x.contiguous(), 0)
        step = _plan(block).step
        assert step is not None
        strided = _call(block, x, 0)
        assert _nodes(strided[0]) != BlockFn.__name__ + "Backward"
        assert _plan(block).step is step  # kept for the next contiguous call
        stepped = _call(block, x.contiguous(), 0)
        assert _nodes(stepped[0]) == BlockFn.__name__ + "Backward"
    _assert_same(stepped, strided)


@pytest.fixture
def reference_attention(monkeypatch):
    """Dispatch sends the attention to the reference, as it does for fp32 on a GPU (no fp32
    attention build ships): the Block's plan then runs it through the public op."""
    from vit_fast import dispatch
    real = dispatch.not_supported_reasons

    def reasons(op, tensors, **options):
        if op == "fused_qkv_attention":
            return ["test: the attention on the reference, as fp32 on a GPU"]
        return real(op, tensors, **options)
    monkeypatch.setattr(dispatch, "not_supported_reasons", reasons)
    from vit_fast import functional, plans
    monkeypatch.setattr(functional, "_PLANS", plans.Plans())  # decisions made before: remade


PUBLIC_CASES = {
    "LayerScale": dict(),
    "no LayerScale": dict(init_values=None),
    "drop-path": dict(drop_path=0.3),
    "segments": dict(segments=True),
}


@pytest.mark.parametrize("case", list(PUBLIC_CASES))
def test_the_step_with_the_public_attention_gives_the_general_paths_bits(reference_attention,
                                                                         case):
    """Where the attention is the reference's (fp32 on a GPU), the step runs it through the
    public op with a graph of its own: the general path's bits, forward and every gradient."""
    kw = dict(PUBLIC_CASES[case])
    segments = kw.pop("segments", False)
    block = _block(**kw)
    x = torch.randn(2, 6, 16)
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]]) if segments else None
    with vit_fast.use_backend("triton"):
        first = _call(block, x, 1, segment_ids=seg)
        assert _plan(block).step is not None and _plan(block).step.attn_public
        stepped = _call(block, x, 1, segment_ids=seg)
        general = _call(block, x, 1, segment_ids=seg, general=True)
    assert _nodes(stepped[0]) == BlockFn.__name__ + "Backward"
    _assert_same(stepped, general)
    _assert_same(stepped, first)


def test_the_public_attention_step_leaves_dropout_and_hooks_to_the_general_path(
        reference_attention):
    """The reference draws its dropout mask in the call's order and saved-tensor hooks cannot
    reach the public attention's own graph: those calls take the general path, the step stays."""
    from torch.autograd.graph import saved_tensors_hooks
    block = _block(attn_drop=0.25)
    x = torch.randn(2, 6, 16)
    with vit_fast.use_backend("triton"):
        _call(block, x, 1)
        step = _plan(block).step
        assert step is not None and step.attn_public
        dropped = _call(block, x, 1)
        assert _nodes(dropped[0]) != BlockFn.__name__ + "Backward"
        assert _plan(block).step is step
        _assert_same(dropped, _call(block, x, 1, general=True))
        block = _block()
        _call(block, x, 1)
        step = _plan(block).step
        with saved_tensors_hooks(lambda t: t, lambda t: t):
            hooked = block(x.requires_grad_())
        assert _nodes(hooked) != BlockFn.__name__ + "Backward"
        assert _nodes(block(x)) == BlockFn.__name__ + "Backward"
        assert _plan(block).step is step
        block.eval()
        with torch.no_grad():  # inference: the public op straight, no graph of its own
            assert torch.equal(block(x), block._forward_general(x, None, False, None))


def test_the_public_attention_step_backward_twice_only_with_retain_graph(reference_attention):
    block, x = _block(), torch.randn(2, 6, 16)
    with vit_fast.use_backend("triton"):
        _call(block, x, 0)
        xs = x.clone().requires_grad_()
        out = block(xs)
        assert _nodes(out) == BlockFn.__name__ + "Backward"
        out.sum().backward(retain_graph=True)
        once = xs.grad.clone()
        out.sum().backward()
        assert torch.equal(xs.grad, 2 * once)
        with pytest.raises(RuntimeError, match="second time"):
            out.sum().backward()


def test_fused_attn_turned_off_after_the_step_is_obeyed():
    """``block.attn.fused_attn = False`` (timm's switch: materialize softmax(q kᵀ·scale)) is
    read at once, also by a configuration that already has its step: the general path."""
    block, x = _block(), torch.randn(2, 6, 16)
    with vit_fast.use_backend("triton"):
        _call(block, x, 1)
        assert _nodes(_call(block, x, 1)[0]) == BlockFn.__name__ + "Backward"
        block.attn.fused_attn = False
        out = _call(block, x, 1)
    assert _nodes(out[0]) != BlockFn.__name__ + "Backward"
    assert _plan(block) is None  # the general path: Attention.attend materializes it


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_the_step_adds_the_stream_gradient_inside_layer_norm_1s_backward(amp):
    """x's gradient is LayerNorm 1's plus the residual's: with an fp32 stream LN1's backward
    kernel adds the residual's as it writes (no pass of its own over [B, N, C] in fp32); the bits
    stay the general path's (test_the_step_gives_the_general_paths_bits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Adds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.add_.Tensor, torch.ops.aten.add.Tensor):
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    block, x = _block(), torch.randn(2, 6, 16)
    with vit_fast.use_backend("triton"):
        _call(block, x, 1, amp)  # the general path makes the step
        x = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = block(x)
        assert _nodes(out) == BlockFn.__name__ + "Backward"
        with Adds() as adds:
            out.float().sum().backward()
    assert (2, 6, 16) not in adds.shapes, adds.shapes
