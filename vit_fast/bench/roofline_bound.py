"""Bound analysis of the modelled ViT block (issue 18): how far each vit_fast variant's fwd+bwd is
from the targets (>= 1.35x eager, >= 1.15x torch.compile) and which kernels keep it from there.

A model, not a measurement: the ops and achievable fractions of vit_fast/bench/roofline.py.
- speedup: the other impl's time / the variant's time (fwd+bwd, achievable fractions applied).
- GEMM floor: the block's Linear GEMMs (forward, dX and dW of qkv, proj, fc1, fc2; attention is
  not in it) at cuBLAS's achievable fraction, every other op free. eager / floor is the most any
  fusion of the non-GEMM work can give while the GEMMs run no faster than eager's cuBLAS calls;
  the second bound adds the variant's attention kernels at their modelled time.
- blockers: where a variant misses a target, each of its ops' excess over its floor (a GEMM's
  time minus its time at cuBLAS's fraction; any other op's whole time), largest first, as many
  as it takes to cover the gap (variant time - target time).
- The Hopper GEMM (kernels/matmul_hopper.py) has no achievable fraction: nothing has measured it,
  so it is shown as not modelled rather than given a number.
"""
from __future__ import annotations

import dataclasses

from . import roofline as rl

TARGETS = {"eager": 1.35, "torch.compile": 1.15}  # issue 18's checks, fwd+bwd
VARIANTS = ("vit_fast", "vit_fast cublas")
GEMM_KINDS = ("cublas_gemm", "triton_gemm")
HOPPER_GEMM = ("hopper_gemm (kernels/matmul_hopper.py: persistent, TMA, 128x256, sm_90): "
               "not modelled: unmeasured (a candidate of the measured selection only)")


def is_gemm(op) -> bool:
    return op.kind in GEMM_KINDS


def at_cublas(op):
    """The op with cuBLAS's achievable fraction (same bytes and FLOPs)."""
    return dataclasses.replace(op, kind="cublas_gemm")


def gemm_floor(ops, hw) -> tuple:
    """(seconds, FLOPs) of the GEMM ops of ``ops``, all at cuBLAS's fraction."""
    gemms = [o for o in ops if is_gemm(o)]
    return sum(at_cublas(o).time_s(hw) for o in gemms), sum(o.flops for o in gemms)


def excess_s(op, hw) -> float:
    """What ``op`` costs above its floor: a GEMM over cuBLAS's fraction, anything else all of it."""
    return op.time_s(hw) - (at_cublas(op).time_s(hw) if is_gemm(op) else 0.0)


CLASSES = {  # excess_s summed per class, for the one-line verdict
    "GEMMs over cuBLAS's fraction": is_gemm,
    "attention": lambda op: op.kind.startswith("attention"),
    "memory-bound kernels (LayerNorm, GELU passes, column sums, adds)":
        lambda op: op.kind == "elementwise",
}


OTHER = list(CLASSES)[-1]


def excess_by_class(ops, hw) -> dict:
    """{class: seconds}: the ops' excess over their floors, per CLASSES entry (they partition
    every op: a GEMM kind, an attention kind or elementwise)."""
    return {name: sum(excess_s(o, hw) for o in ops if member(o))
            for name, member in CLASSES.items()}


def blockers(ops, hw, target_s) -> list:
    """[(op name, excess seconds)], largest first, the fewest whose excess covers
    time(ops) - target_s; [] when the target is met."""
    gap = rl.time_s(ops, hw) - target_s
    out, covered = [], 0.0
    for ex, name in sorted(((excess_s(o, hw), o.name) for o in ops), reverse=True):
        if covered >= gap:
            break
        out.append((name, ex))
        covered += ex
    return out


