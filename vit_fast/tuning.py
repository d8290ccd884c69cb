"""Selection by measurement between implementations of one op (like cudnn.benchmark).

On CUDA, the first call of each key -- (op, shapes, dtypes, options, device, versions) -- times
every candidate (CUDA events, a warm-up then REPS runs, the median), keeps the fastest, and stores
the choice in memory and in a JSON cache (``$VIT_FAST_CACHE_DIR/tuning.json``, default
``~/.cache/vit_fast/tuning.json``) that later processes reload. The choice is fixed afterwards, so
a run is reproducible. A candidate that raises is skipped (recorded with its error), and so is
one whose result differs from the first candidate's that ran (vit_fast/agreement.py): the
sm_90-only candidates (TMA attention forward, Hopper GEMM) can win only by computing the same.

``VIT_FAST_TUNE``:
- ``1`` (default): measure. The candidates save the same tensors for backward (the Triton GEMM
  and the cuBLAS GEMM implementations), so the memory figures hold whatever wins.
- ``speed``: measure, and the eager reference (which saves more for backward) joins the pool of
  the public ``gelu_mlp``; timed forward+backward when the call records a graph.
- ``0``: no timing: the first candidate of PRIORITY that runs.
On CPU, under the Triton interpreter and while a CUDA graph is captured, PRIORITY applies too.

The Triton GEMM's tile configs join the same measurement: kernels/matmul.gemm_candidates offers
2-4 AOT-checked configs per launch, and ``choose_gemm_config`` times them per (shapes, dtypes,
layout, epilogue, device, versions) key; under the interpreter the launcher uses its one CPU
config, with tuning off the fixed table's (the first candidate).

Selection happens inside the custom ops (vit_fast::gelu_mlp_tuned and the Block's op), at run
time: a torch.compile graph holds the op, not the choice. ``VIT_FAST_BACKEND=triton|cublas`` (or
``use_backend``) bypasses selection. ``records()`` lists what was chosen and the times;
``python -m vit_fast.tuning`` prints the cache. While a profiler records, each run of a chosen
candidate is wrapped in a ``vit_fast.tune[op]: ...`` label with the choice and its times.
Attention's candidates (the Triton kernel, PyTorch's flash SDPA) are in ops/attention_sdpa.py.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import threading
from pathlib import Path

import torch

from .agreement import disagreement

REPS = 5
# With tuning off (and where nothing can be timed), the first candidate that runs. cuBLAS first:
# it runs eager PyTorch's own GEMMs with fewer elementwise passes, so it is the safe bet against
# eager; the Triton GEMM's speed against cuBLAS depends on the GPU and shape (issue 17).
PRIORITY = {
    "gelu_mlp_fwd": ("cublas", "triton"),
    "gelu_mlp_bwd": ("cublas", "triton"),
    "gelu_mlp": ("kernels", "reference"),  # VIT_FAST_TUNE=speed: the public op's outer choice
    # PyTorch's flash SDPA on views of the packed qkv saves what the kernel saves (same pool);
    # the kernel first in the fixed table, as the implementation tested on every shape here.
    # triton_tma: the forward with TMA loads (sm_90, plain calls; kernels/attention_fwd_tma.py).
    "attention_fwd": ("triton", "triton_tma", "sdpa"),
    # triton_two_pass: the dK/dV and dQ passes where the plan is the fused pass with partials.
    "attention_bwd": ("triton", "triton_two_pass", "sdpa"),
}
_MODES = {"1": "measure", "on": "measure", "true": "measure", "0": "fixed", "off": "fixed",
          "false": "fixed", "speed": "speed"}


def mode() -> str:
    """'measure', 'fixed' or 'speed', from VIT_FAST_TUNE."""
    env = os.environ.get("VIT_FAST_TUNE", "1").strip().lower() or "1"
    if env not in _MODES:
        raise ValueError(f"VIT_FAST_TUNE must be one of {sorted(_MODES)}, got {env!r}")
    return _MODES[env]


def cache_path() -> Path:
    root = os.environ.get("VIT_FAST_CACHE_DIR") or Path.home() / ".cache" / "vit_fast"
    return Path(root) / "tuning.json"


def cuda_event_timer(name, fn, reps=REPS):
    """Median milliseconds of ``fn()`` over ``reps`` runs, after one warm-up run (JIT compile,
    cuBLAS heuristics), each timed with CUDA events on the current stream."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_VERSIONS = []


