"""The host path (issue 26): what a Block call does on the CPU, decided once per configuration.

- a repeat call of a fused Block -- forward and backward, on the path an sm_90 GPU takes, Triton
  launches replaced by counting no-ops (vit_fast/bench/host.py) -- imports nothing, reads no
  environment variable, runs none of the argument checks (they ran when the configuration
  was first seen) and launches no GEMM or column sum through matmul's per-call decisions (the
  step's are bound: kernels/matmul_bound.py);
- the per-configuration plan (vit_fast/block_plan.py) follows every change that could make the
  fused path wrong: hooks, a swapped submodule, a forward set on an instance, a cast, a new
  Parameter;
- the eager twins (autograd.Function) and the registered custom ops give the same bits;
- ``python -m vit_fast.bench host`` runs and reports what it counts.
"""
import builtins
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import vit_fast
from vit_fast import block_plan
from vit_fast.bench import host

SHAPE = host.SHAPES["vit_s"]


class _Counting:
    """What the enclosed calls do: imports, environment reads, argument-check calls."""

    def __init__(self, monkeypatch):
        self.imports, self.env, self.checks, self.unbound = [], [], [], []
        real_import = builtins.__import__

        # vit_fast's own files (its package and the kernels folder it maps), by path: a venv
        # that merely lives under a folder named vit_fast-* (make compat's) is not vit_fast.
        import vit_fast.kernels
        roots = tuple(os.path.realpath(d) + os.sep
                      for d in (*vit_fast.__path__, *vit_fast.kernels.__path__))

        def counted_import(name, *args, **kwargs):
            caller = os.path.realpath(sys._getframe(1).f_code.co_filename)
            if caller.startswith(roots):
                self.imports.append(f"{name} (from {os.path.basename(caller)})")
            return real_import(name, *args, **kwargs)
        self._import = counted_import
        outer = self

        class Environ(type(os.environ)):
            def __getitem__(self, key):
                outer.env.append(key)
                return super().__getitem__(key)

        env = Environ(os.environ._data, os.environ.encodekey, os.environ.decodekey,
                      os.environ.encodevalue, os.environ.decodevalue)
        monkeypatch.setattr(os, "environ", env)

    def __enter__(self):
        from vit_fast.kernels import matmul
        per_call = {matmul.matmul.__wrapped__.__code__, matmul.colsum.__wrapped__.__code__}

        def profile(frame, event, arg):
            if event == "call":
                name, path = frame.f_code.co_name, frame.f_code.co_filename
                if frame.f_code in per_call:
                    self.unbound.append(name)
                if path.endswith(os.path.join("ops", "checks.py")) or name.startswith("_check") \
                        or name.startswith("check_"):
                    self.checks.append(f"{os.path.basename(path)}:{name}")
        builtins.__import__ = self._import
        sys.setprofile(profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        builtins.__import__ = self._real_import


@pytest.mark.parametrize("precision", ["amp", "fp32", "bf16"])
def test_a_repeat_call_imports_reads_and_checks_nothing(monkeypatch, precision):
    timm_block, ours = host.build_blocks(SHAPE, precision)
    with host.gpu_path("sm_90") as launches:
        step = host.make_step(ours, SHAPE, precision, "fwd+bwd")
        step()
        step()
        launches[0] = 0
        counting = _Counting(monkeypatch)
        counting._real_import = builtins.__import__
        with counting:
            step()
    assert ours.why_not_fused() == []
    assert 10 <= launches[0] <= 20, launches[0]  # the kernels ran (as counted no-ops)
    assert counting.imports == [], counting.imports
    assert counting.env == [], counting.env
    assert counting.checks == [], counting.checks
    assert counting.unbound == [], counting.unbound  # the step's MLP launches are bound


def _block():
    torch.manual_seed(0)
    return vit_fast.Block(16, 2, qkv_bias=True, init_values=0.5)


def _plan_used(block, x):
    """Run block(x) and say whether its per-configuration plan ran it."""
    calls = []
    real = block_plan.BlockPlan.__call__

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)
    block_plan.BlockPlan.__call__ = spy
    try:
        out = block(x)
    finally:
        block_plan.BlockPlan.__call__ = real
    return bool(calls), out


