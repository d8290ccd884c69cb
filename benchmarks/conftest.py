"""Shared grid and runner of `pytest benchmarks --benchmark-only`.

Grid: op (one file each) × ViT shape (S/16, B/16, L/16 at 224; B/16 at 384, N = 577) × dtype ×
mode (forward, forward+backward) × provider (eager: timm's module or PyTorch ops; vit_fast: the
Triton kernels). Every case first checks its output against an fp32 run of the eager reference,
then is timed; extra_info holds img/s, model GB/s and TFLOP/s (bytes and FLOPs from
vit_fast/bench/roofline.py, i.e. a model of the traffic, divided by the measured time) and the max
error. The JSON goes to benchmarks/results.json unless --benchmark-json says otherwise.

On CPU the vit_fast provider is skipped (its kernels run there only under the Triton interpreter,
which is no benchmark) and the grid is trimmed so that it runs in a few minutes; each skip says why.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("VIT_FAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
SHAPES = {  # name -> (C, H, N)
    "S16": (384, 6, 197),
    "B16": (768, 12, 197),
    "L16": (1024, 16, 197),
    "B16-384": (768, 12, 577),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "fwd+bwd")
PROVIDERS = ("eager", "vit_fast")
# Max |error| / max |fp32 reference| allowed per dtype: inputs rounded to the dtype, fp32 sums.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
RESULTS = Path(__file__).with_name("results.json")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if getattr(config.option, "benchmark_json", "missing") is None:
        config.option.benchmark_json = str(RESULTS)


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    dtype: str
    mode: str
    provider: str

    @property
    def dims(self):
        return SHAPES[self.shape]

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def batch(self):
        if DEVICE == "cpu":
            return 2
        return 32 if self.shape in ("L16", "B16-384") else 64

    @property
    def backward(self):
        return self.mode == "fwd+bwd"


def _skip_reason(case: Case):
    if case.provider == "vit_fast" and DEVICE == "cpu":
        return ("vit_fast's Triton kernels run on CPU only under the Triton interpreter, which is "
                "no benchmark (correctness is in tests/)")
    if DEVICE == "cpu":
        if case.dtype != "fp32" and case.shape != "S16":
            return "CPU grid kept small: bf16/fp16 eager timed at S/16 only"
        if case.dtype == "fp16":
            return "CPU grid kept small: fp16 is a GPU dtype"
        if case.backward and case.shape in ("L16", "B16-384"):
            return "CPU grid kept small: L/16 and B/16@384 forward+backward skipped on CPU"
    return None


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = []
    for shape in SHAPES:
        for dtype in DTYPES:
            for mode in MODES:
                for provider in PROVIDERS:
                    case = Case(shape, dtype, mode, provider)
                    why = _skip_reason(case)
                    marks = [pytest.mark.skip(reason=why)] if why else []
                    params.append(pytest.param(case, marks=marks,
                                               id=f"{shape}-{dtype}-{mode}-{provider}"))
    metafunc.parametrize("case", params)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _to(obj, dtype):
    """fp32 copies of the float tensors in a dict (what the fp32 reference runs on)."""
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad)
                if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in obj.items()}


@pytest.fixture
def run_case(benchmark):
    """run_case(case, inputs, eager_fn, fast_fn, model_op): checks accuracy, times, records.

    inputs: dict of tensors in the case dtype on DEVICE (requires_grad set where fwd+bwd needs
    it); eager_fn/fast_fn(inputs) -> output tensor; model_op: roofline Op(s) of the timed work.
    """
    import vit_fast
    from vit_fast.bench import roofline

    def run(case, inputs, eager_fn, fast_fn, model_ops):
        fn = eager_fn if case.provider == "eager" else fast_fn
        backend = "reference" if case.provider == "eager" else "triton"
        with torch.no_grad():
            ref = eager_fn(_to(inputs, torch.float32)).float()
            with vit_fast.use_backend(backend):
                out = fn(inputs).float()
        err = (out - ref).abs().max().item()
        scale = ref.abs().max().item() or 1.0
        assert err / scale <= REL_TOL[case.torch_dtype], (
            f"{case}: max error {err:.3e} vs fp32 reference (scale {scale:.3e})")
        grad = torch.randn_like(out).to(case.torch_dtype) if case.backward else None

        def step():
            with vit_fast.use_backend(backend):
                y = fn(inputs)
                if grad is not None:
                    y.backward(grad)
            _sync()

        rounds = 20 if DEVICE == "cuda" else 3
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        sec = benchmark.stats.stats.median
        total = roofline.total(model_ops)
        benchmark.extra_info.update({
            "device": DEVICE, "measured_on": "CPU" if DEVICE == "cpu" else DEVICE,
            "batch": case.batch, "img_per_s": case.batch / sec,
            "model_GB_per_s": total.bytes / sec / 1e9, "model_TFLOP_per_s": total.flops / sec / 1e12,
            "model_bytes": total.bytes, "model_flops": total.flops, "max_err": err,
            "max_rel_err": err / scale})

    return run
