"""The GPU acceptance kit (`python -m vit_fast.bench gpu-check`), checked on CPU: its --dry-run
writes every file, it refuses without a GPU, budgets skip steps with a line, and the timing and
report helpers compute what they claim."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vit_fast.bench import gpu_check, gpu_check_report, gpu_check_setup, timing
from vit_fast.bench.cli import main as bench_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    cmd = [sys.executable, "-m", "vit_fast.bench", "gpu-check", "--dry-run", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_dry_run_writes_summary_results_trace_and_plot(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["kit"]["dry_run"] is True
    assert {n: s["status"] for n, s in res["steps"].items()} == {n: "done" for n in gpu_check.STEPS}
    summary = (out / "summary.md").read_text()
    assert "DRY RUN on CPU" in summary and "every step ran to the end" in summary
    trace = json.loads((out / "trace_train_step.json").read_text())
    assert trace["traceEvents"]
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "pytest-junit.xml").exists()


def test_dry_run_install_says_pip_was_not_run_and_probes_the_import(dry_run):
    _, out = dry_run
    install = json.loads((out / "install.json").read_text())
    assert any(a.startswith("--dry-run: not run") for a in install["actions"])
    assert install["probe"]["kernels"] == "ok" and install["probe"]["extension"] is True


def test_dry_run_cuda_tests_skip_with_the_reason(dry_run):
    _, out = dry_run
    tests = json.loads((out / "tests.json").read_text())
    assert tests["counts"].get("skipped", 0) > 50 and "passed" not in tests["counts"]
    assert set(tests["per_file"]) == {p.stem for p in (ROOT / "tests" / "cuda").glob("test_*.py")}
    assert all("no CUDA device" in r for r in tests["skip_reasons"])
    # the sync check is asked for (VIT_FAST_SYNC_CHECK=1) and, every test skipping, says so
    assert tests["command"].startswith("VIT_FAST_SYNC_CHECK=1 ")
    assert tests["host_syncs"] == {"checked": 0, "syncs": []}
    assert "- host syncs after warm-up: not checked" in (out / "summary.md").read_text()


def test_dry_run_times_every_op_and_both_model_modes(dry_run):
    _, out = dry_run
    ops = json.loads((out / "ops.json").read_text())
    assert not ops["skipped"], ops["skipped"]
    assert {(r["op"], r["mode"]) for r in ops["rows"]} == {
        (op, mode) for mode in ("forward", "fwd+bwd")
        for op in ("fused_qkv_attention", "residual_layer_norm", "gelu_mlp", "patch_embed", "Block")}
    attn = next(r for r in ops["rows"] if r["op"] == "fused_qkv_attention")
    assert {x["baseline"] for x in attn["ratios"]} == {"SDPA", "eager softmax"}
    for r in ops["rows"]:
        for s in r["providers"].values():
            assert s["n"] == ops["rounds"] and s["q25_s"] <= s["median_s"] <= s["q75_s"]
        if r["mode"] == "forward":  # the same function: vit_fast's output is the eager one's
            assert all(d < 1e-3 for d in r["rel_diff_vs_baseline"].values()), r["rel_diff_vs_baseline"]
    models = json.loads((out / "models.json").read_text())
    assert [r["mode"] for r in models["rows"]] == ["train", "infer"]
    for r in models["rows"]:
        assert set(r["providers"]) == {"timm eager", "vit_fast", "timm compile"}
        assert r["providers"]["vit_fast"]["top1_agree"] == 1.0
        assert r["providers"]["vit_fast"]["rel_err"] < 0.05  # AMP bf16 vs fp32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the kit would run")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert bench_main(["gpu-check", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU found" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()


def test_steps_past_the_total_budget_are_listed_not_silently_dropped(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "12"]) == 1
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("environment", "install", "tests", "ops", "models"):
        assert res["steps"][name]["status"].startswith("skipped:"), res["steps"][name]
    assert res["steps"]["report"]["status"] == "done"
    summary = (tmp_path / "summary.md").read_text()
    assert "- models: skipped: " in summary and "of the 12 s budget" in summary


def test_a_command_past_its_budget_is_stopped(tmp_path):
    t0 = time.monotonic()
    rc, _ = gpu_check_setup.run_logged([sys.executable, "-c", "import time; time.sleep(60)"],
                                       tmp_path / "sleep.log", 1)
    assert rc is None and time.monotonic() - t0 < 30


def test_parse_junit_counts_failures_and_skip_reasons(tmp_path):
    block, model = 'classname="tests.cuda.test_cuda_block"', 'classname="tests.cuda.test_cuda_model"'
    (tmp_path / "j.xml").write_text(
        f'<testsuites><testsuite name="pytest" tests="4"><testcase {block} name="test_a"/>'
        f'<testcase {block} name="test_b"><failure message="dx: max err 1 &gt; bound"/></testcase>'
        f'<testcase {model} name="test_c"><skipped message="no CUDA device"/></testcase>'
        f'<testcase {model} name="test_d"><error message="boom"/></testcase>'
        '<testcase time="0.000" /></testsuite></testsuites>')  # the entry a SIGINT run leaves
    r = gpu_check_setup.parse_junit(tmp_path / "j.xml")
    assert r["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert r["per_file"]["test_cuda_block"] == {"passed": 1, "failed": 1}
    assert r["failures"][0] == {"test": "test_cuda_block::test_b", "kind": "failed",
                                "message": "dx: max err 1 > bound"}
    assert r["skip_reasons"] == {"no CUDA device": 1}


def test_timm_status_says_how_to_bring_the_pinned_wheel():
    low, pin = gpu_check_setup.supported_timm()
    assert low and pin
    ok, text = gpu_check_setup.timm_status(None)
    assert not ok and f"pip download timm=={pin}" in text
    ok, text = gpu_check_setup.timm_status("0.9.16")
    assert not ok and "older than" in text and f"timm-{pin}-py3-none-any.whl" in text
    assert gpu_check_setup.timm_status(pin)[0]


# --- timing ------------------------------------------------------------------------------------

def _summary(samples):
    return timing.summarize(samples)


def test_summarize_median_iqr_and_run_to_run_spread():
    s = _summary([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert s["median_s"] == 3.5 and s["q25_s"] == 2.25 and s["q75_s"] == 4.75
    # even rounds 1, 3, 5 (median 3) vs odd rounds 2, 4, 6 (median 4): 1/3.5 apart
    assert s["run_to_run_rel"] == pytest.approx(1 / 3.5)


def test_compare_calls_a_ratio_inside_the_spread_noise():
    base = _summary([1.00, 1.04, 0.98, 1.02, 1.01, 0.99])
    same = _summary([1.01, 0.99, 1.03, 1.00, 0.98, 1.02])
    c = timing.compare(base, same)
    assert c["verdict"] == "within noise" and "within noise" in timing.fmt_ratio(c)
    fast = _summary([0.50, 0.51, 0.49, 0.50, 0.52, 0.50])
    c = timing.compare(base, fast)
    assert c["verdict"] == "faster" and c["speedup"] == pytest.approx(2.0, rel=0.03)
    assert timing.compare(fast, base)["verdict"] == "slower"


def test_time_interleaved_rotates_the_order_of_providers():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    samples = timing.time_interleaved(fns, "cpu", rounds=3, warmup=0)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(v) == 3 for v in samples.values())


def test_install_falls_back_to_an_in_place_build_and_checks_the_arch(tmp_path, monkeypatch):
    """The non-dry install path with pip and the build faked: pip refusing leads to
    `setup.py build_ext --inplace`, the build gets TORCH_CUDA_ARCH_LIST from the capability, and an
    extension without the GPU's arch is a problem, not a pass."""
    calls = []

    def fake_run(cmd, log_path, timeout_s, env=None, cwd=None):
        calls.append((list(map(str, cmd)), env))
        return (1 if "pip" in cmd else 0), 0.5
    monkeypatch.setattr(gpu_check_setup, "run_logged", fake_run)
    monkeypatch.setattr(gpu_check_setup, "_probe", lambda out, name, env: {
        "vit_fast": "x", "kernels": "ok", "extension": True, "extension_cuda": True,
        "extension_file": None})
    monkeypatch.setattr(gpu_check_setup, "_archs_in", lambda so: ["80", "90"])
    env = {"torch": "2.11", "timm": "1.0.31", "timm_ok": True, "timm_status": "ok", "capability": "10.0"}
    res = gpu_check_setup.install(tmp_path, env, dry_run=False, timeout_s=100)
    assert calls[0][0][1:4] == ["-m", "pip", "install"] and "--no-build-isolation" in calls[0][0]
    assert calls[0][1]["TORCH_CUDA_ARCH_LIST"] == "10.0"
    assert calls[1][0][1:] == ["setup.py", "build_ext", "--inplace"]
    assert "pip install: rc=1" in res["actions"][0] and "build_ext --inplace" in res["actions"][1]
    assert res["arch_ok"] is False and not res["ok"]
    assert any("not sm_100" in p for p in res["problems"])


