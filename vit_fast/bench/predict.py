"""Whole-model img/s of a timm ViT on a named GPU, for timm eager, torch.compile, vit_fast and
vit_fast_cublas: a model, calibrated on timm's published benchmark rows (predict_fit.py), with the
host's launch work in it (predict_host.py). ``python -m vit_fast.bench predict`` prints it.

Per kernel (an :class:`~vit_fast.bench.roofline_time.Op` of predict_ops.py), on GPU ``g``:

    compute = FLOPs / (peak · sustained · η_class)   (+ exp2 count / MUFU rate for attention)
    memory  = bytes / (bandwidth · η_mem)
    time    = max(compute, memory) / wave_efficiency + gap

- peak, bandwidth: the GPU table's datasheet figures (gpu_peaks.py); ``sustained``: the GPU's
  measured large-matmul throughput over its datasheet peak (the same table), so that a fraction
  fitted on one GPU carries to another through what cuBLAS measurably delivers there.
- η_class: cuBLAS GEMM (``gemm``), FA2-class attention's tensor work (``attn``), every kernel's
  DRAM traffic (``mem``): fitted on the RTX 4090 rows (predict_fit.py); vit_fast's Triton GEMM:
  ``gemm · triton_gemm`` (an assumption, see EFFICIENCY_SOURCES); memory-bound kernels have no
  compute term. A free exponent p in (compute^p + memory^p)^(1/p) went to the max (p → ∞) when
  fitted, so the max it is.
- attention: the exp2 of every score (one per score in the forward and in the backward's
  recompute: the math, and vit_fast's SASS, 1.03-1.06 MUFU.EX2 per score) issues on the MUFU
  pipe (16 per SM per clock at the listed boost), serialized with the MMAs as in FA2-class kernels
  (no ping-pong between warpgroups); scores are counted on the 128 x 64 tiles (queries x keys)
  the kernel runs, so N = 197 pads to 256 x 256.
- wave efficiency: a GEMM's 128 x 128 output tiles over the SMs (tiles / (waves · SMs)).
- gap: a fixed per-kernel GPU time (launch latency, tail), an assumption (``gap_us``).

A step's kernels run in order on one stream; the host issues kernel i at H_i (its cumulative host
time, predict_host.py) and the GPU starts it at max(end of kernel i-1, H_i). The step ends at the
last kernel's end plus the synchronize. The configuration is host-bound when the host's total
exceeds the GPU's busy time.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import gpu_peaks, predict_host, predict_ops

KIND_CODES = {"elementwise": 0, "cublas_gemm": 1, "triton_gemm": 2, "attention": 3}
TILE_M, TILE_N = 128, 128          # GEMM output tile for wave quantization
ATTN_BM, ATTN_BN = 128, 64         # attention tile (queries x keys) for padding


@dataclasses.dataclass(frozen=True)
class Efficiency:
    gemm: float = 0.85         # cuBLAS: fraction of the tensor peak
    mem: float = 0.85          # fraction of DRAM bandwidth (every kernel's bytes)
    attn: float = 0.6          # FA2-class attention: fraction of the tensor peak for its MMAs
    triton_gemm: float = 0.7   # vit_fast's Triton GEMM, relative to cuBLAS (assumed)
    gap_us: float = 1.0        # per kernel (assumed)


FITTED_FIELDS = ("gemm", "mem", "attn")

# What backs each efficiency the model uses (issue 29: a kernel's efficiency is backed by its
# SASS figures or by a library that delivers it).
EFFICIENCY_SOURCES = {
    "gemm": "cuBLAS (through torch: eager, torch.compile's extern mm, vit_fast_cublas): fitted on "
            "timm's RTX 4090 rows; the library delivers it",
    "attn": "FA2-class attention (PyTorch's flash SDPA): fitted on the RTX 4090 rows; vit_fast's "
            "own attention kernels are charged the same fraction: their sm_90 SASS has the same "
            "MUFU.EX2 per score (1.03-1.06, README attention_fwd_study), HGMMA on the tile loop",
    "mem": "every kernel's bytes (aten, Inductor and vit_fast's Triton memory-bound kernels): "
           "fitted on the RTX 4090 rows; vit_fast's LayerNorm/GELU/epilogue builds use <= 128 "
           "registers, 0 spills (compile-check), enough occupancy to stream",
    "triton_gemm": "NOT backed: vit_fast's pointer-load Triton GEMM relative to cuBLAS, issue "
                   "17's estimate (0.7x on H100); no SASS figure bounds it (the hot loop's HGMMA "
                   "count is right; its losses are latency and per-tile prologue, not instruction "
                   "counts) and no GPU has measured it",
    "gap_us": "assumed: 1 µs of GPU time per kernel beyond its roofline time (not fittable: "
              "0.3% of the smallest published step)",
}


# The committed fit (predict_fit.py makes it: `predict --calibrate` says whether it still holds).
FITTED = {"gemm": 1.063, "mem": 1.026, "attn": 0.442}


def _fitted_default():
    return Efficiency(**FITTED)


@dataclasses.dataclass
class StepArrays:
    """One step's kernels as arrays (fixed per configuration; times depend on Efficiency)."""
    flops: np.ndarray
    bytes: np.ndarray
    kind: np.ndarray
    scores: np.ndarray       # exp2 count of attention kernels (padded tiles), else 0
    mma_scale: np.ndarray    # attention: padded / exact tensor work, else 1
    waves: np.ndarray        # GEMMs: wave efficiency, else 1
    host_us: np.ndarray      # host µs spent before each kernel is issued
    names: list
    segments: list


