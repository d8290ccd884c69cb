"""Decisions made once per configuration: the keys the per-call paths look them up by.

A ViT-B Block runs in about 1.2 ms on an H100 at batch 64 and a training step calls each op a
dozen times forward and backward: the host must not re-decide anything per call. So the public
ops (vit_fast/functional.py) and the fused Block (vit_fast/block_plan.py) validate their
arguments, pick a backend, resolve autocast and choose between the eager twin of an op and its
registered custom op once per *configuration* -- and afterwards look the result up by a tuple
they build from the call:

- each tensor's type, shape, dtype and device (:func:`meta`), other arguments by type and value;
- :func:`state`: the backend policy in force, autocast for the device type (enabled, dtype, its
  cache), and the generation of the failure tables (a kernel that failed on this device makes
  every decision be remade: kernels/_device.FAILURES).

What depends on the data, not the configuration, stays per call (a dropout seed, drop-path
masks). Nothing here runs while torch.compile traces: a traced call takes the full path, whose
checks and choices the graph then holds (and guards on).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .kernels._device import FAILURES

PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def meta(a):
    """A call argument as part of a key: a tensor by (type, shape, dtype, device), anything else
    by (type, value) so that 1, 1.0 and True stay apart (lists as tuples)."""
    if isinstance(a, Tensor):
        return type(a), a.shape, a.dtype, a.device
    if type(a) is list:
        return list, tuple(a)
    return type(a), a


def state(device_type: str):
    """What every decision also depends on: (policy, failure generation, autocast enabled, its
    dtype, whether its weight cache is on) for tensors of ``device_type``."""
    if device_type in ("cpu", "cuda"):
        enabled = torch.is_autocast_enabled(device_type)
        return (dispatch.current_policy(), FAILURES.generation, enabled,
                torch.get_autocast_dtype(device_type) if enabled else None,
                enabled and torch.is_autocast_cache_enabled())
    return dispatch.current_policy(), FAILURES.generation, None, None, None


def eager(*tensors) -> bool:
    """Whether a call on these tensors may take the ops' eager twins (vit_fast/ops/
    autograd_twin.py): plain tensors only -- FakeTensors, functional tensors and other
    subclasses go through the registered ops, which have fake implementations; so does anything
    torch.compile traces."""
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in PLAIN_TENSORS for t in tensors)


class Plans(dict):
    """key -> plan, bounded: a workload with ever-new shapes (dynamic resolution) keeps the
    recent ones."""
    LIMIT = 1024

    def put(self, key, plan):
        if len(self) >= self.LIMIT:
            self.clear()
        self[key] = plan
        return plan


class NoAutocast:
    """Autocast off for ``device_type`` while the kernels run (they take the dtypes they are given;
    nothing inside a launcher is cast behind the op's back). The raw switch, not torch.autocast:
    entering that costs several µs and touches the nesting count that frees autocast's cache."""
    __slots__ = ("device_type", "was")

    def __init__(self, device_type):
        self.device_type = device_type

    def __enter__(self):
        self.was = torch.is_autocast_enabled(self.device_type)
        torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc):
        torch.set_autocast_enabled(self.device_type, self.was)
