"""gpu-check step 6: summary.md (rewritten after every step, so a run cut short still has one) and
the PNG plot. Tables come from cli.fmt_table; times are medians of interleaved rounds (timing.py)."""
from __future__ import annotations

import time

from . import timing
from .tables import fmt_table


def _mib(n):
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _header(res):
    kit, env = res["kit"], res["steps"].get("environment", {}).get("data", {})
    lines = [f"# vit_fast GPU check: {env.get('device', '?')}", ""]
    mode = "quick" if kit["quick"] else "default"
    if kit["dry_run"]:
        lines += ["**DRY RUN on CPU**: kernels under the Triton interpreter at tiny sizes. No number "
                  "here is a GPU measurement; the run checks the kit itself.", ""]
    lines += [f"Started {kit['started']} UTC; `{kit['command']}` ({mode} budget "
              f"{kit['budget_s']} s).", ""]
    if env:
        dev = (f"{env.get('device')}, {env.get('sm_count')} SMs, capability {env.get('capability')}, "
               f"{env.get('gpu_memory_gib')} GiB, driver {env.get('driver')}" if env.get("capability")
               else env.get("device"))
        lines += [f"- device: {dev}",
                  f"- versions: python {env.get('python')}, torch {env.get('torch')} (CUDA "
                  f"{env.get('torch_cuda')}), triton {env.get('triton')}, timm {env.get('timm')}, numpy "
                  f"{env.get('numpy')}, nvcc {env.get('nvcc')}, vit_fast commit {env.get('git_commit')}",
                  f"- timm: {env.get('timm_status')}", ""]
    return lines


def _steps(res):
    rows = [{"step": n, **s} for n, s in res["steps"].items()]
    return [fmt_table(rows, [("step", "step"), ("status", "status"),
                             ("seconds", lambda r: f"{r.get('seconds', 0):.0f}"),
                             ("budget s", lambda r: f"{r.get('budget_s', 0):.0f}")]), ""]


def _install(d):
    lines = ["## Install", ""] + [f"- {a}" for a in d.get("actions", [])]
    probe = d.get("probe", {})
    lines.append(f"- vit_fast imported from {probe.get('vit_fast')}; vit_fast.kernels: "
                 f"{probe.get('kernels')}; vit_fast._C loaded: {probe.get('extension')}, with CUDA "
                 f"kernels: {probe.get('extension_cuda')}")
    if d.get("arch_wanted"):
        lines.append(f"- extension archs: {d.get('archs_built')} ({d.get('archs_how')}); this GPU: "
                     f"{d['arch_wanted']}")
    lines += [f"- **problem**: {p}" for p in d.get("problems", [])] or ["- no problem found"]
    return lines + [""]


def _tests(d):
    lines = ["## Tests: `" + d.get("command", "") + "`", ""]
    counts = d.get("counts")
    if not counts:
        return lines + ["No junit report (see logs/pytest.log):", "", "```", d.get("tail", ""),
                        "```", ""]
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                 + f" in {d.get('seconds')} s" + (f"; {d['note']}" if d.get("note") else ""))
    lines.append("")
    rows = [{"file": f, **c} for f, c in d.get("per_file", {}).items()]
    cols = [("file", "file")] + [(k, (lambda k: lambda r: r.get(k, 0))(k))
                                 for k in ("passed", "failed", "error", "skipped")]
    lines += [fmt_table(rows, cols), ""]
    lines += _host_syncs(d.get("host_syncs"))
    for reason, n in d.get("skip_reasons", {}).items():
        lines.append(f"- skipped ({n}): {reason}")
    for f in d.get("failures", [])[:40]:
        lines.append(f"- **{f['kind']}** `{f['test']}`: {f['message']}")
    return lines + [""]


def _host_syncs(h):
    """The host-syncs line: each cuda test's kernel step run again after its warm-up under
    torch.cuda.set_sync_debug_mode("error") (tests/cuda/sync_check.py)."""
    if h is None:
        return []
    if not h["checked"]:
        return ["- host syncs after warm-up: not checked (no test ran its kernels)"]
    if not h["syncs"]:
        return [f"- host syncs after warm-up: none in {h['checked']} tests checked "
                "(torch.cuda.set_sync_debug_mode(\"error\") after each test's warm-up)"]
    lines = [f"- **host syncs after warm-up: {len(h['syncs'])}** in {h['checked']} tests checked "
             "(torch.cuda.set_sync_debug_mode(\"error\") after each test's warm-up):"]
    return lines + [f"  - `{s['test']}`: {s['message'].removeprefix('AssertionError: ')}"
                    for s in h["syncs"]]


