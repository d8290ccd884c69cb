"""Every shipped GEMM/colsum config of the GELU MLP compiles for sm_80 and sm_90 with no spills,
and the bf16/fp16 (and tf32) GEMMs use tensor cores: HGMMA on sm_90, HMMA on sm_80."""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from vit_fast.aot import compile_spec, nvidia_backend_missing_reason
from vit_fast.kernels.gelu_mlp import aot_specs

REASON = nvidia_backend_missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

ARCHS = (80, 90)


def _compile(job):
    index, arch = job
    return compile_spec(aot_specs()[index], arch)


def test_every_spec_compiles_without_spills_and_with_tensor_cores(monkeypatch):
    specs = aot_specs()
    assert specs, "aot_specs() is empty"
    jobs = [(i, arch) for i in range(len(specs)) for arch in ARCHS]
    # conftest turned this process's kernels into interpreter functions, which cannot be compiled:
    # fresh (spawned) workers import them as JIT functions. Two of them, as compiles are independent.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        results = list(pool.map(_compile, jobs))
    bad = []
    for (i, arch), r in zip(jobs, results):
        spec = specs[i]
        want_tc = {90: "HGMMA", 80: "HMMA"}[arch] if spec.uses_dot else ""
        if not r.ok or r.spill_bytes or r.tensor_core_ops != want_tc:
            bad.append(f"{spec.name} sm_{arch}: regs={r.registers} spills={r.spill_bytes} "
                       f"shared={r.shared_bytes} tensor-core={r.tensor_core_ops!r} (want {want_tc!r})")
    assert not bad, "\n".join(bad)


def test_half_precision_gemms_are_marked_as_tensor_core_kernels():
    for spec in aot_specs():
        if spec.name.startswith("matmul_kernel") and ("/bf16/" in spec.name or "/fp16/" in spec.name):
            assert spec.uses_dot, spec.name
