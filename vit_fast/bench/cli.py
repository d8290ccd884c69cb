"""``python -m vit_fast.bench [throughput options]`` and its subcommands.

    python -m vit_fast.bench                      timm eager vs vit_fast table (default: ViT-S/16,
                                                  batch 8, fp32, cpu, infer)
    python -m vit_fast.bench memory               bytes saved for backward, block and model
    python -m vit_fast.bench roofline [--amp]     HBM bytes / FLOPs / roofline time (model)
    python -m vit_fast.bench compile-check        AOT sm_80/sm_90 registers, spills, shared, MMA
    python -m vit_fast.bench gpu-check --out DIR  GPU acceptance kit (gpu_check.py; --dry-run on CPU)
    python -m vit_fast.bench navit                packed NaViT batch: vit-pytorch eager vs vit_fast
    python -m vit_fast.bench predict --gpu h100   whole-model img/s by the calibrated model
                                                  (--calibrate: vs timm's published rows; --plan)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

SUBCOMMANDS = ("memory", "roofline", "compile-check", "results", "gpu-check", "navit", "predict",
               "host")


from .tables import fmt_table  # noqa: E402,F401  (the reports' tables; re-exported)
from .tables import mib as _mib  # noqa: E402,F401


def _csv_list(kind):
    def parse(text):
        return [kind(v) for v in text.split(",") if v]
    return parse


# --- throughput (default command) ---------------------------------------------------------------

def throughput_parser():
    from . import gpu_peaks
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench",
                                description="timm eager vs vit_fast: img/s (interleaved, with "
                                "noise), accuracy, memory; without a GPU also the GPU path's "
                                "counted memory, host cost and the calibrated model's prediction. "
                                "Subcommands: " + ", ".join(SUBCOMMANDS) + " (each has --help).")
    p.add_argument("--model", type=_csv_list(str), default=["vit_small_patch16_224"],
                   help="timm model name(s), comma-separated")
    p.add_argument("--batch", type=_csv_list(int), default=[8], help="batch size(s), comma-separated")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="infer", choices=["infer", "train"],
                   help="infer: eval forward; train: forward + backward + SGD step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=6, help="interleaved timing rounds")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cublas"],
                   help="vit_fast backend policy for the vit_fast rows")
    p.add_argument("--compile", action="store_true", help="also torch.compile each model")
    p.add_argument("--gpu", default="h100", choices=sorted(gpu_peaks.GPUS),
                   help="the GPU the model predicts for (without a GPU; default h100)")
    p.add_argument("--gpu-batch", type=_csv_list(int), default=[64, 256],
                   help="batches of the GPU parts (counted memory: the first; prediction: all)")
    p.add_argument("--measured-only", action="store_true",
                   help="only the measured table (no counted memory, host cost or prediction)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--csv", help="write the rows as CSV here")
    p.add_argument("--plot", help="PNG: throughput vs batch (and peak memory on a GPU)")
    p.add_argument("--profile", help="Chrome trace of vit_fast (first model and batch) + top-10 ops")
    p.add_argument("--no-progress", action="store_true")
    return p


def _measured_title(args, kind):
    return (f"{kind} measured: {args.mode}, {args.dtype}, device={args.device}, "
            f"backend={args.backend}; median of {args.iters} interleaved rounds after "
            f"{args.warmup} warm-up (± half the IQR); 'within noise': inside the noise band "
            "(run-to-run and IQR spread" + (f", at least ±{100 * _cpu_floor():.0f}% on a CPU"
                                            if kind == "CPU" else "") + "); errors vs fp32 timm")


def _cpu_floor():
    from .throughput import CPU_NOISE_FLOOR
    return CPU_NOISE_FLOOR


def _vs_eager(r):
    if r["provider"] == "timm eager":
        return "1.00x"
    text = f"{r['speedup']:.2f}x"
    return (f"{text} (within noise ±{100 * r['noise_rel']:.0f}%)" if r["verdict"] == "within noise"
            else f"{text} {r['verdict']} (noise ±{100 * r['noise_rel']:.0f}%)")


_PROVIDER_IMPL = {"timm eager": "eager", "timm compile": "compile", "vit_fast": "vit_fast"}


def _gpu_predictions(rows, device):
    """{(model, batch, provider): predicted img/s} for measured CUDA rows the model covers (the
    GPU matched by name, bf16/fp16; fp32 rows are not modelled)."""
    import torch

    from . import gpu_peaks, predict, predict_ops
    key = gpu_peaks.match(torch.cuda.get_device_name(torch.device(device)))
    out = {}
    for r in rows:
        impl = _PROVIDER_IMPL.get(r["provider"])
        if (key is None or impl is None or r["dtype"] == "fp32"
                or r["model"] not in predict_ops.MODELS):
            continue
        got = predict.predict(key, r["model"], r["batch"], r["mode"], (impl,),
                              precision=r["dtype"])[0]
        out[(r["model"], r["batch"], r["provider"])] = got["img_per_s"]
    return out, key


def throughput_main(argv):
    import torch

    import vit_fast

    from . import throughput
    args = throughput_parser().parse_args(argv)
    torch.set_grad_enabled(True)
    with vit_fast.use_backend(args.backend):
        rows = throughput.run(args.model, args.batch, args.dtype, args.device, args.mode,
                              args.warmup, args.iters, args.compile, progress=not args.no_progress)
    dev = torch.device(args.device)
    kind = "CPU" if dev.type == "cpu" else dev.type.upper()
    cols = [("model", "model"), ("batch", "batch"), ("provider", "provider"),
            ("img/s", lambda r: f"{r['img_per_s']:.2f}"),
            ("step", lambda r: f"{r['median_s'] * 1e3:,.1f} ms ±{50 * r['iqr_rel']:.0f}%"),
            ("vs timm eager", _vs_eager),
            ("max logit err", lambda r: f"{r['max_logit_err']:.2e}"),
            ("top-1 agree", lambda r: f"{100 * r['top1_agree']:.1f}%")]
    if dev.type == "cuda":
        preds, key = _gpu_predictions(rows, dev)
        cols += [("peak CUDA mem", lambda r: _mib(r["memory_bytes"])),
                 (f"model img/s ({key or 'GPU not in the table'})",
                  lambda r: (f"{preds[(r['model'], r['batch'], r['provider'])]:,.0f}"
                             if (r["model"], r["batch"], r["provider"]) in preds else "-"))]
    print(fmt_table(rows, cols, title=_measured_title(args, kind)))
    from vit_fast import tuning
    if tuning.records():  # what selection by measurement chose (CUDA, backend auto)
        print(tuning.format_records())
    if dev.type == "cpu" and not args.measured_only:
        print()
        print(newcomer_report(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.plot:
        plot(rows, args.plot, kind)
    if args.profile:
        from .profile import profile_step
        ref, models = throughput.build_models(args.model[0], torch.device(args.device),
                                              throughput.DTYPES[args.dtype])
        img = ref.patch_embed.img_size
        images = torch.randn(args.batch[0], 3, img[0], img[1], device=args.device).to(
            throughput.DTYPES[args.dtype])
        labels = torch.zeros(args.batch[0], dtype=torch.long, device=args.device)
        with vit_fast.use_backend(args.backend):
            step = throughput.make_step(models["vit_fast"], args.mode, images, labels)
            step()
            print(f"\nProfile of vit_fast ({args.model[0]}, batch {args.batch[0]}, {args.mode}), "
                  f"trace: {args.profile}")
            print(profile_step(step, args.device, args.profile))
    return 0


def newcomer_report(args):
    """Without a GPU: what vit_fast would do on one, each part labelled (counted, host CPU,
    model). Every figure here is deterministic for a given tree except none: two runs agree."""
    from . import gpu_peaks, predict_ops, throughput
    model, gb = args.model[0], args.gpu_batch
    out = []
    try:
        saved, notes = throughput.counted_saved(model, gb[0])
    except Exception as exc:  # no CUDA build of torch, a missing kernel: say so
        saved, notes = [], [f"saved for backward: not counted ({type(exc).__name__}: {exc})"]
    if saved:
        out.append(fmt_table(saved, [
            ("precision", lambda r: "AMP bf16" if r["amp"] else "bf16"), ("impl", "impl"),
            ("saved for backward", lambda r: _mib(r["bytes"])),
            ("units of B·N·C", lambda r: f"{r['units']:.2f}"),
            ("vs timm", lambda r: f"{r['ratio']:.3f}x")],
            title=f"Counted (fake CUDA tensors: the GPU path's kernels, triton backend): "
                  f"{model}, one block, batch {gb[0]}, training forward"))
    out += [f"note: {n}" for n in notes] + [""]
    hrows, label = throughput.host_rows()
    out.append(fmt_table(hrows, [
        ("mode", "mode"), ("precision", "precision"),
        ("timm eager µs", lambda r: f"{r['eager_us']:,.0f}"),
        ("vit_fast µs", lambda r: f"{r['vit_fast_us']:,.0f}"),
        ("less CPU compute: eager / vit_fast µs",
         lambda r: f"{r['eager_host_us']:,.0f} / {r['vit_fast_host_us']:,.0f}"),
        ("+ launch path µs", lambda r: f"{r['vit_fast_launch_us']:,.0f}"),
        ("vs eager", lambda r: f"{r['ratio']:.2f}x"),
        ("Triton launches", lambda r: f"{r['triton_launches']} ({r['direct_launches']} direct)")],
        title=f"Host CPU per Block (thread CPU time on the machine that measured it, the GPU "
              f"path with Triton launches as no-ops; 'less CPU compute': eager's µs times the "
              f"share of its callgrind instructions outside the CPU's GEMM and attention "
              f"bodies, which a GPU runs as kernels, vit_fast's eager's times the ratio of "
              f"their instructions outside them (counts do not vary, thread µs do); '+ launch path': Triton's launch path per "
              f"launch through kernel[grid], the launcher's Python (assumed 1 µs) per direct "
              f"launch): {label}"))
    out.append("")
    if model not in predict_ops.MODELS:
        out.append(f"Model: no prediction for {model} (known: {', '.join(predict_ops.MODELS)})")
        return "\n".join(out)
    g = gpu_peaks.get(args.gpu)
    pred = throughput.predicted_rows(args.gpu, model, gb)
    base = {(r["mode"], r["batch"], r["impl"]): r["img_per_s"] for r in pred}
    out.append(fmt_table(pred, [
        ("mode", "mode"), ("batch", "batch"), ("impl", "impl"),
        ("img/s", lambda r: f"{r['img_per_s']:,.0f}"),
        ("vs eager", lambda r: f"{r['img_per_s'] / base[(r['mode'], r['batch'], 'eager')]:.2f}x"),
        ("vs compile",
         lambda r: f"{r['img_per_s'] / base[(r['mode'], r['batch'], 'compile')]:.2f}x"),
        ("host ms", lambda r: f"{r['host_ms']:,.1f}"),
        ("GPU busy ms", lambda r: f"{r['gpu_busy_ms']:,.1f}"),
        ("bound", lambda r: "host" if r["host_bound"] else "GPU")],
        title=f"Model (not measured): {model} on {g.name}, AMP bf16 (timm's --amp), calibrated "
              "on timm's published RTX 4090 rows (python -m vit_fast.bench predict --calibrate)"))
    from . import predict, predict_fit, predict_host
    out.append(model_notes(g, predict.Efficiency(**predict_fit.FITTED),
                           predict_host.HostAssumptions(), label))
    return "\n".join(out)


def plot(rows, path, kind):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (model, prov) in sorted({(r["model"], r["provider"]) for r in rows}):
        rs = sorted((r for r in rows if r["model"] == model and r["provider"] == prov),
                    key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        ax1.plot(b, [r["img_per_s"] for r in rs], marker="o", label=f"{model} {prov}")
        if rs[0]["memory_bytes"] is not None:
            ax2.plot(b, [r["memory_bytes"] / 2**20 for r in rs], marker="o",
                     label=f"{model} {prov}")
    ax1.set(xlabel="batch", ylabel="img/s", title=f"throughput ({kind} measured)")
    ax2.set(xlabel="batch", ylabel="MiB", title=f"peak CUDA memory ({kind} measured)"
            if rows[0]["memory_kind"] == "peak_cuda" else "no memory figure on a CPU")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- memory --------------------------------------------------------------------------------------

def memory_main(argv):
    from . import memory
    from .throughput import DTYPES
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench memory",
                                description="Bytes saved for backward (unique storages, parameters "
                                "excluded), per block and per model, timm eager vs vit_fast.")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--method", default="fake-cuda", choices=memory.METHODS,
                   help="fake-cuda: FakeTensorMode CUDA tensors, triton backend forced (what the "
                   "kernels save, no GPU needed); cpu: real CPU tensors, backend auto")
    p.add_argument("--scope", default="block,model", type=_csv_list(str))
    p.add_argument("--verbose", action="store_true", help="list the saved storages")
    p.add_argument("--backend", choices=("triton", "cublas"),
                   default=("cublas" if os.environ.get("VIT_FAST_BACKEND") == "cublas" else "triton"),
                   help="kernel policy forced for fake-cuda counting (default: triton, or "
                   "VIT_FAST_BACKEND=cublas): both save the same tensors")
    p.add_argument("--amp", action="store_true", help="also count AMP training (fp32 params and "
                   "input, autocast to --dtype) beside the pure --dtype rows")
    args = p.parse_args(argv)
    rows, notes = memory.measure(args.model, args.batch, DTYPES[args.dtype], args.method, args.scope,
                                 backend=args.backend)
    if args.amp:
        if args.dtype == "fp32":
            p.error("--amp needs --dtype bf16 or fp16 (the autocast dtype)")
        amp_rows, amp_notes = memory.measure(args.model, args.batch, DTYPES[args.dtype],
                                             args.method, args.scope, amp=True,
                                             backend=args.backend)
        rows, notes = rows + amp_rows, notes + amp_notes
    how = (f"fake CUDA tensors, {args.backend} backend forced; eager SDPA counted as flash"
           if args.method == "fake-cuda" else "CPU, real tensors, backend auto")
    print(fmt_table(rows, [
        ("scope", "scope"), ("impl", "impl"),
        ("precision", lambda r: f"AMP {args.dtype}" if r["amp"] else args.dtype),
        ("saved for backward", lambda r: _mib(r["bytes"])),
        ("units of B·N·C", lambda r: f"{r['units']:.2f}"), ("tensors", "tensors"),
        ("vs timm", lambda r: f"{r['ratio']:.3f}x")],
        title=f"Counted ({how}): {args.model}, batch {args.batch}, {args.dtype}, training forward"))
    for n in notes:
        print("note:", n)
    if args.verbose:
        for r in rows:
            print(f"{r['scope']}/{r['impl']}: {r['shapes']}")
    for amp, target in ((False, 0.65), (True, 0.68)):
        block = {r["impl"]: r for r in rows if r["scope"] == "block" and r["amp"] == amp}
        if "vit_fast" in block and "timm eager" in block:
            print(f"block ratio vit_fast/timm{' (AMP)' if amp else ''} = "
                  f"{block['vit_fast']['ratio']:.3f}x (target <= {target}x)")
    return 0 if rows else 1


# --- roofline ------------------------------------------------------------------------------------

def roofline_main(argv):
    from . import roofline as rl
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench roofline",
                                description="Model (not measured): HBM bytes and FLOPs per kernel of "
                                "one ViT block, vit_fast vs eager PyTorch, and roofline times.")
    p.add_argument("--model", default="vit_base_patch16_224", choices=sorted(rl.VIT_CONFIGS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--layer-scale", action="store_true", help="block with LayerScale (DeiT-3, DINOv2)")
    p.add_argument("--per-kernel", action="store_true", help="list every kernel of the block")
    p.add_argument("--amp", action="store_true", help="also AMP training (fp32 params and stream, "
                   "autocast to --dtype): eager under autocast vs vit_fast's AMP path")
    args = p.parse_args(argv)
    if args.amp and args.dtype == "fp32":
        p.error("--amp needs --dtype bf16 or fp16 (the autocast dtype)")
    C, H, depth, _ = rl.VIT_CONFIGS[args.model]
    N, B = rl.tokens(args.model), args.batch
    e = 4 if args.dtype == "fp32" else 2
    hws = list(rl.HARDWARE)
    head = f"{args.model}, one block, B={B}, N={N}, C={C}, H={H}, {args.dtype}"
    rows = []
    for pass_name, bwd in (("forward", False), ("fwd+bwd", True)):
        ops = {impl: rl.block_ops(impl, B, N, C, H, e, backward=bwd, layer_scale=args.layer_scale)
               for impl in rl.IMPLS}
        for impl, seq in ops.items():
            t = rl.total(seq)
            rows.append({"pass": pass_name, "impl": impl, "kernels": len(seq), "bytes": t.bytes,
                         "flops": t.flops, "precision": args.dtype,
                         **{hw: rl.time_s(seq, hw) for hw in hws}})
    if args.amp:
        rows += _roofline_amp_rows(args, B, N, C, H, e, hws)
    for r in rows:
        base = next(x for x in rows if x["pass"] == r["pass"] and x["impl"] == "eager"
                    and x["precision"] == r["precision"])
        r["ratio"] = r["bytes"] / base["bytes"]
    print(fmt_table(rows, [
        ("pass", "pass"), ("impl", "impl"), *([("precision", "precision")] if args.amp else []),
        ("launches", "kernels"),
        ("HBM bytes (model)", lambda r: _mib(r["bytes"])), ("vs eager", lambda r: f"{r['ratio']:.3f}x"),
        ("GFLOP (model)", lambda r: f"{r['flops'] / 1e9:.1f}")]
        + [(f"{hw} µs (model)", (lambda hw: lambda r: f"{r[hw] * 1e6:.1f}")(hw)) for hw in hws],
        title=f"Model: {head}" + (", LayerScale" if args.layer_scale else "")))
    print(rl.efficiency_note())
    from . import roofline_bound
    print(roofline_bound.report(B, N, C, H, e, layer_scale=args.layer_scale, head=head))
    print(host_term_line(args, B, N, C, H, e))
    seg = []
    for ls in (False, True):
        for impl in ("eager", "vit_fast"):
            for bwd in (False, True):
                t = rl.total(rl.residual_layer_norm_ops(impl, B * N, C, e, layer_scale=ls, backward=bwd))
                seg.append({"ls": "yes" if ls else "no", "impl": impl,
                            "pass": "fwd+bwd" if bwd else "forward", "bytes": t.bytes,
                            "h100": t.bytes / rl.HARDWARE["H100 SXM"][0]})
    for r in seg:
        base = next(x for x in seg if x["ls"] == r["ls"] and x["pass"] == r["pass"] and x["impl"] == "eager")
        r["ratio"] = r["bytes"] / base["bytes"]
    print()
    print(fmt_table(seg, [
        ("LayerScale", "ls"), ("pass", "pass"), ("impl", "impl"),
        ("HBM bytes (model)", lambda r: _mib(r["bytes"])), ("vs eager", lambda r: f"{r['ratio']:.3f}x"),
        ("H100 SXM µs (model)", lambda r: f"{r['h100'] * 1e6:.1f}")],
        title=f"Model: residual (+LayerScale) + LayerNorm segment, fused kernel vs eager "
              f"mul/add/LayerNorm ({head})"))
    if args.per_kernel:
        from . import roofline_amp as ra
        seqs = {impl: rl.block_ops(impl, B, N, C, H, e, backward=True, layer_scale=args.layer_scale)
                for impl in rl.IMPLS}
        if args.amp:
            seqs.update({f"{impl} AMP": ra.block_ops(impl, B, N, C, H, e, backward=True,
                                                     layer_scale=args.layer_scale)
                         for impl in ra.AMP_IMPLS})
        for impl, seq in seqs.items():
            print()
            print(fmt_table(seq, [
                ("kernel", lambda o: o.name), ("read", lambda o: _mib(o.read)),
                ("write", lambda o: _mib(o.write)), ("GFLOP", lambda o: f"{o.flops / 1e9:.2f}"),
                ("H100 µs", lambda o: f"{o.time_s('H100 SXM') * 1e6:.1f}")],
                title=f"Model: {impl} fwd+bwd kernels ({head})"))
    print(f"\nWhole model ({depth} blocks), fwd+bwd of the blocks, H100 SXM (model): "
          + ", ".join(f"{r['impl']}{' AMP' if r['precision'] != args.dtype else ''} "
                      f"{r['H100 SXM'] * depth * 1e3:.2f} ms" for r in rows
                      if r["pass"] == "fwd+bwd"))
    return 0


def host_term_line(args, B, N, C, H, e):
    """The host term of one Block's forward+backward (issue 26): host µs on a GPU server from the
    host benchmark (predict_host.py) against the block's roofline time on H100 SXM."""
    from . import predict_host, predict_ops, roofline as rl
    costs, label = predict_host.load()
    assume = predict_host.HostAssumptions()
    precision = "amp" if args.amp else ("fp32" if e == 4 else "bf16")
    cost = costs[("fwd+bwd", precision)]
    parts = []
    for impl, name in (("eager", "eager"), ("vit_fast", "vit_fast"),
                       ("vit_fast_cublas", "vit_fast cublas")):
        if args.amp:
            ops = predict_ops.block_ops(impl, B, N, C, H, e, backward=True,
                                        layer_scale=args.layer_scale)
        else:
            ops = rl.block_ops(name, B, N, C, H, e, backward=True, layer_scale=args.layer_scale)
        host = predict_host.block_host_us(impl, cost, len(ops), assume)
        gpu = rl.time_s(ops, "H100 SXM") * 1e6
        parts.append(f"{name} {host:,.0f} µs host vs {gpu:,.0f} µs GPU: "
                     + ("host-bound" if host > gpu else "GPU-bound"))
    return (f"Host term (model; one Block fwd+bwd, {precision}, H100 SXM; host per Block: "
            f"{label}; x{assume.host_speed} on a GPU server + {assume.launch_us} µs per launch): "
            + "; ".join(parts))


