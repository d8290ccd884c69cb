"""torch.profiler over a few iterations: a Chrome trace (chrome://tracing, Perfetto) and the
top-10 ops table, then the tuning choices recorded in the trace (vit_fast.tune[...] labels)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def profile_step(step, device, path, iters=3):
    """Runs ``step`` ``iters`` times under the profiler, writes the trace to ``path``, returns the
    top-10 table (by self CUDA time on a GPU, else self CPU time)."""
    activities = [ProfilerActivity.CPU]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=10)
    return table + tuning_labels(prof.events())


def tuning_labels(events) -> str:
    """The measured-selection labels (vit_fast.tuning.profiler_label) found in a trace's events,
    one line each: which implementation ran and the times that chose it."""
    labels = sorted({e.name for e in events if e.name.startswith("vit_fast.tune[")})
    return "".join(f"\n{label}" for label in labels)
