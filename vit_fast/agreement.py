"""Whether two candidates of the measured selection computed the same thing (vit_fast.tuning):
a candidate that is fast because it is wrong must not be chosen."""
import torch

# How far a candidate's result may be from the first candidate's, relative to the largest
# magnitude of that result: beyond what 16-bit rounding and another accumulation order give
# (bf16's unit roundoff is 2^-8), far below what reading the wrong rows or tiles gives.
AGREEMENT_RTOL = 2.0 ** -4


def disagreement(result, expected):
    """None when every tensor of result (tensors, or tuples/lists of them and None) matches the
    one at the same place in expected within AGREEMENT_RTOL, else what differs."""
    seqs = isinstance(result, (tuple, list)), isinstance(expected, (tuple, list))
    if any(seqs):
        if not all(seqs) or len(result) != len(expected):
            return "a different structure"
        return next((w for w in map(disagreement, result, expected) if w), None)
    if not isinstance(expected, torch.Tensor):
        return None  # nothing numeric to compare
    if not isinstance(result, torch.Tensor) or result.shape != expected.shape:
        return f"shape {getattr(result, 'shape', None)} vs {tuple(expected.shape)}"
    a, b = result.detach().double(), expected.detach().double()
    if not torch.equal(a.isnan(), b.isnan()):
        return "NaN in other places"
    finite = b.isfinite() & a.isfinite()
    if not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):
        return "infinities in other places"
    if not finite.any():
        return None
    err = (a[finite] - b[finite]).abs().max().item()
    tol = AGREEMENT_RTOL * b[finite].abs().max().item()
    return None if err <= tol else f"max |difference| {err:.3g} > {tol:.3g}"