def _padded(n, tile):
    return math.ceil(n / tile) * tile


def step_arrays(impl, s, batch, mode, gpu, host_costs, assume, attention="flash",
                foreach=True, precision="amp", segments=None) -> StepArrays:
    """``segments``: the step's kernels when not predict_ops.step_segments' (what-if variants,
    predict_plan.py); their host cost is ``impl``'s."""
    segs = segments or predict_ops.step_segments(impl, s, batch, mode, attention=attention,
                                                 foreach=foreach, precision=precision)
    precision = "amp" if precision == "amp" else "bf16"  # host costs: AMP, or a plain l dtype
    key_fwd = ("inference", precision) if mode == "infer" else ("forward", precision)
    cost_fwd = host_costs[key_fwd]
    cost_all = host_costs[("fwd+bwd", precision)]
    flops, nbytes, kinds, scores, scale, waves, host, names = [], [], [], [], [], [], [], []
    for seg in segs:
        n = len(seg.ops)
        if seg.part == "block_fwd":
            per = predict_host.block_host_us(impl, cost_fwd, n, assume) / n
        elif seg.part == "block_bwd":
            bwd = dataclasses.replace(
                cost_all, eager_us=cost_all.eager_host_us - cost_fwd.eager_host_us,
                vit_fast_us=cost_all.vit_fast_host_us - cost_fwd.vit_fast_host_us,
                eager_host_share=1.0, vit_fast_host_share=1.0, host_instruction_ratio=None,
                triton_launches=max(cost_all.triton_launches - cost_fwd.triton_launches, 0),
                direct_launches=max(cost_all.direct_launches - cost_fwd.direct_launches, 0))
            per = predict_host.block_host_us(impl, bwd, n, assume) / n
        else:
            per = predict_host.per_op_us(impl, cost_fwd, assume)
        for op in seg.ops:
            if op.kind not in KIND_CODES:
                raise ValueError(f"{op.name}: kernel class {op.kind!r} has no time model")
            code = KIND_CODES[op.kind]
            sc, ms, w = 0.0, 1.0, 1.0
            if code == KIND_CODES["attention"] and op.dims:
                bh, n_tok, _ = op.dims
                padded = bh * _padded(n_tok, ATTN_BM) * _padded(n_tok, ATTN_BN)
                sc, ms = float(padded), padded / (bh * n_tok * n_tok)
            elif code in (1, 2) and op.dims:
                M, N = op.dims[0], op.dims[1]
                tiles = math.ceil(M / TILE_M) * math.ceil(N / TILE_N)
                w = tiles / (math.ceil(tiles / gpu.sms) * gpu.sms)
            flops.append(op.flops)
            nbytes.append(op.bytes)
            kinds.append(code)
            scores.append(sc)
            scale.append(ms)
            waves.append(w)
            host.append(per)
            names.append(op.name)
    return StepArrays(np.array(flops, float), np.array(nbytes, float), np.array(kinds),
                      np.array(scores), np.array(scale), np.array(waves), np.array(host), names,
                      segs)


