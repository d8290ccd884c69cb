"""A checkpointed forward is recomputed under the backend policies that forward ran under.

torch.utils.checkpoint reruns the checkpointed function in the backward: after the user's
use_backend() has closed, inside another one, or on autograd's device thread (CUDA), which sees
none. A rerun that picks other ops than the forward saves another number of tensors
(non-reentrant: CheckpointError) or differentiates other ops than those that ran (reentrant).
torch itself captures the autocast and RNG state at the checkpoint and restores them for the
rerun, but offers no hook for other state. So, once, on import of vit_fast (:func:`install`), the
two places where torch.utils.checkpoint hands over the function it will rerun bind that function
to the policies open at the checkpoint (dispatch.policy_scope), restored around every call of it
(dispatch.in_scope):

- use_reentrant=False: the generator that sets up the recomputation
  (``_checkpoint_without_reentrant_generator_impl``, before torch 2.14
  ``_checkpoint_without_reentrant_generator``) gets the bound function; checkpoint() calls the
  original one for the forward.
- use_reentrant=True: ``CheckpointFunction`` becomes a subclass whose forward binds the function
  it stores for its backward's rerun.

checkpoint(), checkpoint_sequential() and the libraries calling them (timm's
set_grad_checkpointing, transformers' gradient_checkpointing_enable) go through these. Code
without vit_fast ops is not affected: it reads no policy. torch.compile traces checkpoint() as a
higher-order op without calling either, and reads the policy from VIT_FAST_BACKEND there.
"""
from __future__ import annotations

import warnings

import torch
import torch.utils.checkpoint as torch_checkpoint

from . import dispatch

# The non-reentrant generator, by the name checkpoint() calls it under (newest first).
_GENERATORS = ("_checkpoint_without_reentrant_generator_impl",
               "_checkpoint_without_reentrant_generator")


def bind_policies(fn):
    """``fn``, run under the use_backend() policies open now whenever it is called (and
    ``fn`` itself while torch.compile traces: the graph reads the policy there)."""
    if torch.compiler.is_compiling():
        return fn
    scope = dispatch.policy_scope()

    def rerun(*args, **kwargs):
        with dispatch.in_scope(scope):
            return fn(*args, **kwargs)
    rerun.__wrapped__ = fn
    return rerun


# torch's own class, also where this module is imported again after install()
_TORCH_FUNCTION = getattr(torch_checkpoint.CheckpointFunction, "torch_original",
                          torch_checkpoint.CheckpointFunction)


class CheckpointFunction(_TORCH_FUNCTION):
    """torch's reentrant checkpoint, its backward rerunning the function under the forward's
    policies (same name: its autograd node is still CheckpointFunctionBackward)."""

    torch_original = _TORCH_FUNCTION

    @staticmethod
    def forward(ctx, run_function, preserve_rng_state, *args):
        return _TORCH_FUNCTION.forward(ctx, bind_policies(run_function), preserve_rng_state,
                                       *args)


def _bound_generator(generator):
    def generator_with_policies(fn, *args, **kwargs):
        return generator(bind_policies(fn), *args, **kwargs)
    generator_with_policies.vit_fast_binds_policies = True
    generator_with_policies.__wrapped__ = generator
    return generator_with_policies


def install():
    """Bind the policies of a checkpointed forward to its recomputation (idempotent). Warns,
    and binds nothing, where this torch's checkpoint has neither place (a torch newer than
    vit_fast knows): vit_fast still imports, but a recomputation after its use_backend() closed
    may run other ops than its forward."""
    name = next((n for n in _GENERATORS if hasattr(torch_checkpoint, n)), None)
    if name is None or not hasattr(torch_checkpoint, "CheckpointFunction"):
        warnings.warn(
            f"vit_fast: torch {torch.__version__}'s torch.utils.checkpoint has none of "
            f"{_GENERATORS} or no CheckpointFunction: a checkpointed forward's recomputation "
            "runs under the backend policy in force where it runs, not the forward's (keep "
            "use_backend() open around the backward, on the thread that runs it)",
            RuntimeWarning, stacklevel=2)
        return
    generator = getattr(torch_checkpoint, name)
    if not getattr(generator, "vit_fast_binds_policies", False):
        setattr(torch_checkpoint, name, _bound_generator(generator))
    if not hasattr(torch_checkpoint.CheckpointFunction, "torch_original"):
        torch_checkpoint.CheckpointFunction = CheckpointFunction
