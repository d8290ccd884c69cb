"""The Hopper GEMM's shipped configs (kernels/matmul_hopper_aot.py) compile for sm_90 with no
spills, load A and B through TMA (UTMALDG in the SASS) and multiply on wgmma (HGMMA), read by the
same code as `python -m vit_fast.bench compile-check --sass` (bench/sass_report.py)."""
import json
import os
import subprocess
import sys

import pytest

from vit_fast.aot import nvidia_backend_missing_reason
from vit_fast.kernels import matmul_hopper
from vit_fast.kernels.matmul_hopper_aot import aot_specs

REASON = nvidia_backend_missing_reason()
if REASON is None and matmul_hopper.TensorDescriptor is None:
    REASON = matmul_hopper.not_supported_reasons(None, None, triton_has_descriptors=False)[0]
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# bf16 builds cover every kind x config x GELU form; the fp16 builds differ only in the dtype.
_SCRIPT = """
import json, sys
from vit_fast.bench import sass_report
rows = [r for r in sass_report.report_rows((80, 90), match="hopper_matmul_kernel[")
        if "/bf16/" in r["kernel"]]
json.dump([{k: r[k] for k in ("kernel", "arch", "spill_bytes", "mma_kind", "tma", "ctas_per_sm")}
           for r in rows], sys.stdout)
"""


def test_specs_are_sm90_only_and_cover_every_mlp_gemm():
    specs = aot_specs()
    assert specs and all(s.archs == (90,) and s.uses_dot for s in specs)
    kinds = {s.name.split("[")[1].split("/")[0] for s in specs}
    assert kinds == {"fc1_fwd", "fc2_fwd", "dgelu", "dx", "dw"}


def test_builds_use_tma_and_wgmma_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")  # compiled kernels, not interpreted ones
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)
    want = {s.name for s in aot_specs() if "/bf16/" in s.name}
    assert {r["kernel"] for r in rows} == want
    assert {r["arch"] for r in rows} == {"sm_90"}  # --arch 80 asks; the specs say sm_90 only
    bad = [r for r in rows if r["spill_bytes"] or r["mma_kind"] != "HGMMA" or not r["tma"]
           or r["ctas_per_sm"] < 1]
    assert not bad, bad