def test_summary_lists_what_measured_selection_chose():
    rec = {"op": "gelu_mlp", "key": "gelu_mlp|(64, 768)|bf16", "choice": "cublas",
           "source": "measured", "times_ms": {"triton": 0.31, "cublas": 0.24}}
    res = {"kit": {"quick": False, "dry_run": True, "started": "now", "command": "gpu-check",
                   "budget_s": 1}, "artifacts": {},
           "steps": {"models": {"status": "done", "seconds": 1, "budget_s": 1,
                                "data": {"rows": [], "tuning": [rec]}}}}
    text = gpu_check_report.summary_markdown(res)
    assert "## Measured selection" in text
    assert "gelu_mlp: cublas (measured; triton 0.310 ms, cublas 0.240 ms)" in text


def test_model_rows_carry_the_prediction_beside_the_measurement():
    """On a GPU the table has the model's img/s and measured/model - 1 for each AMP model row
    (the calibrated model, vit_fast/bench/predict.py); on a GPU the model's table lacks, a dash
    and why."""
    from vit_fast.bench import predict
    stat = {"median_s": 0.025, "q25_s": 0.024, "q75_s": 0.026, "iqr_rel": 0.08,
            "run_to_run_rel": 0.01, "n": 10}
    row = {"model": "vit_base_patch16_224", "mode": "train", "batch": 64, "ratios": [],
           "providers": {"timm eager": {**stat, "img_per_s": 2500.0},
                         "vit_fast": {**stat, "img_per_s": 1200.0}}}
    data = {"precision": "AMP bf16 (fp32 weights)", "device": "cuda", "rounds": 10, "rows": [row]}
    text = "\n".join(gpu_check_report._models(data, "NVIDIA H100 80GB HBM3"))
    want = predict.predict("h100", "vit_base_patch16_224", 64, "train", ("eager",))[0]["img_per_s"]
    assert f"| {want:,.0f} " in text
    assert f"{100 * (2500.0 / want - 1):+.0f}%" in text
    assert "predict --gpu h100" in text
    text = "\n".join(gpu_check_report._models(data, "NVIDIA Tesla T4"))
    assert "not in vit_fast/bench/gpu_peaks.py" in text and "model img/s" in text


