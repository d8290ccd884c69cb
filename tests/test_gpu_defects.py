"""Host-side defects a first GPU run would hit (issue 27), reproduced on CPU: each test failed
before its fix (checked against the tree before it, 95ce1f0).

- the backend choice made in forward holds in a backward and a checkpoint's recomputation run on
  another thread (autograd's per-device thread on CUDA);
- the tuner never answers with a remembered choice that is not among the call's candidates
  (SDPA after a policy change), times candidates on the tensors' device, holds at most two
  results while measuring, and a candidate that cannot build is skipped without disabling its op;
- the uint8 patch embed copies nothing from the host and reads nothing back on a repeat call;
- float arguments that torch.compile traces symbolically (a recompile with another value) pass
  the public ops' checks.
"""
import threading
import weakref

import pytest
import torch
from triton.runtime.errors import OutOfResources

import vit_fast
from test_tuning import FakeTimer
from vit_fast import dispatch, fallback, tuning
from vit_fast.kernels import _device


@pytest.fixture(autouse=True)
def _forget_failures():
    fallback.forget()
    yield
    fallback.forget()


def _on_other_thread(fn):
    """Run fn on a new thread, as CUDA's autograd runs a backward on its device thread, which
    sees none of the user's thread-local state. Returns what it raised, or None."""
    caught = []

    def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            caught.append(exc)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return caught[0] if caught else None


def test_checkpoint_recompute_on_another_thread_keeps_the_forwards_backend(monkeypatch):
    """use_backend("reference") around forward and backward, the backward (and with it the
    non-reentrant checkpoint's recomputation) on another thread whose own default is the kernels:
    the recomputation must run what the forward ran (else a CheckpointError: another number of
    saved tensors)."""
    monkeypatch.setenv("VIT_FAST_BACKEND", "triton")  # what a thread without the context sees
    getattr(dispatch, "reload_env", lambda: None)()  # read once on first use
    torch.manual_seed(0)
    block = vit_fast.Block(16, 2, qkv_bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with vit_fast.use_backend("reference"):
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        err = _on_other_thread(lambda: out.sum().backward())
    assert err is None, repr(err)
    want = x.detach().clone().requires_grad_()
    with vit_fast.use_backend("reference"):
        block(want).sum().backward()
    torch.testing.assert_close(x.grad, want.grad)


def test_backward_on_another_thread_runs_the_forwards_implementation(monkeypatch):
    """A Block's fused ops under use_backend("triton"): their backward on another thread (whose
    default is the reference) still runs the kernels the forward chose."""
    monkeypatch.setenv("VIT_FAST_BACKEND", "reference")
    getattr(dispatch, "reload_env", lambda: None)()  # read once on first use
    torch.manual_seed(0)
    attn_qkv = torch.randn(2, 9, 3 * 2 * 8, requires_grad=True)
    from vit_fast.ops import attention_sdpa
    calls = []
    real = attention_sdpa.attention_bwd
    monkeypatch.setattr(attention_sdpa, "attention_bwd",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with vit_fast.use_backend("triton"):
        out = vit_fast.fused_qkv_attention(attn_qkv, 2)
    err = _on_other_thread(lambda: out.sum().backward())
    assert err is None, repr(err)
    assert calls == [1]  # the kernel's backward, chosen in forward, not the reference's


def test_a_remembered_choice_outside_the_candidates_is_chosen_again():
    """SDPA won the attention backward under 'auto'; the same shape under 'triton' (SDPA not a
    candidate) must not answer with 'sdpa' (it raised KeyError: 'sdpa')."""
    from vit_fast.ops import attention
    qkv = torch.randn(2, 13, 3 * 2 * 16, requires_grad=True)
    gy = torch.randn(2, 13, 2 * 16)
    t = tuning.Tuner(None, FakeTimer({"sdpa": 1.0, "triton": 2.0}), measure_anywhere=True)
    with tuning.use_tuner(t):
        with vit_fast.use_backend("auto"):
            out = attention.fused_qkv_attention_op(qkv, 2, 0.25)[0]
            torch.autograd.grad(out, qkv, gy)
        assert {r["op"]: r["choice"] for r in t.records()}["attention_bwd"] == "sdpa"
        with vit_fast.use_backend("triton"):
            out = attention.fused_qkv_attention_op(qkv, 2, 0.25)[0]
            torch.autograd.grad(out, qkv, gy)
    # and the tuner itself: a choice it holds for a key is run only if it is a candidate now
    t = tuning.Tuner(None, FakeTimer({"a": 1.0, "b": 2.0}), measure_anywhere=True)
    assert t.run("op", "k", {"a": lambda: "A", "b": lambda: "B"}, measure=True) == ("a", "A")
    assert t.run("op", "k", {"b": lambda: "B"}, measure=False) == ("b", "B")


def test_candidates_are_timed_on_the_tensors_device(monkeypatch):
    """Tensors on cuda:1 while cuda:0 is current: the events and the synchronize belong to cuda:1
    (Triton and torch launch there). No GPU here: torch.cuda's pieces are recorded stand-ins."""
    log = []

    class Event:
        def __init__(self, **kw):
            pass

        def record(self):
            log.append(("record", current[-1]))

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    current = [0]

    class Device:
        def __init__(self, index):
            self.index = getattr(index, "index", index)

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append(("sync", current[-1])))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    tuning.cuda_event_timer("x", lambda: log.append(("run", current[-1])), reps=2,
                            device=torch.device("cuda", 1))
    assert log and all(where == 1 for _, where in log), log
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "GPU")
    monkeypatch.setattr(tuning, "_DEVICE_NAMES", {})
    assert tuning.device_name(torch.device("cuda", 1)) != tuning.device_name(
        torch.device("cuda", 0))  # the cache keys of two GPUs differ


