"""``python -m vit_fast.bench gpu-check --out DIR [--quick] [--dry-run]``: the GPU acceptance kit.

One command for the few minutes a bare GPU machine is lent: it proves (or disproves) vit_fast there
and leaves everything it saw in DIR. Steps, each with a time budget, each writing DIR/results.json
and DIR/summary.md again as soon as it ends (a run cut off still leaves its data):

1. environment  GPU name, SM count, capability, driver; torch/triton/timm/numpy/nvcc versions
2. install      `pip install --no-deps --no-build-isolation -e .` on the machine's own torch/timm,
                the extension built for the GPU's arch (checked with cuobjdump), an import probe
3. tests        `pytest -m cuda tests/cuda` with the compiled kernels (junit: pytest-junit.xml),
                each test's kernel step again after its warm-up under sync-debug mode "error"
                (VIT_FAST_SYNC_CHECK=1, tests/cuda/sync_check.py): the host syncs it finds
4. ops          per-op forward and forward+backward times vs the eager ops (and SDPA)
5. models       ViT-S/B/L AMP bf16 training step and inference vs timm eager and torch.compile;
                a packed NaViT batch vs vit-pytorch eager (bench/navit.py; skipped without vit-pytorch)
6. report       plot.png (matplotlib, if installed); the profiler trace comes from step 5

Budgets are ceilings: time an earlier step leaves unused goes to the later ones. A step that
runs past its budget is stopped (pytest by SIGINT, so its report is still written);
a step that cannot start in what is left of the total budget is skipped; both are listed in
summary.md under "Not done". Steps 4 and 5 run in their own interpreter (started after the
install, so they import what it built) with their budget as a timeout.

--dry-run runs every step on CPU at tiny sizes (kernels under the Triton interpreter) and skips
the real pip install, so CI checks the kit itself. Without --dry-run and without a CUDA GPU it
refuses (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import gpu_check_report as report
from . import gpu_check_setup as setup

# name -> (budget s default, budget s with --quick). Totals 465 s and 170 s: with the interpreter's
# start (importing torch and timm before main) and a stopped step's wind-down (SIGINT, at most
# 10 s) the run fits 8 minutes, the extension build included, and --quick 3 minutes.
STEPS = {"environment": (20, 10), "install": (150, 95), "tests": (120, 30), "ops": (60, 15),
         "models": (105, 15), "report": (10, 5)}
TOTAL_S = {False: 465, True: 170}
MIN_START_S = 8  # a step is not started with less than this left of the total


def parser():
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench gpu-check",
                                description="GPU acceptance kit: environment, install, cuda tests, "
                                "per-op and whole-model timings; results in --out.")
    p.add_argument("--out", required=True,
                   help="directory for summary.md, results.json, plot, trace, logs")
    p.add_argument("--quick", action="store_true", help="the 3-minute version (fewer shapes and rounds)")
    p.add_argument("--dry-run", action="store_true",
                   help="on CPU at tiny sizes under the Triton interpreter, no pip install: "
                   "checks the kit")
    p.add_argument("--budget", type=float, help="total seconds (default 465, --quick 170)")
    p.add_argument("--skip", action="append", default=[], choices=list(STEPS),
                   help="leave out a step (repeatable); it is listed as not done")
    p.add_argument("--step", choices=("ops", "models"), help=argparse.SUPPRESS)  # child process
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return p


def no_gpu_message():
    import torch
    return (f"gpu-check: no CUDA GPU found (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU machine, "
            "or pass --dry-run to check the kit on CPU.")


def main(argv):
    started = time.time()  # the budget counts from here (`python -m vit_fast.bench` took ~5 s before)
    args = parser().parse_args(argv)
    if args.step:
        return _child(args)
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print(no_gpu_message(), file=sys.stderr)
        return 2
    kit = Kit(args, argv, started)
    kit.run()
    print(f"gpu-check: {kit.out / 'summary.md'}", flush=True)
    return 0 if kit.ok() else 1


def _child(args):
    from . import gpu_check_bench as bench
    out, device = Path(args.out), "cpu" if args.dry_run else "cuda"
    run = bench.run_ops if args.step == "ops" else bench.run_models
    run(out, device, args.quick, args.dry_run, args.deadline)
    return 0


class Kit:
    def __init__(self, args, argv, started):
        self.args, self.out = args, Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.total = args.budget or TOTAL_S[args.quick]
        self.t0 = started
        self.res = {"kit": {"command": "python -m vit_fast.bench gpu-check " + " ".join(argv),
                            "quick": args.quick, "dry_run": args.dry_run, "budget_s": self.total,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.t0)),
                            "budgets_s": {n: b[args.quick] for n, b in STEPS.items()}},
                    "steps": {}, "artifacts": {}}

    def ok(self):
        s = self.res["steps"]
        tests = s.get("tests", {}).get("data", {}).get("counts", {})
        install_ok = s.get("install", {}).get("data", {}).get("ok", False)
        return install_ok and not tests.get("failed") and not tests.get("error") and all(
            v["status"].startswith("done") for v in s.values())

    def run(self):
        """Steps in order. A step may use its own budget plus what earlier steps left unused
        (budgets are ceilings, and the timing steps gain most from the spare time), never more
        than is left of the total less the report's share."""
        end = self.t0 + self.total
        spare = 0.0  # sum of earlier budgets minus the time those steps took
        for name, budgets in STEPS.items():
            budget = budgets[self.args.quick]
            left = end - time.time()
            if name in self.args.skip:
                self._record(name, "not run (--skip)", 0, 0)
                continue
            reserve = 0 if name == "report" else STEPS["report"][self.args.quick]
            allowed = min(budget + max(spare, 0.0), left - reserve)
            if name != "report" and allowed < MIN_START_S:
                self._record(name, f"skipped: {left:.0f} s left of the {self.total:.0f} s budget "
                                   f"(the step gets up to {budget} s)", 0, 0)
                continue
            print(f"gpu-check: {name} (up to {allowed:.0f} s)", flush=True)
            t = time.time()
            try:
                status, data = getattr(self, "_" + name)(max(allowed, 1.0))
            except Exception as exc:  # a broken step is reported; the next steps still run
                status, data = f"failed: {type(exc).__name__}: {exc}", {}
            spare += budget - (time.time() - t)
            self._record(name, status, time.time() - t, allowed, data)

    def _record(self, name, status, seconds, budget, data=None):
        self.res["steps"][name] = {"status": status, "seconds": round(seconds, 1),
                                   "budget_s": round(budget), "data": data or {}}
        if data:
            (self.out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
        self.res["artifacts"] = self._artifacts()
        (self.out / "results.json").write_text(json.dumps(self.res, indent=1, default=str))
        (self.out / "summary.md").write_text(report.summary_markdown(self.res))
        print(f"gpu-check: {name}: {status}", flush=True)

    def _artifacts(self):
        names = {"summary.md": "this summary", "results.json": "everything, machine-readable",
                 "pytest-junit.xml": "the cuda tests' junit report",
                 "plot.png": "per-op speedups, model img/s",
                 "trace_train_step.json": "torch.profiler Chrome trace of one vit_fast training step",
                 "profile_top10.txt": "the trace's top-10 ops", "logs": "pip/build/pytest/step output"}
        have = {k: v for k, v in names.items()
                if (self.out / k).exists() or k in ("summary.md", "results.json")}
        have.update({k: v for k, v in self.res.get("artifacts", {}).items() if k not in names})
        return have

    # --- steps: each returns (status, data) ---

    def _environment(self, budget):
        data = setup.environment(self.args.dry_run)
        return "done", data

    def _install(self, budget):
        env = self.res["steps"]["environment"]["data"]
        data = setup.install(self.out, env, self.args.dry_run, budget)
        return ("done" if data["ok"] else "done, with problems (see Install)"), data

    def _tests(self, budget):
        data = setup.run_tests(self.out, self.args.dry_run, self.args.quick, budget)
        if data["timed_out"]:
            return f"stopped at its {budget:.0f} s budget (partial counts kept)", data
        c = data.get("counts", {})
        bad = c.get("failed", 0) + c.get("error", 0)
        syncs = len(data.get("host_syncs", {}).get("syncs", []))
        return (f"done, {bad} failed" + (f" ({syncs} on a host sync)" if syncs else "")
                if bad else "done"), data

    def _child_step(self, name, budget):
        cmd = [sys.executable, "-m", "vit_fast.bench", "gpu-check", "--step", name,
               "--out", str(self.out), "--deadline", str(time.time() + budget - 10)]
        cmd += ["--quick"] * self.args.quick + ["--dry-run"] * self.args.dry_run
        env = dict(os.environ, TRITON_INTERPRET="1" if self.args.dry_run else "0")
        path = self.out / f"{name}.json"
        path.unlink(missing_ok=True)  # an earlier run's rows must not pass for this run's
        rc, sec = setup.run_logged(cmd, self.out / "logs" / f"{name}.log", budget, env)
        data = json.loads(path.read_text()) if path.exists() else {}
        if rc is None:
            return f"stopped at its {budget:.0f} s budget (rows so far kept)", data
        if rc != 0:
            tail = setup.log_tail(self.out / "logs" / f"{name}.log", 3).replace("\n", " / ")
            return f"failed (rc={rc}): {tail}", data
        return "done", data

    def _ops(self, budget):
        return self._child_step("ops", budget)

    def _models(self, budget):
        return self._child_step("models", budget)

    def _report(self, budget):
        why = report.plot(self.res, self.out / "plot.png")
        if why:
            self.res["artifacts"]["plot.png"] = why
        return "done", {"plot": why or "plot.png"}
