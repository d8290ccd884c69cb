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
