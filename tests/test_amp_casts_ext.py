"""vit_fast._C's AMP weight casts (csrc/amp_casts.cpp), what vit_fast/amp_weights.py calls when the
extension is there: the same values, shapes and regions as the Python path they replace."""
import gc

import pytest
import torch

from vit_fast import amp_weights
from vit_fast.ops import patch_embed as pe

pytestmark = pytest.mark.skipif(not pe.extension_available(),
                                reason=f"extension not loaded: {pe.extension_error()}")
BF = torch.bfloat16


def _C():
    from vit_fast import _C
    return _C


def test_the_package_uses_the_extensions_casts():
    assert amp_weights._CACHED_CAST is _C().autocast_cached_cast
    assert amp_weights._CAST_ALL is _C().casts


def test_casts_are_to_bit_for_bit_and_keep_nones_and_dtype_matches():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5) * 1e3)
    strided = torch.randn(5, 6).t()  # not contiguous: the cast keeps its strides, as .to() does
    same = torch.randn(3, dtype=BF)
    with torch.no_grad():
        got = _C().casts((w, None, strided, same), BF)
    assert got[1] is None and got[3] is same
    for cast, src in ((got[0], w), (got[2], strided)):
        want = src.detach().to(BF)
        assert cast.dtype == BF and cast.stride() == want.stride()
        assert torch.equal(cast.view(torch.int16), want.view(torch.int16))
        assert cast.grad_fn is None and cast.data_ptr() != src.data_ptr()
    assert _C().casts((), BF) == ()


def test_casts_with_grad_mode_record_the_cast_like_to():
    w = torch.nn.Parameter(torch.randn(4, 4))
    cast = _C().casts((w,), BF)[0]  # grad mode on, a tensor that requires grad: its .to()
    assert type(cast.grad_fn).__name__ == "ToCopyBackward0"
    cast.float().sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 4))


def test_bad_arguments_are_type_errors_naming_them():
    w = torch.randn(2)
    with pytest.raises(TypeError, match="argument 1 must be a tuple"):
        _C().casts([w], BF)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a Tensor or None"):
        _C().casts((w, 3), BF)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        _C().casts((w,), "bfloat16")
    with pytest.raises(TypeError, match="argument 1 must be a Tensor"):
        _C().autocast_cached_cast(None, BF)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        _C().autocast_cached_cast(w)


def test_autocast_cached_cast_is_autocasts_own_cache():
    """One cast per region, with a grad_fn even under no_grad (a later op of the region that
    takes it from autocast's cache keeps the weight's gradient), a new one in the next region."""
    w = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=BF):
        with torch.no_grad():
            first = _C().autocast_cached_cast(w, BF)
        assert first.dtype == BF and type(first.grad_fn).__name__ == "ToCopyBackward0"
        assert _C().autocast_cached_cast(w, BF) is first
        (x @ w).float().sum().backward()  # autocast's matmul takes the cached cast
        assert w.grad is not None and torch.equal(w.grad, (x.to(BF).t().float()
                                                           @ torch.ones(2, 4)).to(BF).float())
    with torch.autocast("cpu", dtype=BF):
        assert _C().autocast_cached_cast(w, BF) is not first
        with torch.autocast("cpu", dtype=BF, cache_enabled=False):
            a, b = (_C().autocast_cached_cast(w, BF) for _ in range(2))
            assert a is not b  # autocast's cache off: a cast per call, as autocast's own


@pytest.mark.parametrize("path", ["extension", "python"])
def test_regions_are_the_same_on_both_paths(monkeypatch, path):
    if path == "python":
        monkeypatch.setattr(amp_weights, "_CACHED_CAST", None)
        monkeypatch.setattr(amp_weights, "_CAST_ALL", None)
    cache = amp_weights.AmpWeights()
    dev = torch.device("cpu")
    with torch.autocast("cpu", dtype=BF):
        r = cache.region(dev, BF)
        assert cache.region(dev, BF) is r
        with torch.autocast("cpu", dtype=BF):  # nested: the same region
            assert cache.region(dev, BF) is r
        assert cache.region(dev, BF) is r
    gc.collect()
    with torch.autocast("cpu", dtype=BF):
        assert cache.region(dev, BF) is not r
        with torch.inference_mode():
            assert cache.region(dev, BF) is not cache.region(dev, BF)