def _roofline_amp_rows(args, B, N, C, H, e, hws):
    """roofline --amp: eager under autocast and vit_fast's AMP path (bench/roofline_amp.py)."""
    from . import roofline as rl, roofline_amp as ra
    rows = []
    for pass_name, bwd in (("forward", False), ("fwd+bwd", True)):
        for impl in ra.AMP_IMPLS:
            seq = ra.block_ops(impl, B, N, C, H, e, backward=bwd, layer_scale=args.layer_scale)
            t = rl.total(seq)
            rows.append({"pass": pass_name, "impl": impl, "kernels": len(seq), "bytes": t.bytes,
                         "flops": t.flops, "precision": f"AMP {args.dtype}",
                         **{hw: rl.time_s(seq, hw) for hw in hws}})
    return rows


# --- compile-check -------------------------------------------------------------------------------

def compile_check_main(argv):
    from . import compile_check
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench compile-check",
                                description="AOT-compile every shipped kernel config for sm_80/sm_90; "
                                "exit 1 on any spill, failure or missing tensor-core op.")
    p.add_argument("--arch", type=_csv_list(int), default=[80, 90])
    p.add_argument("--match", help="only kernels whose name contains this")
    p.add_argument("--limit", type=int, help="at most this many specs (quick checks)")
    p.add_argument("--summary", action="store_true",
                   help="one row per kernel family and arch (worst case over its configs)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--sass", action="store_true", help="SASS figures per config (bench/sass_report.py)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels defined under the interpreter cannot be compiled: rerun without it.
        env = dict(os.environ, TRITON_INTERPRET="0")
        print("compile-check: TRITON_INTERPRET=1 is set; running in a subprocess without it", flush=True)
        return subprocess.run([sys.executable, "-m", "vit_fast.bench", "compile-check", *argv],
                              env=env).returncode
    if args.sass:
        from . import sass_report
        return sass_report.main(args.arch, args.match, args.limit)
    try:
        rows, missing = compile_check.run(args.arch, args.match, args.limit, not args.no_progress)
    except RuntimeError as exc:
        print(f"compile-check: {exc}")
        return 2
    if args.summary:
        print(fmt_table(compile_check.summarize(rows), [
            ("kernel family", "family"), ("arch", "arch"), ("builds", "builds"),
            ("max regs", "registers"), ("max spill B", "spill_bytes"),
            ("max shared B", "shared_bytes"), ("MMA", "tensor_core_ops"), ("ok", "ok")],
            title=f"AOT compile (no GPU), worst case per family: {len(rows)} builds"))
    else:
        print(fmt_table(rows, [
            ("kernel", "kernel"), ("arch", "arch"), ("regs", "registers"), ("spill B", "spill_bytes"),
            ("shared B", "shared_bytes"), ("MMA", "tensor_core_ops"),
            ("ok", lambda r: "ok" if r["ok"] else ("FAIL " + r["error"]).strip())],
            title=f"AOT compile (no GPU): {len(rows)} builds"))
    for mod, why in missing:
        print(f"not checked: vit_fast.kernels.{mod}: {why}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} builds ok"
          + (f"; {len(bad)} with spills, failures or no tensor-core op in a dot kernel" if bad else ""))
    return 1 if bad or not rows else 0


# --- results: the pytest-benchmark grid's JSON as one table ----------------------------------------

def results_main(argv):
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench results",
                                description="Summarize `pytest benchmarks --benchmark-only`'s JSON.")
    p.add_argument("path", nargs="?", default="benchmarks/results.json")
    args = p.parse_args(argv)
    with open(args.path) as f:
        data = json.load(f)
    rows = [b for b in data["benchmarks"] if "model_GB_per_s" in b.get("extra_info", {})]
    if not rows:
        print(f"{args.path}: no vit_fast grid results in it")
        return 1
    where = rows[0]["extra_info"].get("measured_on", "?")
    print(fmt_table(rows, [
        ("case", "name"), ("batch", lambda b: b["extra_info"]["batch"]),
        ("median ms", lambda b: f"{b['stats']['median'] * 1e3:.2f}"),
        ("img/s", lambda b: f"{b['extra_info']['img_per_s']:.1f}"),
        ("GB/s (model bytes)", lambda b: f"{b['extra_info']['model_GB_per_s']:.2f}"),
        ("TFLOP/s (model FLOPs)", lambda b: f"{b['extra_info']['model_TFLOP_per_s']:.4f}"),
        ("max rel err vs fp32", lambda b: f"{b['extra_info']['max_rel_err']:.1e}")],
        title=f"{where} measured: {data.get('machine_info', {}).get('cpu', {}).get('brand_raw', '')}"))
    return 0


