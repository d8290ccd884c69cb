"""Activation checkpointing replays a forward under that forward's backend policy, and one thread's
use_backend() is invisible to every other thread (issue 27, item 2).

torch.utils.checkpoint reruns the checkpointed function in the backward: after the user's
use_backend() has closed, or on autograd's device thread. A replay that picks other ops than the
forward saves another number of tensors (non-reentrant: CheckpointError) or silently computes the
gradients of other ops (reentrant). Each test here failed before its fix.
"""
import threading

import pytest
import torch

import vit_fast
from vit_fast import dispatch


@pytest.fixture
def env_policy(monkeypatch):
    """Set VIT_FAST_BACKEND (None: unset, 'auto') as the process default, read again."""
    def set_env(name):
        if name is None:
            monkeypatch.delenv("VIT_FAST_BACKEND", raising=False)
        else:
            monkeypatch.setenv("VIT_FAST_BACKEND", name)
        dispatch.reload_env()
    yield set_env
    dispatch.reload_env()


def _block_and_input():
    torch.manual_seed(0)
    block = vit_fast.Block(16, 2, qkv_bias=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    return block, x


def _grads(block, x):
    return [x.grad] + [p.grad for p in block.parameters()]


def _plain_grads(policy):
    """The gradients of the Block without checkpointing, forward and backward under ``policy``."""
    block, x = _block_and_input()
    with vit_fast.use_backend(policy):
        block(x).sum().backward()
    return _grads(block, x)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("forward, default", [("reference", "triton"), ("triton", None)],
                         ids=["reference_under_triton", "triton_under_auto"])
def test_checkpoint_replay_runs_under_the_forwards_policy(env_policy, forward, default,
                                                          use_reentrant):
    """The forward under use_backend(forward), the backward (and the replay) after the context
    closed, where the default policy is another: the gradients are those of the forward's ops,
    bit for bit (the replay runs what the forward ran). Before the fix: CheckpointError (24
    tensors saved in forward, 16 in the recomputation) or the kernels' gradients."""
    env_policy(default)
    want = _plain_grads(forward)
    block, x = _block_and_input()
    with vit_fast.use_backend(forward):
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=use_reentrant)
    out.sum().backward()
    for got, ref in zip(_grads(block, x), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_checkpoint_replay_inside_another_policy_runs_the_forwards(env_policy):
    """The backward called inside use_backend('triton') of a forward run under the default
    ('reference' here): the replay still runs the forward's (the default's) ops."""
    env_policy("reference")
    want = _plain_grads("reference")
    block, x = _block_and_input()
    out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    with vit_fast.use_backend("triton"):
        out.sum().backward()
    for got, ref in zip(_grads(block, x), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_checkpoint_of_a_function_that_picks_its_own_policy():
    """A checkpointed function that opens use_backend() itself replays with it: the function's
    own choice inside, the forward's around it."""
    seen = []

    def fn(t):
        seen.append(dispatch.current_policy())
        with vit_fast.use_backend("triton"):
            seen.append(dispatch.current_policy())
        return t * 2

    x = torch.randn(3, requires_grad=True)
    with vit_fast.use_backend("reference"):
        out = torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=True)
    with vit_fast.use_backend("auto"):
        out.sum().backward()
    assert seen == ["reference", "triton"] * 2  # the forward, then the replay
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


class _Hold:
    """A thread that holds use_backend(name) open until released."""

    def __init__(self, name):
        self.entered, self.release, self.seen = threading.Event(), threading.Event(), []

        def run():
            with vit_fast.use_backend(name):
                self.seen.append(dispatch.current_policy())
                self.entered.set()
                self.release.wait(30)
        self.thread = threading.Thread(target=run)

    def __enter__(self):
        self.thread.start()
        assert self.entered.wait(30)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join()


def test_another_threads_open_policy_is_invisible_inside_a_backward(env_policy):
    """Another thread holds use_backend('triton') open; this thread has none: code running
    inside its backward sees this thread's policy (the default), not the other thread's (it
    saw 'triton' before the fix)."""
    env_policy("reference")
    inside = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            inside.append(dispatch.current_policy())
            return g

    x = torch.randn(3, requires_grad=True)
    with _Hold("triton") as other:
        Probe.apply(x).sum().backward()
    assert other.seen == ["triton"]
    assert inside == ["reference"]


def test_another_threads_open_policy_does_not_reach_a_checkpoint_replay(env_policy):
    """Another thread holds use_backend('triton') open while this thread checkpoints a Block
    under its default ('reference') and runs the backward: the replay runs the reference ops
    (before the fix it took the other thread's 'triton': CheckpointError)."""
    env_policy("reference")
    want = _plain_grads("reference")
    block, x = _block_and_input()
    with _Hold("triton"):
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        out.sum().backward()
    for got, ref in zip(_grads(block, x), want):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_two_threads_checkpoint_under_their_own_policies(env_policy):
    """Two user threads, each checkpointing a Block under its own use_backend() and running its
    backward after the context closed, the forwards and backwards interleaved: each gets the
    gradients of its own policy."""
    env_policy("auto")
    want = {p: _plain_grads(p) for p in ("reference", "triton")}
    made = {p: _block_and_input() for p in want}  # here: torch's generator is the process's
    got, errors = {}, []
    forwards_done = threading.Barrier(2, timeout=60)

    def run(policy):
        try:
            block, x = made[policy]
            with vit_fast.use_backend(policy):
                out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                forwards_done.wait()  # both contexts open at once
            out.sum().backward()
            got[policy] = _grads(block, x)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
            forwards_done.abort()
    threads = [threading.Thread(target=run, args=(p,)) for p in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors)
    for policy, ref in want.items():
        for g, r in zip(got[policy], ref):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_a_backward_on_another_thread_reads_no_policy(monkeypatch, env_policy):
    """What lets use_backend() be per thread: a backward (autograd's device thread on CUDA, here
    a new thread) never falls back to that thread's default policy -- every op keeps its
    forward's in its autograd context. Each read of the policy stack inside a backward that finds
    it empty is recorded."""
    env_policy("reference")
    empty_reads = []

    class Spy(type(dispatch._local)):
        @property
        def stack(self):
            got = self.__dict__["stack"]
            if not got and torch._C._current_autograd_node() is not None:
                empty_reads.append(threading.current_thread().name)
            return got

        @stack.setter
        def stack(self, value):
            self.__dict__["stack"] = value
    monkeypatch.setattr(dispatch, "_local", Spy())
    torch.manual_seed(0)
    block = vit_fast.Block(40, 2, qkv_bias=True, init_values=0.1)
    x = torch.randn(2, 17, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    fc1, fc2 = torch.randn(56, 40, requires_grad=True), torch.randn(40, 56, requires_grad=True)
    with vit_fast.use_backend("triton"):
        y = block(x)
        z = vit_fast.residual_layer_norm(y, w, w, 1e-6, residual=x)
        z = z[0] if isinstance(z, tuple) else z
        loss = vit_fast.gelu_mlp(z, fc1, None, fc2, None).sum()
        loss = loss + vit_fast.fused_qkv_attention(torch.cat([y, y, y], -1), 2).sum()
    t = threading.Thread(target=loss.backward)
    t.start()
    t.join()
    assert x.grad is not None and fc1.grad is not None
    assert empty_reads == []


def test_install_binds_once_and_keeps_torchs_names():
    """install() runs on import; again it changes nothing (no function bound twice), the
    reentrant node keeps torch's name, and a torch without the places warns, binding nothing."""
    from torch.utils import checkpoint as tc
    from vit_fast import checkpoint_replay
    before = (tc.CheckpointFunction, tc._checkpoint_without_reentrant_generator_impl
              if hasattr(tc, "_checkpoint_without_reentrant_generator_impl")
              else tc._checkpoint_without_reentrant_generator)
    checkpoint_replay.install()
    after = (tc.CheckpointFunction, tc._checkpoint_without_reentrant_generator_impl
             if hasattr(tc, "_checkpoint_without_reentrant_generator_impl")
             else tc._checkpoint_without_reentrant_generator)
    assert before == after and after[0] is checkpoint_replay.CheckpointFunction
    assert after[1].vit_fast_binds_policies and not getattr(after[1].__wrapped__,
                                                            "vit_fast_binds_policies", False)
    x = torch.randn(3, requires_grad=True)
    out = tc.checkpoint(torch.sin, x, use_reentrant=True)
    assert type(out.grad_fn).__name__ == "CheckpointFunctionBackward"


def test_install_on_a_torch_without_the_places_warns(monkeypatch):
    from torch.utils import checkpoint as tc
    from vit_fast import checkpoint_replay
    for name in checkpoint_replay._GENERATORS:
        monkeypatch.delattr(tc, name, raising=False)
    with pytest.warns(RuntimeWarning, match="recomputation runs under the backend policy"):
        checkpoint_replay.install()
