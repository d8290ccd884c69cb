"""Selection by measurement between implementations of one op (like cudnn.benchmark).

On CUDA, the first call of each key -- (op, shapes, dtypes, options, device, versions) -- times
every candidate (CUDA events on the tensors' device, a warm-up then REPS runs, the median), keeps
the fastest, and stores the choice in memory and in a JSON cache (``$VIT_FAST_CACHE_DIR/
tuning.json``, default ``~/.cache/vit_fast/tuning.json``) that later processes reload. The choice
is fixed afterwards, so a run is reproducible. A candidate that raises is skipped (recorded with
its error; a build failure in a candidate is not a failure of the op: its launcher's failure is
not recorded, so the op keeps its kernels), and so is one whose result differs from the first
candidate's that ran (vit_fast/agreement.py): the sm_90-only candidates (TMA attention forward,
Hopper GEMM) can win only by computing the same. Results are compared as they come and dropped:
the measurement holds the first candidate's result and one other at a time.

``VIT_FAST_TUNE``:
- ``1`` (default): measure. The candidates save the same tensors for backward (the Triton GEMM
  and the cuBLAS GEMM implementations), so the memory figures hold whatever wins.
- ``speed``: measure, and the eager reference (which saves more for backward) joins the pool of
  the public ``gelu_mlp``; timed forward+backward when the call records a graph.
- ``0``: no timing: the first candidate of PRIORITY that runs.
On CPU, under the Triton interpreter and while a CUDA graph is captured, PRIORITY applies too.

The host path: a key is a tuple the caller builds from what it has (shapes are torch.Size, which
hash as tuples); a hit is one dict look-up and a call of the chosen candidate with the call's
arguments (``Tuner.run(..., args=...)``: the candidates are functions of the arguments, built
once, not closures per call). The text form of a key (records, the JSON cache) is made only when a
key is first seen.

The Triton GEMM's tile configs join the same measurement (``choose_gemm_config``); the MLP's
implementations are chosen in vit_fast/ops/gelu_mlp_tuned.py and attention's in
vit_fast/ops/attention_sdpa.py. ``records()`` lists what was chosen and the times;
``python -m vit_fast.tuning`` prints the cache. While a profiler records, each run of a chosen
candidate is wrapped in a ``vit_fast.tune[op]: ...`` label with the choice and its times.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
from pathlib import Path

import torch

from .agreement import disagreement
from .kernels import _device

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
    """'measure', 'fixed' or 'speed', from VIT_FAST_TUNE (read when a key is first seen)."""
    env = os.environ.get("VIT_FAST_TUNE", "1").strip().lower() or "1"
    if env not in _MODES:
        raise ValueError(f"VIT_FAST_TUNE must be one of {sorted(_MODES)}, got {env!r}")
    return _MODES[env]


def cache_path() -> Path:
    root = os.environ.get("VIT_FAST_CACHE_DIR") or Path.home() / ".cache" / "vit_fast"
    return Path(root) / "tuning.json"


def cuda_event_timer(name, fn, reps=REPS, device=None):
    """Median milliseconds of ``fn()`` over ``reps`` runs, after one warm-up run (JIT compile,
    cuBLAS heuristics), each timed with CUDA events on ``device``'s current stream (the device of
    the tensors fn works on: Triton and torch launch there, so the events must be recorded there)."""
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
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


_DEVICE_NAMES = {}  # keys are built when first seen: keep the driver queries out of the hot path


def device_name(device) -> str:
    """'NVIDIA H100 80GB HBM3 sm_90 #1': the GPU model, its architecture and its index (two GPUs
    of one model may still differ: clocks, MIG slices, what else runs on them)."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_NAMES:
        major, minor = torch.cuda.get_device_capability(index)
        _DEVICE_NAMES[index] = f"{torch.cuda.get_device_name(index)} sm_{major}{minor} #{index}"
    return _DEVICE_NAMES[index]


