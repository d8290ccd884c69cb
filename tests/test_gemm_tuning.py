"""The Triton GEMM's tile configs join vit_fast.tuning's measurement: on a GPU (here: the launcher's
CUDA configs under the interpreter, an H100 Target patched in, and an injected timer) the fastest
candidate is chosen per key, cached and reloaded; with tuning off the fixed table's first
candidate runs untimed; under the interpreter there is one config and nothing is timed."""
import json

import pytest
import torch

from test_tuning import FakeTimer
from vit_fast import tuning
from vit_fast.kernels import matmul
from vit_fast.kernels._device import Target

H100 = Target(132, 90)


def _operands():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=g).bfloat16()
    b = torch.randn(24, 72, generator=g).bfloat16()
    return a, b, torch.randn(72, generator=g).bfloat16()


def _launched_blocks(monkeypatch):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of every matmul_kernel launch, in order."""
    from triton.runtime import interpreter as interp
    seen = []
    orig = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if self.fn.__name__ == "matmul_kernel":
            seen.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    return seen


def _candidates(a, b, bias):
    ep = matmul.Epilogue(bias=bias is not None)
    return matmul.gemm_candidates(a.shape[0], b.shape[1], a.dtype, ep, "ieee", H100)


def test_fastest_config_is_chosen_cached_and_reloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    monkeypatch.setattr(matmul, "gpu_target", lambda device: H100)
    a, b, bias = _operands()
    cands = _candidates(a, b, bias)
    assert len(cands) >= 3
    slowest_first = {c.name: 3.0 for c in cands}
    fastest = cands[-1]  # not the fixed table's choice: only a measurement picks it
    slowest_first[fastest.name] = 0.5
    timer = FakeTimer(slowest_first)
    launched = _launched_blocks(monkeypatch)
    path = tmp_path / "tuning.json"
    with tuning.use_tuner(tuning.Tuner(path, timer, measure_anywhere=True)):
        out, _, _ = matmul.matmul(a, b, torch.bfloat16, bias=bias,
                                  choose=tuning.choose_gemm_config)
        assert timer.timed == [c.name for c in cands]
        launched.clear()
        again, _, _ = matmul.matmul(a, b, torch.bfloat16, bias=bias,
                                    choose=tuning.choose_gemm_config)
        (rec,) = tuning.records()
    assert timer.timed == [c.name for c in cands]  # the second call is not timed
    assert launched == [fastest[:3]]
    assert rec["op"] == "gemm" and rec["choice"] == fastest.name and rec["source"] == "measured"
    assert "M=40" in rec["key"] and "N=72" in rec["key"] and "K=24" in rec["key"]
    want = (a.float() @ b.float() + bias.float()).bfloat16()
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    assert torch.equal(out, again)

    on_disk = json.loads(path.read_text())["entries"]
    assert [e["choice"] for e in on_disk.values()] == [fastest.name]

    def never(name, fn):
        raise AssertionError("a cached key must not be timed again")
    launched.clear()
    with tuning.use_tuner(tuning.Tuner(path, never, measure_anywhere=True)):
        matmul.matmul(a, b, torch.bfloat16, bias=bias, choose=tuning.choose_gemm_config)
        assert tuning.records()[0]["source"] == "cache"
    assert launched == [fastest[:3]]


def test_tuning_off_runs_the_fixed_table_untimed(monkeypatch):
    monkeypatch.setenv("VIT_FAST_TUNE", "0")
    monkeypatch.setattr(matmul, "gpu_target", lambda device: H100)
    a, b, bias = _operands()
    launched = _launched_blocks(monkeypatch)
    timer = FakeTimer({})  # any timing would raise KeyError
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        matmul.matmul(a, b, torch.bfloat16, bias=bias, choose=tuning.choose_gemm_config)
        (rec,) = tuning.records()
    assert timer.timed == []
    fixed = _candidates(a, b, bias)[0]
    assert rec["choice"] == fixed.name and rec["source"] == "fixed"
    assert launched == [fixed[:3]]


def test_interpreter_uses_its_fixed_config_and_times_nothing(monkeypatch):
    """No Target patched in: the interpreter's one config; choose is never asked."""
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    a, b, bias = _operands()
    assert matmul.gemm_candidates(40, 72, a.dtype, matmul.Epilogue(), "ieee", None) == (
        matmul.INTERPRET_CONFIG,)
    launched = _launched_blocks(monkeypatch)

    def no_choice(*args):
        raise AssertionError("nothing to choose under the interpreter")
    matmul.matmul(a, b, torch.bfloat16, bias=bias, choose=no_choice)
    assert launched == [matmul.INTERPRET_CONFIG[:3]]


