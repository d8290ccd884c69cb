"""Calibration of the performance model (predict.py) on timm's published benchmark rows.

Rows: benchmarks/results/timm-published.csv, copied from the ``results/`` folder of the timm
repository (huggingface/pytorch-image-models; each row names its source file and the commit it
was read at). timm's ``benchmark.py`` runs them: AMP (fp16 autocast, fp32 weights), inference
under ``torch.inference_mode`` with a synchronize per step; training: forward, cross-entropy,
backward, SGD (momentum 0.9, weight decay 1e-4). ``-dynamo`` files are ``torch.compile`` (Inductor,
default mode). Sets:
- ``fit``: the RTX 4090 rows (torch 2.9.1), the only rows the fit sees;
- ``check``: RTX 5090 and RTX PRO 6000 Max-Q inference (torch 2.9.1), RTX 3090 training
  (torch 1.12: timm's softmax attention with its N×N tensors, a per-tensor SGD): predicted with
  the 4090's fit, never refitted;
- ``extra``: the RTX 4090 rows of torch 2.4.0 (compile at batch 256), also not fitted.

The fit: the three FITTED_FIELDS of predict.Efficiency (gemm, mem, attn) minimizing the sum of
squared log errors of img/s over the ``fit`` rows, by Nelder-Mead on the logit of each field
within (0.05, 1.5), from a fixed start, then restarted once from its result: deterministic.
:data:`FITTED` holds its result as committed; ``predict --calibrate`` refits and says whether it
is still the same, and the test suite checks that it is a minimum (each field moved 1% costs).
Fractions above 1 are allowed: they are fractions of datasheet (or measured-matmul) rates that a
card's clocks and the L2 can beat.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np

from . import gpu_peaks, predict, predict_host, predict_ops

PUBLISHED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "timm-published.csv"
SETS = ("fit", "check", "extra")

# python -m vit_fast.bench predict --calibrate --refit (see README "Performance model")
FITTED = predict.FITTED  # the committed fit (kept in predict.py, which uses it)


@dataclasses.dataclass(frozen=True)
class Row:
    source_file: str
    gpu: str
    torch: str
    mode: str
    impl: str
    model: str
    img_size: int
    batch: int
    img_per_s: float
    set: str

    @property
    def attention(self) -> str:  # timm used SDPA (flash) from torch 2.0 on
        return "flash" if int(self.torch.split(".")[0]) >= 2 else "math"

    @property
    def foreach(self) -> bool:  # torch's SGD went multi-tensor by default in 2.0
        return int(self.torch.split(".")[0]) >= 2


def published(path=None) -> list:
    with open(path or PUBLISHED, newline="") as f:
        return [Row(r["source_file"], r["gpu"], r["torch"], r["mode"], r["impl"], r["model"],
                    int(r["img_size"]), int(r["batch"]), float(r["img_per_s"]), r["set"])
                for r in csv.DictReader(f)]


def _arrays(rows, host_costs, assume):
    out = []
    for r in rows:
        g = gpu_peaks.get(r.gpu)
        s = predict_ops.shape(r.model, r.img_size)
        a = predict.step_arrays(r.impl, s, r.batch, r.mode, g, host_costs, assume,
                                attention=r.attention if r.impl == "eager" else "flash",
                                foreach=r.foreach)
        out.append((r, g, a))
    return out


def evaluate(rows=None, eff=None, assume=None, host_costs=None) -> list:
    """[{row, predicted img/s, error (predicted / published - 1), host_bound}] for every row."""
    rows = published() if rows is None else rows
    eff = eff or predict.Efficiency(**FITTED)
    assume = assume or predict_host.HostAssumptions()
    host_costs = host_costs or predict_host.load()[0]
    out = []
    for r, g, a in _arrays(rows, host_costs, assume):
        sim = predict.simulate(a, g, eff, assume)
        ips = r.batch / sim["step_s"]
        out.append({"row": r, "predicted": ips, "error": ips / r.img_per_s - 1,
                    "host_bound": sim["host_bound"]})
    return out


# --- the fit ---------------------------------------------------------------------------------

_BOUNDS = {"gemm": (0.05, 1.5), "mem": (0.05, 1.5), "attn": (0.05, 1.5)}


def _to_x(v: dict) -> np.ndarray:
    x = []
    for k in predict.FITTED_FIELDS:
        lo, hi = _BOUNDS[k]
        u = (v[k] - lo) / (hi - lo)
        x.append(math.log(u / (1 - u)))
    return np.array(x)


def _from_x(x) -> dict:
    v = {}
    for k, xi in zip(predict.FITTED_FIELDS, x):
        lo, hi = _BOUNDS[k]
        v[k] = lo + (hi - lo) / (1 + math.exp(-xi))
    return v


def _nelder_mead(f, x0, step=0.5, iters=400, tol=1e-10):
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] < tol:
            break
        centroid = np.mean(pts[:-1], axis=0)
        refl = centroid + (centroid - pts[-1])
        fr = f(refl)
        if fr < vals[0]:
            exp = centroid + 2 * (centroid - pts[-1])
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def loss(v: dict, prepared, assume) -> float:
    eff = predict.Efficiency(**v)
    total = 0.0
    for r, g, a in prepared:
        ips = r.batch / predict.simulate(a, g, eff, assume)["step_s"]
        total += math.log(ips / r.img_per_s) ** 2
    return total


def fit(rows=None, assume=None, host_costs=None, start=None) -> dict:
    """The fitted fields on the ``fit`` rows (dict), and nothing else of the rows."""
    rows = [r for r in (published() if rows is None else rows) if r.set == "fit"]
    assume = assume or predict_host.HostAssumptions()
    host_costs = host_costs or predict_host.load()[0]
    prepared = _arrays(rows, host_costs, assume)
    start = start or {"gemm": 0.8, "mem": 0.8, "attn": 0.5}
    x, _ = _nelder_mead(lambda x: loss(_from_x(x), prepared, assume), _to_x(start))
    x, _ = _nelder_mead(lambda x: loss(_from_x(x), prepared, assume), x, step=0.1)  # restart
    return {k: round(v, 3) for k, v in _from_x(x).items()}


def summary(results) -> dict:
    """Median and worst |error| per (set, impl), and the compile/eager ratio per model and GPU."""
    out = {}
    for st in SETS:
        for impl in ("eager", "compile"):
            errs = [abs(x["error"]) for x in results
                    if x["row"].set == st and x["row"].impl == impl]
            if errs:
                out[(st, impl)] = {"n": len(errs), "median": statistics.median(errs),
                                   "worst": max(errs)}
    return out


def ratios(results) -> list:
    """compile/eager img/s, published and predicted, per (gpu, torch, model) with both rows and
    the same batch (the torch 2.4.0 rows differ: eager 1024, compile 256; their ratio is shown
    all the same, marked)."""
    by = {}
    for x in results:
        r = x["row"]
        by.setdefault((r.gpu, r.torch, r.model, r.set), {})[r.impl] = x
    out = []
    for (gpu, torch, model, st), d in by.items():
        if "eager" in d and "compile" in d:
            pub = d["compile"]["row"].img_per_s / d["eager"]["row"].img_per_s
            pred = d["compile"]["predicted"] / d["eager"]["predicted"]
            out.append({"gpu": gpu, "torch": torch, "model": model, "set": st,
                        "published": pub, "predicted": pred, "diff": pred - pub,
                        "same_batch": d["compile"]["row"].batch == d["eager"]["row"].batch})
    return out