# --- host syncs after warm-up (issue 27, item 8) -----------------------------------------------

def _sync_check_module():
    """tests/cuda/sync_check.py (tests/cuda is not on this file's import path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sync_check", ROOT / "tests" / "cuda" / "sync_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_kit_runs_the_cuda_tests_with_the_sync_check_on(tmp_path, monkeypatch):
    seen = []

    def fake_run(cmd, log_path, timeout_s, env=None, cwd=None):
        seen.append((list(map(str, cmd)), env))
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text("")
        return 0, 0.1
    monkeypatch.setattr(gpu_check_setup, "run_logged", fake_run)
    res = gpu_check_setup.run_tests(tmp_path, dry_run=False, quick=True, timeout_s=10)
    (cmd, env), = seen
    flag = _sync_check_module().ENV
    assert flag == gpu_check_setup.SYNC_CHECK_ENV
    assert env[flag] == "1" and env["TRITON_INTERPRET"] == "0"
    assert f"{flag}=1" in res["command"] and "tests/cuda" in cmd


def test_parse_junit_counts_the_sync_checked_tests_and_the_host_syncs(tmp_path):
    sync = _sync_check_module()
    block = 'classname="tests.cuda.test_cuda_block"'
    prop = f'<properties><property name="{sync.PROPERTY}" value="1" /></properties>'
    msg = f"AssertionError: {sync.MESSAGE} at vit_fast/ops/x.py:3 (f): called a synchronizing CUDA operation"
    (tmp_path / "j.xml").write_text(
        f'<testsuites><testsuite name="pytest" tests="4"><testcase {block} name="test_a">{prop}</testcase>'
        f'<testcase {block} name="test_b">{prop}<failure message="{msg}"/></testcase>'
        f'<testcase {block} name="test_c"><failure message="dx: max err"/></testcase>'
        f'<testcase {block} name="test_d"><skipped message="no CUDA device"/></testcase>'
        '</testsuite></testsuites>')
    r = gpu_check_setup.parse_junit(tmp_path / "j.xml")
    assert r["host_syncs"] == {"checked": 2, "syncs": [
        {"test": "test_cuda_block::test_b", "message": msg}]}


def _tests_step(data):
    return {"kit": {"quick": False, "dry_run": False, "started": "now", "command": "gpu-check",
                    "budget_s": 1}, "artifacts": {},
            "steps": {"tests": {"status": "done", "seconds": 1, "budget_s": 1, "data": {
                "command": "VIT_FAST_SYNC_CHECK=1 TRITON_INTERPRET=0 -m pytest tests/cuda",
                "counts": {"passed": 3}, "per_file": {}, **data}}}}


def test_summary_has_a_host_syncs_line():
    text = gpu_check_report.summary_markdown(_tests_step({"host_syncs": {"checked": 3, "syncs": []}}))
    assert "- host syncs after warm-up: none in 3 tests checked" in text
    sync = {"test": "test_cuda_patch_embed::test_uint8_images[bf16]",
            "message": "AssertionError: host sync after warm-up at vit_fast/ops/pe.py:9 (f): ..."}
    text = gpu_check_report.summary_markdown(
        _tests_step({"host_syncs": {"checked": 3, "syncs": [sync]}}))
    assert "- **host syncs after warm-up: 1** in 3 tests checked" in text
    assert "test_uint8_images[bf16]`: host sync after warm-up at vit_fast/ops/pe.py:9" in text
    text = gpu_check_report.summary_markdown(_tests_step({"host_syncs": {"checked": 0, "syncs": []}}))
    assert "- host syncs after warm-up: not checked (no test ran its kernels)" in text


def test_a_kernel_step_warms_up_then_runs_under_sync_debug_error(monkeypatch):
    """No GPU here: torch.cuda's sync-debug switch and the generators' fork are recorded
    stand-ins. The step runs once to warm up, then under 'error'; the mode before is restored;
    a sync in the checked run is an AssertionError naming the place; the test is marked."""
    import contextlib
    import types
    sync = _sync_check_module()
    modes, calls = [0], []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kw: contextlib.nullcontext())
    item = types.SimpleNamespace(user_properties=[])
    sync.RUNNING[:] = [item]

    def step():
        calls.append(modes[-1])
        return len(calls)
    monkeypatch.delenv(sync.ENV, raising=False)
    assert sync.kernel_step(step, "cuda:0") == 1 and calls == [0] and modes == [0]
    monkeypatch.setenv(sync.ENV, "1")
    assert sync.kernel_step(step, "cpu") == 2 and modes == [0]  # CPU: nothing to check
    calls.clear()
    assert sync.kernel_step(step, "cuda:0") == 2
    assert calls == [0, "error"] and modes[-1] == 0
    assert item.user_properties == [(sync.PROPERTY, "1")]

    def syncing():
        if modes[-1] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
    with pytest.raises(AssertionError, match=r"^host sync after warm-up at tests/test_gpu_check\.py:\d+ \(syncing\)"):
        sync.kernel_step(syncing, "cuda:0")
    assert modes[-1] == 0
    sync.RUNNING.clear()
