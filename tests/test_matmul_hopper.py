"""The Hopper GEMM (kernels/matmul_hopper.py) under the interpreter, which runs its TMA tensor
descriptors: every epilogue against a float64 torch reference (tolerance rule: twice the error
of the existing Triton GEMM, kernels/matmul.py, on the same inputs, plus the floor), shapes that
are not multiples of the tile (the descriptor zero-fills rows, columns and the K tail), both
operand layouts, several tiles per persistent program, and its gating."""
import pytest
import torch
import torch.nn.functional as F

from tolerance import assert_close_by_rule
from vit_fast.kernels import matmul, matmul_hopper
from vit_fast.kernels._device import Target

# M, N odd; K = 40 (a multiple of 8 for TMA's 16-byte row strides, not of BLOCK_K = 16).
M, N, K = 37, 45, 40
H100, A100 = Target(132, 90), Target(108, 80)
_DESC = {torch.bfloat16: "tensordesc<bf16[{}, {}]>", torch.float16: "tensordesc<fp16[{}, {}]>"}


def _rand(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def _both(a, b, out_dtype, **kw):
    """(hopper result, existing GEMM's result) of one launch."""
    return (matmul_hopper.hopper_matmul(a, b, out_dtype, **kw),
            matmul.matmul(a, b, out_dtype, **kw))


def _gelu64(x, approximate):
    x = x.double().requires_grad_()
    y = F.gelu(x, approximate=approximate)
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), dy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_epilogue_stores_pre_and_gelu(dtype, approximate):
    x, w, bias = _rand(M, K, dtype=dtype), _rand(N, K, dtype=dtype), _rand(N, dtype=dtype)
    (out, pre, _), (out0, pre0, _) = _both(x, w.t(), dtype, bias=bias, epilogue="gelu",
                                           approximate=approximate, store_pre=True)
    pre64 = x.double() @ w.double().t() + bias.double()
    assert_close_by_rule(pre, pre0, pre64, "pre")
    assert_close_by_rule(out, out0, _gelu64(pre64, approximate)[0], "gelu")


