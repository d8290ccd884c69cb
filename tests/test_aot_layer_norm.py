"""Every shipped residual_layer_norm config (kernels/layer_norm.aot_specs) compiles for sm_80 and
sm_90 with 0 spills and shared memory within the arch limit, C up to 8192.

Tests run with TRITON_INTERPRET=1, under which @triton.jit (tl.sum included) yields interpreter
objects that triton.compile cannot take, so the compiles run in child processes with the
variable removed: one per architecture, side by side.
"""
import json
import os
import subprocess
import sys

import pytest

from vit_fast.aot import nvidia_backend_missing_reason
from vit_fast.kernels.layer_norm import MAX_C, aot_specs

ARCHS = (80, 90)
SPEC_NAMES = [spec.name for spec in aot_specs()]

_CHILD = """
import dataclasses, json, sys
from vit_fast.aot import compile_spec
from vit_fast.kernels.layer_norm import aot_specs
arch = int(sys.argv[1])
print(json.dumps([dataclasses.asdict(compile_spec(s, arch)) for s in aot_specs()]))
"""


@pytest.fixture(scope="module")
def results():
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, "-c", _CHILD, str(arch)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS}
    out = {}
    for arch, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{arch} AOT child failed:\n{stderr[-4000:]}"
        out.update({(r["name"], arch): r for r in json.loads(stdout.strip().splitlines()[-1])})
    return out


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
