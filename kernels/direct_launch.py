"""A Triton launch of one bound configuration that skips Triton's per-call launch path.

``kernel[grid](*args, **consts)`` runs Triton's ``JITFunction.run`` every time: it binds the
arguments to the kernel's parameters, derives their specialization (dtypes, 16-byte alignment,
integers equal to 1 or divisible by 16, Nones), hashes that into a cache key, finds the compiled
kernel, asks the driver for the current device and stream, builds launch metadata, and only then
calls the compiled kernel's launcher. That is about 16 µs of Python per launch on this project's
CPU (``python -m vit_fast.bench host``), more than the rest of the fused Block's host path spends
per launch. The Block's step (kernels/*_bound.py) launches each kernel with the same shapes,
dtypes and flags every time, so all of it but the stream and the launcher call can be done once.

:class:`DirectLaunch` is that launch. How it stays Triton's launch, argument for argument:

- Its first call goes through ``kernel[grid]`` (compiling if need be). Its second also does, with
  the compiled kernel's launcher wrapped for that one call so that what Triton passes to it is
  recorded. The direct call is then built to reproduce that record -- the grid, the stream, the
  compiled function and metadata, and every kernel argument in Triton's order (all parameters,
  constexprs included, on the Triton versions we support; the non-constexpr ones on older ones)
  -- and kept only if it does, exactly. On a Triton whose convention it cannot reproduce, or one
  without the pieces it reads (``CompiledKernel._run``, ``function``, ``packed_metadata``), every
  call stays ``kernel[grid]``.
- Per call, the direct path is taken only when the arguments have the specialization of the
  recorded call: every tensor the same dtype and the same 16-byte alignment, every None still
  None, every integer or flag an equal value (Triton specializes on them), every float a float;
  the same current device; no launch hook (a profiler's ``knobs.runtime.launch_enter_hook``) and
  no pre-run hook installed. Any other call goes through ``kernel[grid]``, which finds or compiles
  the kernel it needs.
- ``VIT_FAST_DIRECT_LAUNCH=0`` in the environment (read at import) keeps every call on
  ``kernel[grid]``; so does Triton's interpreter, which has no compiled kernel. Triton's own
  compile options read from its knobs per call (``TRITON_DEBUG``, instrumentation) are taken as
  they were at the recorded call: set them before the first step, as their environment
  variables are.

Launch metadata is built by Triton only for launch hooks, so the direct call passes None for it
and for the hooks. The launch cost that remains is the compiled kernel's launcher itself (its
Python wrapper and the driver call), which the performance model charges per kernel as
``launch_us``.
"""
from __future__ import annotations

import os
import threading

import torch

ENABLED = (os.environ.get("VIT_FAST_DIRECT_LAUNCH", "1") != "0"
           and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))

# The 9 arguments Triton's JITFunction.run passes before the kernel's: grid x/y/z, stream,
# function, packed metadata, launch metadata, enter hook, exit hook.
_LEAD = 9


def _driver():
    """(current device, current stream of a device): the functions Triton's driver launches with
    (torch.cuda.current_device's own C call where Triton's is that Python wrapper)."""
    from triton.runtime import driver
    active = driver.active
    device = active.get_current_device
    if device is torch.cuda.current_device:
        device = torch._C._cuda_getDevice
    return device, active.get_current_stream


def _hook_check(kernel):
    """(source, names) of an expression that is true where a hook wants to see launches: a launch
    hook (profilers; Triton's knobs.runtime.launch_enter_hook / _exit_hook, chains of hooks on
    recent Triton, a callable or None on older) or a pre-run hook of the kernel. Read per call:
    hooks come and go at run time."""
    from triton import knobs
    rt = knobs.runtime
    names = {"RT": rt, "KERNEL": kernel}
    parts = []
    for attr in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(rt, attr, None)
        parts.append(f"RT.{attr}.calls" if hasattr(hook, "calls") else f"RT.{attr} is not None")
    if hasattr(kernel, "pre_run_hooks"):
        parts.append("KERNEL.pre_run_hooks")
    return " or ".join(parts), names


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a is None or b is None:
        return a is b
    return type(a) is type(b) and a == b