def versions() -> str:
    if not _VERSIONS:
        import vit_fast
        try:
            import triton
            tv = triton.__version__
        except Exception:  # pragma: no cover - depends on the install
            tv = "none"
        _VERSIONS.append(f"torch={torch.__version__},cuda={torch.version.cuda},triton={tv},"
                         f"vit_fast={vit_fast.__version__}")
    return _VERSIONS[0]


_DEVICE_NAMES = {}  # every call builds its key: keep the driver queries out of the hot path


def device_name(device) -> str:
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        major, minor = torch.cuda.get_device_capability(index)
        _DEVICE_NAMES[index] = f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return _DEVICE_NAMES[index]


def make_key(op, tensors: dict, **options) -> str:
    """One string per (op, shapes, dtypes, options, device, versions)."""
    parts = [op]
    device = None
    for name, t in tensors.items():
        if t is None:
            parts.append(f"{name}=None")
            continue
        device = device or t.device
        parts.append(f"{name}={str(t.dtype).replace('torch.', '')}{list(t.shape)}")
    parts += [f"{k}={v}" for k, v in sorted(options.items())]
    parts += [f"device={device_name(device) if device is not None else 'none'}", versions()]
    return "|".join(parts)


class Tuner:
    """Choices per key: in memory, and persisted to ``path`` (None: no file) when measured.

    timer(name, fn) -> milliseconds; injectable for tests. measure_anywhere lets a test time
    candidates on CPU tensors (where the module default never measures).
    """

    def __init__(self, path=None, timer=None, measure_anywhere=False):
        self.path = Path(path) if path is not None else None
        self.timer = timer or cuda_event_timer
        self.measure_anywhere = measure_anywhere
        self._records = {}
        self._disk = None
        self._lock = threading.RLock()

    def _load(self):
        if self._disk is None:
            self._disk = {}
            if self.path is not None and self.path.exists():
                try:
                    self._disk = json.loads(self.path.read_text()).get("entries", {})
                except (OSError, ValueError):  # a broken cache is re-measured, not fatal
                    self._disk = {}
        return self._disk

    def _save(self, key, record):
        if self.path is None:
            return
        disk = self._load()
        disk[key] = record
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "entries": disk}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        except OSError:  # a read-only home still tunes, in memory
            pass

    def choice(self, key):
        rec = self._records.get(key)
        return rec["choice"] if rec else None

    def records(self):
        return [dict(r, key=k) for k, r in self._records.items()]

    def run(self, op, key, candidates: dict, *, measure: bool):
        """(name, result) of the candidate chosen for ``key``; candidates: name -> fn(), in
        priority order. The first call of a key chooses; later calls run the choice."""
        with self._lock:
            name = self.choice(key)
            if name is None:
                cached = self._load().get(key)
                if cached and cached.get("choice") in candidates:
                    self._records[key] = dict(cached, source="cache")
                elif measure:
                    return self._measure(op, key, candidates)
                else:
                    return self._first_that_runs(op, key, candidates)
                name = cached["choice"]
        return name, self._call(key, candidates[name])

    def _call(self, key, fn):
        """fn(), under a profiler label that names the choice and its times while a profiler
        records (torch.profiler / the Chrome trace of ``bench --profile``)."""
        if not torch.autograd.profiler._is_profiler_enabled:
            return fn()
        with torch.profiler.record_function(profiler_label(self._records[key])):
            return fn()

    def _measure(self, op, key, candidates):
        times, errors, results = {}, {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = float(self.timer(name, _keeping_result(fn, results, name)))
            except Exception as exc:  # a candidate that cannot run is skipped
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
        # A candidate whose result disagrees with the first that ran (the fixed table's choice
        # where it runs) is wrong, however fast: never chosen (a kernel never run on this GPU
        # must not win by computing something else).
        first = next(iter(times), None)
        for name in list(times)[1:]:
            why = disagreement(results.get(name), results.get(first))
            if why:
                del times[name]
                errors[name] = f"result differs from {first}'s: {why}"
        if not times:
            raise RuntimeError(f"vit_fast.tuning: no candidate of {op} ran: {errors}")
        name = min(times, key=lambda n: (times[n], list(candidates).index(n)))
        record = {"op": op, "choice": name, "times_ms": times, "errors": errors}
        self._records[key] = dict(record, source="measured")
        self._save(key, record)
        return name, self._call(key, candidates[name])

    def _first_that_runs(self, op, key, candidates):
        errors = {}
        for name, fn in candidates.items():
            self._records[key] = {"op": op, "choice": name, "times_ms": {}, "errors": errors,
                                  "source": "fixed"}
            try:
                result = self._call(key, fn)
            except Exception as exc:
                del self._records[key]
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            return name, result
        raise RuntimeError(f"vit_fast.tuning: no candidate of {op} ran: {errors}")


def _keeping_result(fn, results, name):
    """fn, keeping its latest result in results[name] (the timer discards them)."""
    def run():
        results[name] = fn()
        return results[name]
    return run


_TUNER = [Tuner(cache_path())]


def tuner() -> Tuner:
    return _TUNER[-1]


@contextlib.contextmanager
def use_tuner(t: Tuner):
    """Run the enclosed calls with tuner ``t`` (tests: an injected timer, a temporary cache)."""
    _TUNER.append(t)
    try:
        yield t
    finally:
        _TUNER.remove(t)


def records():
    """What the current tuner chose: dicts of op, key, choice, source (measured / cache / fixed),
    times_ms per candidate and the errors of candidates that were skipped."""
    return tuner().records()


def profiler_label(record) -> str:
    """'vit_fast.tune[op]: choice 210us < other 250us' (measured or cached times, fastest first),
    or 'vit_fast.tune[op]: choice (fixed)' where nothing was timed."""
    times = record.get("times_ms") or {}
    if not times:
        return f"vit_fast.tune[{record['op']}]: {record['choice']} ({record.get('source', '?')})"
    order = sorted(times, key=lambda n: (times[n], n != record["choice"]))
    return (f"vit_fast.tune[{record['op']}]: "
            + " < ".join(f"{n} {times[n] * 1e3:.0f}us" for n in order))


def format_records(recs=None) -> str:
    recs = records() if recs is None else recs
    lines = []
    for r in recs:
        times = ", ".join(f"{n} {t:.3f} ms" for n, t in r.get("times_ms", {}).items()) or "-"
        skipped = "; skipped " + ", ".join(r["errors"]) if r.get("errors") else ""
        lines.append(f"{r['op']}: {r['choice']} ({r.get('source', '?')}; {times}{skipped})\n"
                     f"    {r['key']}")
    return "\n".join(lines) or "no tuning records"


def _measurable(x) -> bool:
    from .kernels._device import interpreting
    if tuner().measure_anywhere:
        return mode() != "fixed"
    return (x.is_cuda and mode() != "fixed" and not interpreting()
            and not torch.cuda.is_current_stream_capturing())


def _ordered(op, candidates):
    return {n: candidates[n] for n in PRIORITY[op] if n in candidates}


def select(op, key, candidates, x):
    """The result of ``op``'s candidate chosen for ``key`` (measured on CUDA, else PRIORITY's
    first that runs); x: the tensor whose device decides whether timing is possible."""
    return tuner().run(op, key, _ordered(op, candidates), measure=_measurable(x))[1]


# --- gelu_mlp ------------------------------------------------------------------------------------

def _mlp_key(op, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
             sample_scale, **options):
    return make_key(op, dict(x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                             fc2_bias=fc2_bias, residual=residual, layer_scale=layer_scale,
                             sample_scale=sample_scale), **options)


def gelu_mlp_tuned_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                       layer_scale, sample_scale, save_pre):
    """kernels/gelu_mlp.gelu_mlp_fwd's contract; Triton or cuBLAS GEMMs, chosen per key."""
    from .kernels.gelu_elementwise import gelu_mlp_cublas_fwd
    from .kernels.gelu_mlp import gelu_mlp_fwd
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
            sample_scale, save_pre)
    key = _mlp_key("gelu_mlp_fwd", *args[:5], *args[6:9], approximate=approximate,
                   save_pre=save_pre)
    cands = {"triton": lambda: gelu_mlp_fwd(*args, choose=choose_gemm_config),
             "cublas": lambda: gelu_mlp_cublas_fwd(*args)}
    return tuner().run("gelu_mlp_fwd", key, _ordered("gelu_mlp_fwd", cands),
                       measure=_measurable(x))[1]


