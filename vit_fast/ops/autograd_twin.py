"""The eager twin of a custom op: the same forward, setup_context and backward as an
``autograd.Function``, called directly when nothing traces.

A ``torch.library.custom_op`` call costs ~5x an ``autograd.Function.apply`` on the host (the
dispatcher's boxing, default filling and the autograd wrapper: pytorch issues 176592, 177109),
and a Block calls its ops a dozen times per step. So each op of vit_fast/ops/ is registered twice
from one set of functions:

- ``vit_fast::<op>`` (custom op, fake and autograd registrations): what torch.compile, export,
  FakeTensorMode and opcheck see. Its backward calls the registered backward ops, so a compiled
  graph's backward is traced op by op.
- ``<Op>Fn`` (this module's :func:`twin`): what eager code calls on real tensors. Its backward
  calls the same kernels' launchers directly (``bwd=EAGER`` in the shared backward).

Which one runs is decided where the call starts (vit_fast/plans.py): the twin for plain tensors
outside tracing, the custom op otherwise.
"""
from __future__ import annotations

import functools

import torch


def twin(name, forward, setup_context, backward):
    """An autograd.Function named ``name`` whose forward is ``forward(*inputs)`` (the custom op's
    real implementation, unchecked), with the op's ``setup_context(ctx, inputs, output)`` and
    ``backward(ctx, *grads)``.

    The forward takes ctx and calls setup_context itself (the old style): a Function that
    defines setup_context separately has torch bind its arguments with inspect.signature on
    every apply, which costs more than the rest of the call."""
    def fwd(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output
    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fwd),
        "backward": staticmethod(backward),
        "__doc__": f"Eager twin of the custom op (vit_fast/ops/autograd_twin.py): {forward.__doc__}",
    })


def with_bwd(backward, bwd):
    """``backward`` with its sub-op namespace bound: ``bwd`` is the module's EAGER (launchers) or
    TRACED (registered ops) table."""
    return functools.partial(backward, bwd=bwd)
