"""A bound launch's outputs (kernels/*_bound.py) allocated in one call: vit_fast._C.empties
(csrc/empties.cpp) where the extension loaded, else the same in Python. From Python each
``new_empty(shape, dtype=...)`` costs the host more in argument parsing than the allocation
behind it; the bound launches know their outputs' shapes and dtypes when they are bound."""
from __future__ import annotations

try:
    from vit_fast._C import empties
except (ImportError, OSError):  # no extension (vit_fast.ops.patch_embed says why), or an older one
    def empties(like, specs):
        """tuple(None if s is None else like.new_empty(s[0], dtype=s[1]) for s in specs)."""
        return tuple(None if s is None else like.new_empty(s[0], dtype=s[1]) for s in specs)