def test_the_mlp_op_tunes_each_of_its_gemms(monkeypatch):
    """vit_fast::gelu_mlp (forced triton) passes the chooser to its GEMMs: one measured record
    per GEMM launch key, each the injected timer's fastest config where offered."""
    from test_gelu_mlp_triton import NAMES, make_inputs
    from vit_fast.ops import gelu_mlp as triton_op
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    monkeypatch.setattr(matmul, "gpu_target", lambda device: H100)

    class PreferHalf(FakeTimer):
        def __call__(self, name, fn):
            self.timed.append(name)
            fn()
            return 1.0 if name == matmul.HALF_16.name else 2.0
    t = make_inputs((2, 3), 32, 64, torch.bfloat16, residual=True, layer_scale=True)
    with tuning.use_tuner(tuning.Tuner(None, PreferHalf({}), measure_anywhere=True)):
        out = triton_op.gelu_mlp(*[t[n] for n in NAMES[:5]], "none", *[t[n] for n in NAMES[5:]])
        out.float().sum().backward()
        recs = [r for r in tuning.records() if r["op"] == "gemm"]
    # fc1, fc2; dGELU, dW2, dx, dW1 (dGELU is not offered 64x128: it spills there)
    assert len(recs) == 6
    assert sum(r["choice"] == matmul.HALF_16.name for r in recs) == 5
    assert all(r["source"] == "measured" for r in recs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_candidate_is_a_shipped_config(dtype):
    shipped = {matmul.LARGE_16, matmul.WIDE_16, matmul.NARROW_16, matmul.SMALL_16, matmul.HALF_16,
               matmul.LARGE_TF32, matmul.SMALL_TF32, matmul.EXACT_FP32}
    for kind in ("none", "gelu", "dgelu"):
        for precision in ("ieee", "tf32"):
            for M in (1, 4096, 1 << 20):
                got = matmul.gemm_candidates(M, 768, dtype, matmul.Epilogue(kind), precision, H100)
                assert set(got) <= shipped and len(set(got)) == len(got)


@pytest.mark.parametrize("split", [s.split_k for s in matmul.SPLIT_K_16])
@pytest.mark.parametrize("K", [300, 64, 0])
def test_split_k_matches_the_reference_and_is_deterministic(split, K):
    """fp32 partials over runs of K tiles, added in a fixed order: the reference within bf16
    rounding, and the same bits twice. K = 300 leaves the last run shorter (or empty at split 4);
    K = 64 is one tile, so every run but the first is empty."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(K, 70, generator=g).bfloat16().t()  # [70, K], unit stride along M (dW)
    b = torch.randn(K, 33, generator=g).bfloat16()
    config = matmul.LARGE_16._replace(split_k=split)
    out, aux, rowdot = matmul.matmul(a, b, torch.bfloat16, config=config)
    assert aux is None and rowdot is None and out.dtype == torch.bfloat16
    want = (a.double() @ b.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-2, atol=1e-2 * max(1, K) ** 0.5)
    again, _, _ = matmul.matmul(a, b, torch.bfloat16, config=config)
    assert torch.equal(out, again)
    full, _, _ = matmul.matmul(a, b, torch.float32, config=config)
    torch.testing.assert_close(full.double(), want, rtol=1e-5, atol=1e-4)


def test_split_k_refuses_an_epilogue():
    a, b, bias = _operands()
    with pytest.raises(ValueError, match="split-K"):
        matmul.matmul(a, b, torch.bfloat16, bias=bias, config=matmul.SPLIT_K_16[0])


def test_split_k_is_offered_only_when_sms_would_idle():
    plain = matmul.Epilogue()
    vit_b_dw = matmul.gemm_candidates(768, 3072, torch.bfloat16, plain, "ieee", H100, 64 * 197)
    assert set(matmul.SPLIT_K_16) <= set(vit_b_dw)  # 144 tiles on 132 SMs
    assert vit_b_dw[0] == matmul.LARGE_16  # the fixed table never splits
    full_waves = matmul.gemm_candidates(768, 2816, torch.bfloat16, plain, "ieee", H100, 12608)
    assert not set(matmul.SPLIT_K_16) & set(full_waves)  # 132 tiles: one full wave
    short_k = matmul.gemm_candidates(768, 3072, torch.bfloat16, plain, "ieee", H100, 512)
    assert not set(matmul.SPLIT_K_16) & set(short_k)
    with_bias = matmul.gemm_candidates(768, 3072, torch.bfloat16, matmul.Epilogue(bias=True),
                                       "ieee", H100, 12608)
    assert not set(matmul.SPLIT_K_16) & set(with_bias)
