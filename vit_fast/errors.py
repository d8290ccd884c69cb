"""The error types vit_fast raises for bad arguments (imported by the modules that raise them)."""


class DtypeError(TypeError, ValueError):
    """A tensor of the wrong dtype. Both a TypeError and a ValueError (as numpy's AxisError is
    both a ValueError and an IndexError), so either ``except`` a caller already has catches it."""
