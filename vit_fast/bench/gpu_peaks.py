"""The GPUs the performance model knows, in one table: datasheet peaks and where they come from.

Every rate here is a datasheet figure (or follows from one by arithmetic shown in ``derived``), not
a measurement. The model (vit_fast/bench/predict.py) turns them into times with achievable
fractions fitted on published measurements (vit_fast/bench/predict_fit.py).

- ``tc_flops_per_clk_sm``: dense fp16/bf16 tensor-core FLOPs per SM per clock *with fp32
  accumulation* (what cuBLAS, FlashAttention and Triton's ``tl.dot`` use for fp16/bf16 inputs).
  GeForce parts (GA102, AD102, GB202 GeForce) run fp32 accumulation at half their fp16-accumulate
  rate; data-centre and RTX PRO parts at the full rate. Peak = SMs x this x boost clock.
- ``boost_mhz``: the clock the vendor's peak figures are computed at (data-centre parts: the
  clock of the peak TFLOPS figure; GeForce/RTX PRO: the listed boost clock). Sustained clocks
  under a power limit can be lower: the model has no power model, but a card's measured matmul
  (below) carries the clock it holds under its cap (the RTX PRO Max-Q row).
- ``mem_gbs``: DRAM bandwidth, GB/s (10^9 B/s).
- MUFU (exp2) throughput: 16 results per SM per clock on every architecture here (CUDA C
  Programming Guide, "Arithmetic Instructions" throughput table, compute capability 8.x-12.0).
- ``matmul_tflops``: a *measurement*, not a datasheet figure: the best cuBLAS fp16/bf16 GEMM
  (fp32 accumulation) over square sizes, as published per GPU: by default torch.matmul over
  1024-10240 in github.com/zzc0721/torch-performance-test-data, database.md (the median over its
  entries for that exact GPU, 24/32/80 GB originals only); where that database has no entry, a
  GPU names its own source in ``matmul_source`` (the 300 W Max-Q: cublasGemmEx fp16 in / fp32
  accumulate, the same library call torch.matmul makes, best over 512-8192). Its ratio to the
  datasheet peak, ``sustained``, is what the card's clocks (its power limit included) and cuBLAS
  deliver on large GEMMs (GeForce cards boost above the listed clock: > 1; H100: 0.8; the 300 W
  Max-Q: 0.54); the model's tensor rates are the datasheet peak times it, for every GPU. None
  where no measurement is published: 1.0 is used and the rows say so.
"""
from __future__ import annotations

import dataclasses
import statistics

MUFU_PER_CLK_SM = 16
ZZC_SOURCE = ("github.com/zzc0721/torch-performance-test-data database.md (torch.matmul, best of "
              "fp16/bf16 over square sizes 1024-10240, TFLOP/s)")
MAXQ_MATMUL_SOURCE = (
    "github.com/waynehacking8/blackwell-tensorcore-kernels results/bench.csv, 'cublas_tc' rows "
    "(cublasGemmEx fp16 in / fp32 accumulate, CUDA 12.8, 'NVIDIA RTX PRO 6000 Blackwell Max-Q "
    "Workstation Edition'): 140.7, 214.5, 238.6, 229.1 TFLOP/s at 1024, 2048, 4096, 8192 (best "
    "238.6); a second session, results/bench_mma_session.csv: 136.0, 214.9, 237.9, 229.0 (best "
    "237.9); results/mma_ablation.md reproduces 229.0-229.5 at 8192 in five runs, and "
    "results/clock_state_mma_session.txt logs the 300 W cap reached (300.07 W at 1695 MHz)")
MATMUL_SOURCE = ("per GPU: " + ZZC_SOURCE + "; rtx_pro_6000_maxq: " + MAXQ_MATMUL_SOURCE)


@dataclasses.dataclass(frozen=True)
class Gpu:
    key: str                  # the --gpu name
    name: str
    arch: int                 # compute capability x10
    sms: int
    boost_mhz: float
    tc_flops_per_clk_sm: int  # dense fp16/bf16, fp32 accumulation
    mem_gbs: float
    l2_mb: int
    source: str
    matmul_entries: tuple = ()  # measured cuBLAS GEMM TFLOP/s, one per published entry
    matmul_source: str = ZZC_SOURCE  # where matmul_entries come from

    @property
    def matmul_tflops(self):
        return statistics.median(self.matmul_entries) if self.matmul_entries else None

    @property
    def sustained(self) -> float:
        """Measured large-GEMM TFLOP/s / datasheet peak (1.0 where unmeasured)."""
        m = self.matmul_tflops
        return m * 1e12 / self.tensor_flops if m else 1.0

    @property
    def tensor_flops(self) -> float:
        """Dense fp16/bf16 tensor-core FLOP/s with fp32 accumulation (datasheet arithmetic)."""
        return self.sms * self.tc_flops_per_clk_sm * self.boost_mhz * 1e6

    @property
    def mem_bytes_s(self) -> float:
        return self.mem_gbs * 1e9

    @property
    def mufu_per_s(self) -> float:
        return self.sms * MUFU_PER_CLK_SM * self.boost_mhz * 1e6

    def derived(self) -> str:
        return (f"{self.sms} SMs x {self.tc_flops_per_clk_sm} FLOP/clk x {self.boost_mhz:.0f} MHz "
                f"= {self.tensor_flops / 1e12:.1f} TFLOP/s")


