"""A step body recorded once per configuration and replayed from C++ (csrc/step_program.cpp).

The Block's one-node step (block_step.BlockFn) runs, per forward and per backward, the same
sequence every call of a configuration: ~90 aten ops (GEMMs, allocations, views, sums) and 19
Triton launches, with the same shapes, dtypes, constants and launch arguments. Issued from Python,
each op pays its binding's argument parsing and each launch the Python that builds its arguments:
most of the step's host time, and more than half of what timm's eager Block costs in all
(``python -m vit_fast.bench host``). Recorded once, the sequence is a program that C++ replays
on the next call's tensors: the ops called boxed below autograd and autocast, the launches by
calling each compiled kernel's launcher with the new data pointers.

What is recorded, and when a recording is refused (the body then keeps running in Python):

- every aten op the body dispatches (a TorchDispatchMode sees them below autograd and autocast,
  as the replay calls them) with every argument of its schema: a tensor must be one of the
  inputs or an earlier op's output (a register), anything else is a constant; an op of another
  namespace, one returning a non-tensor (a value read back: ``.item()``, a comparison) or
  reading a tensor the recording has not seen, refuses it;
- every launch, at the compiled kernel's launcher a direct launch calls
  (kernels/direct_launch.py): its grid, function and constants, the current stream (read per
  replay) and, per tensor argument, a register. A launch through ``kernel[grid]`` (no direct
  launch yet, a call the direct launch does not take) or an argument of another kind refuses it;
- anything the step or the tuner decided during the call (``state`` changed): the call was not
  yet the configuration's settled one.

A program is replayed only on inputs with the recorded None-ness, dtypes, sizes, strides and
16-byte alignment (Triton specializes on it; every other tensor of the body is allocated or a
view, so its layout follows), with no dispatch mode active (fake tensors, counting modes see the
Python body), and no launch hook installed (a profiler's, as the direct launch checks). The
caller keys programs by everything else the body branches on (scalars, which gradients).

``VIT_FAST_STEP_PROGRAMS=0`` (read at import) keeps every body in Python; so do Triton's
interpreter (no compiled launcher to call) and a build of vit_fast._C without the replay.
"""
from __future__ import annotations

import os
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .kernels import direct_launch

try:
    from ._C import program_build as _build, program_run as _run
except (ImportError, AttributeError):  # no extension, or one built before the replay
    _build = _run = None

ENABLED = (_run is not None and direct_launch.ENABLED
           and os.environ.get("VIT_FAST_STEP_PROGRAMS", "1") != "0")
RECORD_AT = 3  # a key's call that is recorded: the bound launches are direct from their second
ATTEMPTS = 3   # recordings refused before a key keeps its body in Python for good
_modes = torch._C._len_torch_dispatch_stack
# Launchers are passed the tensors themselves rather than their data pointers (tests: stand-in
# launchers that run the interpreter); read when a program is made.
_AS_TENSORS = False

# Launch arguments other than tensors that a recording takes as constants (Triton's launcher
# convention: grid, stream, function, metadata, hooks, then the kernel's arguments).
_CONSTANT_TYPES = (type(None), bool, int, float, str)


class Program:
    """One recorded body: run(inputs) -> its outputs, or None where the inputs differ from the
    recorded ones or a launch hook is installed (the caller runs the body)."""
    __slots__ = ("capsule", "hooked", "stream", "device", "keep", "as_tensors")

    def __init__(self, capsule, hooked, stream, device, keep):
        self.capsule, self.hooked, self.stream, self.device = capsule, hooked, stream, device
        self.keep = keep  # compiled kernels: Triton unloads a kernel's module when freed
        self.as_tensors = _AS_TENSORS

    def run(self, inputs):
        if self.hooked():
            return None
        return _run(self.capsule, inputs, self.stream, self.device, self.as_tensors)


class Programs:
    """The programs of one step, by key: a Program, the calls seen so far, or False (refused
    ATTEMPTS times). ``state()``: what the step and the tuner have decided (see the module
    docstring)."""
    __slots__ = ("by_key", "state")

    def __init__(self, state):
        self.by_key, self.state = {}, state

    def run(self, key, inputs, body, *args):
        """body(*args) -- a flat tuple of tensors and Nones -- or the program recorded from it
        for ``key``, run on ``inputs`` (every tensor the body reads that it did not make)."""
        prog = self.by_key.get(key)
        if type(prog) is Program:
            if not _modes():
                out = prog.run(inputs)
                if out is not None:
                    return out
            return body(*args)
        if prog is False or _modes():
            return body(*args)
        n = (prog or 0) + 1
        if n < RECORD_AT:
            self.by_key[key] = n
            return body(*args)
        out, prog = record(body, args, inputs, self.state)
        self.by_key[key] = prog if prog is not None else (
            n if n < RECORD_AT + ATTEMPTS - 1 else False)
        return out


