"""Every shipped residual_layer_norm config (kernels/layer_norm_aot.aot_specs) compiles for sm_80 and
sm_90 with 0 spills and shared memory within the arch limit, C up to 8192.

Builds run in worker processes (vit_fast.aot.compile_module), since the tests interpret triton.
"""
import dataclasses

import pytest

from vit_fast.aot import compile_module, nvidia_backend_missing_reason
from vit_fast.kernels.layer_norm import MAX_C
from vit_fast.kernels.layer_norm_aot import aot_specs

ARCHS = (80, 90)
SPEC_NAMES = [spec.name for spec in aot_specs()]


@pytest.fixture(scope="module")
def results():
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    out = compile_module("layer_norm_aot", ARCHS)
    failed = {k: r for k, r in out.items() if isinstance(r, str)}
    assert not failed, failed
    return {k: dataclasses.asdict(r) for k, r in out.items()}


def test_specs_cover_every_block_size_and_dtype():
    blocks = {int(n.split("_C")[1].split("_")[0]) for n in SPEC_NAMES if "_C" in n}
    assert max(blocks) == MAX_C
    assert blocks == {64 << i for i in range(8)}
    for kind in ("fwd", "bwd", "reduce"):
        for dt in ("fp16", "bf16", "fp32"):
            assert any(kind in n and dt in n for n in SPEC_NAMES), (kind, dt)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_compiles_without_spills(results, name, arch):
    from vit_fast.aot import SHARED_LIMIT

    r = results[(name, arch)]
    assert r["spill_bytes"] == 0, f"{name} sm_{arch}: {r['spill_bytes']} spill bytes, {r['registers']} regs"
    assert r["shared_bytes"] <= SHARED_LIMIT[arch], f"{name} sm_{arch}: shared {r['shared_bytes']}"
    assert r["registers"] <= 255
