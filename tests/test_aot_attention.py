"""The attention configs compile for sm_80 and sm_90 with no spills, within the shared memory
limit, and (dot kernels) with tensor-core instructions in the SASS.

`python -m vit_fast.bench compile-check --match attention` builds every spec; this builds the
covering subset of tests/aot_builds.py (every variant family at its heaviest on both
architectures, every head dim, tile, dtype and launch option once)."""
import dataclasses

import pytest

from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.kernels.attention import aot_specs

SPECS = aot_specs()
JOBS = covering_jobs(SPECS)
AOT_JOBS = ("attention", JOBS)  # conftest.py starts them at collection


@pytest.fixture(scope="module")
def compiled(aot_builds):
    return aot_builds.build(*AOT_JOBS)


def test_specs_cover_the_shipped_dtypes_head_dims_and_kernels():
    shipped = {(s.kernel.fn.__name__, s.signature["QKV" if "QKV" in s.signature else "O"],
                s.constants["HEAD_DIM"], s.constants.get("HAS_DROPOUT", False)) for s in SPECS}
    for kernel in ("attention_fwd_kernel", "attention_bwd_delta_kernel",
                   "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
        for ptr in ("*fp16", "*bf16"):
            for head_dim in (64, 128):
                assert (kernel, ptr, head_dim, False) in shipped, (kernel, ptr, head_dim)
                if kernel != "attention_bwd_delta_kernel":  # Δ is the same with dropout
                    assert (kernel, ptr, head_dim, True) in shipped, (kernel, ptr, head_dim, "dropout")


def test_dropout_builds_take_the_seed_pointer():
    # The dropout variant must be compiled as launched: SEED an int64 pointer, not the None
    # constexpr of the plain build.
    for s in SPECS:
        if s.constants.get("HAS_DROPOUT"):
            assert s.signature["SEED"] == "*i64" and "SEED" not in s.constants, s.name
        elif "HAS_DROPOUT" in s.constants:
            assert s.constants["SEED"] is None, s.name


def test_the_subset_builds_dropout_and_segments_on_both_architectures():
    built = {(name, arch) for name, arch in JOBS}
    for kernel in ("fwd", "dkdv", "dq"):
        for arch in (80, 90):
            assert any(n.startswith(f"attention_{kernel}[") and n.endswith(",dropout,segments]")
                       and a == arch for n, a in built), (kernel, arch)


@parametrize_jobs(JOBS)
def test_compiles_without_spills(compiled, name, arch):
    spec = next(s for s in SPECS if s.name == name)
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch} failed to compile: {r}"
    assert r.spill_bytes == 0, f"{name} sm_{arch}: {r.spill_bytes} bytes spilled ({r.registers} registers)"
    if spec.uses_dot:
        # sm_90 tiles under 64 rows per warpgroup get mma.sync (HMMA), not wgmma: still tensor cores.
        assert r.tensor_core_ops in ("HGMMA", "HMMA"), f"{name} sm_{arch}: no tensor-core ops"
    assert r.ok, dataclasses.asdict(r)