# --- predict: the calibrated performance model ----------------------------------------------------

def predict_parser():
    from . import gpu_peaks, predict_ops
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench predict",
                                description="Model (not measured): whole-model img/s of timm eager, "
                                "torch.compile, vit_fast and vit_fast_cublas on a named GPU, host "
                                "time included; calibrated on timm's published RTX 4090 rows.")
    p.add_argument("--gpu", default="h100", choices=sorted(gpu_peaks.GPUS))
    p.add_argument("--model", type=_csv_list(str), default=["vit_base_patch16_224"],
                   help="timm model name(s): " + ", ".join(predict_ops.MODELS))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=_csv_list(int), default=[64], help="comma-separated")
    p.add_argument("--mode", default="train", choices=predict_ops.MODES,
                   help="infer: forward; train: forward, backward, SGD step (timm's benchmark)")
    p.add_argument("--precision", default="amp", choices=predict_ops.PRECISIONS,
                   help="amp: fp32 weights under autocast (timm's --amp); bf16/fp16: the whole model")
    p.add_argument("--host-speed", type=float, help="GPU server host time / this machine's "
                   "(default 0.6, an assumption: vit_fast/bench/predict_host.py)")
    p.add_argument("--host-json", help="host benchmark JSON (default benchmarks/results/host-cpu.json)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--calibrate", action="store_true",
                   help="every published row (benchmarks/results/timm-published.csv) vs the model")
    p.add_argument("--plan", action="store_true", help="what-if steps of vit_fast's AMP training "
                   "step toward 1.3x eager / 1.1x torch.compile (vit_fast/bench/predict_plan.py)")
    p.add_argument("--gpus", action="store_true", help="the GPU table with its sources")
    return p


