"""The sm_90 forward study (issue 18): today's tiles against larger ones and against the TMA
variant (kernels/attention_fwd_tma.py), by the figures of the compiled SASS (no GPU).

    python -m vit_fast.bench.attention_fwd_study [--dtype bfloat16] [--dims 64,128]

prints, per build: registers, spills, shared bytes, CTAs and warps per SM, tensor-core
instructions per 128 x 128 block of scores, MUFU.EX2 / integer / FFMA+FMUL+FADD instructions per
score (vit_fast.bench.sass_report), and the modelled HBM traffic of one ViT-B/16 forward
(B = 64, H = 12, N = 197; each K/V tile read once per query tile). SASS and model, not speed.
"""
from __future__ import annotations

import argparse

import triton

from vit_fast.kernels.attention_aot import _TORCH_TO_SIG, aot_specs, tma_fwd_spec
from vit_fast.kernels.attention_config import _CUDA_CONFIGS

# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried beside the table's entry, per head-dim bucket.
LARGER = {64: [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3)],
          128: [(128, 128, 8, 2), (128, 64, 8, 2)]}
VIT_B = dict(B=64, H=12, N=197)


def study_specs(dtype, dims=(64, 128)):
    """[(variant, config, spec)]: the pointer kernel at the table's long-sequence entry and the
    LARGER tiles, and the TMA kernel at each, for head dims ``dims`` (their own buckets)."""
    ptr = _TORCH_TO_SIG[dtype]
    out = []
    for d in dims:
        bucket = max(64, triton.next_power_of_2(d))
        configs = [_CUDA_CONFIGS[("fwd", bucket, False)]] + LARGER[bucket]
        builds = [("fwd", bucket, False, False, c, None) for c in configs]
        prefix = f"attention_fwd[{str(dtype).split('.')[-1]},D={d},"
        ptr_specs = [s for s in aot_specs(builds) if s.name.startswith(prefix)]
        out += [("pointer", c, s) for c in configs for s in ptr_specs
                if f"BM={c[0]},BN={c[1]},w={c[2]},s={c[3]}]" in s.name]
        out += [("tma", c, tma_fwd_spec(ptr, d, c)) for c in configs]
    return out


def traffic_mb(config, head_dim, B=VIT_B["B"], H=VIT_B["H"], N=VIT_B["N"], elem=2):
    """Modelled HBM bytes of one forward, in MB: Q read and O written once, K and V once per
    query tile, lse written (fp32)."""
    q_tiles = triton.cdiv(N, config[0])
    per_head = N * head_dim * elem * (2 + 2 * q_tiles) + 4 * N
    return B * H * per_head / 1e6


def study_rows(dtype, dims=(64, 128), arch=90):
    from vit_fast.aot import compile_spec
    from vit_fast.bench import sass_report as sr
    rows = []
    for variant, (bm, bn, warps, stages), spec in study_specs(dtype, dims):
        res = compile_spec(spec, arch)
        f = sr.figures(sr._sass_of(spec, arch), num_warps=warps, tile_elems=bm * bn)
        ctas = sr.ctas_per_sm(res.registers, res.shared_bytes, warps, arch)
        f.update(kernel=spec.name, variant=variant, registers=res.registers,
                 spill_bytes=res.spill_bytes, shared_bytes=res.shared_bytes, ctas_per_sm=ctas,
                 warps_per_sm=ctas * warps,
                 mma_per_128x128=f["mma_per_iter"] * (warps / 4) * 128 * 128 / (bm * bn),
                 traffic_mb=traffic_mb((bm, bn), spec.constants["HEAD_DIM"]))
        rows.append(f)
    return rows


def main(argv=None) -> int:
    import torch

    from vit_fast.bench.tables import fmt_table
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench.attention_fwd_study")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--dims", default="64,128", help="head dims, comma-separated")
    args = p.parse_args(argv)
    rows = study_rows(getattr(torch, args.dtype), tuple(int(d) for d in args.dims.split(",")))
    print(fmt_table(rows, [
        ("build (sm_90)", "kernel"), ("regs", "registers"), ("spill B", "spill_bytes"),
        ("shared B", "shared_bytes"), ("CTAs/SM", "ctas_per_sm"), ("warps/SM", "warps_per_sm"),
        ("HGMMA/128x128", lambda r: f"{r['mma_per_128x128']:.0f}"),
        ("EX2/score", lambda r: f"{r['ex2_per_score']:.2f}"),
        ("INT/score", lambda r: f"{r['int_per_score']:.2f}"),
        ("FP/score", lambda r: f"{r['fp_per_score']:.2f}"),
        ("TMA", lambda r: "yes" if r["tma"] else "-"),
        ("model MB (ViT-B/16 fwd)", lambda r: f"{r['traffic_mb']:.0f}")],
        title="attention forward on sm_90: SASS figures (hot loop) and modelled traffic; not a speed"))
    return 0 if all(r["spill_bytes"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