def kernel_times(a: StepArrays, gpu, eff: Efficiency) -> np.ndarray:
    """Seconds per kernel on ``gpu`` (no host term)."""
    peak, bw = gpu.tensor_flops * gpu.sustained, gpu.mem_bytes_s * eff.mem
    frac = np.select([a.kind == 1, a.kind == 2, a.kind == 3],
                     [eff.gemm, eff.gemm * eff.triton_gemm, eff.attn], 1.0)
    compute = np.where(a.kind == 0, 0.0, a.flops * a.mma_scale / (peak * frac))
    compute = compute + a.scores / gpu.mufu_per_s
    memory = a.bytes / bw
    return np.maximum(compute, memory) / a.waves + eff.gap_us * 1e-6


def simulate(a: StepArrays, gpu, eff: Efficiency, assume) -> dict:
    """Step time with the host issuing kernels in order (see the module docstring)."""
    g = kernel_times(a, gpu, eff)
    G = np.cumsum(g)
    H = np.cumsum(a.host_us) * 1e-6
    G_before = np.concatenate(([0.0], G[:-1]))
    wait = max(0.0, float(np.max(H - G_before)))
    end = float(G[-1]) + wait
    return {"step_s": end + assume.sync_us * 1e-6, "gpu_busy_s": float(G[-1]),
            "host_s": float(H[-1]), "gpu_idle_s": wait, "kernels": len(g),
            "host_bound": float(H[-1]) > float(G[-1])}


def breakdown(a: StepArrays, gpu, eff: Efficiency) -> dict:
    """GPU seconds per kernel class (GEMM, attention, memory-bound, gaps)."""
    g = kernel_times(a, gpu, eff) - eff.gap_us * 1e-6
    return {"gemm": float(g[(a.kind == 1) | (a.kind == 2)].sum()),
            "attention": float(g[a.kind == 3].sum()),
            "memory-bound": float(g[a.kind == 0].sum()),
            "gaps": eff.gap_us * 1e-6 * len(g)}


def predict(gpu, model, batch, mode, impls=predict_ops.IMPLS, *, img_size=224, eff=None,
            assume=None, host_costs=None, attention="flash", foreach=True,
            precision="amp") -> list:
    """[{impl, img_per_s, step_ms, gpu_busy_ms, host_ms, host_bound, kernels, breakdown_ms}] for
    one configuration (AMP, the timm benchmark's step: inference forward, or forward + backward +
    SGD). ``gpu``: a key of gpu_peaks.GPUS or a Gpu."""
    g = gpu_peaks.get(gpu) if isinstance(gpu, str) else gpu
    s = predict_ops.shape(model, img_size)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    eff = eff or _fitted_default()
    assume = assume or predict_host.HostAssumptions()
    host_costs = host_costs or predict_host.load()[0]
    rows = []
    for impl in impls:
        a = step_arrays(impl, s, batch, mode, g, host_costs, assume,
                        attention=attention if impl == "eager" else "flash", foreach=foreach,
                        precision=precision)
        r = simulate(a, g, eff, assume)
        rows.append({"gpu": g.key, "model": model, "img_size": img_size, "batch": batch,
                     "mode": mode, "precision": precision, "impl": impl,
                     "img_per_s": batch / r["step_s"],
                     "step_ms": r["step_s"] * 1e3, "gpu_busy_ms": r["gpu_busy_s"] * 1e3,
                     "host_ms": r["host_s"] * 1e3, "gpu_idle_ms": r["gpu_idle_s"] * 1e3,
                     "host_bound": r["host_bound"], "kernels": r["kernels"],
                     "breakdown_ms": {k: v * 1e3 for k, v in breakdown(a, g, eff).items()}})
    return rows