def _host_inputs(args):
    from . import predict_host
    costs, label = predict_host.load(args.host_json)
    assume = predict_host.HostAssumptions()
    if args.host_speed is not None:
        if args.host_speed <= 0:
            raise SystemExit("predict: --host-speed must be > 0")
        assume = predict_host.HostAssumptions(host_speed=args.host_speed)
    return costs, label, assume


def _ms(x):
    return f"{x:,.2f}"


def predict_main(argv):
    from . import gpu_peaks, predict, predict_fit
    args = predict_parser().parse_args(argv)
    costs, label, assume = _host_inputs(args)
    eff = predict.Efficiency(**predict_fit.FITTED)
    if args.gpus:
        print(gpu_table())
        return 0
    if args.calibrate:
        print(calibration_report(eff, assume, costs))
        return 0
    g = gpu_peaks.get(args.gpu)
    rows = []
    for model in args.model:
        for batch in args.batch:
            if args.plan:
                print(plan_report(g, model, batch, eff, assume, costs))
                print()
                continue
            try:
                got = predict.predict(g, model, batch, args.mode, eff=eff, assume=assume,
                                      host_costs=costs, img_size=args.img_size,
                                      precision=args.precision)
            except ValueError as exc:
                raise SystemExit(f"predict: {exc}") from None
            rows += got
            base = {r["impl"]: r["img_per_s"] for r in got}
            print(fmt_table(got, [
                ("impl", "impl"), ("img/s", lambda r: f"{r['img_per_s']:,.0f}"),
                ("step ms", lambda r: _ms(r["step_ms"])),
                ("GPU busy ms", lambda r: _ms(r["gpu_busy_ms"])),
                ("host ms", lambda r: _ms(r["host_ms"])),
                ("bound", lambda r: "host" if r["host_bound"] else "GPU"),
                ("vs eager", lambda r: f"{r['img_per_s'] / base['eager']:.2f}x"),
                ("vs compile", lambda r: f"{r['img_per_s'] / base['compile']:.2f}x"),
                ("GEMM ms", lambda r: _ms(r["breakdown_ms"]["gemm"])),
                ("attention ms", lambda r: _ms(r["breakdown_ms"]["attention"])),
                ("memory-bound ms", lambda r: _ms(r["breakdown_ms"]["memory-bound"])),
                ("kernels", "kernels")],
                title=f"Model (not measured): {model}, {args.img_size} px, batch {batch}, "
                      f"{args.mode} ({'AMP' if args.precision == 'amp' else args.precision}), "
                      f"{g.name}"))
            print()
    if not args.plan:
        print(model_notes(g, eff, assume, label))
    if args.json:
        import dataclasses
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "efficiency": dataclasses.asdict(eff), "host": label,
                       "assumptions": dataclasses.asdict(assume)}, f, indent=2)
    return 0


