"""gpu-check, step 5's last rows: the host side of a training step on the GPU (issues 26, 27).

- host CPU per step: the thread CPU time of back-to-back AMP training steps of vit_fast and of
  timm eager while the GPU is kept busy (no synchronize inside the timed steps), per step -- what
  the host pays to issue a step, the figure `python -m vit_fast.bench host` estimates on any CPU
  (a host that waits on a full launch queue spins, which counts: read it beside the GPU time);
- CUDA graphs: the same step captured with torch.cuda.make_graphed_callables against eager
  (autocast's cache off, as graphs require), timed interleaved;
- tuning memory: what the first step of a fresh process allocates at its peak while measured
  selection times its candidates (the 'auto' policy, an empty in-memory tuner), over the same
  step once every key is chosen.
"""
from __future__ import annotations

import copy
import time

import torch

from . import timing


def _step(model, opt, images, labels, device, cache_enabled=True):
    def run():
        opt.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        opt.step()
        return loss
    return run


def _host_us(step, device, steps=10):
    """Thread CPU µs per step of ``steps`` back-to-back steps (the GPU kept busy)."""
    for _ in range(2):
        step()
    torch.cuda.synchronize(device)
    t0 = time.thread_time_ns()
    for _ in range(steps):
        step()
    used = time.thread_time_ns() - t0
    torch.cuda.synchronize(device)
    return used / steps / 1e3


def _models(name, batch, kw, device):
    import timm

    import vit_fast
    torch.manual_seed(0)
    with torch.device(device):
        ref = timm.create_model(name, pretrained=False, **kw).train()
    g = torch.Generator().manual_seed(batch)
    img = ref.patch_embed.img_size
    images = torch.randn(batch, 3, img[0], img[1], generator=g).to(device)
    labels = torch.randint(0, ref.num_classes, (batch,), generator=g).to(device)
    return ref, vit_fast.convert(copy.deepcopy(ref)), images, labels


def add_rows(rec, device, settings, name, batch, kw):
    """The three measurements above for one model and batch, as models.json's host_rows."""
    from vit_fast import tuning
    rec.data.setdefault("host_rows", [])
    if device.type != "cuda":
        rec.add("notes", "host CPU per step, CUDA graphs and tuning memory: CUDA only")
        return
    timm_model, ours, images, labels = _models(name, batch, kw, device)
    sgd = torch.optim.SGD
    with tuning.use_tuner(tuning.Tuner(None)):  # a fresh tuner: the first step measures
        step = _step(ours, sgd(ours.parameters(), lr=0.0), images, labels, device)
        first = timing.peak_step_bytes(step, device)
        again = timing.peak_step_bytes(step, device)
        rec.add("host_rows", {"model": name, "batch": batch, "measure": "tuning memory",
                         "first_step_peak_bytes": first, "later_step_peak_bytes": again,
                         "tuning_extra_bytes": first - again,
                         "tuned_keys": len(tuning.records())})
        host = {"vit_fast": _host_us(step, device),
                "timm eager": _host_us(_step(timm_model, sgd(timm_model.parameters(), lr=0.0),
                                             images, labels, device), device)}
        rec.add("host_rows", {"model": name, "batch": batch, "measure": "host CPU per step (µs)",
                         **host})
        plain = _step(ours, sgd(ours.parameters(), lr=0.0), images, labels, device,
                      cache_enabled=False)
        for _ in range(3):  # warm-up: every key chosen before the capture
            plain()
        graphed_model = torch.cuda.make_graphed_callables(copy.deepcopy(ours), (images,))
        graphed = _step(graphed_model, sgd(graphed_model.parameters(), lr=0.0), images, labels,
                        device, cache_enabled=False)
        samples = timing.time_interleaved({"eager": plain, "graphed": graphed}, device,
                                          settings["rounds"], settings["warmup"])
        stats = {n: timing.summarize(s) for n, s in samples.items()}
        rec.add("host_rows", {"model": name, "batch": batch, "measure": "CUDA graphs (train step)",
                         "providers": stats,
                         "ratio": timing.compare(stats["eager"], stats["graphed"])})
