"""The GEMM/colsum configs of the GELU MLP compile for sm_80 and sm_90 with no spills, and the
bf16/fp16 (and tf32) GEMMs use tensor cores: HGMMA on sm_90, HMMA on sm_80.

`python -m vit_fast.bench compile-check --match matmul_kernel` builds every spec; this builds the
covering subset of tests/aot_builds.py."""
from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.kernels.gelu_mlp_aot import aot_specs

SPECS = {s.name: s for s in aot_specs()}
JOBS = covering_jobs(list(SPECS.values()))
AOT_JOBS = ("gelu_mlp_aot", JOBS)  # conftest.py starts them at collection


@parametrize_jobs(JOBS)
def test_compiles_without_spills_and_with_tensor_cores(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch}: {r}"
    want_tc = {90: "HGMMA", 80: "HMMA"}[arch] if SPECS[name].uses_dot else ""
    assert r.ok and not r.spill_bytes and r.tensor_core_ops == want_tc, (
        f"{name} sm_{arch}: regs={r.registers} spills={r.spill_bytes} shared={r.shared_bytes} "
        f"tensor-core={r.tensor_core_ops!r} (want {want_tc!r})")


def test_half_precision_gemms_are_marked_as_tensor_core_kernels():
    for spec in SPECS.values():
        if spec.name.startswith("matmul_kernel") and ("/bf16/" in spec.name or "/fp16/" in spec.name):
            assert spec.uses_dot, spec.name
