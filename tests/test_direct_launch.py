"""DirectLaunch (vit_fast/kernels/direct_launch.py) makes the launcher call Triton would make.

No GPU here: Triton's own JITFunction.run runs for real (binder, specialization, cache key) with a
stand-in driver, and the compiled kernel its cache holds is a stand-in whose launcher records what
it is called with. The direct launch must pass the launcher exactly what Triton passes for the
same arguments, and must leave every call Triton would specialize differently to Triton.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from vit_fast.kernels import direct_launch
from vit_fast.kernels.direct_launch import DirectLaunch


def _probe(X, Y, B, M, stride, eps, HAS_B: tl.constexpr, BLOCK: tl.constexpr,
           EXTRA: tl.constexpr = 3):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < M), mask=offs < M)


# A compiled-path JITFunction even where the tests run under TRITON_INTERPRET=1 (triton.jit
# would make an interpreted one, which has no compiled kernel to launch directly).
probe_kernel = JITFunction(_probe)


class StandIn:
    """The parts of Triton's CUDA driver that JITFunction.run and DirectLaunch read."""
    device = 0

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 700 + device

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


class Compiled:
    """A compiled kernel as Triton's cache holds it: ``run`` is its launcher (a property over
    ``_run``, as in Triton); this one records its calls."""
    function = 4242
    packed_metadata = (4, 1, 0)

    def __init__(self, calls):
        self._run = lambda *a: calls.append(a)

    @property
    def run(self):
        return self._run

    def launch_metadata(self, *args):
        return None


@pytest.fixture
def triton_stand_in(monkeypatch):
    """Yields (calls to the launcher, calls of JITFunction.run, the stand-in driver)."""
    from triton.runtime import driver as driver_mod
    stand_in, launched, runs = StandIn(), [], []
    saved = driver_mod._active
    driver_mod.set_active(stand_in)
    try:
        x = torch.empty(64)
        with contextlib.suppress(Exception):  # fills device_caches; compiling fails (no GPU)
            probe_kernel[(1,)](x, x, None, 64, 1, 1e-5, HAS_B=False, BLOCK=64)
        cache = probe_kernel.device_caches[0][0]
        cache.clear()

        def compile_stand_in(key, *args, **kwargs):
            cache[key] = Compiled(launched)
            return cache[key]
        monkeypatch.setattr(probe_kernel, "_do_compile", compile_stand_in)
        real_run = type(probe_kernel).run

        def counted_run(*args, **kwargs):
            if not kwargs.get("warmup"):
                runs.append(1)
            return real_run(probe_kernel, *args, **kwargs)
        monkeypatch.setattr(probe_kernel, "run", counted_run)
        monkeypatch.setattr(direct_launch, "ENABLED", True)
        yield launched, runs, stand_in
    finally:
        driver_mod._active = saved
        probe_kernel.device_caches[0][0].clear()


CONSTS = dict(HAS_B=True, BLOCK=64, num_warps=4)


def _args():
    x, y, b = torch.randn(64), torch.empty(64), torch.randn(64)
    return (x, y, b, 64, 1, 1e-5)


def _triton_call(launched, args):
    """What Triton itself passes the launcher for args: (the leading six, the kernel's)."""
    probe_kernel[(2,)](*args, **CONSTS)
    call = launched.pop()
    return call[:6], call[9:]


def test_the_direct_call_is_tritons_call(triton_stand_in):
    launched, runs, _ = triton_stand_in
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    launch(*args)
    launch(*args)  # Triton's launch, recorded
    assert len(runs) == 2 and len(launched) == 2 and launch.fast is not None
    for new in (args, _args()):  # the same tensors, and other tensors of the same kind
        launched.clear()
        runs.clear()
        launch(*new)
        assert not runs, "the direct call went through JITFunction.run"
        (direct,) = launched
        lead, kernel_args = _triton_call(launched, new)
        assert direct[:6] == lead and direct[6:9] == (None, None, None)
        assert len(direct[9:]) == len(kernel_args)
        assert all(a is b if isinstance(a, torch.Tensor) else (type(a) is type(b) and a == b)
                   for a, b in zip(direct[9:], kernel_args))


def _misaligned(args):
    x = torch.randn(65)[1:]  # 4 bytes past a 16-byte boundary: Triton specializes on it
    return (x, *args[1:])


@pytest.mark.parametrize("change", ["misaligned", "dtype", "none", "int", "float_to_int",
                                    "device"])
