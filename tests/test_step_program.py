"""Recorded step bodies replayed from C++ (vit_fast/step_program.py, csrc/step_program.cpp).

Under Triton's interpreter there is no compiled kernel, so no direct launch and no program; here
each kernel gets a stand-in compiled kernel whose launcher runs the interpreter (as the host
bench's counting launcher stands in for the GPU's, but computing), so that the direct launches,
the recordings and the replays run as they do on a GPU, and the replayed step can be compared
bit for bit with the general path."""
import contextlib
import copy
import inspect

import pytest
import torch

import vit_fast
from vit_fast import block_step, step_program
from vit_fast.kernels import direct_launch

pytestmark = pytest.mark.skipif(step_program._run is None,
                                reason="vit_fast._C without the step-program replay")


class _Param:
    def __init__(self, p, constexpr):
        self.name, self.is_constexpr = p.name, constexpr
        self.has_default = p.default is not inspect.Parameter.empty
        self.default = p.default if self.has_default else None


class _StandIn:
    """A compiled kernel as Triton's cache holds it; its launcher runs the interpreter."""
    function, packed_metadata = 0, None

    def __init__(self, kernel, run):
        def launcher(*passed):
            grid, values = passed[:3], passed[9:]
            run(kernel, *values, grid=grid, warmup=False)
        self.launcher = self._run = launcher
        self.launches = 0

    @property
    def run(self):
        return self._run


@contextlib.contextmanager
def executing_direct_launches(monkeypatch):
    """Direct launches, recordings and replays on CPU, each launch run by the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run
    stand_ins = {}

    def params(kernel):
        sig = inspect.signature(kernel.fn)
        return [_Param(p, "constexpr" in str(p.annotation)) for p in sig.parameters.values()]

    def launch(kernel, *args, grid, warmup=False, **kwargs):
        if not hasattr(kernel, "params"):  # read by the direct launch before its warmup
            kernel.params = params(kernel)
        if warmup:
            return stand_ins.setdefault(kernel, _StandIn(kernel, run))
        stand_in = stand_ins.get(kernel)
        if stand_in is not None and stand_in._run is not stand_in.launcher:
            # a direct launch recording Triton's launcher call: every parameter, in order
            values = list(args) + [kwargs[p.name] if p.name in kwargs else p.default
                                   for p in kernel.params[len(args):]]
            grid3 = tuple(grid) + (1,) * (3 - len(grid))
            return stand_in.run(*grid3, 0, 0, None, None, None, None, *values)
        return run(kernel, *args, grid=grid, warmup=False, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", launch)
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    monkeypatch.setattr(direct_launch, "_driver", lambda: ((lambda: 0), (lambda device: 0)))
    monkeypatch.setattr(step_program, "ENABLED", True)
    monkeypatch.setattr(step_program, "_AS_TENSORS", True)
    # launches kept across calls were made without direct paths (the interpreter): made again
    from vit_fast.kernels import gelu_elementwise
    monkeypatch.setattr(gelu_elementwise, "_LAUNCHES", {})
    direct_launch.forget_kept()
    try:
        yield
    finally:
        direct_launch.forget_kept()


def _block(init_values=0.5, drop_path=0.0):
    torch.manual_seed(0)
    return vit_fast.Block(16, 2, qkv_bias=True, init_values=init_values,
                          drop_path=drop_path).train()


def _call(block, x, amp=False, general=False):
    params = list(block.parameters())
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = block._forward_general(x, None, False, None) if general else block(x)
    weight = torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape).sin()
    return out, torch.autograd.grad((out.float() * weight).sum(), [x, *params])


def _recorded(block, x, amp=False):
    """The general path's call, then the step's: its third records (step_program.RECORD_AT)."""
    for _ in range(4):
        _call(block, x, amp)


def _programs(block):
    return block.__dict__["_block_plan"][1].step.programs


def _replays(monkeypatch):
    """A list that gets one entry per replay that ran (not given up for the body)."""
    runs, real = [], step_program._run

    def counted(*args):
        out = real(*args)
        if out is not None:
            runs.append(1)
        return out
    monkeypatch.setattr(step_program, "_run", counted)
    return runs


CASES = {"fp32": {}, "fp32 no LayerScale": dict(init_values=None), "amp": dict(amp=True),
         "cuBLAS MLP": dict(backend="cublas")}


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_step_gives_the_general_paths_bits(case, monkeypatch):
    kw = dict(CASES[case])
    amp, backend = kw.pop("amp", False), kw.pop("backend", "triton")
    x = torch.randn(2, 6, 16)
    with executing_direct_launches(monkeypatch), vit_fast.use_backend(backend):
        block = _block(**kw)
        runs = _replays(monkeypatch)
        _recorded(block, x, amp)
        programs = _programs(block)
        assert programs is not None
        kinds = {type(p).__name__ for p in programs.by_key.values()}
        assert kinds == {"Program"}, programs.by_key
        assert len(programs.by_key) == 2  # the forward and the backward
        replayed = _call(block, x, amp)
        assert len(runs) == 2
        general = _call(block, x, amp, general=True)
    assert type(replayed[0].grad_fn).__name__ == "BlockFnBackward"
    assert torch.equal(replayed[0], general[0])
    for a, b in zip(replayed[1], general[1]):
        assert torch.equal(a, b)


def test_inputs_unlike_the_recorded_take_the_body(monkeypatch):
    """A misaligned x (a view at an odd offset: Triton specializes on 16-byte alignment) or a
    dispatch mode: the Python body, the same bits."""
    from torch.utils._python_dispatch import TorchDispatchMode
    x = torch.randn(2, 6, 16)
    with executing_direct_launches(monkeypatch), vit_fast.use_backend("triton"):
        block = _block()
        _recorded(block, x)
        runs = _replays(monkeypatch)
        flat = torch.randn(2 * 6 * 16 + 1)
        odd = flat[1:].view(2, 6, 16)  # contiguous, 4 bytes past 16-byte alignment
        odd.copy_(x)
        a = _call(block, odd)
        assert runs == []  # the forward's inputs differ: both bodies in Python
        b = _call(block, x)
        assert len(runs) == 2

        class Passing(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        with Passing():
            c = _call(block, x)
        assert len(runs) == 2
    for u, v in zip((a[0], *a[1]), (b[0], *b[1])):
        assert torch.equal(u, v)
    for u, v in zip((c[0], *c[1]), (b[0], *b[1])):
        assert torch.equal(u, v)


def test_drop_path_is_not_recorded(monkeypatch):
    """Drop-path's per-sample scales are drawn per call: the body stays in Python."""
    x = torch.randn(2, 6, 16)
    with executing_direct_launches(monkeypatch), vit_fast.use_backend("triton"):
        block = _block(drop_path=0.3)
        for _ in range(5):
            _call(block, x)
        assert _programs(block).by_key == {}