def model_notes(g, eff, assume, host_label):
    from . import predict
    fitted = ", ".join(f"{k} {getattr(eff, k):.3f}" for k in predict.FITTED_FIELDS)
    m = g.matmul_tflops
    lines = [f"GPU: {g.name}: {g.derived()} (datasheet), {g.mem_gbs:,.0f} GB/s; measured large "
             f"matmul " + (f"{m:.0f} TFLOP/s -> tensor rates x {g.sustained:.3f}" if m else
                            "not published -> datasheet rates (x 1.000)"),
             f"efficiencies (fitted on timm's RTX 4090 rows): {fitted}; vit_fast's Triton GEMM "
             f"{eff.triton_gemm:.2f} of cuBLAS (assumed, not backed); {eff.gap_us:.1f} µs per "
             "kernel (assumed)",
             f"host per Block: {host_label}; on the GPU server x {assume.host_speed} (assumed), "
             f"+{assume.launch_us} µs per kernel launch, compile {assume.compile_launch_us} µs "
             "per kernel; 'host' bound: the host's total exceeds the GPU's busy time"]
    return "\n".join(lines)


def gpu_table():
    from . import gpu_peaks
    rows = list(gpu_peaks.GPUS.values())
    table = fmt_table(rows, [
        ("--gpu", lambda g: g.key), ("name", lambda g: g.name), ("sm", lambda g: g.arch),
        ("SMs", lambda g: g.sms), ("boost MHz", lambda g: f"{g.boost_mhz:.0f}"),
        ("FLOP/clk/SM", lambda g: g.tc_flops_per_clk_sm),
        ("tensor TFLOP/s", lambda g: f"{g.tensor_flops / 1e12:.1f}"),
        ("GB/s", lambda g: f"{g.mem_gbs:,.0f}"), ("L2 MB", lambda g: g.l2_mb),
        ("matmul TFLOP/s (measured)", lambda g: f"{g.matmul_tflops:.1f}" if g.matmul_tflops else "-"),
        ("sustained", lambda g: f"{g.sustained:.3f}")],
        title="GPU peaks (datasheet; tensor: dense fp16/bf16 with fp32 accumulation; "
              "vit_fast/bench/gpu_peaks.py)")
    return "\n".join([table, ""] + [f"- {g.key}: {g.source}" for g in rows]
                     + [f"- matmul column: {gpu_peaks.MATMUL_SOURCE}"])