def test_the_plan_follows_what_could_change_the_fused_path():
    block, x = _block(), torch.randn(2, 5, 16)
    with vit_fast.use_backend("triton"), torch.no_grad():
        assert _plan_used(block, x)[0]
        fired = []
        handle = block.mlp.fc1.register_forward_hook(lambda m, a, o: fired.append(1))
        used, _ = _plan_used(block, x)
        assert not used and fired == [1]  # a hook: the plain path, the hook fires
        handle.remove()
        block(x)  # fusable again: the general path drops the old decision
        assert _plan_used(block, x)[0]
        block.mlp.fc1.forward = lambda t: torch.zeros(*t.shape[:-1], 64)  # set on the instance
        used, out = _plan_used(block, x)
        assert not used
        del block.mlp.fc1.forward
        block(x)
        assert _plan_used(block, x)[0]
        block.attn.qkv = nn.Linear(16, 48, bias=False)  # a submodule swapped
        used, out = _plan_used(block, x)
        assert used
        with vit_fast.use_backend("reference"):
            torch.testing.assert_close(out, block(x))
        block.mlp.fc2.weight = nn.Parameter(torch.zeros(16, 64))  # a new Parameter: used at once
        block.mlp.fc2.bias = nn.Parameter(torch.zeros(16))
        h = block.ls1(block.attn(block.norm1(x)))
        torch.testing.assert_close(_plan_used(block, x)[1], x + h, rtol=1e-5, atol=1e-5)
        block.to(torch.float64)  # .to(): the reference now (fp64 is not a kernel dtype)
        used, out = _plan_used(block, x.double())
        assert not used and out.dtype == torch.float64


def test_eager_twins_and_registered_ops_give_the_same_bits():
    """The plan's eager twins (autograd.Function) against the Block's general path, which calls
    the registered custom ops: same kernels, same order, so the same bits, outputs and grads."""
    block = _block().train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    params = list(block.parameters())
    with vit_fast.use_backend("triton"):
        assert _plan_used(block, x)[0]
        out = block(x)
        got = torch.autograd.grad(out, [x, *params], torch.ones_like(out))
        general = block._forward_general(x, None, False)
        want = torch.autograd.grad(general, [x, *params], torch.ones_like(general))
    assert torch.equal(out, general)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_host_benchmark_reports_its_counts(capsys, tmp_path):
    rows = host.measure(SHAPE, "amp", "sm_90", modes=("fwd+bwd",), rounds=1, inner=1)
    (row,) = rows
    assert row["fused"] and row["timm_us"] > 0 and row["vit_fast_us"] > 0
    assert 10 <= row["triton_launches"] <= 20
    assert row["aten_ops_timm"] > 0 and row["aten_ops_vit_fast"] > 0
    text = host.format_rows(rows)
    assert "vit_s" in text and "fwd+bwd" in text
    counted = {("vit_s", "amp", "fwd+bwd"): (host.Instructions(4e6, 1.5e6),
                                             host.Instructions(2.5e6, 0.5e6))}
    text = host.format_rows(rows, counted)
    assert "4.00 M / 2.50 M (0.62x)" in text and "2.50 M / 2.00 M (0.80x)" in text
    out = host.results(rows, 15.0, counted, "python -m vit_fast.bench host")
    from vit_fast.bench import predict_host
    fields = [f.name for f in __import__("dataclasses").fields(predict_host.HostCost)]
    (r,) = out["rows"]
    assert r["mode"] in predict_host.HOST_MODES and r["precision"] in predict_host.PRECISIONS
    assert (r["eager_host_share"], r["vit_fast_host_share"]) == (0.625, 0.8)
    cost = predict_host.HostCost(**{f: r[f] for f in fields if f in r})  # a row alone: shares
    assert cost.eager_host_us == pytest.approx(0.625 * r["eager_us"])
    assert cost.vit_fast_host_us == pytest.approx(0.8 * r["vit_fast_us"])
    saved = tmp_path / "host-cpu.json"  # the saved file: the counted instructions' ratio
    saved.write_text(json.dumps(out))
    loaded = predict_host.load(saved)[0][(r["mode"], r["precision"])]
    assert loaded.host_instruction_ratio == pytest.approx(2.0 / 2.5)
    assert loaded.vit_fast_host_us == pytest.approx(loaded.eager_host_us * 0.8)


def test_a_stack_of_blocks_costs_each_block_what_one_block_costs():
    """--depth: in a stack (as a model runs them) every Block reaches its one-node step: no more
    launches and aten ops than one Block alone makes (the general path makes more of both)."""
    (one,) = host.measure(SHAPE, "amp", "sm_90", modes=("fwd+bwd",), rounds=1, inner=1)
    (two,) = host.measure(SHAPE, "amp", "sm_90", modes=("fwd+bwd",), rounds=1, inner=1, depth=2)
    assert two["fused"] and two["depth"] == 2
    assert two["triton_launches"] == 2 * one["triton_launches"]
    assert two["aten_ops_vit_fast"] <= 2 * one["aten_ops_vit_fast"]
    assert "vit_s x2" in host.format_rows([two])


