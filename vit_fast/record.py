"""Record post-softmax attention maps of a ViT (like vit-pytorch's ``Recorder``).

The fused attention never materializes softmax(q kᵀ), so while recording, the chosen attention
modules take their materialized path (``fused_attn = False``, exactly what timm's own flag does)
and a hook copies the probabilities out; the flag is put back when the context exits.

    with vit_fast.record_attention(model, blocks=[-1]) as maps:
        logits = model(images)
    maps[0]          # [B, H, N, N] of the last block
    maps.stack()     # [B, L, H, N, N], vit-pytorch's Recorder layout
"""
from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn as nn

from . import modules

__all__ = ["record_attention", "AttentionMaps"]


class AttentionMaps(list):
    """Post-softmax attention [B, H, N, N], one entry per recorded attention call, in call order.

    ``names[i]`` is the qualified name of the attention module that produced entry i.
    """

    def __init__(self):
        super().__init__()
        self.names = []

    def stack(self) -> torch.Tensor:
        """[B, L, H, N, N]: the recorded maps stacked on a new dim 1."""
        if not self:
            raise ValueError("record_attention: nothing was recorded (run the model inside the "
                             "context first)")
        return torch.stack(list(self), dim=1)


def _attention_modules(model):
    """(name, module, capture site) of every attention whose softmax can be captured, in order.

    The capture site is (submodule, "input" | "output"): timm's and vit_fast's Attention pass the
    probabilities into ``attn_drop``; a converted vit-pytorch attention out of ``attend`` (whose
    hook alone sends that module down vit-pytorch's own eager forward).
    """
    from timm.layers import Attention as TimmAttention

    from .vit_pytorch_modules import FusedAttention
    found = []
    for name, m in model.named_modules():
        if isinstance(m, (modules.Attention, TimmAttention)):
            found.append((name, m, (m.attn_drop, "input")))
        elif isinstance(m, FusedAttention) and isinstance(getattr(m, "attend", None), nn.Softmax):
            found.append((name, m, (m.attend, "output")))
    return found


def _select(found, blocks):
    if blocks is None:
        return found
    if isinstance(blocks, (numbers.Integral, str)):
        blocks = [blocks]
    names = [name for name, _, _ in found]
    chosen = []
    for b in blocks:
        if isinstance(b, numbers.Integral) and not isinstance(b, bool):
            if not -len(found) <= b < len(found):
                raise ValueError(f"record_attention: block index {b} is out of range; the model "
                                 f"has {len(found)} attention module(s)")
            idx = int(b) % len(found)
        elif isinstance(b, str):
            # A block's name ("blocks.3") or its attention's ("blocks.3.attn").
            hits = [i for i, n in enumerate(names) if n == b or n.rpartition(".")[0] == b]
            if len(hits) != 1:
                raise ValueError(f"record_attention: {b!r} names no attention module (or several); "
                                 f"attention modules: {names}")
            idx = hits[0]
        else:
            raise TypeError(f"record_attention: blocks must be None, an int, a name, or a list of "
                            f"them, got {type(b).__name__}")
        if found[idx] not in chosen:
            chosen.append(found[idx])
    return chosen


@contextlib.contextmanager
def record_attention(model: nn.Module, blocks=None, *, detach: bool = True):
    """Collect the post-softmax attention [B, H, N, N] of the chosen blocks while inside.

    model: a timm/vit_fast ViT (or a vit-pytorch ViT after ``vit_fast.convert``).
    blocks: None (every attention), or an int / name or a list of them: ints index the model's
    attention modules in order (negative counts from the end), names are a block's or an
    attention's qualified name. Yields an :class:`AttentionMaps` list that fills as the model runs.
    detach=False keeps the maps in the autograd graph (for gradient-weighted attention).
    Raises ValueError when the model has no vit_fast/timm attention.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"record_attention: model must be an nn.Module, got {type(model).__name__}")
    found = _attention_modules(model)
    if not found:
        raise ValueError(f"record_attention: {type(model).__name__} has no vit_fast or timm "
                         "Attention module to record (for vit-pytorch models run "
                         "vit_fast.convert(model) first)")
    chosen = _select(found, blocks)
    maps = AttentionMaps()
    handles, saved_flags = [], []

    def hook_for(name):
        def keep(t):
            maps.append(t.detach().clone() if detach else t)
            maps.names.append(name)

        def on_input(_mod, args):
            keep(args[0])

        def on_output(_mod, _args, out):
            keep(out)
        return on_input, on_output

    try:
        for name, attn, (site, where) in chosen:
            saved_flags.append((attn, attn.fused_attn))
            attn.fused_attn = False
            on_input, on_output = hook_for(name)
            handles.append(site.register_forward_pre_hook(on_input) if where == "input"
                           else site.register_forward_hook(on_output))
        yield maps
    finally:
        for h in handles:
            h.remove()
        for attn, flag in saved_flags:
            attn.fused_attn = flag
