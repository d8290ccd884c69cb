"""Timing that can be compared across providers: interleaved rounds, device events, medians with
their spread, paired ratios and a noise verdict.

Providers of one comparison are timed in the same run, round by round, in a rotating order, so
load on the machine, clocks and thermal state hit all of them alike. On CUDA each sample is timed
with CUDA events around ``reps`` calls (enough calls for ~1 ms, so launch overhead and event
resolution stay small); on CPU with perf_counter.

Spread: the interquartile range of the samples, and the run-to-run spread: the samples of the
even rounds and of the odd rounds are two runs of the same provider, and their medians differ
by some fraction of the median. A ratio whose distance from 1 is within the two providers'
run-to-run spreads is reported as "within noise" (the same version timed twice differs that much).
"""
from __future__ import annotations

import statistics
import time

import torch

SAMPLE_TARGET_S = 1e-3  # aim for at least this much work per timed sample
MAX_REPS = 100


def _quantile(values, q):
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def measure(fn, device, reps=1):
    """Seconds per call of ``fn``, over ``reps`` back-to-back calls (CUDA events on a GPU)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def reps_for(fn, device):
    """Calls per sample so that a sample lasts about SAMPLE_TARGET_S (1 on CPU: calls are long)."""
    if torch.device(device).type != "cuda":
        return 1
    once = measure(fn, device)
    return max(1, min(MAX_REPS, int(SAMPLE_TARGET_S / max(once, 1e-7)) + 1))


def time_interleaved(fns, device, rounds, warmup=1):
    """{name: [seconds per call, one per round]} for the callables in ``fns``, timed round-robin.

    Round r starts with provider r mod P, so no provider always runs first (after an idle gap)
    or always right after the same neighbour."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    reps = {n: reps_for(fns[n], device) for n in names}
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            samples[n].append(measure(fns[n], device, reps[n]))
    return samples


def summarize(samples):
    """median, q25, q75 (seconds), iqr_rel and run_to_run_rel (fractions of the median), n."""
    med = statistics.median(samples)
    halves = [samples[0::2], samples[1::2]]
    rtr = (abs(statistics.median(halves[0]) - statistics.median(halves[1])) / med
           if all(halves) and med > 0 else float("nan"))
    q25, q75 = _quantile(samples, 0.25), _quantile(samples, 0.75)
    return {"median_s": med, "q25_s": q25, "q75_s": q75,
            "iqr_rel": (q75 - q25) / med if med > 0 else float("nan"),
            "run_to_run_rel": rtr, "n": len(samples)}


def compare(base, other):
    """Speedup of ``other`` over ``base`` (summaries): base median / other median, > 1 is faster,
    with the verdict 'faster', 'slower' or 'within noise'."""
    ratio = base["median_s"] / other["median_s"]
    noise = base["run_to_run_rel"] + other["run_to_run_rel"]
    if noise != noise:  # nan: too few rounds to know the spread
        verdict = "spread unknown"
    elif abs(ratio - 1.0) <= noise:
        verdict = "within noise"
    else:
        verdict = "faster" if ratio > 1 else "slower"
    return {"speedup": ratio, "noise_rel": noise, "verdict": verdict}


def fmt_ratio(c):
    """'1.23x' or '1.01x (within noise ±3%)' for a compare() result."""
    text = f"{c['speedup']:.2f}x"
    if c["verdict"] == "within noise":
        return f"{text} (within noise ±{100 * c['noise_rel']:.0f}%)"
    if c["verdict"] == "spread unknown":
        return f"{text} (spread unknown)"
    return text


def fmt_time(s):
    """A summary's median and IQR as '123.4 µs ±2%'."""
    med = s["median_s"]
    unit, scale = ("ms", 1e3) if med >= 1e-3 else ("µs", 1e6)
    return f"{med * scale:,.1f} {unit} ±{100 * s['iqr_rel'] / 2:.0f}%"


def peak_step_bytes(step, device):
    """Bytes a step allocates above what was allocated before it, at its peak (CUDA; None
    elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
