"""Argument checks of the registered ops (torch.ops.vit_fast.*).

vit_fast.functional validates what users pass; these checks guard the ops themselves, which can
be called directly: each op runs its check in its real implementation *and* in its fake one, so
neither a kernel nor torch.compile's tracing ever sees a shape, dtype or device mix the kernels
were not written for (a [3] weight for 8 channels would otherwise be read past its end). They
raise ValueError / TypeError naming the argument, through torch._check_value / _check_type, which
take symbolic sizes: the checks trace into a compiled graph as guards or runtime asserts, with
no graph break.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def value(op, cond, msg):
    torch._check_value(cond, lambda: f"vit_fast::{op}: {msg}")


def tensor(op, name, t, *, like=None, shape=None, dim=None, ndim=None, dtype=None,
           optional=False):
    """t is a tensor; of ``shape`` (a sequence of sizes), ``ndim`` dims or at least ``dim``; on
    like's device; of ``dtype``, else like's dtype, else a kernel dtype. None passes if optional."""
    if t is None:
        torch._check_type(optional, lambda: f"vit_fast::{op}: {name} must be a tensor, got None")
        return
    torch._check_type(isinstance(t, torch.Tensor),
                      lambda: f"vit_fast::{op}: {name} must be a Tensor, got {type(t).__name__}")
    want = dtype if dtype is not None else (like.dtype if like is not None else None)
    if want is not None:
        torch._check_type(t.dtype == want,
                          lambda: f"vit_fast::{op}: {name} must be {want}, got {t.dtype}")
    else:
        torch._check_type(t.dtype in KERNEL_DTYPES, lambda: (
            f"vit_fast::{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}"))
    if like is not None:
        value(op, t.device == like.device,
              f"{name} is on {t.device}, expected {like.device} (one device for all tensors)")
    if shape is not None:
        shape = tuple(shape)
        value(op, t.dim() == len(shape), f"{name} must have shape {shape}, got {tuple(t.shape)}")
        for got, want_n in zip(t.shape, shape):
            value(op, got == want_n, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if ndim is not None:
        value(op, t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dim is not None:
        value(op, t.dim() >= dim, f"{name} must have at least {dim} dims, got {tuple(t.shape)}")


def rows(t):
    """M = the number of [C] rows of a [..., C] tensor (also when C is 0)."""
    return math.prod(t.shape[:-1])


def eps(op, v):
    value(op, isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0,
          f"eps must be a finite float >= 0, got {v!r}")


def approximate(op, v):
    value(op, v in ("none", "tanh"), f"approximate must be 'none' or 'tanh', got {v!r}")


def sample_scale(op, t, x):
    """sample_scale [B] for x [B, ..., C] (x needs a batch dim)."""
    if t is not None:
        value(op, x.dim() >= 2, f"sample_scale needs x with a batch dim, got {tuple(x.shape)}")
        tensor(op, "sample_scale", t, like=x, shape=(x.shape[0],))


def _signature(a):
    return (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a


def once_per_signature(check):
    """``check(*args)`` run once per signature of its arguments (each tensor's shape, dtype and
    device; other values as they are), then skipped: a registered op's real implementation runs
    its checks on every call (a compiled graph calls it each step), and most calls repeat one
    signature. Arguments that cannot be hashed are checked every time."""
    seen = set()

    @functools.wraps(check)
    def run(*args):
        try:
            sig = tuple(map(_signature, args))
            if sig in seen:
                return
        except TypeError:  # an unhashable argument (a list): no memory
            return check(*args)
        check(*args)
        if len(seen) > 4096:  # dynamic shapes: a bounded memory
            seen.clear()
        seen.add(sig)
    return run
