"""Every shipped attention config compiles for sm_80 and sm_90 with no spills, within the shared
memory limit, and (dot kernels) with tensor-core instructions in the SASS."""
import dataclasses

import pytest

from vit_fast.aot import compile_module, nvidia_backend_missing_reason
from vit_fast.kernels.attention import aot_specs

SPECS = aot_specs()
ARCHS = (80, 90)

@pytest.fixture(scope="module")
def compiled():
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    return compile_module("attention", ARCHS)


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_without_spills(compiled, spec, arch):
    if not spec.for_arch(arch):
        pytest.skip(f"launched on {spec.archs} only")
    r = compiled[(spec.name, arch)]
    assert not isinstance(r, str), f"{spec.name} sm_{arch} failed to compile: {r}"
    assert r.spill_bytes == 0, f"{spec.name} sm_{arch}: {r.spill_bytes} bytes spilled ({r.registers} registers)"
    if spec.uses_dot:
        # sm_90 tiles under 64 rows per warpgroup get mma.sync (HMMA), not wgmma: still tensor cores.
        assert r.tensor_core_ops in ("HGMMA", "HMMA"), f"{spec.name} sm_{arch}: no tensor-core ops"
    assert r.ok, dataclasses.asdict(r)