def record(body, args, inputs, state=tuple):
    """(body(*args), the Program that replays it on inputs like ``inputs``, or None)."""
    if not _RECORDING.acquire(blocking=False):
        return body(*args), None
    try:
        rec = _Recorder(inputs)
        before = state()
        with rec:
            out = body(*args)
        if state() != before:
            rec.refuse("the call decided something")
    finally:
        _RECORDING.release()
    return out, rec.program(out)


class _Refused(Exception):
    pass


class _Recorder(TorchDispatchMode):
    def __init__(self, inputs):
        super().__init__()
        self.thread = threading.get_ident()
        self.regs = {}      # id(tensor) -> register
        self.alive = []     # every tensor seen, so that no id is reused while recording
        self.instrs = []    # [kind, ..., registers read, registers written]
        self.kernels = {}   # kernel -> its compiled kernel
        self.views = {}     # a view op's output register -> (base register, op index, view, base)
        self.why = None
        self.specs = []
        for t in inputs:
            if t is None:
                self.specs.append(None)
                self.regs_new(None)
                continue
            if type(t) not in (torch.Tensor, torch.nn.Parameter) or id(t) in self.regs:
                self.refuse("an input is a tensor subclass or repeated")
            self.specs.append((t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr() % 16 == 0))
            self.regs_new(t)

    def regs_new(self, t):
        n = len(self.alive)
        self.alive.append(t)
        if t is not None:
            self.regs[id(t)] = n
        return n

    def refuse(self, why):
        if self.why is None:
            self.why = why

    def reg(self, t):
        r = self.regs.get(id(t))
        if r is None:
            raise _Refused("a tensor the recording has not seen")
        return r

    # -- aten ops ----------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.why is None:
            try:
                self._op(func, args, kwargs, out)
            except _Refused as e:
                self.refuse(f"{func}: {e}")
        return out

    def _op(self, func, args, kwargs, out):
        if func.namespace != "aten":
            raise _Refused("not an aten op")
        schema = func._schema
        items, read = [], []
        for i, a in enumerate(schema.arguments):
            if i < len(args) and not a.kwarg_only:
                v = args[i]
            elif a.name in kwargs:
                v = kwargs[a.name]
            elif a.has_default_value():
                v = a.default_value
            else:
                raise _Refused(f"no value for {a.name}")
            if isinstance(v, torch.Tensor):
                r = self.reg(v)
                items.append(("r", r))
                read.append(r)
            elif isinstance(v, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in v):
                if str(a.type) != "List[Tensor]" or not all(isinstance(e, torch.Tensor) for e in v):
                    raise _Refused(f"argument {a.name} of type {a.type}")
                regs = tuple(self.reg(e) for e in v)
                items.append(("l", regs))
                read.extend(regs)
            else:
                items.append(("c", v))
        returns = schema.returns
        values = (out,) if len(returns) == 1 else tuple(out) if returns else ()
        outs, written = [], []
        for v in values:
            if isinstance(v, torch.Tensor):
                r = self.regs.get(id(v))
                r = self.regs_new(v) if r is None else r
                outs.append(r)
                written.append(r)
            elif isinstance(v, (list, tuple)) and all(isinstance(e, torch.Tensor) for e in v):
                rs = tuple(self.regs.get(id(e)) if id(e) in self.regs else self.regs_new(e)
                           for e in v)
                outs.append(rs)
                written.extend(rs)
            else:
                raise _Refused("returns a value that is not a tensor")
        name, _, overload = func.name().partition(".")
        self.instrs.append(["op", name, overload, tuple(items), tuple(outs), read, written])
        base = args[0] if args else None
        if (func.is_view and len(written) == 1 and isinstance(out, torch.Tensor)
                and isinstance(base, torch.Tensor) and out is not base
                and out.dtype == base.dtype and not name.endswith("_")):
            self.views[written[0]] = (self.regs[id(base)], len(self.instrs) - 1, out, base)

    # -- launches ------------------------------------------------------------------------------

    def launch(self, run, passed, compiled, kernel):
        template, slots, read = list(passed), [], []
        if any(v is not None for v in passed[6:9]):
            raise _Refused("launch metadata or hooks")
        for j in range(9, len(passed)):
            v = passed[j]
            if isinstance(v, torch.Tensor):
                r = self.reg(v)
                slots.append((j, r))
                read.append(r)
                template[j] = None
            elif type(v) not in _CONSTANT_TYPES:
                raise _Refused(f"a launch argument of type {type(v).__name__}")
        template[3] = None
        self.kernels[kernel] = compiled
        self.instrs.append(["launch", run, tuple(template), 3, tuple(slots), read, []])

    def __enter__(self):
        super().__enter__()
        _patch(self)
        return self

    def __exit__(self, *exc):
        _unpatch()
        return super().__exit__(*exc)

    # -- the program ---------------------------------------------------------------------------

    def _leave_out_views(self, outputs):
        """Drop the view ops whose output only launches read: a launch takes a data pointer, the
        base's plus the view's byte offset (fixed: every layout in the program is). Views of
        views resolve to the first base; a view left with no reader is dropped too."""
        ops_reading = {}
        for ins in self.instrs:
            if ins[0] == "op":
                for r in ins[5]:
                    ops_reading[r] = ops_reading.get(r, 0) + 1
        for k in range(len(self.instrs) - 1, -1, -1):
            ins = self.instrs[k]
            if ins is None or ins[0] != "op" or len(ins[6]) != 1:
                continue
            v = ins[6][0]
            view = self.views.get(v)
            if view is None or view[1] != k or ops_reading.get(v) or v in outputs:
                continue
            base, _, t, b = view
            delta = t.data_ptr() - b.data_ptr()
            for other in self.instrs[k + 1:]:
                if other is None or other[0] != "launch":
                    continue
                slots = []
                for slot in other[4]:
                    if slot[1] == v:
                        offset = delta + (slot[2] if len(slot) == 5 else 0)
                        slot = (slot[0], base, offset, tuple(t.shape) if len(slot) == 2 else
                                slot[3], tuple(t.stride()) if len(slot) == 2 else slot[4])
                    slots.append(slot)
                other[4] = tuple(slots)
                other[5] = [base if r == v else r for r in other[5]]
            for r in ins[5]:
                ops_reading[r] -= 1
            self.instrs[k] = None
        self.instrs = [ins for ins in self.instrs if ins is not None]

    def program(self, out):
        if self.why is not None:
            return None
        try:
            outputs = tuple(-1 if t is None else self.reg(t) for t in out)
        except (_Refused, TypeError):
            return None
        self._leave_out_views(set(outputs))
        last = {}
        for k, ins in enumerate(self.instrs):
            for r in (*ins[5], *ins[6]):
                last[r] = k
        kept = set(outputs)
        frees = [[] for _ in self.instrs]
        for r, k in last.items():
            if r not in kept:
                frees[k].append(r)
        instrs = tuple((*ins[:5], tuple(frees[k])) for k, ins in enumerate(self.instrs))
        try:
            capsule = _build(len(self.alive), tuple(self.specs), instrs, outputs)
        except (TypeError, ValueError, RuntimeError):  # a constant the extension cannot hold
            return None
        if not self.kernels:  # no launch: no stream to read
            return Program(capsule, _hooks(()), None, None, ())
        get_device, get_stream = direct_launch._driver()
        return Program(capsule, _hooks(self.kernels), get_stream, get_device(),
                       tuple(self.kernels.values()))


