"""vit_fast._C's host-path functions (csrc/amp_casts.cpp, csrc/empties.cpp) on the GPU's device:
the step's AMP casts are .to()'s bits on that device, autocast's cache keeps its cast for the
region, and a bound launch's outputs land on the given tensor's device."""
import pytest
import torch

from vit_fast.ops import patch_embed as pe

from cuda_helpers import BF16, F32

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not pe.extension_available(),
                                 reason=f"extension not loaded: {pe.extension_error()}")]


def test_casts_on_the_device_are_to_bit_for_bit(device):
    from vit_fast import _C
    torch.manual_seed(0)
    ws = tuple(torch.randn(s, device=device) * 1e3 for s in ((2304, 768), (2304,), (768, 768),
                                                              (3072, 768)))
    with torch.no_grad():
        got = _C.casts(ws + (None,), BF16)
    assert got[-1] is None
    for g, w in zip(got, ws):
        assert g.device == w.device and g.stride() == w.stride()
        assert torch.equal(g.view(torch.int16), w.to(BF16).view(torch.int16))


def test_autocast_cached_cast_on_the_device(device):
    from vit_fast import _C
    w = torch.nn.Parameter(torch.randn(64, 64, device=device))
    with torch.autocast(device.type, dtype=BF16):
        with torch.no_grad():
            a = _C.autocast_cached_cast(w, BF16)
        assert a.device == w.device and a.grad_fn is not None
        assert _C.autocast_cached_cast(w, BF16) is a
    with torch.autocast(device.type, dtype=BF16):
        assert _C.autocast_cached_cast(w, BF16) is not a


def test_empties_land_on_the_device(device):
    from vit_fast import _C
    like = torch.empty(1, device=device)
    out = _C.empties(like, (((4, 8), BF16), None, ((3,), F32)))
    assert out[1] is None
    assert [(t.device, t.dtype, tuple(t.shape)) for t in (out[0], out[2])] == \
        [(like.device, BF16, (4, 8)), (like.device, F32, (3,))]