def _describe(name, t):
    if t is None:
        return f"{name}=None"
    return f"{name}={str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def make_key(op, tensors: dict, **options) -> str:
    """One string per (op, shapes, dtypes, options, device, versions): the text form of a key."""
    parts = [op]
    device = None
    for name, t in tensors.items():
        device = device or (t.device if t is not None else None)
        parts.append(_describe(name, t))
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
        self.timer = timer
        self.measure_anywhere = measure_anywhere
        self._records = {}  # text key -> record
        self._fast = {}  # key as given -> (name, record)
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
        hit = self._fast.get(key)
        if hit is not None:
            return hit[0]
        rec = self._records.get(key) if isinstance(key, str) else None
        return rec["choice"] if rec else None

    def records(self):
        return [dict(r, key=k) for k, r in self._records.items()]

    def run(self, op, key, candidates: dict, *, measure: bool, args=(), describe=None,
            device=None):
        """(name, result) of the candidate chosen for ``key``; candidates: name -> fn(*args), in
        priority order. The first call of a key chooses (in memory, from the JSON cache, by
        measurement or by the fixed order); later calls run the choice. ``key`` is any hashable;
        ``describe()`` gives its text form (records, the cache; default str keys as they are).
        A remembered choice is run only if it is among this call's candidates: a key that does
        not hold everything that changes the candidate set is chosen again, never a KeyError."""
        hit = self._fast.get(key)
        if hit is not None and hit[0] in candidates:
            return hit[0], self._call(hit[1], candidates[hit[0]], args)
        with self._lock:
            text = key if isinstance(key, str) else describe()
            rec = self._records.get(text)
            if rec is None or rec["choice"] not in candidates:
                cached = self._load().get(text)
                if cached and cached.get("choice") in candidates:
                    rec = self._records[text] = dict(cached, source="cache")
                elif measure:
                    rec = self._measure(op, text, candidates, args, device)
                else:
                    name, result, rec = self._first_that_runs(op, text, candidates, args)
                    self._fast[key] = (name, rec)
                    return name, result
            self._fast[key] = (rec["choice"], rec)
        return rec["choice"], self._call(rec, candidates[rec["choice"]], args)

    @staticmethod
    def _call(record, fn, args):
        """fn(*args), under a profiler label that names the choice and its times while a
        profiler records (torch.profiler / the Chrome trace of ``bench --profile``)."""
        if not torch.autograd.profiler._is_profiler_enabled:
            return fn(*args)
        with torch.profiler.record_function(profiler_label(record)):
            return fn(*args)

    def _time(self, name, fn, device):
        if self.timer is not None:
            return self.timer(name, fn)
        return cuda_event_timer(name, fn, device=device)

    def _measure(self, op, key, candidates, args, device):
        """Time each candidate; a result that disagrees with the first that ran is a candidate
        that is wrong, however fast: never chosen (a kernel never run on this GPU must not win by
        computing something else). Each result is compared as soon as its candidate was timed
        and dropped, so at most two results are alive at once."""
        times, errors = {}, {}
        first = first_result = None
        with _device.trial():  # a candidate's build failure is the candidate's, not the op's
            for name, fn in candidates.items():
                kept = []
                try:
                    times[name] = float(self._time(name, _keeping_last(fn, args, kept), device))
                except Exception as exc:  # a candidate that cannot run is skipped
                    errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                if first is None:
                    first, first_result = name, (kept[0] if kept else None)
                    continue
                why = disagreement(kept[0] if kept else None, first_result)
                del kept
                if why:
                    del times[name]
                    errors[name] = f"result differs from {first}'s: {why}"
        del first_result
        if not times:
            raise _device.KernelLaunchError(f"vit_fast.tuning: no candidate of {op} ran: {errors}")
        name = min(times, key=lambda n: (times[n], list(candidates).index(n)))
        record = {"op": op, "choice": name, "times_ms": times, "errors": errors}
        self._records[key] = dict(record, source="measured")
        self._save(key, record)
        return self._records[key]

    def _first_that_runs(self, op, key, candidates, args):
        errors = {}
        for name, fn in candidates.items():
            rec = self._records[key] = {"op": op, "choice": name, "times_ms": {},
                                        "errors": errors, "source": "fixed"}
            try:
                with _device.trial() if len(candidates) > 1 else contextlib.nullcontext():
                    result = self._call(rec, fn, args)
            except Exception as exc:
                del self._records[key]
                errors[name] = f"{type(exc).__name__}: {exc}"[:300]
                if len(candidates) == 1:
                    raise
                continue
            return name, result, rec
        raise _device.KernelLaunchError(f"vit_fast.tuning: no candidate of {op} ran: {errors}")


