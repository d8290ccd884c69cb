"""The AOT builds the tests compile: a covering subset of each kernels/*_aot.py list, built once per
session in one pool of worker processes (tests/conftest.py's ``aot_builds`` fixture).

``python -m vit_fast.bench compile-check`` builds every spec for sm_80 and sm_90; the tests
compile a subset chosen by :func:`covering_jobs`, a rule over the specs themselves (so a spec
added to a list is covered without editing a test):

1. every variant family -- a kernel with one setting of its flag constexprs (bools, strings,
   None: dropout, segments, an epilogue, RMS or LayerNorm) -- at its heaviest spec (the largest
   product of its numeric constexprs and warps, then the most fp32 pointers, then the largest
   single constexpr: the most live values, where spills show first), on every architecture;
2. then, greedily, specs until every value of every constexpr of each kernel (each head dim,
   tile, block size), every pointer dtype of every argument and every (num_warps, num_stages) of
   each variant family (each row of a config table) has been built once, on one architecture
   (the one with fewer builds so far).

On two CPU cores that is 162 of the 1196 builds compile-check makes.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

ARCHS = (80, 90)


def _kernel(spec):
    return spec.kernel.fn.__name__


def _is_flag(value):
    return value is None or isinstance(value, (bool, str))


def family(spec):
    """(kernel, its flag constexprs): the variant a build is of."""
    return _kernel(spec), tuple(sorted((n, v) for n, v in spec.constants.items() if _is_flag(v)))


def _values(spec):
    """What else a build fixes: each numeric constexpr, each pointer dtype, the launch options."""
    k = _kernel(spec)
    out = {("const", k, n, v) for n, v in spec.constants.items() if not _is_flag(v)}
    out |= {("ptr", k, n, t) for n, t in spec.signature.items() if t.startswith(("*", "tensordesc"))}
    out.add(("launch", family(spec), spec.num_warps, spec.num_stages))
    return out


def _weight(spec):
    numbers = [v for v in spec.constants.values() if not _is_flag(v)]
    product = 1
    for v in numbers:
        product *= max(int(v), 1)
    wide = sum(t == "*fp32" for t in spec.signature.values())
    return product * spec.num_warps, wide, max(numbers, default=0)


def archs_of(spec):
    # A spec may say which targets its launcher runs it on (sm_90-only TMA builds).
    return tuple(a for a in ARCHS if spec.for_arch(a))


def covering_jobs(specs) -> list[tuple[str, int]]:
    """[(spec name, arch)] to build: the rule in this module's docstring."""
    heaviest = {}
    for spec in specs:
        fam = family(spec)
        if fam not in heaviest or _weight(spec) > _weight(heaviest[fam]):
            heaviest[fam] = spec
    jobs = [(s.name, a) for s in heaviest.values() for a in archs_of(s)]
    values = [(_values(s), _weight(s), s) for s in specs]
    todo = set().union(*(v for v, _, _ in values))
    todo -= set().union(*map(_values, heaviest.values()))
    per_arch = {a: 0 for a in ARCHS}
    for a in (a for _, a in jobs):
        per_arch[a] += 1
    while todo:
        new, _, spec = max(values, key=lambda v: (len(v[0] & todo), v[1]))
        arch = min(archs_of(spec), key=lambda a: (per_arch[a], a))
        jobs.append((spec.name, arch))
        per_arch[arch] += 1
        todo -= new
    return jobs


def parametrize_jobs(jobs):
    """The pytest parametrization of a test over ``jobs``: arguments (name, arch), readable ids."""
    import pytest
    return pytest.mark.parametrize("name, arch", jobs, ids=[f"{n}-sm_{a}" for n, a in jobs])


# --- building ---------------------------------------------------------------------------------

def _compiling():
    """In a worker: the tests run triton under the interpreter, whose kernels cannot be compiled;
    turn it off before anything imports triton (this module imports neither triton nor
    vit_fast). The workers start at collection, outside pytest's output capture: the tools'
    chatter (nvdisasm's format warnings) goes to /dev/null, results come back as values."""
    if os.environ.get("TRITON_INTERPRET") == "0":
        return
    os.environ["TRITON_INTERPRET"] = "0"
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)
    os.dup2(quiet, 2)
    os.close(quiet)


def _call(job):
    """In a worker: ``function(*args)`` for job = ("module:function", args)."""
    _compiling()
    import importlib
    target, args = job
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(*args)


def _build(job):
    """In a worker: compile one spec of vit_fast.kernels.<module> for one arch."""
    _compiling()
    import importlib

    from vit_fast.aot import compile_spec
    module, name, arch = job
    specs = {s.name: s for s in importlib.import_module(f"vit_fast.kernels.{module}").aot_specs()}
    try:
        return job, compile_spec(specs[name], arch)
    except Exception as exc:  # one failed build is a result to report, not a crash
        return job, f"{type(exc).__name__}: {exc}"[:2000]


class AotBuilds:
    """Builds in a pool of spawned workers kept for the session, each (module, spec, arch) once.

    :meth:`submit` starts builds in the background (conftest.py submits every collected AOT test
    module's jobs at collection and runs those tests last, so the workers compile while the
    interpreter tests run); :meth:`build` waits for them."""

    def __init__(self, workers=2):
        self._futures = {}
        self._pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))

    def submit(self, module, jobs):
        """Start building ``jobs`` of vit_fast.kernels.<module> (a list of (spec name, arch))."""
        for name, arch in jobs:
            key = (module, name, arch)
            if key not in self._futures:
                self._futures[key] = self._pool.submit(_build, key)

    def build(self, module, jobs):
        """{(spec name, arch): AotResult, or the error text} for ``jobs`` of
        vit_fast.kernels.<module>."""
        self.submit(module, jobs)
        return {(n, a): self._futures[(module, n, a)].result()[1] for n, a in jobs}

    def call(self, target, arg_lists):
        """[target(*args) for args in arg_lists], run in the workers (with triton compiling, not
        interpreting); target is "module:function"."""
        return list(self._pool.map(_call, [(target, tuple(args)) for args in arg_lists]))

    def close(self):
        self._pool.shutdown(cancel_futures=True)
