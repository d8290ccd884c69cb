"""gpu-check steps 4-5: per-op and whole-model timings. Each runs in its own interpreter (started by
gpu_check.py, after the install step, with the step's budget as its timeout) and rewrites its JSON
file in DIR after every case, so a step cut off by its budget still leaves what it measured.

Providers of one case are timed interleaved in one run (timing.py): vit_fast against the eager
ops it replaces (the reference backend: timm's own math), attention also against SDPA, models
against timm eager and torch.compile of timm.
"""
from __future__ import annotations

import copy
import json
import time

import torch

from . import timing
from .timing import peak_step_bytes as _peak_step_bytes

# name -> (width, heads, tokens, batch): ViT-S/B/L at 224 px, ViT-B at 384 px.
OP_SHAPES = {"ViT-S": (384, 6, 197, 64), "ViT-B": (768, 12, 197, 64), "ViT-L": (1024, 16, 197, 32),
             "ViT-B@384": (768, 12, 577, 32)}
QUICK_OP_SHAPES = ("ViT-B",)
TINY_OP_SHAPE = {"tiny": (32, 2, 17, 1)}
# ViT-B first: the budget may stop the step, and B is the one most results are compared on.
MODELS = [("vit_base_patch16_224", 64), ("vit_small_patch16_224", 128), ("vit_large_patch16_224", 32)]
TINY_MODEL = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)  # dry run: 1 block, 5 tokens
COMPILE_ESTIMATE_S = 75  # torch.compile of a ViT training step, first call (inductor)
CASE_ESTIMATE_S = 10  # one model and mode, eager and vit_fast: build, accuracy, memory, timed rounds


class Recorder:
    """The step's JSON file, rewritten after every change."""

    def __init__(self, path, **head):
        self.path, self.data = path, {**head, "rows": [], "skipped": [], "notes": []}
        self.save()

    def add(self, key, item):
        self.data[key].append(item)
        self.save()

    def save(self):
        from vit_fast import tuning
        # What measured selection chose for the MLP (cuBLAS vs Triton GEMMs) and the times it saw.
        self.data["tuning"] = tuning.records()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def _settings(device, quick, dry_run):
    if dry_run:  # the interpreter compiles nothing: no warm-up; two rounds give the two "runs"
        return {"rounds": 2, "warmup": 0}
    return {"rounds": 10 if quick else 20, "warmup": 2}


def _timed_row(fns, device, settings, pairs):
    samples = timing.time_interleaved(fns, device, settings["rounds"], settings["warmup"])
    stats = {n: timing.summarize(s) for n, s in samples.items()}
    ratios = [{"provider": a, "baseline": b, **timing.compare(stats[b], stats[a])} for a, b in pairs]
    return stats, ratios


# --- 4. per-op --------------------------------------------------------------------------------

def _eager_softmax_attention(qkv, heads):
    """timm's Attention with fused_attn=False: the N×N probabilities materialized."""
    B, N, three_c = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, three_c // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return (attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, three_c // 3)


def _op_cases(C, H, N, batch, dtype, device):
    """(op, inputs, {provider: (backend, fn)}, ratio pairs) for one shape."""
    import timm.models.vision_transformer as tvit

    import vit_fast
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    ln = lambda x, weight, bias, residual, layer_scale: vit_fast.residual_layer_norm(  # noqa: E731
        x, weight, bias, 1e-6, residual=residual, layer_scale=layer_scale)
    mlp = lambda x, w1, b1, w2, b2, residual: vit_fast.gelu_mlp(  # noqa: E731
        x, w1, b1, w2, b2, residual=residual)
    attn = lambda qkv: vit_fast.fused_qkv_attention(qkv, H)  # noqa: E731
    patch = 16
    img = int(round(((N - 1) ** 0.5))) * patch
    yield ("fused_qkv_attention", {"qkv": rnd(batch, N, 3 * C)},
           {"vit_fast": ("triton", attn), "SDPA": ("reference", attn),
            "eager softmax": ("reference", lambda qkv: _eager_softmax_attention(qkv, H))},
           [("vit_fast", "SDPA"), ("vit_fast", "eager softmax")])
    yield ("residual_layer_norm", {"x": rnd(batch, N, C), "weight": rnd(C), "bias": rnd(C),
                                   "residual": rnd(batch, N, C), "layer_scale": rnd(C)},
           {"vit_fast": ("triton", ln), "eager": ("reference", ln)}, [("vit_fast", "eager")])
    yield ("gelu_mlp", {"x": rnd(batch, N, C), "w1": rnd(4 * C, C, scale=C ** -0.5), "b1": rnd(4 * C),
                        "w2": rnd(C, 4 * C, scale=(4 * C) ** -0.5), "b2": rnd(C),
                        "residual": rnd(batch, N, C)},
           {"vit_fast": ("triton", mlp), "eager": ("reference", mlp)}, [("vit_fast", "eager")])
    pe = lambda images, weight, bias: vit_fast.patch_embed(  # noqa: E731
        images, weight, bias, patch_size=patch)
    yield ("patch_embed", {"images": rnd(batch, 3, img, img), "bias": rnd(C),
                           "weight": rnd(C, 3, patch, patch, scale=0.05)},
           {"vit_fast": ("triton", pe), "eager": ("reference", pe)}, [("vit_fast", "eager")])
    torch.manual_seed(0)
    timm_block = torch.nn.Sequential(tvit.Block(C, H, qkv_bias=True)).to(device=device, dtype=dtype)
    fast_block = vit_fast.convert(copy.deepcopy(timm_block))
    yield ("Block", {"input": rnd(batch, N, C)},  # nn.Sequential.forward(input)
           {"vit_fast": ("triton", fast_block), "timm": ("reference", timm_block)},
           [("vit_fast", "timm")])


