"""vit_fast.tuning: selection by measurement with an injected timer, the JSON cache, the fixed
priority table, skipped failing candidates, and the reference timed only with VIT_FAST_TUNE=speed."""
import json

import pytest
import torch

from test_gelu_mlp_triton import NAMES, make_inputs
from vit_fast import reference, tuning
from vit_fast.ops import gelu_mlp_tuned as tuned_op
from vit_fast.ops import residual_layer_norm_mlp as block_mlp_op


class FakeTimer:
    """Runs each candidate once (so a broken one raises, as under CUDA events) and reports the
    time given for its name; remembers what it timed."""

    def __init__(self, times):
        self.times = times
        self.timed = []

    def __call__(self, name, fn):
        self.timed.append(name)
        fn()
        return self.times[name]


def fail():
    raise RuntimeError("no kernel image for this GPU")


def test_fastest_candidate_wins_and_the_choice_is_fixed(tmp_path):
    timer = FakeTimer({"a": 2.0, "b": 0.5, "c": 1.0})
    t = tuning.Tuner(tmp_path / "tuning.json", timer)
    cands = {"a": lambda: "A", "b": lambda: "B", "c": lambda: "C"}
    assert t.run("op", "k1", cands, measure=True) == ("b", "B")
    assert timer.timed == ["a", "b", "c"]
    timer.times = {"a": 0.1, "b": 9.0, "c": 9.0}  # later timings never change a choice
    assert t.run("op", "k1", cands, measure=True) == ("b", "B")
    assert timer.timed == ["a", "b", "c"]
    (rec,) = t.records()
    assert rec["choice"] == "b" and rec["source"] == "measured"
    assert rec["times_ms"] == {"a": 2.0, "b": 0.5, "c": 1.0}


