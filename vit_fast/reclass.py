"""Converting a module in place: its class becomes a subclass that keeps the original's name.

Some conversions keep the module object and change only its class, to ``type(name, (Mixin,
Original), ...)``: the object, its submodules, Parameters, hooks and train/eval mode are the same,
isinstance(module, Original) still holds (vit-pytorch's Recorder, transformers' output capture and
gradient checkpointing, FSDP's wrap policies match by isinstance), and the mixin's forward calls
``super().forward`` whenever it cannot run fused.

The subclass's ``__name__`` is the original's: transformers' ``_no_split_modules``, accelerate's
device maps and FSDP's ``transformer_layer_cls_to_wrap`` find layers by
``module.__class__.__name__``, and ``print(model)`` shows the same names. Its ``__qualname__`` is
a unique key under the module that made it, whose ``__getattr__`` rebuilds the class from that key
(:func:`class_from_key`), so pickle and torch.save find it again.
"""
from __future__ import annotations

import importlib

__all__ = ["subclass_keeping_name", "key_of", "class_from_key"]

_MADE = {}  # (hosting module, key) -> class


def key_of(role, base):
    """'role:pkg:mod::Qual:Name' -- a string with no '.', which pickle would split on."""
    return f"{role}:{base.__module__.replace('.', ':')}::{base.__qualname__.replace('.', ':')}"


def _base_of(key):
    role, _, rest = key.partition(":")
    module, sep, qualname = rest.partition("::")
    if not (role and module and sep and qualname) or "<locals>" in qualname:
        return role, None
    obj = importlib.import_module(module.replace(":", "."))
    for part in qualname.split(":"):
        obj = getattr(obj, part)
    return role, obj


def subclass_keeping_name(mixin, base, module, role):
    """``mixin`` over ``base``, named base.__name__, reachable as ``<module>.<key_of(role, base)>``
    (made once per pair). ``module`` is the hosting module's __name__."""
    key = key_of(role, base)
    made = _MADE.get((module, key))
    if made is None:
        made = type(base.__name__, (mixin, base), {
            "__module__": module, "__qualname__": key,
            "__doc__": f"{base.__qualname__} ({base.__module__}), converted by vit_fast."})
        _MADE[(module, key)] = made
    return made


def class_from_key(key, mixins, module):
    """The class ``subclass_keeping_name`` made for ``key``, rebuilt if this process has not made
    it yet (unpickling); ``mixins`` maps a role to its mixin. None when ``key`` is not one."""
    try:
        role, base = _base_of(key)
    except (ImportError, AttributeError):
        return None
    if base is None or role not in mixins:
        return None
    return subclass_keeping_name(mixins[role], base, module, role)
