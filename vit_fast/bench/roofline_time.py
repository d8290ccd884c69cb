"""How long the roofline model's ops take (vit_fast/bench/roofline.py lists the ops): the GPUs'
datasheet peaks, the achievable fraction of them per kernel class, and :class:`Op`, one kernel's
HBM bytes and FLOPs.

time: max(bytes / (bandwidth·η_mem), FLOPs / (peak·η_class)) per kernel, summed over kernels (no
overlap between kernels, no launch latency); ``achievable=False`` gives the datasheet-peak
roofline. A model, not a measurement.
"""
from __future__ import annotations

import dataclasses

# Peak HBM bandwidth (bytes/s) and dense bf16 tensor-core throughput (FLOP/s) from the datasheets.
HARDWARE = {
    "H100 SXM": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
}

# Achievable fraction of the datasheet peaks per kernel class (model inputs, to be replaced by GPU
# measurements; sources below, read for their reported figures, nothing copied):
# - memory: streaming kernels sustain ~90% of HBM peak (STREAM-type copy/triad results on
#   A100/H100 are ~0.9 of the datasheet figure); applied to every kernel's bytes.
# - attention (FA2-class: ours and PyTorch's flash SDPA, no TMA/warp specialization):
#   FlashAttention-2 (Dao 2023, arXiv:2307.08691) reports 50-73% of peak FLOP/s on A100;
#   FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608) reports FA2 at 35% on H100.
# - attention_fa3: FlashAttention-3 reports 740 TFLOP/s fp16 on H100 SXM, 75% of peak (shown
#   for comparison; neither path here runs FA3).
# - cublas_gemm: 0.75-0.8 of dense peak for bf16 GEMMs of ViT sizes. The FA2 paper calls its
#   50-73% "close to the efficiency of GEMM operations"; NVIDIA's post "New cuBLAS 12.0 Features
#   and Matrix Multiplication Performance on NVIDIA Hopper GPUs" charts H100 GEMM throughput (the
#   figure to check this against; not re-read here). An assumption until the GPU kit measures it.
# - triton_gemm: this repo's non-persistent, pointer-load GEMM relative to cuBLAS: issue 17's
#   review estimates 0.55-0.8x on H100 (0.7 used); Triton's matmul tutorial reports parity with
#   cuBLAS on A100 for an autotuned kernel (0.9 used, the configs here are fixed).
EFFICIENCY = {
    "H100 SXM": {"memory": 0.90, "cublas_gemm": 0.75, "triton_gemm": 0.75 * 0.7,
                 "attention": 0.35, "attention_fa3": 0.75, "elementwise": 1.0},
    "A100": {"memory": 0.90, "cublas_gemm": 0.80, "triton_gemm": 0.80 * 0.9,
             "attention": 0.60, "attention_fa3": 0.60, "elementwise": 1.0},
}
KINDS = ("elementwise", "cublas_gemm", "triton_gemm", "attention", "attention_fa3")


def efficiency_note() -> str:
    """One line per GPU: the achievable fractions the times use (model inputs)."""
    return "\n".join(f"achievable fractions (uncalibrated model inputs; the calibrated whole-model "
                     f"times are `bench predict`'s), {hw}: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in EFFICIENCY[hw].items() if k != "elementwise")
                     for hw in HARDWARE)


@dataclasses.dataclass(frozen=True)
class Op:
    """One kernel launch (or one eager op): bytes read/written from HBM and FLOPs (model), and
    its kernel class (a key of EFFICIENCY's rows), which sets the achievable FLOP/s. ``dims``:
    (M, N, K) of a GEMM, (B·H, N, D) of an attention kernel, () otherwise (the whole-model
    predictor, vit_fast/bench/predict.py, reads tile counts from them)."""
    name: str
    read: int
    write: int
    flops: int = 0
    kind: str = "elementwise"
    dims: tuple = ()

    @property
    def bytes(self) -> int:
        return self.read + self.write

    def time_s(self, hw: str, achievable: bool = True) -> float:
        bw, peak = HARDWARE[hw]
        if achievable:
            eff = EFFICIENCY[hw]
            bw, peak = bw * eff["memory"], peak * eff[self.kind]
        return max(self.bytes / bw, self.flops / peak)


def total(ops) -> Op:
    ops = list(ops)
    return Op("total", sum(o.read for o in ops), sum(o.write for o in ops), sum(o.flops for o in ops))


def time_s(ops, hw: str, achievable: bool = True) -> float:
    return sum(o.time_s(hw, achievable) for o in ops)