def test_a_launch_hook_takes_the_body(monkeypatch):
    """A profiler's launch hook must see every launch: no replay while one is installed."""
    from triton import knobs
    x = torch.randn(2, 6, 16)
    with executing_direct_launches(monkeypatch), vit_fast.use_backend("triton"):
        block = _block()
        _recorded(block, x)
        runs = _replays(monkeypatch)
        hook = knobs.runtime.launch_enter_hook
        if hasattr(hook, "calls"):
            monkeypatch.setattr(hook, "calls", [lambda *a: None])
        else:
            monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
        _call(block, x)
        assert runs == []


def test_recording_refuses_a_launch_through_the_subscript():
    """A launch that is not a direct one (Triton's own launch path) cannot be replayed."""
    from vit_fast.kernels.layer_norm import residual_layer_norm_fwd
    x = torch.randn(4, 16)
    w, b = torch.ones(16), torch.zeros(16)
    out, prog = step_program.record(lambda: (residual_layer_norm_fwd(x, w, b, 1e-5)[0],), (),
                                    (x, w, b))
    assert prog is None
    assert out[0].shape == x.shape


def test_recording_refuses_a_value_read_back():
    """An op whose result is read back into Python (.item()) may steer the body."""
    x = torch.randn(4)

    def body():
        return (x * 2 if x.sum().item() > 0 else x * 3,)
    _, prog = step_program.record(body, (), (x,))
    assert prog is None


def test_an_aten_only_body_replays():
    """Ops with constants, views, lists and an in-place op, replayed on new inputs."""
    def body(a, b):
        c = torch.cat([a, b], 1).t().contiguous()
        d = c.sum(0, keepdim=True)
        c.add_(d)
        return c, None, a.reshape(-1)
    a, b = torch.randn(3, 2), torch.randn(3, 4)
    out, prog = step_program.record(body, (a, b), (a, b))
    assert prog is not None
    a2, b2 = torch.randn(3, 2), torch.randn(3, 4)
    again = prog.run((a2, b2))
    want = body(a2, b2)
    assert again[1] is None
    assert torch.equal(again[0], want[0]) and torch.equal(again[2], want[2])
    assert prog.run((a2, torch.randn(3, 5))) is None  # another shape: not this program


