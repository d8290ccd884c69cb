"""When a fused module may skip calling its submodules, and the cache of that decision.

A fused forward reads its submodules' parameters and runs one op instead of calling them. That
is only allowed when nothing the user attached could notice the skipped calls: forward or
backward hooks (module-level or global), a ``forward`` set on the instance, a subclass with its
own forward (LoRA/adapters, a custom drop-path), a hook-based reparametrization (pruning, the
old ``weight_norm``). Otherwise the module runs its plain submodules for that call.

Each fused module lists the submodules its fused path skips (``_bypassed``) and the structural
reasons it cannot fuse (``_structure_reasons``). The decision is cached against a key made of the
skipped submodules' identity, class and whether anything is attached to them, so it is re-derived
only when that configuration changes (a submodule swapped, a hook registered, a parametrization's
class swap), never from imports or reason strings on every call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals

__all__ = ["FusedModule", "notice_reason", "forward_is", "STRUCTURE"]


class _Structure:
    """A counter that moves whenever a fused module's structure may have changed: a submodule set,
    added or deleted on it, a ``forward`` or ``fused_attn`` set on its instance, or its
    parameters moved or cast
    (``.to()``, ``.half()``, ... run ``_apply``). Decisions cached per configuration hold it
    (vit_fast/block_plan.py) and are remade when it moves."""
    generation = 0


STRUCTURE = _Structure()
_STRUCTURAL = frozenset(("forward", "fused_attn"))  # attributes a plan's decisions read once


def _global_hooks() -> bool:
    g = _module_globals
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def _attached(m) -> bool:
    """Whether skipping ``m``'s call could be noticed (hooks, or a forward set on the instance)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or "forward" in m.__dict__)


def hooks_attached(module) -> tuple:
    """What the fused paths' decisions read of hooks, for ``module`` and every submodule (itself
    included): whether each has hooks or a forward set on the instance, and whether global module
    hooks are registered. vit_fast/block_plan.py compares it when a hook was registered anywhere:
    a tensor's or an autograd node's hook changes none of it."""
    return tuple(map(_attached, module.modules())), _global_hooks()


def notice_reason(name, m):
    """Why skipping the call of submodule ``name`` would be noticed, or None."""
    if m is None:
        return None
    if m._forward_pre_hooks:
        # torch.nn.utils.prune and the hook-based weight_norm recompute .weight in a pre-hook.
        return f"{name} has forward pre-hooks (hooks, pruning or hook-based weight_norm)"
    if m._forward_hooks:
        return f"{name} has forward hooks"
    if m._backward_hooks or m._backward_pre_hooks:
        return f"{name} has backward hooks"
    if "forward" in m.__dict__:
        return f"{name}.forward is set on the instance"
    return None


def forward_is(m, *forwards) -> bool:
    """True when ``m``'s class runs one of ``forwards`` (a subclass that only adds a
    parametrization keeps its parent's forward; a LoRA Linear has its own)."""
    return any(type(m).forward is f for f in forwards)


class FusedModule(nn.Module):
    """Mixin for modules with a fused path that skips calling some submodules."""

    # Dotted names of the submodules the fused path reads but does not call.
    bypassed_paths: tuple = ()
    _split_bypassed_paths: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Split once per class, when it is defined: a cache filled on the first call would be
        # module state that Dynamo guards on and that changes while it traces (a recompile).
        cls._split_bypassed_paths = tuple(tuple(p.split(".")) for p in cls.bypassed_paths)

    def _bypassed_modules(self):
        found = []
        for path in self._split_bypassed_paths:
            m = self
            for name in path:
                m = m._modules.get(name) if m is not None else None
            found.append(m)
        return found

    def _bypassed(self):
        """(name, submodule or None) that the fused path does not call."""
        return list(zip(self.bypassed_paths, self._bypassed_modules()))

    def _structure_reasons(self):
        """Reasons, from the modules' classes and settings, that the fused path cannot run."""
        return []

    def _compute_reasons(self):
        reasons = list(self._structure_reasons())
        if not reasons:
            reasons = [r for r in (notice_reason(n, m) for n, m in self._bypassed()) if r]
        if _global_hooks():
            reasons.append("global module hooks are registered (torch.nn.modules.module."
                           "register_module_forward_hook / ..._backward_hook)")
        return reasons

    def _fusion_key(self):
        mods = self._bypassed_modules()
        return (tuple(mods), tuple(map(type, mods)),
                tuple([m is not None and _attached(m) for m in mods]), _global_hooks())

    def fusion_reasons(self):
        """Why the fused path cannot run, from this module's configuration; [] when it can."""
        if torch.compiler.is_compiling():
            return self._compute_reasons()  # no cache writes inside a traced graph
        key = self._fusion_key()
        cached = self.__dict__.get("_fusion_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        reasons = self._compute_reasons()
        self.__dict__["_fusion_cache"] = (key, reasons)
        return reasons

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # fused_attn: timm's switch to materialized attention, which plans decide on once
        if isinstance(value, nn.Module) or name in _STRUCTURAL or name.startswith("_forward") \
                or name.startswith("_backward"):
            STRUCTURE.generation += 1

    def __delattr__(self, name):
        super().__delattr__(name)
        STRUCTURE.generation += 1

    def add_module(self, name, module):  # register_module calls it too
        super().add_module(name, module)
        STRUCTURE.generation += 1

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        STRUCTURE.generation += 1
        return out

    def __getstate__(self):
        # The caches hold module and class references (the Block's plan and step: launch
        # decisions, the tuner it looked its choices up in); a copy re-derives them on its first
        # call.
        state = self.__dict__.copy()
        state.pop("_fusion_cache", None)
        state.pop("_block_plan", None)
        state.pop("_block_plans", None)
        return state