def test_a_call_triton_would_specialize_otherwise_goes_through_triton(triton_stand_in, change):
    launched, runs, stand_in = triton_stand_in
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    launch(*args)
    launch(*args)
    assert launch.fast is not None
    new = {"misaligned": lambda: _misaligned(args),
           "dtype": lambda: (args[0].double(), *args[1:]),
           "none": lambda: (*args[:2], None, *args[3:]),
           "int": lambda: (*args[:3], 48, *args[4:]),
           "float_to_int": lambda: (*args[:5], 1)}.get(change, lambda: args)()
    if change == "device":
        stand_in.device = 1
    runs.clear()
    launch(*new)
    assert len(runs) == 1, f"{change}: the call did not go through JITFunction.run"
    stand_in.device = 0
    runs.clear()
    launch(*args)  # and the bound call is still direct
    assert not runs


def test_hooks_send_launches_through_triton(triton_stand_in):
    launched, runs, _ = triton_stand_in
    from triton import knobs
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    launch(*args)
    launch(*args)
    runs.clear()
    seen = []

    def hook(metadata):
        seen.append(metadata)
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton's launch hooks are not chains")
    chain.add(hook)
    try:
        launch(*args)
        assert len(runs) == 1
    finally:
        chain.remove(hook)
    probe_kernel.add_pre_run_hook(lambda *a, **k: None)
    try:
        runs.clear()
        launch(*args)
        assert len(runs) == 1
    finally:
        probe_kernel.pre_run_hooks.clear()
    runs.clear()
    launch(*args)
    assert not runs


def test_disabled_every_call_goes_through_triton(triton_stand_in, monkeypatch):
    launched, runs, _ = triton_stand_in
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    for _ in range(4):
        launch(*args)
    assert len(runs) == 4 and launch.fast is None


@pytest.mark.parametrize("extra", [(), ("extra",)], ids=["non-constexpr-only", "unknown"])
def test_the_launcher_convention_is_read_from_triton(triton_stand_in, monkeypatch, extra):
    """A Triton that passes the launcher only the non-constexpr arguments (older releases) gets
    direct calls in that convention; one whose call this cannot reproduce (here: an argument
    more) stays on kernel[grid] for good."""
    launched, runs, _ = triton_stand_in
    real = type(probe_kernel).run

    def other_convention(*args, grid, warmup, **kwargs):
        compiled = real(probe_kernel, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:
            runs.append(1)
            compiled.run(grid[0], 1, 1, 700, compiled.function, compiled.packed_metadata, None,
                         None, None, *args, *extra)
        return compiled
    monkeypatch.setattr(probe_kernel, "run", other_convention)
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    for _ in range(3):
        launch(*args)
    if extra:
        assert launch.fast is None and len(runs) == 3
    else:
        assert launch.fast is not None and len(runs) == 2
        assert launched[-1][9:] == launched[-2][9:] == args


def test_keyword_arguments_and_parameters_launch_directly(triton_stand_in):
    """Per-call keyword arguments (the attention backward's dq target) and nn.Parameters (a
    Block's weights) are arguments like any other: a tensor's class is not part of Triton's
    specialization, its dtype is."""
    launched, runs, _ = triton_stand_in
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    weight = torch.nn.Parameter(torch.randn(64))
    args = (weight, torch.empty(64), None, 64, 1)
    launch(*args, eps=1e-5)
    launch(*args, eps=1e-5)
    runs.clear()
    launched.clear()
    launch(*args, eps=2e-5)
    assert not runs
    (direct,) = launched
    lead, kernel_args = _triton_call(launched, (*args, 2e-5))
    assert direct[:6] == lead and direct[9:14] == kernel_args[:5] and direct[14] == 2e-5
    runs.clear()
    launch(torch.randn(64), *args[1:], eps=1e-5)  # Triton specializes on dtype, not on the type
    assert not runs
    launch(torch.randn(64).double(), *args[1:], eps=1e-5)
    assert len(runs) == 1


def test_a_triton_it_cannot_read_launches_through_triton(triton_stand_in, monkeypatch):
    """An exception while reading the compiled kernel (here: from warmup) is not the call's:
    the call launches through Triton, and so do the ones after it."""
    launched, runs, _ = triton_stand_in

    def unreadable(*args, **kwargs):
        raise RuntimeError("an internal this Triton does not have")
    monkeypatch.setattr(probe_kernel, "warmup", unreadable)
    launch = DirectLaunch(probe_kernel, (2,), CONSTS)
    args = _args()
    for _ in range(3):
        launch(*args)
    assert launch.fast is None and len(runs) == 3 and len(launched) == 3
