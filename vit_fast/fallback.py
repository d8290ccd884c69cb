"""A kernel op whose launch fails on this device answers with its reference instead, once warned.

vit_fast.dispatch.run covers the public ops' forwards: it has the whole call and reruns it on the
reference. A backward cannot go back that far: autograd already holds the tensors the kernel's
forward saved. But they are enough to recompute the gradient with the reference math
(vit_fast/reference_grad.py), so the ops that run in a backward -- the *_backward custom ops, and
the LayerNorm forward that the Block's fused ops rerun there -- take :func:`reference_on_failure`,
as do the Block's fused forward ops, which the Block calls without dispatch.run:

    @torch.library.custom_op("vit_fast::gelu_mlp_backward", mutates_args=())
    @reference_on_failure("gelu_mlp", reference_grad.gelu_mlp_backward)
    def gelu_mlp_backward_op(...): ...          # the kernel path

On a build failure of the device (kernels/_device.is_build_failure: OutOfResources, a
CompilationError, "no kernel image") the op warns once per (op, device), returns the reference's
result, and later calls of it on that device go to the reference directly. The launcher guard has
recorded the failure too, so dispatch sends later forwards of the op to the reference as well.
The wrapper is inside the custom op, so it holds in a torch.compile graph too. Attention with
dropout falls back too: its reference redraws the kernels' mask from the saved seed
(vit_fast/dropout_mask.py).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch

from .kernels._device import LAUNCH_FAILURES, failure_recorded, is_build_failure

# The one memory of failed kernels, for both paths (dispatch.run's forwards, the ops wrapped
# here): failure key -> why its kernel failed; later calls with that key go to the reference.
# The key starts with (op, device str); dispatch.run's forwards add the call's dtypes and options
# (dispatch.Choice.key), the ops here remember per (op, device). Both warn through warn_once.
FELL_BACK: dict = {}
# The failing launches already warned about: one launcher failing inside several ops (the
# LayerNorm forward in both of the Block's fused ops, or in a forward and then a backward) is
# one warning.
_WARNED: set = set()


def forget():
    """Drop what was remembered, the launchers' own record included (tests)."""
    FELL_BACK.clear()
    _WARNED.clear()
    LAUNCH_FAILURES.clear()
    failure_recorded()


def remember(key: tuple, failure: BaseException):
    """Record that the kernel behind ``key`` = (op, device, ...) failed with ``failure``."""
    FELL_BACK[key] = f"{type(failure).__name__}: {failure}"
    failure_recorded()


def warn_once(key: tuple, failure: BaseException, *, stacklevel: int = 1):
    """Warn that the kernel behind ``key`` = (op, device, ...), recorded in FELL_BACK, failed with
    ``failure`` (a build failure): once per failing launch (the launcher guard's
    ``failure.launch``, else the key). ``stacklevel`` counts from the caller."""
    launch = getattr(failure, "launch", key)
    if launch in _WARNED:
        return
    _WARNED.add(launch)
    op, device = key[0], key[1]
    warnings.warn(f"vit_fast.{op}: its kernel failed on {device} ({FELL_BACK[key]}); this and "
                  "later calls like it are computed by the reference from the same inputs",
                  RuntimeWarning, stacklevel=stacklevel + 1)


def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return str(a.device)
    return "?"


def in_backward() -> bool:
    """Whether autograd's engine is running a backward node on this thread."""
    return torch._C._current_autograd_node() is not None


def reference_on_failure(op: str, reference, *, only_in_backward: bool = False):
    """Decorate a kernel op's body: on a build failure, ``reference(*same args)`` answers.

    only_in_backward: the op is a forward that dispatch.run already answers with the reference;
    only its reruns inside a backward (the Block's LayerNorm recompute) fall back here.
    Per call this costs one look at an (almost always empty) table: the try block is free."""
    def wrap(kernel_path):
        @functools.wraps(kernel_path)
        def run(*args, **kwargs):
            if FELL_BACK and (op, _device_of(args)) in FELL_BACK:
                if not only_in_backward or in_backward():
                    return reference(*args, **kwargs)
            try:
                return kernel_path(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - filtered just below
                if not is_build_failure(exc) or (only_in_backward and not in_backward()):
                    raise
                failure = exc
            key = (op, _device_of(args))
            result = reference(*args, **kwargs)
            remember(key, failure)
            warn_once(key, failure, stacklevel=2)
            return result
        # torch.library reads the op's schema from this signature and evaluates string
        # annotations in the function's globals: give it the kernel path's, already evaluated.
        run.__signature__ = inspect.signature(kernel_path, eval_str=True)
        return run
    return wrap
