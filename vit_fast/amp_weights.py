"""GEMM weights cast to the autocast dtype once per autocast region, as autocast's own weight
cache casts them: what the fused Block runs under AMP (vit_fast/fused_block_ops.py,
vit_fast/block_step.py)."""
from __future__ import annotations

import weakref

import torch

_PARAMETER = torch.nn.Parameter

try:  # the extension's casts (csrc/amp_casts.cpp); absent or an older build: Python's
    from vit_fast import _C as _ext
    _CACHED_CAST = getattr(_ext, "autocast_cached_cast", None)
    _CAST_ALL = getattr(_ext, "casts", None)
except (ImportError, OSError):  # vit_fast.ops.patch_embed says why
    _CACHED_CAST = _CAST_ALL = None


class AmpWeights:
    """GEMM weights cast to the autocast dtype once per autocast region, like autocast's own
    weight cache: a cast is reused while the region lasts, the parameter is unchanged (its
    version) and the cast is alive. Casts are held only weakly here: autograd's saved tensors
    keep one for its backward, nothing keeps it after.

    The region is told by a sentinel: one fp32 leaf per (device, dtype) whose cast autocast
    itself caches -- read off an empty product that autocast computes with it -- and drops when
    the outermost region exits (torch.clear_autocast_cache). While that cast is alive the region
    is the same: one probe per region, instead of one per weight per call. Where autocast would
    not cache (its cache off, e.g. checkpoint's recompute, or inference mode, which records no
    graph to read the probe off) every call is a region of its own: each call casts.

    With the extension (vit_fast._C, csrc/amp_casts.cpp) the probe is a call of autocast's own
    cached cast of the sentinel, and a group's casts are made in one call: the same casts and
    regions, without the probe's matmul and graph or a Python call per weight."""

    def __init__(self):
        self._sentinels = {}  # (device, dtype) -> (sentinel leaf, weakref to its cast, token)
        self._casts = {}  # id(param) -> (region token, weakref param, version, weakref cast)

    def region(self, device, dtype):
        if torch.is_inference_mode_enabled() or not torch.is_autocast_cache_enabled():
            return object()
        hit = self._sentinels.get((device, dtype))
        if hit is not None and hit[1]() is not None:
            return hit[2]
        sentinel = hit[0] if hit is not None else torch.zeros(1, device=device,
                                                              requires_grad=True)
        if _CACHED_CAST is not None:
            cast = _CACHED_CAST(sentinel, dtype)
        else:
            with torch.enable_grad():
                probe = sentinel.new_empty((0, 1), dtype=dtype, requires_grad=True)
                cast = torch.matmul(probe, sentinel).grad_fn._saved_vec  # mv(probe, its cast)
        token = object()
        self._sentinels[(device, dtype)] = (sentinel, weakref.ref(cast), token)
        return token

    def cast(self, t, dtype, region):
        """t in ``dtype`` (None and tensors already in it pass through)."""
        if t is None or t.dtype == dtype:
            return t
        if not (type(t) is _PARAMETER and t.dtype == torch.float32):
            # Parameters only (autocast caches fp32 leaves; a module's weights are Parameters): a
            # fresh leaf -- a converted transformers layer's q/k/v weights concatenated per call,
            # an inference tensor, which keeps no version -- casts every time.
            return t.to(dtype)
        key = id(t)
        entry = self._casts.get(key)
        if entry is not None and entry[0] is region and entry[2] == t._version \
                and entry[1]() is t:
            c = entry[3]()
            if c is not None and c.dtype == dtype:
                return c
        c = t.to(dtype)
        if len(self._casts) > 4096:  # entries of freed parameters: one per parameter ever cast
            self._casts.clear()
        self._casts[key] = (region, weakref.ref(t), t._version, weakref.ref(c))
        return c

    def cast_group(self, tensors, dtype, region, holder):
        """tuple(cast(t, dtype, region) for t in tensors), the group cached as one entry that
        ``holder`` keeps in its ``casts`` attribute (the Block step: its eight GEMM parameters),
        reused on the same terms -- the region, each tensor the same object at the same version,
        every cast alive -- at one check per call instead of one look-up per tensor. Where a
        tensor is not an fp32 Parameter each takes :meth:`cast` (no entry is kept: only
        Parameters' ids stay theirs while the entry lasts)."""
        entry = holder.casts
        if entry is not None and entry[0] is region and entry[1] == tuple(map(id, tensors)) \
                and entry[2] == tuple(t._version if t is not None else 0 for t in tensors):
            casts = tuple(r() if r is not None else None for r in entry[3])
            if all(c is not None for c, t in zip(casts, tensors) if t is not None):
                return casts
        if not all(t is None or (type(t) is _PARAMETER and t.dtype == torch.float32)
                   for t in tensors):
            return tuple(self.cast(t, dtype, region) for t in tensors)
        if _CAST_ALL is not None:
            casts = _CAST_ALL(tuple(tensors), dtype)
        else:
            casts = tuple(t.to(dtype) if t is not None else None for t in tensors)
        holder.casts = (region, tuple(map(id, tensors)),
                        tuple(t._version if t is not None else 0 for t in tensors),
                        tuple(weakref.ref(c) if c is not None else None for c in casts))
        return casts

    def live(self):
        """The entries whose cast is still alive (held by a graph)."""
        return {k: e for k, e in self._casts.items() if e[3]() is not None}

    def clear(self):
        self._casts.clear()
