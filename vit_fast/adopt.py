"""Build a converted module around an existing one's state: parameters, submodules and hooks.

convert() replaces some modules by new objects of vit_fast's classes (timm's Block by
vit_fast.Block...). Nothing is created or copied: the same Parameter, buffer and submodule objects
move over, so state_dict keys, the order of parameters() (which optimizers and checkpoints rely
on), devices, dtypes and requires_grad stay as they were. The hook dictionaries move too -- the
same dict objects, so the handles a user got from register_forward_hook & co. before convert still
remove their hooks afterwards.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["adopt", "HOOK_ATTRIBUTES"]

# Every hook container nn.Module.__init__ creates (forward, pre-forward, backward, state_dict,
# load_state_dict hooks and their kwargs / always-call flags), read from torch itself so a torch
# that adds one still has all of them moved.
HOOK_ATTRIBUTES = tuple(name for name in vars(nn.Module()) if "hook" in name)


def adopt(cls, old, replace=None):
    """A new ``cls`` module built around ``old``'s parameters, buffers, submodules, plain
    attributes and hooks, in their order. ``replace`` maps a submodule name to the module that
    takes its place. ``cls.__init__`` is not called."""
    replace = replace or {}
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, param in old._parameters.items():
        new.register_parameter(name, param)
    for name, buf in old._buffers.items():
        new.register_buffer(name, buf, persistent=name not in old._non_persistent_buffers_set)
    for name, module in old._modules.items():
        setattr(new, name, replace.get(name, module))
    # Plain attributes (num_heads, scale, patch_size, a ``gate`` of None...) come along too.
    plain = {k: v for k, v in vars(old).items() if not k.startswith("_") and k != "training"}
    for key, value in plain.items():
        setattr(new, key, value)
    for name in HOOK_ATTRIBUTES:
        setattr(new, name, getattr(old, name))
    new.training = old.training  # this module's mode only: children keep their own
    return new