def analyze(B, N, C, H, e, hw="H100 SXM", layer_scale=False) -> dict:
    """Times, speedups, bounds and blockers of every vit_fast variant (fwd+bwd, seconds)."""
    ops = {impl: rl.block_ops(impl, B, N, C, H, e, backward=True, layer_scale=layer_scale)
           for impl in rl.IMPLS}
    times = {impl: rl.time_s(seq, hw) for impl, seq in ops.items()}
    floor_s, floor_flops = gemm_floor(ops["eager"], hw)
    out = {"hw": hw, "times": times, "gemm_floor_s": floor_s, "gemm_floor_flops": floor_flops,
           "variants": {}}
    for v in VARIANTS:
        attn_s = sum(o.time_s(hw) for o in ops[v] if o.kind.startswith("attention"))
        # what-if, not a model of any kernel: every GEMM of the variant at cuBLAS's fraction (the
        # figure a Triton GEMM -- e.g. the unmeasured Hopper one -- would have to reach)
        parity_s = sum((at_cublas(o) if is_gemm(o) else o).time_s(hw) for o in ops[v])
        out["variants"][v] = {
            "speedup": {ref: times[ref] / times[v] for ref in TARGETS},
            "bound": {ref: times[ref] / floor_s for ref in TARGETS},
            "bound_with_attention": {ref: times[ref] / (floor_s + attn_s) for ref in TARGETS},
            "attention_s": attn_s,
            "gemm_parity_s": parity_s,
            "excess_by_class": excess_by_class(ops[v], hw),
            # what the LayerNorm/elementwise kernels may take for the target to hold with the
            # GEMMs at cuBLAS's fraction and the attention as modelled
            "other_budget_s": {ref: times[ref] / want - floor_s - attn_s
                               for ref, want in TARGETS.items()},
            "blockers": {ref: blockers(ops[v], hw, times[ref] / want)
                         for ref, want in TARGETS.items()},
        }
    return out


def report(B, N, C, H, e, hw="H100 SXM", layer_scale=False, head="") -> str:
    a = analyze(B, N, C, H, e, hw, layer_scale)
    us = 1e6
    t = a["times"]
    lines = [f"Bound analysis (model; {head or f'B={B}, N={N}, C={C}, H={H}'}, fwd+bwd, {hw}, "
             "achievable fractions applied; targets "
             + ", ".join(f">= {x:.2f}x {ref}" for ref, x in TARGETS.items()) + "):",
             f"  eager {t['eager'] * us:.1f} µs, torch.compile {t['torch.compile'] * us:.1f} µs",
             f"  GEMMs alone at cuBLAS's fraction ({rl.EFFICIENCY[hw]['cublas_gemm']:.2f}): "
             f"{a['gemm_floor_s'] * us:.1f} µs ({a['gemm_floor_flops'] / 1e9:.1f} GFLOP); every "
             "non-GEMM op free: at most "
             + ", ".join(f"{t[ref] / a['gemm_floor_s']:.2f}x {ref}" for ref in TARGETS)]
    for v, r in a["variants"].items():
        lines.append(f"  {v}: {t[v] * us:.1f} µs = "
                     + ", ".join(f"{r['speedup'][ref]:.3f}x {ref}" for ref in TARGETS)
                     + f"; bound with its attention ({r['attention_s'] * us:.1f} µs) as modelled: "
                     + ", ".join(f"{r['bound_with_attention'][ref]:.2f}x {ref}" for ref in TARGETS))
        if r["gemm_parity_s"] < t[v]:
            lines.append(f"    what-if, its GEMMs at cuBLAS's fraction (unmeasured): "
                         f"{r['gemm_parity_s'] * us:.1f} µs = " + ", ".join(
                             f"{t[ref] / r['gemm_parity_s']:.3f}x {ref}" for ref in TARGETS))
        lines.append("    over the GEMM floor by class: " + ", ".join(
            f"{name} +{ex * us:.1f} µs" for name, ex in r["excess_by_class"].items()))
        other = r["excess_by_class"][OTHER]
        lines.append("    with its GEMMs at cuBLAS's fraction and its attention as modelled, "
                     + ", ".join(f"{want:.2f}x {ref} leaves the other kernels "
                                 f"{r['other_budget_s'][ref] * us:.1f} µs"
                                 for ref, want in TARGETS.items())
                     + f"; they take {other * us:.1f} µs")
        for ref, want in TARGETS.items():
            if not r["blockers"][ref]:
                lines.append(f"    meets {want:.2f}x {ref}")
                continue
            gap = t[v] - t[ref] / want
            lines.append(f"    short of {want:.2f}x {ref} by {gap * us:.1f} µs; kept there by "
                         + ", ".join(f"{name} +{ex * us:.1f}" for name, ex in r["blockers"][ref])
                         + " (µs over GEMM-at-cuBLAS / free)")
    lines.append(f"  {HOPPER_GEMM}")
    return "\n".join(lines)
