"""Whether two candidates of the measured selection computed the same thing (vit_fast.tuning):
a candidate that is fast because it is wrong must not be chosen."""
import torch

# How far a candidate's result may be from the first candidate's, relative to the largest
# magnitude of that result: beyond what 16-bit rounding and another accumulation order give
# (bf16's unit roundoff is 2^-8), far below what reading the wrong rows or tiles gives.
AGREEMENT_RTOL = 2.0 ** -4


_CHUNK = 1 << 20  # elements compared at a time: the comparison's memory stays this small


def disagreement(result, expected):
    """None when every tensor of result (tensors, or tuples/lists of them and None) matches the
    one at the same place in expected within AGREEMENT_RTOL, else what differs.

    Compared piece by piece in fp32 (enough for a 2^-4 tolerance), so the check needs no copy of
    the results: the tuning step runs at the first backward's activation peak."""
    seqs = isinstance(result, (tuple, list)), isinstance(expected, (tuple, list))
    if any(seqs):
        if not all(seqs) or len(result) != len(expected):
            return "a different structure"
        return next((w for w in map(disagreement, result, expected) if w), None)
    if not isinstance(expected, torch.Tensor):
        return None  # nothing numeric to compare
    if not isinstance(result, torch.Tensor) or result.shape != expected.shape:
        return f"shape {getattr(result, 'shape', None)} vs {tuple(expected.shape)}"
    a, b = result.detach().reshape(-1), expected.detach().reshape(-1)
    err = scale = 0.0
    any_finite = False
    with torch.no_grad():
        for i in range(0, b.numel(), _CHUNK):
            x, y = a[i:i + _CHUNK].float(), b[i:i + _CHUNK].float()
            if not torch.equal(x.isnan(), y.isnan()):
                return "NaN in other places"
            finite = y.isfinite() & x.isfinite()
            if not torch.equal(x[~finite].nan_to_num(), y[~finite].nan_to_num()):
                return "infinities in other places"
            if finite.any():
                any_finite = True
                err = max(err, (x[finite] - y[finite]).abs().max().item())
                scale = max(scale, y[finite].abs().max().item())
    if not any_finite:
        return None
    tol = AGREEMENT_RTOL * scale
    return None if err <= tol else f"max |difference| {err:.3g} > {tol:.3g}"
