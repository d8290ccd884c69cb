"""The host term of the performance model: how long the CPU takes to launch a step's kernels.

Inputs, per (mode, precision), as :class:`HostCost`: the thread CPU µs of one Block on *this*
machine along the path a GPU takes (timm's eager Block and vit_fast.Block, Triton launches
replaced by counting no-ops), launches per Block, and Triton's Python cost per launch. They are
read from ``benchmarks/results/host-cpu.json`` (written by ``python -m vit_fast.bench host``,
issue 26) when it exists, else from :data:`DEFAULT_HOST` (the lead's quick probe, labelled so).

On the GPU server, per kernel the model charges (see :func:`block_host_us`):
- eager: ``host_speed`` x eager_us spread over the Block's kernels, plus the CUDA driver's launch
  cost per kernel (``launch_us``), which the CPU measurement does not contain;
- vit_fast: ``host_speed`` x (its host µs + triton_launch_us per launch through Triton's
  ``kernel[grid]`` + ``launcher_python_us`` per direct launch) plus ``launch_us`` per kernel;
  its host µs are eager's times the ratio of their callgrind host instructions where the row was
  counted (:attr:`HostCost.host_instruction_ratio`), else its own thread µs times its host share;
  vit_fast_cublas is charged the same Python path;
- compile: Inductor's generated wrapper, ``compile_launch_us`` per kernel, no Python per op;
- stem, head, loss, optimizer: ``host_speed`` x the eager µs per aten op, per kernel.

Assumptions (no published row is host-bound: the smallest published step is ViT-Ti at batch 256,
10.5 ms, so none of these can be fitted; each is a stated input, and ``predict --host-speed``
overrides the first):
- ``host_speed`` 0.6: a GPU server's core (Sapphire Rapids / Genoa class, 3.5-3.8 GHz boost,
  not shared) does this machine's host work (2 shared vCPUs of an AMD EPYC Milan, KVM) in 0.6 of
  its thread CPU time;
- ``launch_us`` 2.5: cudaLaunchKernel's host cost per kernel;
- ``compile_launch_us`` 4.0: per kernel from Inductor's wrapper (its launcher, no dispatcher);
- ``sync_us`` 10: the step's final synchronize (timm's benchmark syncs every step);
- ``launcher_python_us`` 1.0: what a direct launch (kernels/direct_launch.py) still runs in Python
  on this machine per launch -- Triton's compiled-kernel launcher wrapper (its scratch-buffer
  checks) before the C launch -- which needs the CUDA driver, so it cannot be measured here.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

HOST_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "host-cpu.json"
HOST_MODES = ("forward", "fwd+bwd", "inference")
PRECISIONS = ("fp32", "bf16", "amp")


@dataclasses.dataclass(frozen=True)
class HostCost:
    """Per Block, one (mode, precision), thread CPU µs on the machine that measured it."""
    eager_us: float
    vit_fast_us: float
    triton_launches: int
    aten_ops_eager: int
    aten_ops_vit_fast: int
    triton_launch_us: float
    # The share of each side's instructions (callgrind) that is host work: the CPU also computes
    # the GEMMs and the attention that a GPU runs as kernels (bench host's CPU_COMPUTE); its
    # thread µs are scaled by this share. 1.0 where the row was not counted.
    eager_host_share: float = 1.0
    vit_fast_host_share: float = 1.0
    # Of triton_launches, those made past Triton's launch path (kernels/direct_launch.py): they
    # pay the compiled launcher's Python wrapper instead of triton_launch_us.
    direct_launches: int = 0
    # vit_fast's host instructions over eager's (callgrind, less the CPU's compute), where the
    # row was counted: vit_fast's host µs are then eager's times this ratio. Instruction counts
    # do not vary; two sides' thread µs on a shared machine do (IQRs up to ±96% in one saved
    # run), so one noisy figure instead of two, and the ratio between them is the counted one.
    host_instruction_ratio: float | None = None

    @property
    def eager_host_us(self) -> float:
        return self.eager_us * self.eager_host_share

    @property
    def vit_fast_host_us(self) -> float:
        if self.host_instruction_ratio is not None:
            return self.eager_host_us * self.host_instruction_ratio
        return self.vit_fast_us * self.vit_fast_host_share


@dataclasses.dataclass(frozen=True)
class HostAssumptions:
    host_speed: float = 0.6
    launch_us: float = 2.5
    compile_launch_us: float = 4.0
    sync_us: float = 10.0
    launcher_python_us: float = 1.0


# The lead's quick probe (issue 26; CPU thread time, one Block at tiny widths, sm_90 path, Triton
# launches as counting no-ops): eager ~1100 µs fp32 and ~2250 µs AMP for forward+backward,
# vit_fast 3.5x / 2.7x that with 16 / 19 Triton launches, ~15 µs of Triton's Python per launch.
# Forward and inference are not in the probe: taken as 0.4 and 0.3 of forward+backward for both
# (assumed; an autograd backward is dispatched from C++ and costs less per op than the Python
# forward). Kernels per eager Block: this model's op lists (bench roofline's launches column:
# AMP 20 forward, 56 fwd+bwd with the weight casts; fp32/bf16 10 and 34). bf16 (no autocast) is
# not in the probe: taken as fp32's (the same path, another dtype).
_PROBE = {"fp32": (1100.0, 3.5, 16), "bf16": (1100.0, 3.5, 16), "amp": (2250.0, 2.7, 19)}
_SHARE = {"fwd+bwd": 1.0, "forward": 0.4, "inference": 0.3}
_ATEN_EAGER = {"amp": {"fwd+bwd": 56, "forward": 20, "inference": 20},
               "fp32": {"fwd+bwd": 34, "forward": 10, "inference": 10}}


def _default(mode, precision) -> HostCost:
    eager, ratio, launches = _PROBE[precision]
    share = _SHARE[mode]
    return HostCost(eager * share, eager * ratio * share,
                    launches if mode == "fwd+bwd" else max(1, round(launches * 0.4)),
                    _ATEN_EAGER["amp" if precision == "amp" else "fp32"][mode], 0, 15.0)


DEFAULT_HOST = {(m, p): _default(m, p) for m in HOST_MODES for p in PRECISIONS}
DEFAULT_LABEL = ("default (lead's quick probe of issue 26, not the final `bench host` command; "
                 "forward/inference shares assumed)")


def load(path=None) -> tuple:
    """({(mode, precision): HostCost}, label): from the host benchmark's JSON when present.

    The JSON: {"command": str, "rows": [{"mode": one of HOST_MODES, "precision": "fp32"|"amp",
    "eager_us", "vit_fast_us", "triton_launches", "aten_ops_eager", "aten_ops_vit_fast",
    "triton_launch_us", "shape", ...}, ...], "instructions": {"shape/precision/mode": {"eager":
    {"total", "cpu_compute"}, "vit_fast": {...}}}}; missing (mode, precision) pairs keep their
    defaults; a row with both sides' instructions gets their host ratio."""
    path = Path(path) if path is not None else HOST_JSON
    if not path.exists():
        return dict(DEFAULT_HOST), DEFAULT_LABEL
    data = json.loads(path.read_text())
    costs = dict(DEFAULT_HOST)
    fields = [f.name for f in dataclasses.fields(HostCost)]
    for row in data.get("rows", []):
        key = (row["mode"], row["precision"])
        if key not in costs:
            raise ValueError(f"{path}: mode/precision {key} not in {HOST_MODES} x {PRECISIONS}")
        costs[key] = HostCost(**{f: row[f] for f in fields if f in row},
                              host_instruction_ratio=_instruction_ratio(data, row))
    return costs, f"measured: {path.name} ({data.get('command', 'python -m vit_fast.bench host')})"