_PATCHED = []
_RECORDING = threading.Lock()  # one recording at a time: it patches classes


def _patch(rec):
    """Route the recording thread's launches to the recorder: direct launches record (their
    launcher call), any other launch refuses the recording."""
    from triton.runtime import jit
    direct_call = direct_launch.DirectLaunch.__call__
    subscript = jit.KernelInterface.__getitem__
    run = jit.JITFunction.run

    def recording_call(launch, *args, **kwargs):
        if threading.get_ident() != rec.thread:
            return direct_call(launch, *args, **kwargs)
        fast = launch.fast
        if fast is None:
            rec.refuse("a launch without its direct path yet")
            return direct_call(launch, *args, **kwargs)
        env = fast.__globals__
        real = env["_vf_run"]
        passed = []

        def capture(*a):
            passed.append(a)
            return real(*a)
        env["_vf_run"] = capture
        try:
            done = fast(*args, **kwargs)
        finally:
            env["_vf_run"] = real
        if not done:
            rec.refuse("a launch the direct path did not take")
            return direct_call(launch, *args, **kwargs)
        if rec.why is None:
            try:
                rec.launch(real, passed[0], env.get("_vf_COMPILED"), launch.kernel)
            except _Refused as e:
                rec.refuse(str(e))
        return None

    def refusing_subscript(kernel, grid):
        if threading.get_ident() == rec.thread:
            rec.refuse("a launch through kernel[grid]")
        return subscript(kernel, grid)

    def refusing_run(kernel, *args, **kwargs):
        if threading.get_ident() == rec.thread:
            rec.refuse("a launch through JITFunction.run")
        return run(kernel, *args, **kwargs)
    _PATCHED[:] = [(direct_launch.DirectLaunch, "__call__", direct_call),
                   (jit.KernelInterface, "__getitem__", subscript), (jit.JITFunction, "run", run)]
    direct_launch.DirectLaunch.__call__ = recording_call
    jit.KernelInterface.__getitem__ = refusing_subscript
    jit.JITFunction.run = refusing_run


def _unpatch():
    for cls, name, fn in _PATCHED:
        setattr(cls, name, fn)
    _PATCHED.clear()


def _hooks(kernels):
    """A function true where a hook wants to see this program's launches (as each direct launch
    checks: Triton's launch hooks, a kernel's pre-run hooks)."""
    parts, names = [], {}
    for i, kernel in enumerate(kernels):
        check, env = direct_launch._hook_check(kernel)
        names["RT"] = env["RT"]
        names[f"K{i}"] = env["KERNEL"]
        parts.append(check.replace("KERNEL.", f"K{i}."))
    src = f"lambda: bool({' or '.join(dict.fromkeys(parts)) or 'False'})"
    return eval(src, names)  # noqa: S307 - built from direct_launch's own expressions
