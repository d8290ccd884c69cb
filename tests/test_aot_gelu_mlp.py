"""Every shipped GEMM/colsum config of the GELU MLP compiles for sm_80 and sm_90 with no spills,
and the bf16/fp16 (and tf32) GEMMs use tensor cores: HGMMA on sm_90, HMMA on sm_80."""
import pytest

from vit_fast.aot import compile_module, nvidia_backend_missing_reason
from vit_fast.kernels.gelu_mlp_aot import aot_specs

REASON = nvidia_backend_missing_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


def test_every_spec_compiles_without_spills_and_with_tensor_cores():
    specs = {s.name: s for s in aot_specs()}
    assert specs, "aot_specs() is empty"
    bad = []
    for (name, arch), r in compile_module("gelu_mlp_aot").items():
        want_tc = {90: "HGMMA", 80: "HMMA"}[arch] if specs[name].uses_dot else ""
        if isinstance(r, str):
            bad.append(f"{name} sm_{arch}: {r}")
        elif not r.ok or r.spill_bytes or r.tensor_core_ops != want_tc:
            bad.append(f"{name} sm_{arch}: regs={r.registers} spills={r.spill_bytes} "
                       f"shared={r.shared_bytes} tensor-core={r.tensor_core_ops!r} (want {want_tc!r})")
    assert not bad, "\n".join(bad)


def test_half_precision_gemms_are_marked_as_tensor_core_kernels():
    for spec in aot_specs():
        if spec.name.startswith("matmul_kernel") and ("/bf16/" in spec.name or "/fp16/" in spec.name):
            assert spec.uses_dot, spec.name