def gelu_mlp_tuned_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                       *, approximate, has_residual, wanted):
    """kernels/gelu_mlp.gelu_mlp_bwd's contract; Triton or cuBLAS GEMMs, chosen per key."""
    from .kernels.gelu_elementwise import gelu_mlp_cublas_bwd
    from .kernels.gelu_mlp import gelu_mlp_bwd
    args = (grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale)
    opts = dict(approximate=approximate, has_residual=has_residual, wanted=wanted)
    key = make_key("gelu_mlp_bwd", dict(grad=grad, x=x, fc1_weight=fc1_weight,
                                        fc2_weight=fc2_weight, fc2_bias=fc2_bias,
                                        layer_scale=layer_scale, sample_scale=sample_scale),
                   approximate=approximate, has_residual=has_residual, needs=tuple(wanted))
    cands = {"triton": lambda: gelu_mlp_bwd(*args, **opts, choose=choose_gemm_config),
             "cublas": lambda: gelu_mlp_cublas_bwd(*args, **opts)}
    return tuner().run("gelu_mlp_bwd", key, _ordered("gelu_mlp_bwd", cands),
                       measure=_measurable(x))[1]


def choose_gemm_config(a, fields: dict, candidates: dict):
    """kernels/matmul.matmul's ``choose``: the Triton GEMM's tile config for this launch key
    (shapes, dtypes, layout, epilogue), timed on CUDA like the implementations above; the
    candidates come in the fixed table's order, so with tuning off (or while a CUDA graph is
    captured) the first -- the fixed table's choice -- runs. Returns the chosen launch's result.
    On sm_90 the Hopper GEMM's configs (kernels/matmul_hopper.py) join last: timed, never the
    fixed choice."""
    from .kernels.matmul_hopper import hopper_launches
    key = make_key("gemm", {"a": a}, **fields)
    candidates = {**candidates, **hopper_launches(fields, candidates)}
    return tuner().run("gemm", key, candidates, measure=_measurable(a))[1]