class DirectLaunch:
    """``kernel[grid](*args, **kwargs, **consts)`` for one bound configuration (see the module
    docstring). ``args`` and ``kwargs`` vary per call (a call passes the same keyword names every
    time); ``consts`` (constexprs and launch options) are fixed when it is made."""
    __slots__ = ("kernel", "grid", "consts", "calls", "fast", "__weakref__")

    def __init__(self, kernel, grid, consts):
        self.kernel, self.grid, self.consts = kernel, tuple(grid), dict(consts)
        self.calls = 0
        self.fast = None  # the generated direct launch: returns False where a call must not use it

    def __call__(self, *args, **kwargs):
        fast = self.fast
        if fast is not None and fast(*args, **kwargs):
            return
        self.calls += 1
        if self.calls == 2 and fast is None and ENABLED:
            self.fast = _record_and_build(self, args, kwargs)
            return
        self.kernel[self.grid](*args, **kwargs, **self.consts)


_KEPT = {}  # (kernel, grid, id(constexprs)) -> (DirectLaunch, the constexprs, held)


def kept(kernel, grid, consts):
    """The DirectLaunch of ``kernel[grid](..., **consts)`` for a general launcher, made on first
    use and kept, so that its calls too skip Triton's launch path once a configuration has
    launched twice. ``consts`` must be the launcher's own per-configuration constexprs (kept by
    it, so the same dict each call): keyed by the dict's identity, which the entry holds."""
    key = (kernel, grid, id(consts))
    hit = _KEPT.get(key)
    if hit is None:
        if len(_KEPT) >= 4096:  # configurations of shapes long gone: drop, remake on use
            _KEPT.clear()
        hit = _KEPT[key] = (DirectLaunch(kernel, grid, consts), consts)
    return hit[0]


def forget_kept():
    """Drop every kept launch (bench host: none made on its stand-in launcher may outlive it)."""
    _KEPT.clear()


def _record_and_build(launch, args, kwargs):
    """Launch through Triton while recording what it passes to the compiled kernel's launcher;
    return the direct launch that reproduces it, or None (this call launched either way)."""
    kernel, grid, consts = launch.kernel, launch.grid, launch.consts
    needed = ("warmup", "params")
    compiled = real = None
    if all(hasattr(kernel, n) for n in needed):
        try:  # Triton's own lookup of the kernel this call compiles to (nothing launched)
            compiled = kernel.warmup(*args, grid=grid, **kwargs, **consts)
            hooked, names = _hook_check(kernel)
            if not all(hasattr(compiled, n) for n in ("_run", "function", "packed_metadata")) \
                    or eval(hooked, names):
                compiled = None
            else:
                real = compiled.run  # initializes the launcher (compiled._run)
        except Exception:  # noqa: BLE001 - a Triton this cannot read: launch through it
            compiled = None
    if compiled is None:
        kernel[grid](*args, **kwargs, **consts)
        return None
    me = threading.get_ident()
    record = []

    def recording(*passed):
        if threading.get_ident() == me and not record:
            record.append(passed)
        return real(*passed)
    try:
        compiled._run = recording
        kernel[grid](*args, **kwargs, **consts)
    finally:
        compiled._run = real
    if not record:
        return None
    try:
        return _build(launch, args, kwargs, compiled, real, record[0])
    except Exception:  # noqa: BLE001 - a convention this cannot read: stay on kernel[grid]
        return None


def _layouts(kernel, n_args, kwargs, consts):
    """Candidate orders of the kernel's arguments in the launcher call: every parameter (what
    Triton >= 3.3 passes), or the non-constexpr ones (older Triton). Each entry: ("arg", i) for
    the call's i-th positional argument, ("kw", name) for a keyword one, ("const", value)."""
    entries = []
    for i, p in enumerate(kernel.params):
        if i < n_args:
            entry = ("arg", i)
        elif p.name in kwargs:
            entry = ("kw", p.name)
        elif p.name in consts:
            entry = ("const", consts[p.name])
        elif p.has_default:
            entry = ("const", p.default)
        else:
            raise TypeError(f"{kernel}: no value for parameter {p.name!r}")
        entries.append((entry, p.is_constexpr))
    return [[e for e, _ in entries], [e for e, constexpr in entries if not constexpr]]