def _ops(d):
    lines = [f"## Per-op timings ({d.get('dtype')}, {d.get('device')}): median of {d.get('rounds')} "
             "interleaved rounds, ± half the IQR; speedup = baseline time / provider time", ""]
    rows = []
    for r in d.get("rows", []):
        for p, s in r["providers"].items():
            vs = [f"{timing.fmt_ratio(x)} vs {x['baseline']}" for x in r["ratios"] if x["provider"] == p]
            rows.append({"op": r["op"], "shape": f"{r['shape']} B={r['batch']} N={r['N']}",
                         "mode": r["mode"], "provider": p, "time": timing.fmt_time(s),
                         "speedup": "; ".join(vs) or "baseline"})
    if rows:
        keys = ("op", "shape", "mode", "provider", "time", "speedup")
        lines += [fmt_table(rows, [(k, k) for k in keys]), ""]
    return lines + [f"- skipped: {s}" for s in d.get("skipped", [])] + [""]


_PROVIDER_IMPL = {"timm eager": "eager", "timm compile": "compile", "vit_fast": "vit_fast"}


def predictions(rows, device_name):
    """{(model, mode, batch, provider): img/s} by the calibrated model (vit_fast/bench/predict.py)
    for the AMP rows of a GPU the model's table has; ({}, why) otherwise."""
    from . import gpu_peaks, predict, predict_ops
    key = gpu_peaks.match(device_name)
    if key is None:
        return {}, f"no model row: {device_name!r} is not in vit_fast/bench/gpu_peaks.py"
    out = {}
    for r in rows:
        if r["model"] not in predict_ops.MODELS:
            continue
        for p in r["providers"]:
            if p in _PROVIDER_IMPL:
                got = predict.predict(key, r["model"], r["batch"], r["mode"], (_PROVIDER_IMPL[p],))
                out[(r["model"], r["mode"], r["batch"], p)] = got[0]["img_per_s"]
    return out, f"model: `python -m vit_fast.bench predict --gpu {key}` (AMP, calibrated on " \
                "timm's RTX 4090 rows); measured/model - 1 is the model's error on this GPU"


def _models(d, device_name=None):
    lines = [f"## Whole models ({d.get('precision')}, {d.get('device')}): median of {d.get('rounds')} "
             "interleaved rounds; accuracy of the eval forward vs fp32 timm eager", ""]
    rows = []
    preds, why = predictions(d.get("rows", []), device_name or d.get("device", ""))
    for r in d.get("rows", []) + d.get("navit_rows", []):  # NaViT: baseline vit-pytorch eager
        ratio = {(x["provider"], x["baseline"]): x for x in r["ratios"]}
        eager = "vit-pytorch eager" if "vit-pytorch eager" in r["providers"] else "timm eager"
        for p, s in r["providers"].items():
            def vs(base, p=p):
                return timing.fmt_ratio(ratio[(p, base)]) if (p, base) in ratio else "-"
            pred = preds.get((r["model"], r["mode"], r["batch"], p))
            rows.append({"model": r["model"], "mode": r["mode"], "batch": r["batch"], "provider": p,
                         "img/s": f"{s['img_per_s']:,.1f}", "step": timing.fmt_time(s),
                         "vs eager": vs(eager), "vs timm compile": vs("timm compile"),
                         "model img/s": f"{pred:,.0f}" if pred else "-",
                         "measured/model": f"{100 * (s['img_per_s'] / pred - 1):+.0f}%" if pred else "-",
                         "peak step mem": _mib(s.get("peak_step_bytes")),
                         "max abs err": f"{s['max_abs_err']:.2e}" if "max_abs_err" in s else "-",
                         "top-1 agree": f"{100 * s['top1_agree']:.0f}%" if "top1_agree" in s else "-"})
    if rows:
        keys = ("model", "mode", "batch", "provider", "img/s", "step", "vs eager", "vs timm compile",
                "model img/s", "measured/model", "peak step mem", "max abs err", "top-1 agree")
        lines += [fmt_table(rows, [(k, k) for k in keys]),
                  "", "peak step mem: CUDA memory a step allocates above what is resident before it "
                  "(all providers' weights). vs eager: timm eager, or vit-pytorch's own NaViT for "
                  "the NaViT rows (max abs err: vs that NaViT under the same autocast). " + why, ""]
    return (lines + _host(d.get("host_rows", [])) + [f"- note: {s}" for s in d.get("notes", [])]
            + [f"- skipped: {s}" for s in d.get("skipped", [])] + [""])


