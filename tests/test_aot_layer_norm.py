"""The residual_layer_norm configs (kernels/layer_norm_aot.aot_specs) compile for sm_80 and sm_90
with 0 spills and shared memory within the arch limit, C up to 8192.

`python -m vit_fast.bench compile-check --match layer_norm` builds every spec; this builds the
covering subset of tests/aot_builds.py (every block size, dtype and flag family)."""
from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.aot import SHARED_LIMIT
from vit_fast.kernels.layer_norm import MAX_C
from vit_fast.kernels.layer_norm_aot import aot_specs

SPEC_NAMES = [spec.name for spec in aot_specs()]
JOBS = covering_jobs(aot_specs())
AOT_JOBS = ("layer_norm_aot", JOBS)  # conftest.py starts them at collection


def test_specs_cover_every_block_size_and_dtype():
    blocks = {int(n.split("_C")[1].split("_")[0]) for n in SPEC_NAMES if "_C" in n}
    assert max(blocks) == MAX_C
    assert blocks == {64 << i for i in range(8)}
    for kind in ("fwd", "bwd", "reduce"):
        for dt in ("fp16", "bf16", "fp32"):
            assert any(kind in n and dt in n for n in SPEC_NAMES), (kind, dt)


@parametrize_jobs(JOBS)
def test_spec_compiles_without_spills(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch}: {r}"
    assert r.spill_bytes == 0, f"{name} sm_{arch}: {r.spill_bytes} spill bytes, {r.registers} regs"
    assert r.shared_bytes <= SHARED_LIMIT[arch], f"{name} sm_{arch}: shared {r.shared_bytes}"
    assert r.registers <= 255
