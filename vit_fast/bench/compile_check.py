"""AOT-compile every shipped kernel config for sm_80/sm_90 and report resources (no GPU needed).

Iterates ``aot_specs()`` of each kernel module that imports; a module that does not is reported
with the reason and counts as a failure only with ``strict``.
"""
from __future__ import annotations

import importlib
import re

MODULES = ("attention_aot", "layer_norm_aot", "gelu_mlp_aot", "gelu_elementwise_aot", "qk_norm_aot",
           "rope_aot", "matmul_hopper_aot", "glu_mlp_aot")


def collect_specs(modules=MODULES, match=None):
    """([(module, spec)], [(module, why it was skipped)])."""
    specs, missing = [], []
    for mod in modules:
        try:
            m = importlib.import_module(f"vit_fast.kernels.{mod}")
            mod_specs = m.aot_specs()
        except Exception as exc:
            missing.append((mod, f"{type(exc).__name__}: {exc}"))
            continue
        specs += [(mod, s) for s in mod_specs if match is None or match in s.name]
    return specs, missing


def run(archs=(80, 90), match=None, limit=None, progress=True):
    """Rows {module, kernel, arch, registers, spill_bytes, shared_bytes, tensor_core_ops, ok, error}
    and the list of modules that could not be read."""
    from tqdm import tqdm

    from vit_fast.aot import compile_spec, nvidia_backend_missing_reason
    why = nvidia_backend_missing_reason()
    if why:
        raise RuntimeError(f"compile-check needs triton's NVIDIA backend: {why}")
    specs, missing = collect_specs(match=match)
    if limit:
        specs = specs[:limit]
    rows = []
    for mod, spec in tqdm(specs, desc="compile", disable=not progress, leave=False):
        for arch in filter(spec.for_arch, archs):
            try:
                r = compile_spec(spec, arch)
                rows.append({"module": mod, "kernel": spec.name, "arch": f"sm_{arch}",
                             "registers": r.registers, "spill_bytes": r.spill_bytes,
                             "shared_bytes": r.shared_bytes, "tensor_core_ops": r.tensor_core_ops or "-",
                             "uses_dot": spec.uses_dot, "ok": r.ok, "error": ""})
            except Exception as exc:  # a failed build is a row, not a crash
                rows.append({"module": mod, "kernel": spec.name, "arch": f"sm_{arch}",
                             "registers": -1, "spill_bytes": -1, "shared_bytes": -1,
                             "tensor_core_ops": "-", "uses_dot": spec.uses_dot, "ok": False,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
    return rows, missing


def family(name: str) -> str:
    """'attention_fwd[fp16,D=64,...]' -> 'attention_fwd', 'matmul_kernel[dgelu/bf16/large16]' ->
    'matmul_kernel[dgelu]', 'residual_layer_norm_bwd_fp16_C768_M1_w4' -> 'residual_layer_norm_bwd'."""
    if "[" in name:
        base, rest = name.split("[", 1)
        return f"{base}[{rest.split('/')[0]}]" if "/" in rest else base
    return re.split(r"_(?:fp16|bf16|fp32)(?:_|$)", name)[0]


def summarize(rows):
    """Worst case (max registers, spills, shared memory) per kernel family and arch."""
    groups = {}
    for r in rows:
        groups.setdefault((family(r["kernel"]), r["arch"]), []).append(r)
    out = []
    for (fam, arch), rs in groups.items():
        mma = sorted({r["tensor_core_ops"] for r in rs})
        out.append({"family": fam, "arch": arch, "builds": len(rs),
                    "registers": max(r["registers"] for r in rs),
                    "spill_bytes": max(r["spill_bytes"] for r in rs),
                    "shared_bytes": max(r["shared_bytes"] for r in rs),
                    "tensor_core_ops": "/".join(mma),
                    "ok": f"{sum(r['ok'] for r in rs)}/{len(rs)}"})
    return out