def _host(rows):
    """The host side of a training step (gpu_check_host.py): tuning memory, host CPU per step,
    CUDA graphs."""
    lines = []
    for r in rows:
        what = f"{r['model']}, batch {r['batch']}"
        if r["measure"] == "tuning memory":
            lines.append(f"- tuning step ({what}): {_mib(r['first_step_peak_bytes'])} at the first "
                         f"step's peak, {_mib(r['later_step_peak_bytes'])} later: "
                         f"{_mib(r['tuning_extra_bytes'])} extra for {r['tuned_keys']} keys")
        elif r["measure"].startswith("host CPU"):
            lines.append(f"- host CPU per AMP training step ({what}, GPU kept busy): vit_fast "
                         f"{r['vit_fast']:,.0f} µs, timm eager {r['timm eager']:,.0f} µs")
        else:
            s = r["providers"]
            lines.append(f"- CUDA graphs ({what}, make_graphed_callables): eager step "
                         f"{timing.fmt_time(s['eager'])}, graphed {timing.fmt_time(s['graphed'])} "
                         f"({timing.fmt_ratio(r['ratio'])})")
    return lines + ([""] if lines else [])


def _tuning(steps):
    recs = {r["key"]: r for name in ("ops", "models")
            for r in steps.get(name, {}).get("data", {}).get("tuning", [])}
    if not recs:
        return []
    from vit_fast import tuning
    return ["## Measured selection (vit_fast.tuning)", "", "```",
            tuning.format_records(list(recs.values())), "```", ""]


def summary_markdown(res):
    lines = _header(res) + ["## Steps", ""] + _steps(res)
    steps = res["steps"]
    device = steps.get("environment", {}).get("data", {}).get("device")
    for name, render in (("install", _install), ("tests", _tests), ("ops", _ops), ("models", _models)):
        if steps.get(name, {}).get("data"):
            data = steps[name]["data"]
            lines += render(data, device) if name == "models" else render(data)
    lines += _tuning(steps)
    skipped = [f"{n}: {s['status']}" for n, s in steps.items() if not s["status"].startswith("done")]
    lines += ["## Not done", ""] + ([f"- {s}" for s in skipped] or ["- every step ran to the end"])
    lines.append("")
    arts = res.get("artifacts", {})
    lines += ["## Files", ""] + [f"- {k}: {v}" for k, v in arts.items()]
    lines.append(f"\nWritten {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC.")
    return "\n".join(lines) + "\n"


def plot(res, path):
    """plot.png: per-op speedups of vit_fast and model img/s. Returns None, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: matplotlib is not installed ({exc})"
    ops = res["steps"].get("ops", {}).get("data", {}).get("rows", [])
    models = res["steps"].get("models", {}).get("data", {}).get("rows", [])
    if not ops and not models:
        return "no plot: no timing rows"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels, values = [], []
    for r in ops:
        for x in r["ratios"]:
            if x["provider"] == "vit_fast":
                labels.append(f"{r['op']} {r['shape']} {r['mode']} vs {x['baseline']}")
                values.append(x["speedup"])
    ax1.barh(range(len(values)), values)
    ax1.set_yticks(range(len(values)), labels, fontsize=6)
    ax1.axvline(1.0, color="k", lw=0.8)
    ax1.set(xlabel="speedup of vit_fast (baseline time / vit_fast time)", title="per-op")
    names = [f"{r['model'].replace('_patch16_224', '')} {r['mode']} {p}"
             for r in models for p in r["providers"]]
    ips = [s["img_per_s"] for r in models for s in r["providers"].values()]
    ax2.barh(range(len(ips)), ips)
    ax2.set_yticks(range(len(ips)), names, fontsize=6)
    ax2.set(xlabel="img/s", title="whole model")
    device = res["steps"].get("environment", {}).get("data", {}).get("device", "?")
    fig.suptitle(f"vit_fast gpu-check: {device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