def _op_callable(backend, fn, inputs, backward):
    import vit_fast
    if not backward:
        def forward():
            with torch.no_grad(), vit_fast.use_backend(backend):
                return fn(**inputs)
        return forward
    leaves = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    with vit_fast.use_backend(backend):
        out = fn(**leaves)
    out = out[0] if isinstance(out, tuple) else out
    grad = torch.randn_like(out)
    wrt = [v for v in leaves.values() if v.requires_grad]
    if isinstance(fn, torch.nn.Module):  # the Block: its weight gradients are half the backward
        wrt += [p for p in fn.parameters() if p.requires_grad]

    def fwd_bwd():
        with vit_fast.use_backend(backend):
            y = fn(**leaves)
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, wrt, grad)
    return fwd_bwd


def run_ops(out_dir, device, quick, dry_run, deadline):
    device = torch.device(device)
    dtype = torch.float32 if dry_run else torch.bfloat16
    names = QUICK_OP_SHAPES if quick else OP_SHAPES
    shapes = TINY_OP_SHAPE if dry_run else {k: OP_SHAPES[k] for k in names}
    settings = _settings(device, quick, dry_run)
    rec = Recorder(out_dir / "ops.json", device=str(device), dtype=str(dtype).replace("torch.", ""),
                   **settings)
    for shape, (C, H, N, batch) in shapes.items():
        for op, inputs, providers, pairs in _op_cases(C, H, N, batch, dtype, device):
            for mode in ("forward", "fwd+bwd"):
                where = f"{op} {shape} {mode}"
                if time.time() > deadline - 5:
                    rec.add("skipped", f"{where}: past the step's budget")
                    continue
                try:
                    fns = {p: _op_callable(b, f, inputs, mode == "fwd+bwd")
                           for p, (b, f) in providers.items()}
                    outs = {p: f() for p, f in fns.items()} if mode == "forward" else {}
                    stats, ratios = _timed_row(fns, device, settings, pairs)
                except Exception as exc:  # one broken case must not hide the others
                    rec.add("skipped", f"{where}: failed ({type(exc).__name__}: {str(exc)[:300]})")
                    continue
                diff = {}
                for p, o in outs.items():
                    o = o[0] if isinstance(o, tuple) else o
                    base = outs[pairs[0][1]]
                    base = base[0] if isinstance(base, tuple) else base
                    diff[p] = ((o.float() - base.float()).norm()
                               / base.float().norm().clamp_min(1e-30)).item()
                rec.add("rows", {"op": op, "shape": shape, "mode": mode, "batch": batch, "N": N, "C": C,
                                 "heads": H, "providers": stats, "ratios": ratios,
                                 "rel_diff_vs_baseline": diff})
    return rec.data


# --- 5. whole models --------------------------------------------------------------------------

def _amp(step, device):
    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step()
    return run


@torch.no_grad()
def _accuracy(model, images, ref_logits, device):
    was = model.training
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(images)
    model.train(was)
    return _errors(out, ref_logits)