def _keeping_last(fn, args, kept):
    """fn(*args) as a zero-argument callable for the timer, keeping only its latest result in
    ``kept`` (the previous one is dropped before the next run starts)."""
    def run():
        kept.clear()
        kept.append(fn(*args))
        return kept[0]
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


def measurable(x) -> bool:
    """Whether candidates for a call on x's device can be timed now (read when a key is first
    seen, with the rest of the choice)."""
    if tuner().measure_anywhere:
        return mode() != "fixed"
    return (x.is_cuda and mode() != "fixed" and not _device.interpreting()
            and not torch.cuda.is_current_stream_capturing())


def ordered(op, candidates):
    """candidates in PRIORITY's order for op (those PRIORITY does not list are dropped)."""
    return {n: candidates[n] for n in PRIORITY[op] if n in candidates}


def select(op, key, candidates, x, args=(), describe=None):
    """The result of ``op``'s candidate chosen for ``key`` (measured on CUDA, else PRIORITY's
    first that runs); x: the tensor whose device decides whether timing is possible; candidates:
    name -> fn(*args) (zero-argument closures with args=())."""
    t = _TUNER[-1]
    hit = t._fast.get(key)
    if hit is not None and hit[0] in candidates:
        return t._call(hit[1], candidates[hit[0]], args)
    return t.run(op, key, ordered(op, candidates), measure=measurable(x), args=args,
                 describe=describe, device=x.device)[1]


# --- the Triton GEMM's tile config ---------------------------------------------------------------

def choose_gemm_config(a, key, candidates: dict):
    """kernels/matmul.matmul's ``choose``: the chosen launch's result for this launch ``key``
    (a kernels/matmul.GemmKey: shapes, dtypes, layout, epilogue, precision, whether TMA can read
    the operands, device). candidates: {config name: launch} in the fixed table's order, so with
    tuning off (or while a CUDA graph is captured) the first -- the fixed table's choice -- runs.
    On sm_90 the Hopper GEMM's configs (kernels/matmul_hopper.py) join last: timed, never the
    fixed choice. matmul asks :func:`chosen_gemm_config` first: a key seen before is launched
    without building candidates."""
    from .kernels.matmul_hopper import hopper_launches
    candidates = {**candidates, **hopper_launches(key, candidates)}
    return tuner().run("gemm", key, candidates, measure=measurable(a), device=a.device,
                       describe=lambda: gemm_key_text(key))[1]


_GEMM_DECISIONS = {}  # (tuner id, key) -> what matmul launches for a key chosen before


def chosen_gemm_config(key):
    """What was chosen before for ``key``: a matmul GemmConfig, or the Hopper GEMM bound to its
    config (a launcher taking matmul's arguments); None when the key has not been seen."""
    t = _TUNER[-1]
    hit = t._fast.get(key)
    if hit is None:
        return None
    memo = (id(t), key)
    decision = _GEMM_DECISIONS.get(memo)
    if decision is None or decision[0] != hit[0]:
        decision = _GEMM_DECISIONS[memo] = (hit[0], _gemm_decision(key, hit[0]))
    return decision[1]


def _gemm_decision(key, name):
    import functools

    from .kernels import matmul, matmul_hopper
    key = matmul.GemmKey(*key)
    target = _device.gpu_target(key.device)
    for c in matmul.gemm_candidates(key.M, key.N, key.a, key.epilogue, key.precision, target,
                                    key.K):
        if c.name == name:
            return c
    config = matmul_hopper.config_named(name)
    if config is None:  # a name this build does not know (an old cache): choose again
        return None
    return functools.partial(matmul_hopper.hopper_matmul, config=config)


choose_gemm_config.lookup = chosen_gemm_config


def gemm_key_text(key):
    from .kernels.matmul import GemmKey
    key = GemmKey(*key)
    fields = ", ".join(f"{k}={v}" for k, v in key._asdict().items() if k != "device")
    return f"gemm|{fields}|device={device_name(key.device)}|{versions()}"


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