def _instruction_ratio(data, row):
    """vit_fast's host instructions over eager's for the row (None where not counted)."""
    counted = data.get("instructions", {}).get(
        f"{row.get('shape')}/{row['precision']}/{row['mode']}")
    if not counted or not {"eager", "vit_fast"} <= counted.keys():
        return None
    eager, ours = ((c["total"] - c["cpu_compute"]) for c in (counted["eager"], counted["vit_fast"]))
    return ours / eager if eager > 0 else None


def block_host_us(impl, cost: HostCost, kernels: int, a: HostAssumptions) -> float:
    """Host µs per Block (one mode) on the GPU server for ``impl`` launching ``kernels``."""
    if impl == "compile":
        return kernels * a.compile_launch_us
    if impl == "eager":
        return a.host_speed * cost.eager_host_us + kernels * a.launch_us
    if impl in ("vit_fast", "vit_fast_cublas"):
        return a.host_speed * python_us(cost, a) + kernels * a.launch_us
    raise ValueError(f"impl {impl!r} has no host model")


def python_us(cost: HostCost, a: HostAssumptions) -> float:
    """vit_fast's Python per Block on the machine that measured it: its own host work (less the
    CPU's compute), Triton's launch path for each launch through ``kernel[grid]``, and the
    compiled launcher's Python wrapper for each direct one."""
    through_triton = cost.triton_launches - cost.direct_launches
    return (cost.vit_fast_host_us + through_triton * cost.triton_launch_us
            + cost.direct_launches * a.launcher_python_us)


def per_op_us(impl, cost: HostCost, a: HostAssumptions) -> float:
    """Host µs per kernel outside the Blocks (stem, head, loss, optimizer): eager's µs per aten
    op; Inductor's launch cost for a compiled model."""
    if impl == "compile":
        return a.compile_launch_us
    return a.host_speed * cost.eager_host_us / max(cost.aten_ops_eager, 1) + a.launch_us