def test_measuring_holds_at_most_two_results():
    """The first candidate's result (the yardstick) and the one being compared: a result is
    dropped once compared, so the tuning step's memory is bounded (it kept every result)."""
    alive = []
    peak = [0]

    def candidate(value):
        def run():
            out = torch.full((64,), value)
            alive.append(weakref.ref(out))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return out
        return run
    timer = FakeTimer({n: t for n, t in zip("abcde", (5.0, 4.0, 3.0, 2.0, 1.0))})
    t = tuning.Tuner(None, timer)
    name, _ = t.run("op", "k", {n: candidate(1.0) for n in "abcde"}, measure=True)
    assert name == "e"
    # the next candidate's result is made while the yardstick and (at most) the last compared
    # one are alive
    assert peak[0] <= 3, peak[0]
    del _
    import gc
    gc.collect()
    assert sum(r() is not None for r in alive) == 0


def test_agreement_needs_no_float64_copy(monkeypatch):
    """Comparing two results converts them piece by piece in fp32, not whole to fp64."""
    from vit_fast.agreement import disagreement
    a = torch.randn(3, 1000)
    monkeypatch.setattr(torch.Tensor, "double", lambda self: pytest.fail("a float64 copy"))
    assert disagreement(a + 1e-4, a) is None
    assert "max |difference|" in disagreement(a * 2, a)


def test_a_candidate_that_cannot_build_is_skipped_without_disabling_the_op(monkeypatch):
    """One GEMM tile config failing to build (OutOfResources inside the launcher's guard, as on a
    GPU whose shared memory it exceeds) is skipped; the op keeps its kernels."""
    from vit_fast.kernels import matmul
    H100 = _device.Target(132, 90)
    monkeypatch.setattr(matmul, "gpu_target", lambda device: H100)
    a, b = torch.randn(40, 24, dtype=torch.bfloat16), torch.randn(24, 72, dtype=torch.bfloat16)
    cands = matmul.gemm_candidates(40, 72, torch.bfloat16, matmul.Epilogue(), "ieee", H100, 24)
    bad = cands[0]
    real = matmul.matmul_kernel

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["BLOCK_M"] == bad.block_m and kwargs["BLOCK_N"] == bad.block_n \
                        and kwargs["num_stages"] == bad.num_stages:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(matmul, "matmul_kernel", Failing())
    timer = FakeTimer({c.name: 1.0 for c in cands})
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        out = matmul.matmul(a, b, torch.bfloat16, choose=tuning.choose_gemm_config)[0]
        (rec,) = tuning.records()
    assert rec["choice"] != bad.name and bad.name in rec["errors"]
    assert not _device.LAUNCH_FAILURES and not fallback.FELL_BACK
    torch.testing.assert_close(out.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-2)
    with vit_fast.use_backend("triton"):
        assert dispatch.choose("gelu_mlp", [a]).backend == "triton"


def test_uint8_patch_embed_copies_nothing_from_the_host_on_a_repeat_call(monkeypatch):
    """mean/std given as numbers: put on the device once, not per call (a blocking copy each call
    on CUDA, and a failure under CUDA-graph capture), and std checked without reading a device
    value back."""
    images = torch.randint(0, 255, (2, 8, 8, 3), dtype=torch.uint8)
    weight, bias = torch.randn(6, 3, 4, 4), torch.randn(6)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    first = vit_fast.patch_embed(images, weight, bias, patch_size=4, mean=mean, std=std)
    made = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    reads = []
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or bool(
        self.item()))
    again = vit_fast.patch_embed(images, weight, bias, patch_size=4, mean=mean, std=std)
    assert not made and not reads
    torch.testing.assert_close(again, first)


def test_compiled_ops_take_traced_floats():
    """Two eps values in one process: dynamo recompiles with eps symbolic (automatic dynamic),
    and the checks must trace (math.isfinite on a SymFloat broke fullgraph=True)."""
    torch._dynamo.reset()
    x, w, b = torch.randn(2, 8), torch.randn(8), torch.randn(8)

    def fn(x, eps, scale):
        y = vit_fast.residual_layer_norm(x, w, b, eps)[0]
        qkv = torch.cat([y, y, y], -1).reshape(1, 2, 24)
        return vit_fast.fused_qkv_attention(qkv, 2, scale=scale)

    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)
    for eps, scale in ((1e-6, 0.5), (1e-5, 0.25)):
        torch.testing.assert_close(compiled(x, eps, scale), fn(x, eps, scale))
    torch._dynamo.reset()
