"""kernels/empties.py: a bound launch's outputs in one call, through vit_fast._C (csrc/empties.cpp)
where it loaded, else Python; both give what ``like.new_empty(shape, dtype=dtype)`` gives."""
import pytest
import torch

from vit_fast.kernels import empties as empties_mod
from vit_fast.ops import patch_embed as pe

needs_ext = pytest.mark.skipif(not pe.extension_available(),
                               reason=f"extension not loaded: {pe.extension_error()}")
SPECS = (((4, 5), torch.bfloat16), None, ((7,), torch.float32), ((), torch.float32),
         ((2, 0, 3), torch.float16))


def _python_empties(like, specs):
    import importlib
    import sys
    saved = sys.modules.get("vit_fast._C")
    sys.modules["vit_fast._C"] = None  # `from vit_fast._C import empties` raises ImportError
    try:
        return importlib.reload(empties_mod).empties(like, specs)
    finally:
        sys.modules["vit_fast._C"] = saved
        importlib.reload(empties_mod)


@pytest.mark.parametrize("path", ["extension", "python"])
def test_empties_are_new_empty(path):
    if path == "extension" and not pe.extension_available():
        pytest.skip(f"extension not loaded: {pe.extension_error()}")
    like = torch.randn(3, 2).t()  # its layout does not matter: outputs are contiguous
    got = (empties_mod.empties if path == "extension" else _python_empties)(like, SPECS)
    assert type(got) is tuple and len(got) == len(SPECS) and got[1] is None
    for t, spec in zip(got, SPECS):
        if spec is None:
            continue
        want = like.new_empty(spec[0], dtype=spec[1])
        assert (t.shape, t.dtype, t.stride(), t.device) == (want.shape, want.dtype, want.stride(),
                                                           want.device)
        assert not t.requires_grad and t.grad_fn is None
    ptrs = [t.data_ptr() for t in got if t is not None and t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # each its own storage


@needs_ext
def test_the_package_uses_the_extensions_empties():
    from vit_fast import _C
    assert empties_mod.empties is _C.empties


@needs_ext
def test_bad_specs_are_type_errors_naming_them():
    from vit_fast import _C
    x = torch.randn(2)
    for specs, match in (([((1,), torch.float32)], "specs must be a tuple"),
                         ((((1,),),), r"specs\[0\] must be None or a \(shape tuple, torch.dtype\)"),
                         ((None, ((-1,), torch.float32)), r"specs\[1\] shape must hold"),
                         ((((2.0,), torch.float32),), r"specs\[0\] shape must hold"),
                         ((((1,), "float32"),), r"specs\[0\] must be None")):
        with pytest.raises(TypeError, match=match):
            _C.empties(x, specs)
    with pytest.raises(TypeError, match="like must be a Tensor"):
        _C.empties(None, ())
    with pytest.raises(TypeError, match="takes 2 arguments"):
        _C.empties(x)