def test_cache_persists_and_reloads(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    tuning.Tuner(path, FakeTimer({"a": 3.0, "b": 1.0})).run(
        "op", "k", {"a": lambda: 1, "b": lambda: 2}, measure=True)
    on_disk = json.loads(path.read_text())["entries"]["k"]
    assert on_disk["choice"] == "b" and on_disk["times_ms"] == {"a": 3.0, "b": 1.0}

    def never(name, fn):
        raise AssertionError("a cached key must not be timed again")
    fresh = tuning.Tuner(path, never)
    assert fresh.run("op", "k", {"a": lambda: 1, "b": lambda: 2}, measure=True) == ("b", 2)
    assert fresh.records()[0]["source"] == "cache"


def test_failing_candidate_is_skipped_when_measuring_and_with_the_fixed_table(tmp_path):
    t = tuning.Tuner(None, FakeTimer({"bad": 0.1, "good": 5.0}))
    assert t.run("op", "k", {"bad": fail, "good": lambda: "ok"}, measure=True) == ("good", "ok")
    assert "no kernel image" in t.records()[0]["errors"]["bad"]
    fixed = tuning.Tuner(None)
    assert fixed.run("op", "k", {"bad": fail, "good": lambda: "ok"}, measure=False) == ("good", "ok")
    with pytest.raises(RuntimeError, match="no candidate"):
        tuning.Tuner(None, FakeTimer({"bad": 1.0})).run("op", "k2", {"bad": fail}, measure=True)


def test_a_fast_candidate_with_a_wrong_result_is_never_chosen(tmp_path):
    x = torch.linspace(-3, 3, 64).reshape(8, 8)
    t = tuning.Tuner(None, FakeTimer({"fixed": 3.0, "wrong": 0.1, "rounded": 1.0}))
    cands = {"fixed": lambda: (x, None), "wrong": lambda: (x.flip(0), None),
             "rounded": lambda: (x.bfloat16(), None)}  # 16-bit rounding of the same values agrees
    assert t.run("op", "k", cands, measure=True)[0] == "rounded"
    rec = t.records()[0]
    assert "result differs from fixed's" in rec["errors"]["wrong"] and "wrong" not in rec["times_ms"]
    # The first candidate that runs is the yardstick when the fixed choice cannot run.
    t = tuning.Tuner(None, FakeTimer({"bad": 0.1, "fixed": 2.0, "nan": 0.1}))
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert t.run("op", "k", {"bad": fail, "fixed": lambda: x, "nan": lambda: nan},
                 measure=True)[0] == "fixed"
    assert t.records()[0]["errors"]["nan"] == "result differs from fixed's: NaN in other places"


@pytest.mark.parametrize("result, why", [
    ((torch.ones(3),), "a different structure"),
    (torch.ones(4), "shape"),
    (torch.tensor([1.0, float("inf"), 3.0]), "infinities in other places"),
    (torch.tensor([1.0, 2.0, 3.3]), "max |difference|"),
])
def test_disagreement_names_what_differs(result, why):
    from vit_fast.agreement import disagreement
    expected = torch.tensor([1.0, 2.0, 3.0])
    assert why in disagreement(result, expected)
    assert disagreement(expected + 0.1, expected) is None
    assert disagreement((expected, None), (expected, None)) is None


def test_cache_dir_and_mode_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_FAST_CACHE_DIR", str(tmp_path))
    assert tuning.cache_path() == tmp_path / "tuning.json"
    for env, want in (("1", "measure"), ("0", "fixed"), ("off", "fixed"), ("speed", "speed")):
        monkeypatch.setenv("VIT_FAST_TUNE", env)
        assert tuning.mode() == want
    monkeypatch.setenv("VIT_FAST_TUNE", "fastest")
    with pytest.raises(ValueError, match="VIT_FAST_TUNE"):
        tuning.mode()


def _mlp_inputs(train=True):
    t = make_inputs((2, 3), 64, 256, torch.float32, residual=True, layer_scale=True)
    if not train:
        t = {k: (v.detach() if v is not None else None) for k, v in t.items()}
    return [t[n] for n in NAMES]


def _call_tuned(args):
    return tuned_op.gelu_mlp_tuned(*args[:5], "none", *args[5:])


def test_tuned_op_takes_the_measured_winner_forward_and_backward(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    timer = FakeTimer({"triton": 1.0, "cublas": 2.0})
    args = _mlp_inputs()
    with tuning.use_tuner(tuning.Tuner(tmp_path / "t.json", timer, measure_anywhere=True)):
        out = _call_tuned(args)
        out.sum().backward()
        recs = {r["op"]: r for r in tuning.records()}
    assert {op: r["choice"] for op, r in recs.items()} == {"gelu_mlp_fwd": "triton",
                                                           "gelu_mlp_bwd": "triton"}
    assert "reference" not in timer.timed and set(timer.timed) == {"triton", "cublas"}
    assert "float32[2, 3, 64]" in recs["gelu_mlp_fwd"]["key"]
    ref = reference.gelu_mlp(*[a.detach() for a in args[:5]], residual=args[5].detach(),
                             layer_scale=args[6].detach())
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)
    text = tuning.format_records(list(recs.values()))
    assert "gelu_mlp_fwd: triton (measured; cublas 2.000 ms, triton 1.000 ms)" in text


def test_fixed_table_applies_with_tuning_off(monkeypatch):
    monkeypatch.setenv("VIT_FAST_TUNE", "0")
    timer = FakeTimer({})  # any timing would raise KeyError
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        _call_tuned(_mlp_inputs(train=False))
        (rec,) = tuning.records()
    assert timer.timed == []
    assert rec["choice"] == tuning.PRIORITY["gelu_mlp_fwd"][0] and rec["source"] == "fixed"


def test_broken_cublas_launcher_falls_back_to_triton(monkeypatch):
    from vit_fast.kernels import gelu_elementwise
    monkeypatch.setattr(gelu_elementwise, "gelu_mlp_cublas_fwd", lambda *a: fail())
    args = _mlp_inputs(train=False)
    for env in ("0", "1"):
        monkeypatch.setenv("VIT_FAST_TUNE", env)
        with tuning.use_tuner(tuning.Tuner(None, FakeTimer({"triton": 5.0, "cublas": 1.0}),
                                           measure_anywhere=True)):
            out = _call_tuned(args)
            (rec,) = tuning.records()
        assert rec["choice"] == "triton" and "cublas" in rec["errors"], env
        ref = reference.gelu_mlp(*args[:5], residual=args[5], layer_scale=args[6])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("env,timed_reference", [("1", False), ("speed", True)])
def test_reference_is_timed_only_when_asked_for(monkeypatch, env, timed_reference):
    monkeypatch.setenv("VIT_FAST_TUNE", env)
    timer = FakeTimer({"triton": 2.0, "cublas": 3.0, "kernels": 2.0, "reference": 1.0})
    args = _mlp_inputs()
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        out = tuned_op.gelu_mlp(*args[:5], "none", *args[5:])
        chosen = {r["op"]: r["choice"] for r in tuning.records()}
    assert ("reference" in timer.timed) == timed_reference
    if timed_reference:  # timed forward+backward, and the faster reference wins
        assert chosen["gelu_mlp"] == "reference"
    else:
        assert "gelu_mlp" not in chosen and chosen["gelu_mlp_fwd"] == "triton"
    out.sum().backward()
    assert args[1].grad is not None


def test_main_prints_the_cache(tmp_path, capsys):
    path = tmp_path / "tuning.json"
    tuning.Tuner(path, FakeTimer({"x": 1.5})).run("some_op", "key1", {"x": lambda: 0}, measure=True)
    assert tuning.main(["--path", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 entries" in out and "some_op: x (cache; x 1.500 ms)" in out and "key1" in out


def test_compiled_graph_holds_the_tuned_op_and_selection_runs_inside_it(monkeypatch):
    """torch.compile(fullgraph=True) sees one opaque vit_fast::gelu_mlp_tuned op (forward) and
    its backward op; the choice is made when the compiled graph runs, not while tracing."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    args = _mlp_inputs()
    timer = FakeTimer({"triton": 1.0, "cublas": 2.0})
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        out = torch.compile(_call_tuned, backend=backend, fullgraph=True)(args)
        out.sum().backward()
        chosen = {r["op"]: r["choice"] for r in tuning.records()}
    graphs = "\n".join(str(g.graph) for g in backend.fw_graphs + backend.bw_graphs)
    assert "vit_fast.gelu_mlp_tuned.default" in graphs
    assert "vit_fast.gelu_mlp_tuned_backward.default" in graphs
    assert "triton" not in graphs and "cublas" not in graphs  # no choice baked into the graph
    assert chosen == {"gelu_mlp_fwd": "triton", "gelu_mlp_bwd": "triton"}
    ref = reference.gelu_mlp(*[a.detach() for a in args[:5]], residual=args[5].detach(),
                             layer_scale=args[6].detach())
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-4)


def test_block_op_selects_inside_under_auto(monkeypatch):
    """The Block's residual->LayerNorm->MLP op under 'auto' runs the tuned launchers: forward and
    backward chosen by measurement, same result as the Triton policy. (On CPU 'auto' routes the
    Block to the reference, so the policy the op sees is set to 'auto' by hand here.)"""
    import vit_fast
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    torch.manual_seed(0)
    blk = vit_fast.Block(32, 2, init_values=0.5).train()
    x = torch.randn(2, 5, 32, requires_grad=True)

    def step():
        with vit_fast.use_backend("triton"):  # the Block takes its fused path on CPU
            out = blk(x)
        return (out, *torch.autograd.grad(out, [x, blk.mlp.fc2.weight], torch.ones_like(out)))
    want = step()
    orig = tuned_op.mlp_launchers
    monkeypatch.setattr(block_mlp_op, "mlp_launchers", lambda policy=None: orig("auto"))
    timer = FakeTimer({"triton": 3.0, "cublas": 1.0})
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        got = step()
        chosen = {r["op"]: r["choice"] for r in tuning.records()}
    assert chosen == {"gelu_mlp_fwd": "cublas", "gelu_mlp_bwd": "cublas"}
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_choice_and_times_label_the_profiler_trace(monkeypatch, tmp_path):
    """A chosen candidate runs under a 'vit_fast.tune[op]: ...' record_function label (the
    choice first, with the measured times) in a CPU profiler trace, the Chrome trace file and
    the bench's --profile text; nothing is labelled while no profiler records."""
    from torch.profiler import ProfilerActivity, profile

    from vit_fast.bench.profile import profile_step
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    timer = FakeTimer({"triton": 0.25, "cublas": 0.21})
    args = _mlp_inputs(train=False)
    with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _call_tuned(args)  # measured here: the winner's run is labelled
            _call_tuned(args)  # later calls run the choice, labelled too
        names = [e.name for e in prof.events()]
        label = "vit_fast.tune[gelu_mlp_fwd]: cublas 210us < triton 250us"
        assert names.count(label) == 2, [n for n in names if "vit_fast" in n]
        trace = tmp_path / "trace.json"
        text = profile_step(lambda: _call_tuned(args), "cpu", trace, iters=1)
        assert label in text and label in trace.read_text()
        with torch.autograd.profiler.record_function("outside"):  # no profiler: no label work
            assert not torch.autograd.profiler._is_profiler_enabled
    fixed = {"op": "x", "choice": "triton", "times_ms": {}, "source": "fixed"}
    assert tuning.profiler_label(fixed) == "vit_fast.tune[x]: triton (fixed)"