def _errors(out, ref_logits):
    out = out.float()
    return {"max_abs_err": (out - ref_logits).abs().max().item(),
            "rel_err": ((out - ref_logits).norm() / ref_logits.norm()).item(),
            "top1_agree": (out.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}


def _model_case(name, batch, mode, kw, device, settings, compile_backend, trace_path):
    """One (model, mode): the providers built from one fp32 timm model, accuracy vs it, peak step
    memory, interleaved timing; the first training case also writes the profiler trace."""
    import timm

    import vit_fast

    from .profile import profile_step
    from .throughput import make_step
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: ViT-L's CPU init alone takes seconds
        ref = timm.create_model(name, pretrained=False, **kw).eval()
    img = ref.patch_embed.img_size
    g = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, img[0], img[1], generator=g).to(device)
    labels = torch.randint(0, ref.num_classes, (batch,), generator=g).to(device)
    with torch.no_grad():
        ref_logits = ref(images).float()
    providers = {"timm eager": copy.deepcopy(ref), "vit_fast": vit_fast.convert(copy.deepcopy(ref))}
    if compile_backend:
        providers["timm compile"] = torch.compile(copy.deepcopy(ref), backend=compile_backend)
    with vit_fast.use_backend("triton"):
        steps = {p: _amp(make_step(m, mode, images, labels), device) for p, m in providers.items()}
        # Accuracy of the eval forward vs fp32 timm; a compiled model only through its own infer
        # step (an extra eval graph would cost a second compile).
        acc = ({p: _errors(s(), ref_logits) for p, s in steps.items()} if mode == "infer" else
               {p: _accuracy(m, images, ref_logits, device) for p, m in providers.items()
                if p != "timm compile"})
        mem = {p: _peak_step_bytes(s, device) for p, s in steps.items()}
        pairs = [("vit_fast", "timm eager")]
        if compile_backend:
            pairs += [("vit_fast", "timm compile"), ("timm compile", "timm eager")]
        stats, ratios = _timed_row(steps, device, settings, pairs)
        table = None
        if trace_path is not None and mode == "train":
            table = profile_step(steps["vit_fast"], device, trace_path, iters=1)
    row = {"model": name, "mode": mode, "batch": batch, "ratios": ratios,
           "providers": {p: {**stats[p], "img_per_s": batch / stats[p]["median_s"],
                             "peak_step_bytes": mem[p], **acc.get(p, {})} for p in stats}}
    return row, table


def run_models(out_dir, device, quick, dry_run, deadline):
    device = torch.device(device)
    settings = _settings(device, quick, dry_run)
    if not dry_run:
        settings["rounds"] = 5 if quick else 10
    models = [("vit_small_patch16_224", 1)] if dry_run else MODELS
    kw = TINY_MODEL if dry_run else {}
    rec = Recorder(out_dir / "models.json", device=str(device), precision="AMP bf16 (fp32 weights)",
                   **settings)
    if dry_run:
        rec.add("notes", "dry run: a 1-block ViT at 32 px, width 32; torch.compile with backend='eager' "
                         "(tracing only: no inductor build on CPU)")
    traced = False
    cases = [(name, batch, mode) for name, batch in models for mode in ("train", "infer")]
    for i, (name, batch, mode) in enumerate(cases):
        where, left = f"{name} {mode}", deadline - time.time()
        if left < 15:
            rec.add("skipped", f"{where}: past the step's budget")
            continue
        # Compile only when the eager/vit_fast rows of the cases after this one still fit.
        after = len(cases) - i - 1
        backend = "eager" if dry_run else "inductor"
        if quick and name != models[0][0]:
            backend = None
            rec.add("skipped", f"{where}: timm compile not timed (--quick compiles the first "
                               "model only)")
        elif not dry_run and left < COMPILE_ESTIMATE_S + CASE_ESTIMATE_S * (after + 1):
            backend = None
            rec.add("skipped", f"{where}: timm compile not timed ({left:.0f} s left: a compile "
                               f"takes ~{COMPILE_ESTIMATE_S} s and the {after} cases after this "
                               f"~{CASE_ESTIMATE_S} s each)")
        trace = None if traced or mode != "train" else out_dir / "trace_train_step.json"
        try:
            row, table = _model_case(name, batch, mode, kw, device, settings, backend, trace)
        except Exception as exc:  # one broken case must not hide the others
            rec.add("skipped", f"{where}: failed ({type(exc).__name__}: {str(exc)[:300]})")
            continue
        if table is not None:
            what = f"one AMP bf16 training step of vit_fast {name}, batch {batch}"
            (out_dir / "profile_top10.txt").write_text(f"torch.profiler, {what}\n{table}\n")
            rec.add("notes", f"trace_train_step.json: {what}")
            traced = True
        if dry_run:
            row["model"] = f"{name} (dry run: 1 block, 32 px)"
        rec.add("rows", row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if deadline - time.time() < 60:  # host per step, CUDA graphs, tuning memory (gpu_check_host)
        rec.add("skipped", "host/graphs/tuning memory: past the step's budget")
    else:
        from .gpu_check_host import add_rows
        try:
            add_rows(rec, device, settings, *models[0], kw)
        except Exception as exc:  # one broken case must not hide the others
            rec.add("skipped", f"host/graphs/tuning memory: failed ({type(exc).__name__}: "
                               f"{str(exc)[:300]})")
    if deadline - time.time() < 15:  # packed NaViT vs vit-pytorch eager (bench/navit.py)
        rec.add("skipped", "NaViT: past the step's budget")
    else:
        from .navit import add_gpu_kit_rows
        add_gpu_kit_rows(rec, device, settings, dry_run)
    return rec.data