def calibration_report(eff, assume, costs):
    from . import predict, predict_fit
    res = predict_fit.evaluate(eff=eff, assume=assume, host_costs=costs)
    refit = predict_fit.fit(assume=assume, host_costs=costs)
    lines = [fmt_table(res, [
        ("set", lambda x: x["row"].set), ("source file (timm results/)", lambda x: x["row"].source_file),
        ("GPU", lambda x: x["row"].gpu), ("torch", lambda x: x["row"].torch),
        ("mode", lambda x: x["row"].mode), ("model", lambda x: x["row"].model),
        ("batch", lambda x: x["row"].batch), ("impl", lambda x: x["row"].impl),
        ("published img/s", lambda x: f"{x['row'].img_per_s:,.0f}"),
        ("model img/s", lambda x: f"{x['predicted']:,.0f}"),
        ("error", lambda x: f"{100 * x['error']:+.1f}%")],
        title="Calibration (model vs published): fit = the only rows fitted; check/extra = "
              "predicted with the fit, never refitted"), ""]
    summ = predict_fit.summary(res)
    lines.append(fmt_table([{"key": k, **v} for k, v in summ.items()], [
        ("set", lambda r: r["key"][0]), ("impl", lambda r: r["key"][1]), ("rows", "n"),
        ("median |error|", lambda r: f"{100 * r['median']:.1f}%"),
        ("worst |error|", lambda r: f"{100 * r['worst']:.1f}%")],
        title="|error| of img/s per set"))
    lines.append("")
    import statistics
    per_gpu = {}
    for x in res:
        per_gpu.setdefault((x["row"].gpu, x["row"].torch, x["row"].mode, x["row"].set,
                            x["row"].impl), []).append(abs(x["error"]))
    lines.append(fmt_table([{"k": k, "v": v} for k, v in per_gpu.items()], [
        ("GPU", lambda r: r["k"][0]), ("torch", lambda r: r["k"][1]), ("mode", lambda r: r["k"][2]),
        ("set", lambda r: r["k"][3]), ("impl", lambda r: r["k"][4]),
        ("rows", lambda r: len(r["v"])),
        ("median |error|", lambda r: f"{100 * statistics.median(r['v']):.1f}%"),
        ("worst |error|", lambda r: f"{100 * max(r['v']):.1f}%")], title="per GPU"))
    lines.append("")
    lines.append(fmt_table(predict_fit.ratios(res), [
        ("GPU", "gpu"), ("torch", "torch"), ("model", "model"), ("set", "set"),
        ("compile/eager published", lambda r: f"{r['published']:.3f}"
         + ("" if r["same_batch"] else " (batch 256 vs 1024)")),
        ("model", lambda r: f"{r['predicted']:.3f}"), ("diff", lambda r: f"{r['diff']:+.3f}")],
        title="torch.compile / eager img/s"))
    fitted = {k: getattr(eff, k) for k in predict.FITTED_FIELDS}
    same = all(abs(refit[k] - fitted[k]) <= 0.002 for k in fitted)
    lines += ["", "fitted (committed, vit_fast/bench/predict_fit.py FITTED): "
              + ", ".join(f"{k} {v:.3f}" for k, v in fitted.items())
              + "; refit now: " + ", ".join(f"{k} {v:.3f}" for k, v in refit.items())
              + (" (same)" if same else " (DIFFERENT: update FITTED)")]
    return "\n".join(lines)