def mlp_launchers(policy=None):
    """(forward launcher, backward op) of the GELU MLP for a backend policy: what the Block's
    residual->LayerNorm->MLP op runs. 'auto' selects inside, per key."""
    from . import dispatch
    from .ops import gelu_mlp_cublas  # noqa: F401  registers the cublas and tuned ops
    policy = policy or dispatch.current_policy()
    if policy == "triton":
        from .kernels.gelu_mlp import gelu_mlp_fwd
        return (functools.partial(gelu_mlp_fwd, choose=choose_gemm_config),
                torch.ops.vit_fast.gelu_mlp_backward)
    if policy == "cublas":
        from .kernels.gelu_elementwise import gelu_mlp_cublas_fwd
        return gelu_mlp_cublas_fwd, torch.ops.vit_fast.gelu_mlp_cublas_backward
    return gelu_mlp_tuned_fwd, torch.ops.vit_fast.gelu_mlp_tuned_backward


def gelu_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
             sample_scale):
    """The kernel path of functional.gelu_mlp (inputs validated, autocast applied): the forced
    implementation, else the tuned op; with VIT_FAST_TUNE=speed also the eager reference."""
    from . import dispatch, reference
    from .ops import gelu_mlp as triton_op
    from .ops import gelu_mlp_cublas as cublas_op
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual, layer_scale,
            sample_scale)
    policy = dispatch.current_policy()
    if policy == "triton":
        return triton_op.gelu_mlp(*args)
    if policy == "cublas":
        return cublas_op.gelu_mlp(*args)
    if mode() != "speed" or torch.compiler.is_compiling() or not _measurable(x):
        return cublas_op.gelu_mlp_tuned(*args)
    tensors = [t for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, layer_scale,
                           sample_scale) if t is not None]
    train = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)

    def ref():
        return reference.gelu_mlp(*args[:5], approximate=approximate, residual=residual,
                                  layer_scale=layer_scale, sample_scale=sample_scale)

    cands = {"kernels": lambda: cublas_op.gelu_mlp_tuned(*args), "reference": ref}
    timed = {n: _with_backward(fn, tensors) if train else fn for n, fn in cands.items()}
    key = _mlp_key("gelu_mlp", *args[:5], *args[6:], approximate=approximate, train=train)
    t = tuner()
    name = t.choice(key)
    if name is None:  # time forward(+backward) of each, then run the winner for its graph
        name, _ = t.run("gelu_mlp", key, timed, measure=True)
    return cands[name]()


def _with_backward(fn, tensors):
    """fn's forward and backward, as one timed step (grads returned, not accumulated)."""
    needs = [t for t in tensors if t.requires_grad]

    def step():
        out = fn()
        return torch.autograd.grad(out, needs, torch.ones_like(out))
    return step


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m vit_fast.tuning",
                                description="Print the measured choices in the tuning cache.")
    p.add_argument("--path", default=str(cache_path()))
    args = p.parse_args(argv)
    entries = Tuner(args.path)._load()
    print(f"{args.path}: {len(entries)} entries")
    print(format_records([dict(r, key=k, source="cache") for k, r in entries.items()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
