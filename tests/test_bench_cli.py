"""`python -m vit_fast.bench` and its subcommands stay runnable (tiny model, few iterations)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from vit_fast.bench import cli


def test_throughput_table_json_csv_plot_profile(tmp_path, capsys):
    paths = {k: tmp_path / f"out.{k}" for k in ("json", "csv", "png")}
    trace = tmp_path / "trace.json"
    rc = cli.main(["--model", "test_vit", "--batch", "1,2", "--warmup", "0", "--iters", "1",
                   "--mode", "train", "--no-progress", "--gpu-batch", "2", "--json", str(paths["json"]),
                   "--csv", str(paths["csv"]), "--plot", str(paths["png"]), "--profile", str(trace)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "CPU measured" in out and "timm eager" in out and "vit_fast" in out
    rows = json.loads(paths["json"].read_text())
    assert [(r["batch"], r["provider"]) for r in rows] == [
        (1, "timm eager"), (1, "vit_fast"), (2, "timm eager"), (2, "vit_fast")]
    for r in rows:
        assert r["img_per_s"] > 0 and r["memory_kind"] is None and r["rounds"] == 1
        # Same weights, fp32, reference path on CPU: the logits agree to fp32 round-off.
        assert r["max_logit_err"] < 1e-3 and r["top1_agree"] == 1.0
        assert r["verdict"] in ("within noise", "faster", "slower") and r["noise_rel"] >= 0.05
    assert rows[0]["speedup"] == 1.0
    # Without a GPU: the GPU path's counted memory, the host cost, and the model's part (no
    # prediction for timm's tiny test_vit, which the model does not list)
    assert "Counted (fake CUDA tensors" in out or "not counted" in out
    assert "Host CPU per Block" in out and "no prediction for test_vit" in out
    assert len(list(csv.DictReader(paths["csv"].open()))) == 4
    assert paths["png"].stat().st_size > 1000
    assert json.loads(trace.read_text())["traceEvents"]
    assert "Self CPU" in out  # the top-10 ops table


def _need_cuda_build():
    import importlib

    import torch
    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch (this one is CPU-only)")
    try:
        importlib.import_module("vit_fast.kernels")
    except ImportError as exc:
        pytest.skip(f"vit_fast.kernels is not importable ({exc}); nothing to count for vit_fast")


def test_memory_subcommand_counts_fake_cuda(capsys):
    _need_cuda_build()
    rc = cli.main(["memory", "--model", "test_vit", "--batch", "2", "--scope", "block"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "fake CUDA tensors" in out and "block ratio vit_fast/timm" in out


def test_memory_fake_cuda_counts_kernel_saves():
    """On fake CUDA the triton path saves x, qkv, o, s and the fc1 pre-activation (= 10 B·N·C
    units; the LayerNorm outputs are rebuilt in the backward) plus fp32 statistics; timm eager
    with flash SDPA saves 16 units."""
    import torch

    from vit_fast.bench import memory
    _need_cuda_build()
    rows, notes = memory.measure("vit_base_patch16_224", batch=4, dtype=torch.bfloat16,
                                 what=("block",))
    by = {r["impl"]: r for r in rows}
    assert not notes
    assert by["timm eager"]["units"] == pytest.approx(16.0, abs=0.1)
    assert by["vit_fast"]["units"] == pytest.approx(10.0, abs=0.1)
    assert by["vit_fast"]["ratio"] <= 0.65


def test_roofline_subcommand(capsys):
    assert cli.main(["roofline", "--batch", "64", "--layer-scale", "--per-kernel"]) == 0
    out = capsys.readouterr().out
    assert "Model:" in out and "H100 SXM µs (model)" in out and "residual (+LayerScale) + LayerNorm" in out
    assert "attention_bwd_dkdv" in out


def test_roofline_amp_rows_beside_the_pure_ones(capsys):
    assert cli.main(["roofline", "--amp", "--per-kernel"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "| AMP bf16" in line]
    assert len(rows) == 4 and sum("| vit_fast " in r for r in rows) == 2  # forward, fwd+bwd
    assert "| eager           | bf16 " in out  # the pure rows stay
    assert "mlp_fc2_residual_amp" in out and "vit_fast AMP 1" in out  # kernels, whole model
    with pytest.raises(SystemExit):
        cli.main(["roofline", "--amp", "--dtype", "fp32"])


def test_compile_check_subcommand():
    from vit_fast.aot import nvidia_backend_missing_reason
    why = nvidia_backend_missing_reason()
    if why:
        pytest.skip(why)
    specs, missing = __import__("vit_fast.bench.compile_check", fromlist=["x"]).collect_specs()
    if not specs:
        pytest.skip(f"no kernel module with aot_specs() imports: {missing}")
    # Through the module entry point (tests run under TRITON_INTERPRET=1, which AOT cannot use).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "vit_fast.bench", "compile-check", "--limit", "1",
                        "--arch", "90", "--no-progress"], capture_output=True, text=True,
                       timeout=120, env=env)
    out, rc = r.stdout, r.returncode
    assert "sm_90" in out and "1/1 builds ok" in out
    assert rc == 0


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        cli.main(["--mode", "sideways"])
    with pytest.raises(SystemExit):
        cli.main(["roofline", "--model", "resnet50"])


def test_gpu_rows_get_the_model_prediction_beside_them(monkeypatch):
    """With a GPU, each bf16/fp16 measured row of a model the performance model lists gets its
    predicted img/s (the GPU matched by its name); fp32 rows and unknown GPUs get none."""
    import torch

    from vit_fast.bench import predict
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    rows = [{"model": "vit_small_patch16_224", "batch": 64, "mode": "train", "dtype": d,
             "provider": p} for d in ("bf16", "fp32") for p in ("timm eager", "vit_fast")]
    preds, key = cli._gpu_predictions(rows, "cuda")
    assert key == "h100"
    want = predict.predict("h100", "vit_small_patch16_224", 64, "train", ("vit_fast",),
                           precision="bf16")[0]["img_per_s"]
    assert preds == {("vit_small_patch16_224", 64, "timm eager"): pytest.approx(
        predict.predict("h100", "vit_small_patch16_224", 64, "train", ("eager",),
                        precision="bf16")[0]["img_per_s"]),
        ("vit_small_patch16_224", 64, "vit_fast"): pytest.approx(want)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Tesla T4")
    assert cli._gpu_predictions(rows, "cuda") == ({}, None)


def test_newcomer_report_has_the_three_gpu_parts_each_labelled():
    """Without a GPU, after the CPU table: the GPU path's counted saved-for-backward bytes (bf16
    and AMP), the host cost per Block against eager, and the model's prediction for --gpu."""
    import argparse
    args = argparse.Namespace(model=["vit_tiny_patch16_224"], gpu="a100", gpu_batch=[2, 64])
    text = cli.newcomer_report(args)
    assert "Host CPU per Block" in text and "vs eager" in text
    assert "Model (not measured): vit_tiny_patch16_224 on A100 SXM4 80GB" in text
    rows = [[c.strip() for c in line.split("|")[1:4]] for line in text.splitlines()
            if line.startswith(("| train ", "| infer "))]
    assert len(rows) == 2 * 2 * 4  # modes x batches x impls
    assert {(m, b) for m, b, _ in rows} == {(m, b) for m in ("train", "infer") for b in ("2", "64")}
    try:
        import torch
        cuda_build = torch.backends.cuda.is_built()
    except Exception:
        cuda_build = False
    if cuda_build:
        assert "Counted (fake CUDA tensors" in text and "AMP bf16" in text


def test_cpu_ratios_inside_the_noise_floor_are_not_called():
    from vit_fast.bench import throughput, timing
    base = timing.summarize([1.00, 1.00, 1.00, 1.00])
    other = timing.summarize([0.96, 0.96, 0.96, 0.96])  # 1.04x, no spread at all
    assert throughput.verdict(base, other, "cpu")["verdict"] == "within noise"
    assert throughput.verdict(base, other, "cuda")["verdict"] == "faster"
    slow = timing.summarize([1.5, 1.5, 1.5, 1.5])
    assert throughput.verdict(base, slow, "cpu")["verdict"] == "slower"