def _build(launch, args, kwargs, compiled, run, passed):
    get_device, get_stream = _driver()
    device = get_device()
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    lead = (grid[0], grid[1], grid[2], get_stream(device), compiled.function,
            compiled.packed_metadata)
    if len(passed) < _LEAD or any(not _same(a, b) for a, b in zip(passed[:6], lead)):
        return None
    value = {"arg": args.__getitem__, "kw": kwargs.__getitem__, "const": lambda v: v}
    for layout in _layouts(launch.kernel, len(args), kwargs, launch.consts):
        values = [value[kind](v) for kind, v in layout]
        if len(values) == len(passed) - _LEAD and all(
                _same(a, b) for a, b in zip(passed[_LEAD:], values)):
            return _generate(launch.kernel, args, kwargs, layout, grid, device, compiled, run,
                             get_device, get_stream)
    return None


def _checks(named, env):
    """Tests that the call's arguments (``named``: (parameter name in the generated function,
    recorded value)) have the recorded specialization in Triton's terms -- tensors their dtype
    and 16-byte alignment, Nones None, integers and flags their values (compared as one tuple:
    the bound launchers pass the same Python types every call), floats floats -- or None for a
    kind this does not handle."""
    checks, ints, values = [], [], []
    for name, value in named:
        if isinstance(value, torch.Tensor):
            env[f"_vf_{name}_dtype"] = value.dtype
            aligned = value.data_ptr() % 16 == 0
            checks.append(f"{name} is not None and {name}.dtype is _vf_{name}_dtype and "
                          f"{'not ' if aligned else ''}{name}.data_ptr() & 15")
        elif value is None:
            checks.append(f"{name} is None")
        elif type(value) in (int, bool):
            ints.append(name)
            values.append(value)
        elif type(value) is float:
            checks.append(f"type({name}) is float")
        else:
            return None
    if ints:
        env["_vf_INTS"] = tuple(values)
        checks.append(f"({', '.join(ints)},) == _vf_INTS")
    return checks


def _generate(kernel, args, kwargs, layout, grid, device, compiled, run, get_device, get_stream):
    """The direct launch as one generated function: check the call's specialization, launch.
    Returns False (nothing launched) where the call differs from the recorded one. Its globals
    are named _vf_* so that no kernel parameter name shadows them."""
    positional = [f"a{i}" for i in range(len(args))]
    hooked, names = _hook_check(kernel)
    env = {"_vf_run": run, "_vf_device": get_device, "_vf_stream": get_stream,
           "_vf_DEVICE": device, "_vf_FUNCTION": compiled.function,
           "_vf_PACKED": compiled.packed_metadata, "_vf_G": grid,
           "_vf_RT": names["RT"], "_vf_KERNEL": names["KERNEL"],
           "_vf_COMPILED": compiled}  # held: Triton unloads a compiled kernel's module when freed
    hooked = hooked.replace("RT.", "_vf_RT.").replace("KERNEL.", "_vf_KERNEL.")
    checks = _checks([*zip(positional, args), *kwargs.items()], env)
    if checks is None:
        return None
    checks.insert(0, "_vf_device() == _vf_DEVICE")
    passed = []
    for j, (kind, v) in enumerate(layout):
        if kind == "arg":
            passed.append(positional[v])
        elif kind == "kw":
            passed.append(v)
        else:
            env[f"_vf_C{j}"] = v
            passed.append(f"_vf_C{j}")
    signature = ", ".join(positional + (["*", *kwargs] if kwargs else []))
    src = (f"def direct({signature}):\n"
           f"    if not ({' and '.join(checks)}) or {hooked}:\n"
           f"        return False\n"
           f"    _vf_run(_vf_G[0], _vf_G[1], _vf_G[2], _vf_stream(_vf_DEVICE), _vf_FUNCTION, "
           f"_vf_PACKED, None, None, None{''.join(', ' + p for p in passed)})\n"
           f"    return True\n")
    exec(compile(src, f"<direct launch of {getattr(kernel, '__name__', kernel)}>", "exec"), env)
    return env["direct"]