def test_residual_epilogue_with_layer_scale_and_sample_scale():
    x, w = _rand(M, K), _rand(N, K)
    res, ls, ss = _rand(M, N, seed=1), _rand(N, seed=2), _rand(M // 4 + 1, seed=3)
    kw = dict(bias=_rand(N, seed=4), residual=res, layer_scale=ls, sample_scale=ss,
              rows_per_sample=4)
    (out, _, _), (out0, _, _) = _both(x, w.t(), torch.bfloat16, **kw)
    acc = x.double() @ w.double().t() + kw["bias"].double()
    want = res.double() + acc * ls.double() * ss.double().repeat_interleave(4)[:M, None]
    assert_close_by_rule(out, out0, want, "residual")


def test_dgelu_epilogue_act_and_row_dot():
    # dx layout: B row-major, so its row stride N must be a multiple of 8 (not of the tile)
    n = 40
    g, w2, pre = _rand(M, K), _rand(K, n), _rand(M, n, seed=5)
    ss = _rand(M, seed=6)
    (dh, act, rowdot), (dh0, act0, _) = _both(g, w2, torch.bfloat16, epilogue="dgelu", pre=pre,
                                              store_act=True, row_dot=True, sample_scale=ss)
    acc = g.double() @ w2.double()
    gelu, dgelu = _gelu64(pre, "none")
    s = ss.double()[:, None]
    assert_close_by_rule(dh, dh0, acc * dgelu * s, "dgelu")
    assert_close_by_rule(act, act0, gelu * s, "act")
    cfg = matmul_hopper.INTERPRET_CONFIG
    assert rowdot.shape == (-(-n // cfg.block_n) * cfg.epilogue_subtiles, M)
    torch.testing.assert_close(rowdot.double().sum(0), (acc * gelu).sum(1), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_weight_gradient_layout_reads_a_through_its_transpose(out_dtype):
    """dW = gᵀ @ x: A = gᵀ has unit stride along M (the descriptor is over g)."""
    g, x = _rand(72, 40), _rand(72, 24)  # K = tokens = 72 rows
    (dw, _, _), (dw0, _, _) = _both(g.t(), x, out_dtype)
    assert_close_by_rule(dw, dw0, g.double().t() @ x.double(), "dW")


def test_persistent_programs_cover_every_tile(monkeypatch):
    """3 programs for 2x3 tiles of 32x32 (and an odd edge): each program takes two tiles; every
    element of a NaN-filled output is written."""
    launched = []
    kernel = matmul_hopper.hopper_matmul_kernel
    orig = type(kernel).__getitem__

    def getitem(self, grid):
        launched.append(grid)
        return orig(self, grid)
    monkeypatch.setattr(type(kernel), "__getitem__", getitem)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: torch.full(*a, float("nan"), **k))
    a, b = _rand(60, 40), _rand(40, 72)
    out, _, _ = matmul_hopper.hopper_matmul(a, b, torch.float32)
    assert launched == [(3,)]
    assert not out.isnan().any()
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-2, atol=1e-2)


def test_offered_only_on_sm90_with_descriptors_and_16_bit_operands():
    ep = matmul.Epilogue("gelu", bias=True)
    assert matmul_hopper.hopper_candidates(torch.bfloat16, ep, H100) == (matmul_hopper.LARGE,)
    assert matmul_hopper.hopper_candidates(torch.bfloat16, matmul.Epilogue(residual=True), H100) == (
        matmul_hopper.WIDE, matmul_hopper.LARGE)
    assert matmul_hopper.hopper_candidates(torch.bfloat16, matmul.Epilogue("dgelu"), H100) == (
        matmul_hopper.DGELU,)
    assert matmul_hopper.hopper_candidates(torch.bfloat16, ep, A100) == ()
    assert matmul_hopper.hopper_candidates(torch.float32, ep, H100) == ()
    assert matmul_hopper.not_supported_reasons(torch.bfloat16, H100) == []
    assert "sm_90 only (device is sm_80)" in matmul_hopper.not_supported_reasons(
        torch.bfloat16, A100)[0]
    (why,) = matmul_hopper.not_supported_reasons(torch.float16, H100, triton_has_descriptors=False)
    assert "tensor_descriptor" in why


def test_unaligned_or_strideless_operands_raise_naming_the_operand():
    with pytest.raises(ValueError, match="a's strides"):  # row stride 37·2 bytes
        matmul_hopper.hopper_matmul(_rand(40, 37)[:, :36], _rand(36, 8), torch.bfloat16)
    with pytest.raises(ValueError, match="b has no unit stride"):
        matmul_hopper.hopper_matmul(_rand(8, 16), _rand(16, 32)[:, ::2], torch.bfloat16)
    with pytest.raises(ValueError, match="fp16/bf16"):
        matmul_hopper.hopper_matmul(_rand(8, 16, dtype=torch.float32),
                                    _rand(16, 8, dtype=torch.float32), torch.float32)


def _tuned_launch(monkeypatch, target, times):
    """matmul.matmul with tuning's chooser on ``target`` (patched in), a FakeTimer of ``times``
    (unlisted candidates take 3 ms); returns (result, timed names, the record)."""
    from test_tuning import FakeTimer
    from vit_fast import tuning
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    monkeypatch.setattr(matmul, "gpu_target", lambda device: target)
    monkeypatch.setattr(matmul_hopper, "gpu_target", lambda device: target)
    x, w, bias = _rand(40, 24), _rand(72, 24), _rand(72)
    timer = FakeTimer(type("T", (dict,), {"__missing__": lambda self, k: 3.0})(times))
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        out, pre, _ = matmul.matmul(x, w.t(), torch.bfloat16, bias=bias, epilogue="gelu",
                                    store_pre=True, choose=tuning.choose_gemm_config)
        (rec,) = tuning.records()
    pre64 = x.double() @ w.double().t() + bias.double()
    torch.testing.assert_close(pre.double(), pre64, rtol=2e-2, atol=3e-2)
    return out, timer.timed, rec


def test_joins_the_measured_selection_on_sm90_and_wins_when_fastest(monkeypatch):
    large = matmul_hopper.LARGE.name  # fc1's GELU epilogue: the 128x128 tile only
    _, timed, rec = _tuned_launch(monkeypatch, H100, {large: 0.5})
    offered = [c.name for c in matmul.gemm_candidates(40, 72, torch.bfloat16,
                                                      matmul.Epilogue("gelu", bias=True,
                                                                      store_pre=True),
                                                      "ieee", H100, 24)]
    # matmul's configs first (the fixed table's order), the Hopper configs last
    assert timed == offered + [large]
    assert rec["choice"] == large and rec["source"] == "measured"


def test_not_offered_off_sm90(monkeypatch):
    _, timed, rec = _tuned_launch(monkeypatch, A100, {})
    assert not any(n.startswith("tma") for n in timed)
    assert not rec["choice"].startswith("tma")


@pytest.mark.parametrize("dtype,approximate", [(torch.bfloat16, "none"), (torch.float16, "tanh")])
def test_mlp_launches_on_h100_are_compiled_and_agree_with_matmul(monkeypatch, dtype,
                                                                  approximate):
    """The GELU MLP's forward and backward with every candidate run, the Hopper ones included
    (H100 patched in): each hopper_matmul_kernel launch is covered by a kernels/
    matmul_hopper_aot.py spec (constexprs, warps, stages, descriptor dtype and block shape), and
    each Hopper result equals matmul's first candidate's within bf16/fp16 rounding."""
    from test_aot_coverage import _mismatches, _mlp_inputs, launches_on
    from vit_fast.kernels import gelu_mlp, matmul_hopper_aot
    monkeypatch.setattr(matmul_hopper, "gpu_target", lambda device: H100)
    t = _mlp_inputs(dtype)
    results = []

    def choose(a, fields, candidates):
        hopper = matmul_hopper.hopper_launches(fields, candidates)
        assert hopper, fields  # every MLP GEMM of these shapes is offered on sm_90
        outs = {name: fn() for name, fn in {**candidates, **hopper}.items()}
        results.append(outs)
        return next(iter(outs.values()))

    with launches_on(monkeypatch, H100) as seen:
        out, pre = gelu_mlp.gelu_mlp_fwd(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], approximate,
                                         t["res"], t["ls"], t["ss"], True, choose=choose)
        gelu_mlp.gelu_mlp_bwd(torch.randn_like(out), t["x"], t["w1"], t["w2"], t["b2"], pre,
                              t["ls"], t["ss"], approximate=approximate, has_residual=True,
                              choose=choose)
    launches = [s for s in seen if s["kernel"] == "hopper_matmul_kernel"]
    specs = matmul_hopper_aot.aot_specs()
    assert len(launches) >= 8
    for launch in launches:
        descs = {k: v for k, v in launch["args"].items() if k.endswith("_desc")}
        rest = dict(launch, args={k: v for k, v in launch["args"].items() if k not in descs})
        covered = [s for s in specs if not _mismatches(rest, s) and all(
            s.signature[k] == _DESC[d.base.dtype].format(*d.block_shape)
            for k, d in descs.items())]
        assert covered, {k: v for k, v in launch["args"].items() if not torch.is_tensor(v)}
    for outs in results:
        first, *_ = outs.values()
        for name, got in outs.items():
            if not name.startswith("tma"):
                continue
            for x, y in zip(first[:2], got[:2]):
                if x is not None:
                    torch.testing.assert_close(y.float(), x.float(), rtol=2e-2, atol=2e-2,
                                               msg=name)
            if first[2] is not None:  # row dots: one row per tile (matmul) or subtile (Hopper)
                torch.testing.assert_close(got[2].sum(0), first[2].sum(0), rtol=2e-2, atol=2e-2)


def test_operands_tma_cannot_read_get_no_hopper_candidate(monkeypatch):
    """K = 36: a row-major A's row stride is 72 bytes, not a multiple of 16; the launch keeps
    matmul's own candidates only (tensor_reasons says why)."""
    monkeypatch.setattr(matmul, "gpu_target", lambda device: H100)
    monkeypatch.setattr(matmul_hopper, "gpu_target", lambda device: H100)
    seen = []

    def choose(a, fields, candidates):
        seen.append(matmul_hopper.hopper_launches(fields, candidates))
        return next(iter(candidates.values()))()
    x, w = _rand(40, 36), _rand(24, 36)
    matmul.matmul(x, w.t(), torch.bfloat16, choose=choose)
    assert seen == [{}]
    assert "a's strides (36, 1)" in matmul_hopper.tensor_reasons(("a", x))[0]
    # a single column: unit strides both ways, and a 2-byte row stride TMA cannot take
    assert "not 16-byte aligned" in matmul_hopper.tensor_reasons(("b", _rand(8, 1)))[0]
    assert matmul_hopper.tensor_reasons(("b", _rand(8, 16)), ("a", _rand(16, 8).t())) == []