def plan_report(g, model, batch, eff, assume, costs):
    from . import predict_plan
    r = predict_plan.run(g, model, batch, eff=eff, assume=assume, host_costs=costs)
    head = (f"Model (not measured): {model}, batch {batch}, AMP training step, {g.name}: eager "
            f"{r['eager']['img_per_s']:,.0f} img/s ({'host' if r['eager']['host_bound'] else 'GPU'}"
            f"-bound), torch.compile {r['compile']['img_per_s']:,.0f} img/s; what-if steps, each "
            "on top of the ones above")
    table = fmt_table(r["steps"], [
        ("step", "step"), ("img/s", lambda x: f"{x['img_per_s']:,.0f}"),
        ("step ms", lambda x: _ms(x["step_ms"])), ("host ms", lambda x: _ms(x["host_ms"])),
        ("bound", lambda x: "host" if x["host_bound"] else "GPU"),
        ("vs eager", lambda x: f"{x['vs_eager']:.2f}x"),
        ("vs compile", lambda x: f"{x['vs_compile']:.2f}x"),
        ("GEMM ms", lambda x: _ms(x["breakdown_ms"]["gemm"])),
        ("memory-bound ms", lambda x: _ms(x["breakdown_ms"]["memory-bound"])),
        ("backed by", "backing")], title=head)
    need = predict_plan.parity_needed(g, model, batch, eff=eff, assume=assume, host_costs=costs)
    tail = ("gemm_parity needs a GEMM with the erf-GELU epilogues at >= "
            f"{need:.2f} of cuBLAS's fraction for 1.1x torch.compile" if need else
            "1.1x torch.compile is out of reach even with the epilogue-fused GEMM at cuBLAS's "
            "fraction")
    return table + "\n" + tail


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        cmd, rest = argv[0], argv[1:]
        if cmd == "gpu-check":
            from .gpu_check import main as gpu_check_main
            return gpu_check_main(rest)
        if cmd == "navit":
            from .navit import main as navit_main
            return navit_main(rest)
        if cmd == "host":
            from .host import main as host_main
            return host_main(rest)
        return {"memory": memory_main, "roofline": roofline_main,
                "compile-check": compile_check_main, "results": results_main,
                "predict": predict_main}[cmd](rest)
    return throughput_main(argv)
