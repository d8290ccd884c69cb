"""``python -m vit_fast.bench navit``: a packed NaViT batch of mixed resolutions, vit-pytorch eager
vs vit_fast.convert of the same model.

- CPU throughput (measured): images/s of the whole model (packing, transformer, attention pool,
  head) in one process, eager and converted interleaved per round; max |logit error|.
- Bytes saved for backward (counted, not measured): the transformer's training forward on fake
  CUDA tensors (memory.py's method, no GPU, no data), eager with NaViT's [B, 1, N, N] mask --
  its SDPA counted as the memory-efficient kernel, which is what takes an arbitrary mask on a
  GPU -- against the converted layers with the Triton backend forced.
- GPU: the acceptance kit (``python -m vit_fast.bench gpu-check``) times the same comparison on
  the GPU, in its models step (:func:`gpu_kit_case`).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

SIZES = ((64, 64), (96, 48), (128, 128))
# Small model: ViT-S-like width at depth 4.
SMALL = dict(patch_size=16, dim=384, depth=4, heads=6, dim_head=64, mlp_dim=1536)
TINY = dict(patch_size=8, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=48)  # the kit's dry run


def packed_sizes(sizes, rows):
    """Image sizes per packed row: row r holds len(sizes) - r % len(sizes) of them, rotated, so
    the rows differ in image count, order and length (some padding)."""
    k = len(sizes)
    return [[sizes[(r + j) % k] for j in range(k - r % k)] for r in range(rows)]


def build(config, num_classes=10, seed=0):
    """(vit-pytorch NaViT, vit_fast.convert of a copy): the same weights."""
    from vit_pytorch.na_vit import NaViT

    import vit_fast
    torch.manual_seed(seed)
    largest = max(max(h, w) for h, w in SIZES)
    eager = NaViT(image_size=largest, num_classes=num_classes, **config)
    return eager, vit_fast.convert(copy.deepcopy(eager))


def make_images(layout, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, h, w, generator=g).to(device=device, dtype=dtype) for h, w in row]
            for row in layout]


def tokens(layout, patch):
    """(B, N, real tokens): the packed batch's shape and how many of its B·N tokens are images."""
    per_row = [sum((h // patch) * (w // patch) for h, w in row) for row in layout]
    return len(layout), max(per_row), sum(per_row)


def cpu_rows(config, layout, modes=("infer", "train"), warmup=1, iters=3):
    """Measured on this CPU: img/s of eager and converted, interleaved round by round."""
    from .throughput import make_step
    images = make_images(layout)
    n_images = sum(len(r) for r in layout)
    labels = torch.arange(n_images) % 10
    rows = []
    for mode in modes:
        eager, fast = build(config)
        with torch.no_grad():
            err = (fast.eval()(images) - eager.eval()(images)).abs().max().item()
        steps = {"vit-pytorch eager": make_step(eager, mode, images, labels),
                 "vit_fast": make_step(fast, mode, images, labels)}
        times = {p: [] for p in steps}
        for i in range(warmup + iters):
            for p, step in steps.items():
                t0 = time.perf_counter()
                step()
                if i >= warmup:
                    times[p].append(time.perf_counter() - t0)
        base = n_images / statistics.median(times["vit-pytorch eager"])
        for p, ts in times.items():
            ips = n_images / statistics.median(ts)
            rows.append({"mode": mode, "provider": p, "img_per_s": ips, "speedup": ips / base,
                         "max_logit_err": None if p == "vit-pytorch eager" else err})
    return rows


def masked_sdpa_as_efficient():
    """F.scaled_dot_product_attention with a mask on fake CUDA tensors as the memory-efficient
    kernel (what runs masked attention on a GPU; without one, SDPA would pick the math path and
    save the N×N probabilities). A bool mask becomes the additive bias SDPA builds from it."""
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "cuda" or attn_mask is None or is_causal or kw:
            return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, **kw)
        bias = attn_mask
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, False, scale=scale)[0]
    return mock.patch.object(F, "scaled_dot_product_attention", sdpa)


def saved_rows(config, layout, dtype=torch.bfloat16):
    """Counted: bytes the transformer's training forward saves for backward on fake CUDA tensors
    (unique storages, parameters excluded), one row per implementation."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    import vit_fast

    from .memory import count_saved
    eager, fast = build(config)
    B, N, _ = tokens(layout, config["patch_size"])
    rows = []
    with FakeTensorMode(), vit_fast.use_backend("triton"), masked_sdpa_as_efficient():
        ids = torch.empty(B, N, dtype=torch.int64, device="cuda")
        mask = torch.empty(B, 1, N, N, dtype=torch.bool, device="cuda")  # what NaViT builds
        for impl, model, kwargs in (("vit-pytorch eager", eager, {"attn_mask": mask}),
                                    ("vit_fast", fast, {"segment_ids": ids})):
            t = model.transformer.train()
            params = {k: torch.empty(v.shape, device="cuda", dtype=dtype).requires_grad_()
                      for k, v in t.named_parameters()}
            buffers = {k: torch.empty(v.shape, device="cuda", dtype=dtype)
                       for k, v in t.named_buffers()}
            x = torch.empty(B, N, config["dim"], device="cuda", dtype=dtype, requires_grad=True)
            with count_saved(params.values()) as saved:
                functional_call(t, {**params, **buffers}, (x,), kwargs)
            square = sum(1 for s, _ in saved.shapes if len(s) >= 2 and s[-2:] == (N, N))
            rows.append({"impl": impl, "bytes": saved.bytes, "tensors": saved.tensors,
                         "n_by_n": square})
    for r in rows:
        r["ratio"] = r["bytes"] / rows[0]["bytes"]
    return rows


def gpu_kit_case(device, settings, dry_run, backend="triton"):
    """The GPU kit's NaViT row (gpu_check_bench.run_models): AMP bf16 training step and inference
    of the packed batch, eager vs converted, timed interleaved; the kit's row format."""
    import vit_fast

    from . import timing
    from .timing import peak_step_bytes as _peak_step_bytes
    from .throughput import make_step
    config = TINY if dry_run else SMALL
    layout = packed_sizes(SIZES if not dry_run else ((16, 16), (24, 16)), 2 if dry_run else 32)
    images = make_images(layout, device)
    labels = (torch.arange(sum(len(r) for r in layout)) % 10).to(device)
    out = []
    for mode in ("train", "infer"):
        eager, fast = (m.to(device) for m in build(config))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            ref = eager.eval()(images).float()
            err = (fast.eval()(images).float() - ref).abs().max().item()

        def amp(step):
            def run():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return step()
            return run
        fns = {"vit-pytorch eager": amp(make_step(eager, mode, images, labels)),
               "vit_fast": amp(make_step(fast, mode, images, labels))}
        with vit_fast.use_backend(backend):
            mem = {p: _peak_step_bytes(f, device) for p, f in fns.items()}
            samples = timing.time_interleaved(fns, device, settings["rounds"], settings["warmup"])
        stats = {p: timing.summarize(s) for p, s in samples.items()}
        n = len(labels)
        B, N, real = tokens(layout, config["patch_size"])
        out.append({"model": f"NaViT (vit-pytorch) {B}x{N} packed, {real} real tokens",
                    "mode": mode, "batch": n,
                    "ratios": [{"provider": "vit_fast", "baseline": "vit-pytorch eager",
                                **timing.compare(stats["vit-pytorch eager"], stats["vit_fast"])}],
                    "providers": {p: {**s, "img_per_s": n / s["median_s"],
                                      "peak_step_bytes": mem[p],
                                      **({"max_abs_err": err} if p == "vit_fast" else {})}
                                  for p, s in stats.items()}})
    return out


def add_gpu_kit_rows(rec, device, settings, dry_run, backend="triton"):
    """Adds the NaViT rows to the kit's models record, or says why not (vit-pytorch missing)."""
    try:
        import vit_pytorch  # noqa: F401
    except ImportError:
        rec.add("skipped", "NaViT: vit-pytorch is not installed (pip install vit-pytorch)")
        return
    rec.data.setdefault("navit_rows", [])
    try:
        for row in gpu_kit_case(device, settings, dry_run, backend):
            rec.add("navit_rows", row)
    except Exception as exc:  # the timm rows are already recorded; say what broke here
        rec.add("skipped", f"NaViT: failed ({type(exc).__name__}: {str(exc)[:300]})")


def main(argv):
    from .tables import fmt_table
    from .tables import mib as _mib
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench navit",
                                description="Packed NaViT batch of mixed resolutions: vit-pytorch "
                                "eager vs vit_fast (CPU img/s measured; bytes saved for backward "
                                "counted on fake CUDA tensors).")
    p.add_argument("--rows", type=int, default=8, help="packed rows (batch size of the sequence)")
    p.add_argument("--modes", default="infer,train")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="a 1-layer width-32 model (quick checks)")
    args = p.parse_args(argv)
    try:
        import vit_pytorch  # noqa: F401
    except ImportError:
        print("bench navit: vit-pytorch is not installed (pip install vit-pytorch)")
        return 2
    config = TINY if args.tiny else SMALL
    sizes = ((16, 16), (24, 16), (32, 32)) if args.tiny else SIZES
    layout = packed_sizes(sizes, args.rows)
    B, N, real = tokens(layout, config["patch_size"])
    what = (f"NaViT dim {config['dim']}, depth {config['depth']}, heads {config['heads']}x"
            f"{config['dim_head']}, patch {config['patch_size']}; {B} packed rows of "
            f"{'/'.join(f'{h}x{w}' for h, w in sizes)} images: N = {N}, {real} of {B * N} tokens real")
    rows = cpu_rows(config, layout, args.modes.split(","), args.warmup, args.iters)
    print(fmt_table(rows, [
        ("mode", "mode"), ("provider", "provider"), ("img/s", lambda r: f"{r['img_per_s']:.1f}"),
        ("speedup", lambda r: f"{r['speedup']:.2f}x"),
        ("max logit err vs eager", lambda r: "-" if r["max_logit_err"] is None
         else f"{r['max_logit_err']:.1e}")],
        title=f"CPU measured ({torch.get_num_threads()} threads, fp32, backend auto = reference "
              f"ops on CPU; median of {args.iters} after {args.warmup} warm-up): {what}"))
    saved = saved_rows(config, layout)
    print()
    print(fmt_table(saved, [
        ("impl", "impl"), ("saved for backward", lambda r: _mib(r["bytes"])),
        ("vs eager", lambda r: f"{r['ratio']:.3f}x"), ("tensors", "tensors"),
        ("[.., N, N] saved", "n_by_n")],
        title=f"Counted (fake CUDA tensors, bf16, Triton backend forced; eager masked SDPA counted "
              f"as the memory-efficient kernel): the transformer's training forward, {what}"))
    print("note: GPU timings of this comparison: python -m vit_fast.bench gpu-check (models step, "
          "NaViT rows)")
    return 0