# callgrind_annotate --inclusive=yes lines: count, share, file:function [object]
_ANNOTATED = """\
4,000,000 (100.0%)  PROGRAM TOTALS
1,000,000 (25.00%)  ???:at::native::addmm_impl_cpu_(at::Tensor&, at::Tensor const&) [lib.so]
  400,000 (10.00%)  ???:at::native::addmm_impl_cpu_(at::Tensor&, at::Tensor const&)'2 [lib.so]
  300,000 ( 7.50%)  ???:at::native::_scaled_dot_product_flash_attention_cpu(at::Tensor) [l]
  200,000 ( 5.00%)  ???:at::native::_scaled_dot_product_flash_attention_cpu_backward(Tensor) [l]
  900,000 (22.50%)  ???:at::_ops::addmm::call(at::Tensor const&) [lib.so]
   50,000 ( 1.25%)  ???:at::native::cpublas::gemm(long) [lib.so]
"""


def test_cpu_compute_is_the_gemm_and_attention_bodies():
    """What the host figure leaves out: the inclusive counts of the CPU's GEMM and flash-attention
    bodies, each once (not their recursion entries, not their callers, not what they call)."""
    assert host.cpu_compute_instructions(_ANNOTATED) == 1_500_000
    assert host.Instructions(4e6, 1.5e6).host == 2.5e6


@pytest.mark.parametrize("drops", [(0.0, 0.0), (0.25, 0.2)], ids=["plain", "dropout+drop-path"])
def test_the_plan_takes_the_kernels_attention_only_where_dispatch_would(monkeypatch, drops):
    """Where dispatch sends the attention to the reference (on a GPU: fp32 attention, no build is
    shipped), the Block's plan must not call the attention kernel: it calls the public op, which
    asks dispatch, and draws the same random numbers as the general path. Emulated on CPU by a
    reason the kernel gives."""
    from vit_fast import plans, support
    from vit_fast.ops import attention_sdpa
    torch.manual_seed(0)
    block = vit_fast.Block(16, 2, qkv_bias=True, init_values=0.5, attn_drop=drops[0],
                           drop_path=drops[1]).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    monkeypatch.setattr(support.AttentionKernel, "option_reasons",
                        lambda self, floats, **options: ["no build for this call (test)"])
    # decisions already made for this configuration in this process are not this test's
    monkeypatch.setattr(plans.FAILURES, "generation", plans.FAILURES.generation + 10**6)
    with vit_fast.use_backend("triton"):
        torch.manual_seed(1)
        want = block._forward_general(x, None, False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("the attention kernel ran where dispatch chose the reference")
    monkeypatch.setattr(attention_sdpa, "attention_fwd", no_kernel)
    with vit_fast.use_backend("triton"):
        for _ in range(3):  # the plan, then its step: both with the public attention
            torch.manual_seed(1)
            out = block(x)
            out.sum().backward()
    plan = block.__dict__["_block_plan"][1]
    assert plan is not None and not plan.attn_kernel  # the plan ran it with the public op...
    assert plan.step is not None and plan.step.attn_public  # ...and so does its step
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_outside_the_interpreter_the_steps_launches_go_direct():
    """As ``bench host`` runs (Triton compiling, not interpreting; launches counted), a repeat
    fwd+bwd of the Block (AMP, bf16, fp32) makes every Triton launch past Triton's launch path
    (kernels/direct_launch.py), and no more launches than through Triton; so does a repeat
    forward on the general path (the launchers' kept direct launches). In a child process: this
    one interprets."""
    import json
    import subprocess
    code = ("import json; from vit_fast.bench import host\n"
            "rows = [r for p in ('amp', 'bf16', 'fp32') for r in host.measure("
            "host.SHAPES['vit_s'], p, 'sm_90', modes=('forward', 'fwd+bwd'), rounds=1, "
            "inner=1)]\n"
            "print(json.dumps([[r['triton_launches'], r['direct_launches']] for r in rows]))\n")
    counts = {}
    for direct in ("1", "0"):
        env = dict(os.environ, TRITON_INTERPRET="0", VIT_FAST_DIRECT_LAUNCH=direct)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        counts[direct] = json.loads(res.stdout.strip().splitlines()[-1])
    # one process, three precisions in turn: a launch kept per configuration (the cuBLAS MLP's
    # elementwise ones, bf16's and fp32's) is kept per dtype too
    assert len(counts["1"]) == len(counts["0"]) == 6
    for i, ((launches, direct), (launches_off, direct_off)) in enumerate(
            zip(counts["1"], counts["0"])):
        low, high = (4, 5) if i % 2 == 0 else (10, 20)  # forward (before any backward: the
        # general path), then fwd+bwd (the step)
        assert low <= launches == launches_off <= high
        assert direct == launches and direct_off == 0
