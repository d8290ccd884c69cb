"""docs/design.md's tolerance rule, in the one place tests take it from.

|ours - ref64| <= 2·|torch_same_dtype - ref64| + floor, where ref64 is the reference in float64 and
torch_same_dtype the reference run in the test dtype (FlashAttention's rule). The floor keeps the
bound meaningful where the same-dtype reference happens to be exact.
"""
import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Absolute floor per dtype, scaled by the magnitude of the reference.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-10}


def assert_close_by_rule(ours, same_dtype, ref64, name="output"):
    """Assert the rule; NaNs must sit exactly where the float64 reference has them."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    floor = FLOOR[same_dtype.dtype]
    ours, same_dtype, ref64 = ours.double(), same_dtype.double(), ref64.double()
    nan = torch.isnan(ref64)
    assert torch.equal(torch.isnan(ours), nan), f"{name}: NaN positions differ from the reference"
    ours, same_dtype, ref64 = (t.masked_fill(nan, 0.0) for t in (ours, same_dtype, ref64))
    err = (ours - ref64).abs().max().item() if ours.numel() else 0.0
    base = (same_dtype - ref64).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if ours.numel() else 1.0)
    bound = 2 * base + floor * scale
    assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e} (torch same dtype {base:.3e})"
