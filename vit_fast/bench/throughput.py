"""Side-by-side throughput of timm eager vs vit_fast (and torch.compile of each), one process.

Both models are the same weights: vit_fast's is ``vit_fast.convert`` of a deep copy of timm's.
Timing: warm-up iterations, then the median of timed iterations (CUDA: synchronized). Accuracy:
an eval forward of each model in the benchmark dtype against the fp32 timm model on the same
images (max |logit error|, top-1 agreement). Memory: peak CUDA memory of the timed loop, or on CPU
the bytes a training forward saves for backward (unique storages, see memory.py).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(model_name, device, dtype, compile_=False, seed=0):
    """{provider: model} for 'timm eager', 'vit_fast' (and '+ compile' variants), plus the fp32
    timm model used as the accuracy reference."""
    import timm

    import vit_fast
    torch.manual_seed(seed)
    ref = timm.create_model(model_name, pretrained=False).eval().to(device)
    timm_model = copy.deepcopy(ref).to(dtype)
    fast = vit_fast.convert(copy.deepcopy(timm_model))
    models = {"timm eager": timm_model, "vit_fast": fast}
    if compile_:
        models["timm compile"] = torch.compile(copy.deepcopy(timm_model))
        models["vit_fast compile"] = torch.compile(vit_fast.convert(copy.deepcopy(timm_model)))
    return ref, models


def make_step(model, mode, images, labels):
    """A no-arg callable running one iteration: eval forward, or forward+backward+SGD step."""
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                return model(images)
        return step
    if mode != "train":
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        return loss
    return step


def time_step(step, device, warmup, iters, progress=None):
    """Median seconds of ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
        if progress is not None:
            progress.update(1)
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return statistics.median(times)


@torch.no_grad()
def accuracy(model, ref_logits, images):
    was_training = model.training
    model.eval()
    out = model(images).float()
    model.train(was_training)
    err = (out - ref_logits).abs().max().item()
    top1 = (out.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    return err, top1


def saved_bytes(model, images):
    from .memory import count_saved
    was_training = model.training
    model.train()
    x = images.detach().requires_grad_(images.is_floating_point())
    with count_saved(list(model.parameters())) as saved:
        model(x)
    model.train(was_training)
    return saved.bytes


def run(models=("vit_small_patch16_224",), batches=(8,), dtype="fp32", device="cpu", mode="infer",
        warmup=2, iters=5, compile_=False, progress=True):
    """One row per (model, batch, provider); speedup is against 'timm eager' of the same row group."""
    from tqdm import tqdm
    device = torch.device(device)
    dt = DTYPES[dtype]
    n_prov = 4 if compile_ else 2
    bar = tqdm(total=len(models) * len(batches) * n_prov * (warmup + iters), desc="bench",
               unit="it", disable=not progress, leave=False)
    rows = []
    for name in models:
        for batch in batches:
            # Fresh models per batch: a train step's SGD update must not carry over.
            ref, providers = build_models(name, device, dt, compile_)
            img = ref.patch_embed.img_size
            g = torch.Generator().manual_seed(batch)
            images32 = torch.randn(batch, 3, img[0], img[1], generator=g).to(device)
            labels = torch.randint(0, ref.num_classes, (batch,), generator=g).to(device)
            images = images32.to(dt)
            with torch.no_grad():
                ref_logits = ref(images32).float()
            base = None
            for prov, model in providers.items():
                bar.set_postfix_str(f"{name} b={batch} {prov}")
                # Before timing: a train step's SGD update would move the weights off the reference.
                err, top1 = accuracy(model, ref_logits, images)
                step = make_step(model, mode, images, labels)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sec = time_step(step, device, warmup, iters, bar)
                mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                       else saved_bytes(model, images))
                ips = batch / sec
                base = ips if prov == "timm eager" else base
                rows.append({"model": name, "batch": batch, "dtype": dtype, "device": device.type,
                             "mode": mode, "provider": prov, "img_per_s": ips,
                             "speedup": ips / base if base else float("nan"),
                             "max_logit_err": err, "top1_agree": top1,
                             "memory_kind": "peak_cuda" if device.type == "cuda" else "saved_for_bwd",
                             "memory_bytes": mem, "median_s": sec})
    bar.close()
    return rows
