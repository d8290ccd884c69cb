"""``python -m vit_fast.bench [throughput options]`` and its subcommands.

    python -m vit_fast.bench                      timm eager vs vit_fast table (default: ViT-S/16,
                                                  batch 8, fp32, cpu, infer)
    python -m vit_fast.bench memory               bytes saved for backward, block and model
    python -m vit_fast.bench roofline [--amp]     HBM bytes / FLOPs / roofline time (model)
    python -m vit_fast.bench compile-check        AOT sm_80/sm_90 registers, spills, shared, MMA
    python -m vit_fast.bench gpu-check --out DIR  GPU acceptance kit (gpu_check.py; --dry-run on CPU)
    python -m vit_fast.bench navit                packed NaViT batch: vit-pytorch eager vs vit_fast
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys

SUBCOMMANDS = ("memory", "roofline", "compile-check", "results", "gpu-check", "navit")


def fmt_table(rows, columns, title=None):
    """Plain-text table (also valid Markdown): columns = [(header, key or callable)]."""
    cells = [[str(h) for h, _ in columns]]
    for r in rows:
        cells.append([str(k(r) if callable(k) else r[k]) for _, k in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = [] if title is None else [title]
    for j, c in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |")
        if j == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _mib(n):
    return f"{n / 2**20:,.1f} MiB"


def _csv_list(kind):
    def parse(text):
        return [kind(v) for v in text.split(",") if v]
    return parse


# --- throughput (default command) ---------------------------------------------------------------

def throughput_parser():
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench",
                                description="timm eager vs vit_fast: img/s, accuracy, memory. "
                                "Subcommands: " + ", ".join(SUBCOMMANDS) + " (each has --help).")
    p.add_argument("--model", type=_csv_list(str), default=["vit_small_patch16_224"],
                   help="timm model name(s), comma-separated")
    p.add_argument("--batch", type=_csv_list(int), default=[8], help="batch size(s), comma-separated")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="infer", choices=["infer", "train"],
                   help="infer: eval forward; train: forward + backward + SGD step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cublas"],
                   help="vit_fast backend policy for the vit_fast rows")
    p.add_argument("--compile", action="store_true", help="also torch.compile each model")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--csv", help="write the rows as CSV here")
    p.add_argument("--plot", help="PNG: throughput vs batch and memory vs batch")
    p.add_argument("--profile", help="Chrome trace of vit_fast (first model and batch) + top-10 ops")
    p.add_argument("--no-progress", action="store_true")
    return p


def throughput_main(argv):
    import torch

    import vit_fast

    from . import throughput
    args = throughput_parser().parse_args(argv)
    torch.set_grad_enabled(True)
    with vit_fast.use_backend(args.backend):
        rows = throughput.run(args.model, args.batch, args.dtype, args.device, args.mode,
                              args.warmup, args.iters, args.compile, progress=not args.no_progress)
    kind = "CPU" if torch.device(args.device).type == "cpu" else torch.device(args.device).type.upper()
    mem_head = "peak CUDA mem" if kind != "CPU" else "saved for bwd"
    print(fmt_table(rows, [
        ("model", "model"), ("batch", "batch"), ("provider", "provider"),
        ("img/s", lambda r: f"{r['img_per_s']:.2f}"), ("speedup", lambda r: f"{r['speedup']:.2f}x"),
        ("max logit err", lambda r: f"{r['max_logit_err']:.2e}"),
        ("top-1 agree", lambda r: f"{100 * r['top1_agree']:.1f}%"),
        (mem_head, lambda r: _mib(r["memory_bytes"]))],
        title=f"{kind} measured: {args.mode}, {args.dtype}, device={args.device}, backend={args.backend}, "
              f"median of {args.iters} after {args.warmup} warm-up; errors vs fp32 timm"))
    from vit_fast import tuning
    if tuning.records():  # what selection by measurement chose (CUDA, backend auto)
        print(tuning.format_records())
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
        ax2.plot(b, [r["memory_bytes"] / 2**20 for r in rs], marker="o", label=f"{model} {prov}")
    ax1.set(xlabel="batch", ylabel="img/s", title=f"throughput ({kind} measured)")
    mem = "peak CUDA memory" if rows[0]["memory_kind"] == "peak_cuda" else "saved for backward"
    ax2.set(xlabel="batch", ylabel="MiB", title=f"{mem} ({kind} measured)")
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
        return {"memory": memory_main, "roofline": roofline_main,
                "compile-check": compile_check_main, "results": results_main}[cmd](rest)
    return throughput_main(argv)