def test_reference_pair_gives_sdpas_bits():
    """SDPA's forward/backward pair as the step calls it (ops/attention_sdpa.reference_fwd/_bwd)
    against the reference op with autograd (F.scaled_dot_product_attention): the same bits."""
    from vit_fast import reference
    from vit_fast.ops import attention_sdpa as sdpa
    torch.manual_seed(0)
    qkv = torch.randn(2, 6, 3 * 16)
    pair = sdpa.reference_pair(qkv.shape, qkv.dtype, qkv.device, 2)
    assert pair == "cpu_flash"
    scale = 0.3
    leaf = qkv.clone().requires_grad_()
    want = reference.fused_qkv_attention(leaf, 2, scale=scale)
    dout = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, leaf, dout)
    out, lse, seed, offset = sdpa.reference_fwd(pair, qkv, 2, scale)
    assert torch.equal(out, want)
    assert torch.equal(sdpa.reference_bwd(pair, dout, qkv, out, lse, seed, offset, 2, scale),
                       want_grad)


@pytest.mark.parametrize("programs", [False, True])
def test_step_with_the_reference_attention_gives_the_general_paths_bits(programs, monkeypatch):
    """Where dispatch sends the attention to the reference (fp32 on a GPU; forced here), the step
    runs SDPA's pair itself, recorded and replayed with the rest of its body."""
    from vit_fast import dispatch, functional, plans
    choose = dispatch.choose

    def to_reference(op, tensors, **options):
        if op == "fused_qkv_attention":
            return dispatch.Choice("reference", ["as on a GPU in fp32"])
        return choose(op, tensors, **options)
    monkeypatch.setattr(dispatch, "choose", to_reference)
    monkeypatch.setattr(functional, "_PLANS", plans.Plans())  # none chose the kernel
    x = torch.randn(2, 6, 16)
    ctx = (executing_direct_launches(monkeypatch) if programs else contextlib.nullcontext())
    with ctx, vit_fast.use_backend("triton"):
        block = _block()
        runs = _replays(monkeypatch)
        _recorded(block, x)
        step = block.__dict__["_block_plan"][1].step
        assert step.attn_public and step.attn_ref == "cpu_flash"
        stepped = _call(block, x)
        assert len(runs) == (2 if programs else 0)
        general = _call(block, x, general=True)
    assert type(stepped[0].grad_fn).__name__ == "BlockFnBackward"
    for a, b in zip((stepped[0], *stepped[1]), (general[0], *general[1])):
        assert torch.equal(a, b)


def _layer_calls(layers, x, n, amp=False):
    """The n-th call's output and gradients of x and every parameter (transformers' calling
    convention: hidden states and no mask)."""
    params = list(layers.parameters())
    for _ in range(n):
        xi = h = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            for layer in layers:
                h = layer(h, None)
        if isinstance(h, tuple):
            h = h[0]
        weight = torch.arange(h.numel(), dtype=torch.float32).reshape(h.shape).sin()
        grads = torch.autograd.grad((h.float() * weight).sum(), [xi, *params])
    return h.detach(), grads


@pytest.mark.parametrize("amp", [False, True])
def test_converted_transformers_layers_replay_their_steps(amp):
    """A converted transformers ViTLayer runs the Block's step (transformers_plan.py): replayed,
    its layers give the bits of the same step run in Python."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                       "(test-only dependency)")
    from converted_copy import converted_copy
    T = transformers
    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=16, num_attention_heads=2, intermediate_size=32,
                      num_hidden_layers=1, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    layers, _ = converted_copy(torch.nn.ModuleList(
        T.models.vit.modeling_vit.ViTLayer(cfg) for _ in range(1)))
    python_step = copy.deepcopy(layers)
    x = torch.randn(2, 6, 16)
    with pytest.MonkeyPatch.context() as mp, executing_direct_launches(mp), \
            vit_fast.use_backend("triton"):
        runs = _replays(mp)
        replayed = _layer_calls(layers, x, 5, amp)
        assert len(runs) == 2  # the 5th call: the layer's forward and backward
    with vit_fast.use_backend("triton"):
        want = _layer_calls(python_step, x, 3, amp)  # the step's body in Python
    assert torch.equal(replayed[0], want[0])
    for a, b in zip(replayed[1], want[1]):
        assert torch.equal(a, b)


def test_a_program_the_extension_cannot_build_is_refused(monkeypatch):
    """A recording whose program the extension rejects (a constant it cannot convert) leaves the
    body in Python instead of failing the call."""
    def rejecting(*args):
        raise RuntimeError("cannot convert")
    monkeypatch.setattr(step_program, "_build", rejecting)
    x = torch.randn(4)
    out, prog = step_program.record(lambda a: (a * 2,), (x,), (x,))
    assert prog is None
    assert torch.equal(out[0], x * 2)
