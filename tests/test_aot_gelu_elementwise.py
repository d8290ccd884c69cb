"""The cuBLAS MLP's elementwise kernels (kernels/gelu_elementwise_aot.py) compile for sm_80 and
sm_90 with no spills: the covering subset of tests/aot_builds.py (all of them with
`python -m vit_fast.bench compile-check --match gelu`)."""
from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.kernels.gelu_elementwise_aot import aot_specs

JOBS = covering_jobs(aot_specs())
AOT_JOBS = ("gelu_elementwise_aot", JOBS)  # conftest.py starts them at collection


def test_specs_list_every_elementwise_kernel():
    assert {s.name.split("[")[0] for s in aot_specs()} == {
        "gelu_fwd_kernel", "gelu_bwd_kernel", "residual_epilogue_kernel"}


@parametrize_jobs(JOBS)
def test_compiles_without_spills(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str) and r.ok and not r.spill_bytes, f"{name} sm_{arch}: {r}"