GPUS = {g.key: g for g in (
    Gpu("h100", "H100 SXM5 80GB", 90, 132, 1830, 4096, 3350, 50,
        "NVIDIA H100 Tensor Core GPU datasheet: 989.4 dense BF16 TFLOPS (1,979 with sparsity), "
        "3.35 TB/s HBM3 (SXM); Hopper architecture whitepaper: 132 SMs, 50 MB L2",
        (789.24, 783.66)),
    Gpu("a100", "A100 SXM4 80GB", 80, 108, 1410, 2048, 2039, 40,
        "NVIDIA A100 datasheet: 312 dense BF16/FP16 TFLOPS, 2,039 GB/s HBM2e (80GB SXM); Ampere "
        "GA100 whitepaper: 108 SMs, 1410 MHz boost, 40 MB L2", (264.53,)),
    Gpu("rtx3090", "GeForce RTX 3090", 86, 82, 1695, 512, 936, 6,
        "NVIDIA Ampere GA102 GPU architecture whitepaper, RTX 3090 column: 82 SMs, 1695 MHz "
        "boost, 'Peak FP16 Tensor TFLOPS with FP32 Accumulate' 71/142 (dense/sparse), 936 GB/s "
        "GDDR6X, 6 MB L2", (76.34, 76.68, 76.58)),
    Gpu("rtx4090", "GeForce RTX 4090", 89, 128, 2520, 512, 1008, 72,
        "NVIDIA Ada GPU architecture whitepaper, RTX 4090 column: 128 SMs, 2520 MHz boost, "
        "'Peak FP16 Tensor TFLOPS with FP32 Accumulate' 165.2/330.4, 1008 GB/s GDDR6X, 72 MB L2",
        (170.06, 173.31, 162.39, 167.80)),
    Gpu("rtx5090", "GeForce RTX 5090", 120, 170, 2407, 512, 1792, 96,
        "NVIDIA RTX Blackwell GPU architecture whitepaper, RTX 5090 column: 170 SMs, 2407 MHz "
        "boost, FP16 tensor 419 dense TFLOPS with FP16 accumulate (838 sparse, the figure in "
        "reviews), half that with FP32 accumulate on GeForce: 209.5 (the measured matmul, "
        "236-242 TFLOP/s, is above 209.5 and far under 419: the half rate); 1792 GB/s GDDR7, "
        "96 MB L2",
        (236.03, 242.18)),
    Gpu("rtx_pro_6000_maxq", "RTX PRO 6000 Blackwell Max-Q", 120, 188, 2288, 1024, 1792, 128,
        "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition datasheet: 188 SMs, 300 W, "
        "3,511 AI TOPS (FP4, sparse) = 439 dense FP16 TFLOPS; FP32 accumulate at the full rate "
        "on RTX PRO (the 600 W editions measure 410-418 bf16 TFLOP/s in the zzc0721 matmul "
        "table, above the 251 a half rate would allow; on this card an mma.sync probe measures "
        "1023.8 FP32-accumulate FLOP/clk/SM, waynehacking8/blackwell-tensorcore-kernels "
        "results/mma_rate_probe.csv); boost 2288 MHz (listings; 2617 MHz at 600 W); 1792 GB/s "
        "GDDR7, 128 MB L2. Measured matmul (no zzc0721 entry for the 300 W card): "
        "cublasGemmEx at its 300 W cap, best 238.6 and 237.9 TFLOP/s in two sessions (4096^3), 0.54 of the datasheet "
        "rate (waynehacking8/blackwell-tensorcore-kernels, matmul column note)",
        (238.58, 237.93), MAXQ_MATMUL_SOURCE),
)}


def get(key: str) -> Gpu:
    try:
        return GPUS[key]
    except KeyError:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {key!r}") from None


# Words in torch.cuda.get_device_name / nvidia-smi names -> table key (first match wins).
_NAME_KEYS = (("h100", "h100"), ("a100", "a100"), ("rtx 3090", "rtx3090"), ("rtx 4090", "rtx4090"),
              ("rtx 5090", "rtx5090"), ("rtx pro 6000 blackwell max-q", "rtx_pro_6000_maxq"))


def match(device_name) -> str | None:
    """The table key of a device name ('NVIDIA H100 80GB HBM3' -> 'h100'), or None. Variants
    the table does not list (H100 PCIe, 4090 D, the 600 W RTX PRO 6000) are not matched."""
    name = (device_name or "").lower()
    if any(v in name for v in ("pcie", "nvl", "4090 d", "laptop")):
        return None
    for words, key in _NAME_KEYS:
        if words in name:
            return key
    return None
