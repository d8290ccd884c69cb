"""Every shipped attention config compiles for sm_80 and sm_90 with no spills, within the shared
memory limit, and (dot kernels) with tensor-core instructions in the SASS."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from vit_fast.aot import AotResult, nvidia_backend_missing_reason
from vit_fast.kernels.attention import aot_specs

SPECS = aot_specs()
ARCHS = (80, 90)

# conftest sets TRITON_INTERPRET=1 before triton is imported, which turns triton.language's own
# jit helpers (tl.cdiv, tl.max, ...) into interpreter objects for the life of this process; the
# compiler cannot use those, so the builds run in a child process without the variable.
# Two workers: the builds are independent and each is single-threaded.
_CHILD = """
import concurrent.futures, dataclasses, json, sys
from vit_fast.aot import compile_spec
from vit_fast.kernels.attention import aot_specs

def build(job):
    i, arch = job
    spec = aot_specs()[i]
    try:
        return f"{spec.name}@{arch}", dataclasses.asdict(compile_spec(spec, arch))
    except Exception as exc:  # reported per spec by the test
        return f"{spec.name}@{arch}", repr(exc)[-2000:]

if __name__ == "__main__":
    jobs = [(i, arch) for i in range(len(aot_specs())) for arch in (80, 90)]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        results = dict(pool.map(build, jobs))
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("aot") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = path.with_name("build.py")
    script.write_text(_CHILD)  # a file, not -c: the worker processes re-import the main module
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def test_specs_cover_the_shipped_dtypes_head_dims_and_kernels():
    shipped = {(s.kernel.fn.__name__, s.signature["QKV" if "QKV" in s.signature else "O"],
                s.constants["HEAD_DIM"]) for s in SPECS}
    for kernel in ("attention_fwd_kernel", "attention_bwd_delta_kernel",
                   "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"):
        for ptr in ("*fp16", "*bf16"):
            for head_dim in (64, 128):
                assert (kernel, ptr, head_dim) in shipped, (kernel, ptr, head_dim)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_without_spills(compiled, spec, arch):
    r = compiled[f"{spec.name}@{arch}"]
    assert isinstance(r, dict), f"{spec.name} sm_{arch} failed to compile: {r}"
    r = AotResult(**r)
    assert r.spill_bytes == 0, f"{spec.name} sm_{arch}: {r.spill_bytes} bytes spilled ({r.registers} registers)"
    if spec.uses_dot:
        # sm_90 tiles under 64 rows per warpgroup get mma.sync (HMMA), not wgmma: still tensor cores.
        assert r.tensor_core_ops in ("HGMMA", "HMMA"), f"{spec.name} sm_{arch}: no tensor-core ops"
    assert r.ok, dataclasses.asdict(r)
