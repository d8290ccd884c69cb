"""Side-by-side throughput of timm eager vs vit_fast (and torch.compile of each), one process, and
what `make bench` tells a newcomer without a GPU.

Both models are the same weights: vit_fast's is ``vit_fast.convert`` of a deep copy of timm's.
Timing: the providers of one (model, batch) are timed interleaved, round by round in a rotating
order (timing.py), so load on this shared machine hits them alike; each ratio to timm eager comes
with its noise band and is called "within noise" inside it (see :func:`verdict`). Accuracy: an
eval forward of each model in the benchmark dtype against the fp32 timm model on the same images
(max |logit error|, top-1 agreement). Memory: peak CUDA memory of a step on a GPU.

Without a GPU, :func:`newcomer_sections` adds what the GPU path would do: the saved-for-backward
bytes counted on fake CUDA tensors (memory.py), the host cost per Block (predict_host.py) and the
calibrated model's prediction for a named GPU (predict.py), each labelled.
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


# A ratio inside this band is never called faster or slower on a CPU: this machine is shared
# (2 cores, six sessions), and rounds a few percent apart flip from run to run even interleaved.
CPU_NOISE_FLOOR = 0.05


def verdict(base, other, device):
    """timing.compare, with the noise band widened to the samples' spread (half the two IQRs)
    and, on a CPU, to CPU_NOISE_FLOOR: a ratio is called only when two runs would agree."""
    from . import timing
    c = timing.compare(base, other)
    spread = (base["iqr_rel"] + other["iqr_rel"]) / 2
    noise = max(c["noise_rel"] if c["noise_rel"] == c["noise_rel"] else 0.0, spread,
                CPU_NOISE_FLOOR if torch.device(device).type == "cpu" else 0.0)
    c["noise_rel"] = noise
    c["verdict"] = ("within noise" if abs(c["speedup"] - 1) <= noise else
                    "faster" if c["speedup"] > 1 else "slower")
    return c


def run(models=("vit_small_patch16_224",), batches=(8,), dtype="fp32", device="cpu", mode="infer",
        warmup=1, iters=8, compile_=False, progress=True):
    """One row per (model, batch, provider), the providers of a (model, batch) timed interleaved
    over ``iters`` rounds; speedup and verdict are against 'timm eager' of the same group."""
    from tqdm import tqdm

    from . import timing
    device = torch.device(device)
    dt = DTYPES[dtype]
    n_prov = 4 if compile_ else 2
    bar = tqdm(total=len(models) * len(batches) * n_prov, desc="bench", unit="provider",
               disable=not progress, leave=False)
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
            acc, steps, mem = {}, {}, {}
            for prov, model in providers.items():
                bar.set_postfix_str(f"{name} b={batch} {prov}")
                # Before timing: a train step's SGD update would move the weights off the reference.
                acc[prov] = accuracy(model, ref_logits, images)
                steps[prov] = make_step(model, mode, images, labels)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    steps[prov]()
                    _sync(device)
                    mem[prov] = torch.cuda.max_memory_allocated(device)
                bar.update(1)
            samples = timing.time_interleaved(steps, device, iters, warmup)
            stats = {p: timing.summarize(v) for p, v in samples.items()}
            for prov, st in stats.items():
                c = verdict(stats["timm eager"], st, device)
                rows.append({"model": name, "batch": batch, "dtype": dtype, "device": device.type,
                             "mode": mode, "provider": prov, "img_per_s": batch / st["median_s"],
                             "speedup": c["speedup"], "verdict": c["verdict"],
                             "noise_rel": c["noise_rel"], "median_s": st["median_s"],
                             "iqr_rel": st["iqr_rel"], "rounds": st["n"],
                             "max_logit_err": acc[prov][0], "top1_agree": acc[prov][1],
                             "memory_kind": "peak_cuda" if device.type == "cuda" else None,
                             "memory_bytes": mem.get(prov)})
    bar.close()
    return rows


# --- what the GPU path would do (no GPU needed) -------------------------------------------------

def counted_saved(model, batch):
    """memory.measure on fake CUDA tensors, one block, bf16 and AMP bf16: (rows, notes)."""
    from . import memory
    rows, notes = memory.measure(model, batch, torch.bfloat16, "fake-cuda", ("block",))
    amp_rows, amp_notes = memory.measure(model, batch, torch.bfloat16, "fake-cuda", ("block",),
                                         amp=True)
    return rows + amp_rows, notes + amp_notes


def host_rows(host_json=None):
    """Host µs per Block (this CPU, the GPU path): rows per (mode, precision), and the label.
    The host figures leave out the CPU's own compute: eager's thread µs times its counted host
    share, vit_fast's eager's host µs times the two sides' counted host-instruction ratio (where
    callgrind counted the row; else its own µs times its share); vs eager adds Triton's launch
    path to vit_fast's."""
    from . import predict_host
    costs, label = predict_host.load(host_json)
    rows = []
    for (mode, precision), c in sorted(costs.items()):
        launched = predict_host.python_us(c, predict_host.HostAssumptions())
        rows.append({"mode": mode, "precision": precision, "eager_us": c.eager_us,
                     "vit_fast_us": c.vit_fast_us, "eager_host_us": c.eager_host_us,
                     "vit_fast_host_us": c.vit_fast_host_us, "vit_fast_launch_us": launched,
                     "ratio": launched / c.eager_host_us, "triton_launches": c.triton_launches,
                     "direct_launches": c.direct_launches})
    return rows, label


def predicted_rows(gpu, model, batches, modes=("train", "infer"), precision="amp",
                   host_json=None):
    """The calibrated model's rows for ``gpu`` (predict.predict), every impl."""
    from . import predict, predict_host
    costs, _ = predict_host.load(host_json)
    rows = []
    for mode in modes:
        for b in batches:
            rows += predict.predict(gpu, model, b, mode, host_costs=costs, precision=precision)
    return rows
