"""The attention configs compile for sm_80 and sm_90 with no spills, within the shared memory
limit, and (dot kernels) with tensor-core instructions in the SASS.

`python -m vit_fast.bench compile-check --match attention` builds every spec; this builds the
covering subset of tests/aot_builds.py (every variant family at its heaviest on both
architectures, every head dim, tile, dtype and launch option once)."""
import dataclasses

from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.kernels.attention_aot import aot_specs

SPECS = aot_specs()
JOBS = covering_jobs(SPECS)


def _fwd_config_of(spec):
    c = spec.constants
    return (c["BLOCK_M"], c["BLOCK_N"], spec.num_warps, spec.num_stages)


def _picked_at(limit):
    """The forward builds the launcher picks on a GPU allowing ``limit`` bytes per block."""
    from vit_fast.kernels.attention_config import _CUDA_CONFIGS, fwd_config
    picked = {(key[1], dropout, segments, bias, fwd_config(key, dropout, segments, limit, bias))
              for key in _CUDA_CONFIGS if key[0] == "fwd"
              for dropout in (False, True) for segments in (False, True) for bias in (False, True)}
    return [s for s in SPECS if s.kernel.fn.__name__ == "attention_fwd_kernel"
            and (max(64, s.constants["BLOCK_D"]), s.constants["HAS_DROPOUT"],
                 s.constants["HAS_SEGMENTS"], s.constants["HAS_BIAS"], _fwd_config_of(s)) in picked]


def _sm86_jobs():
    """GPUs with 99 KB per block (sm_86, sm_89, sm_120) compile the same mma.sync pipeline as
    sm_80: each picked (bucket, variant, tile) once, at its largest head dim, bf16."""
    from vit_fast.support import MIN_TRITON_SHARED_BYTES
    largest = {}
    for s in _picked_at(MIN_TRITON_SHARED_BYTES):
        if s.signature["QKV"] != "*bf16":
            continue
        k = (max(64, s.constants["BLOCK_D"]), s.constants["HAS_DROPOUT"], s.constants["HAS_SEGMENTS"],
             s.constants["HAS_BIAS"], _fwd_config_of(s))
        if k not in largest or s.constants["HEAD_DIM"] > largest[k].constants["HEAD_DIM"]:
            largest[k] = s
    return [(s.name, 86) for s in largest.values()]


SM86_JOBS = _sm86_jobs()
AOT_JOBS = ("attention_aot", JOBS + SM86_JOBS)  # conftest.py starts them at collection


def test_specs_cover_the_shipped_dtypes_head_dims_and_kernels():
    shipped = {(s.kernel.fn.__name__, s.signature.get("QKV", s.signature.get("O", s.signature.get("DQKV"))),
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


# --- GPUs with 99 KB of shared memory per block (sm_86, sm_89, sm_120) ---------------------------

def test_forward_builds_picked_at_the_99KB_limit_fit_it_on_sm86(compiled):
    from vit_fast.aot import SHARED_LIMIT
    from vit_fast.support import MIN_TRITON_SHARED_BYTES
    assert SHARED_LIMIT[86] == MIN_TRITON_SHARED_BYTES
    assert len(SM86_JOBS) >= 3 * 8  # every bucket x dropout/segments/bias variant
    for name, arch in SM86_JOBS:
        r = compiled[(name, arch)]
        assert not isinstance(r, str), f"{name} sm_86 failed to compile: {r}"
        assert r.shared_bytes <= MIN_TRITON_SHARED_BYTES, dataclasses.asdict(r)
        assert r.spill_bytes == 0 and r.ok, dataclasses.asdict(r)


def test_shared_memory_model_bounds_the_forward_builds(compiled):
    """fwd_config decides by fwd_shared_bytes: it must not undercount what the builds take on
    sm_80 and sm_86 (the 99 KB GPUs compile the same mma.sync pipeline)."""
    from vit_fast.kernels.attention_config import fwd_shared_bytes
    checked = 0
    for (name, arch), r in compiled.items():
        spec = next(s for s in SPECS if s.name == name)
        if spec.kernel.fn.__name__ != "attention_fwd_kernel" or arch == 90 or isinstance(r, str):
            continue
        bound = fwd_shared_bytes(_fwd_config_of(spec), spec.constants["BLOCK_D"],
                                 segments=spec.constants["HAS_SEGMENTS"],
                                 bias=spec.constants["HAS_BIAS"])
        assert r.shared_bytes <= bound, (name, arch, r.shared_bytes, bound)
        checked += 1
    assert checked >= len(SM86_JOBS)


def test_other_attention_builds_fit_the_99KB_limit_on_sm80(compiled):
    """The backward and Δ builds have no smaller alternative: each built must fit the gate's limit."""
    from vit_fast.support import MIN_TRITON_SHARED_BYTES
    for (name, arch), r in compiled.items():
        if arch == 80 and not name.startswith("attention_fwd["):
            assert isinstance(r, str) or r.shared_bytes <= MIN_TRITON_SHARED_BYTES, name
