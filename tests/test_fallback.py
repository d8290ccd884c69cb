"""A kernel that cannot compile or launch on the device falls back to the reference, warns once,
and is remembered; a failure that is not about the build propagates. (Backward kernels:
tests/test_backward_fallback.py.)

Failures are injected where they happen on a GPU: the ``kernel[grid](...)`` launch inside the
launcher (the @triton.jit object is replaced by one that raises), so the launcher's device guard
and vit_fast.dispatch both see them as they would see triton's own OutOfResources.
"""
import ast
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

import vit_fast
# The bound launchers (the Block's step) take their @triton.jit kernels by name when first
# imported: imported here, before any test replaces a kernel, so that none binds a failing
# stand-in for the rest of the session.
import vit_fast.block_step  # noqa: F401
from vit_fast import dispatch, fallback, reference
from vit_fast.kernels import _device


class FailingKernel:
    """Stands in for a @triton.jit kernel whose every launch raises ``exc``."""

    def __init__(self, exc):
        self.exc = exc
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.exc
        return launch


@pytest.fixture(autouse=True)
def _forget_failures():
    fallback.forget()
    yield
    fallback.forget()


def _ln_inputs(requires_grad=False):
    x = torch.randn(2, 5, 24, requires_grad=requires_grad)
    w = torch.randn(24, requires_grad=requires_grad)
    b = torch.randn(24, requires_grad=requires_grad)
    return x, w, b


def test_forward_out_of_resources_falls_back_once(monkeypatch):
    from vit_fast.kernels import layer_norm
    failing = FailingKernel(OutOfResources(98304, 65536, "shared memory"))
    monkeypatch.setattr(layer_norm, "residual_layer_norm_fwd_kernel", failing)
    x, w, b = _ln_inputs()
    expected, _ = reference.residual_layer_norm(x, w, b, 1e-6)
    with vit_fast.use_backend("triton"):
        with pytest.warns(RuntimeWarning, match="out of resource") as caught:
            y, _ = vit_fast.residual_layer_norm(x, w, b, 1e-6)
        assert len([c for c in caught if "vit_fast" in str(c.message)]) == 1
        torch.testing.assert_close(y, expected)
        # Remembered: the next call goes straight to the reference, silently.
        choice = dispatch.choose("residual_layer_norm", [x, w, b], dim=24)
        assert choice.backend == "reference" and "OutOfResources" in choice.reasons[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y2, _ = vit_fast.residual_layer_norm(x, w, b, 1e-6)
    assert failing.launches == 1
    torch.testing.assert_close(y2, expected)


def test_failure_is_remembered_per_key(monkeypatch):
    """Another dtype or option of the same op still tries its kernel."""
    from vit_fast.kernels import layer_norm
    monkeypatch.setattr(layer_norm, "residual_layer_norm_fwd_kernel",
                        FailingKernel(OutOfResources(1, 0, "shared memory")))
    x, w, b = _ln_inputs()
    with vit_fast.use_backend("triton"), pytest.warns(RuntimeWarning):
        vit_fast.residual_layer_norm(x, w, b, 1e-6)
    dispatch.LAUNCH_FAILURES.clear()  # keep only the per-key memory of run()
    with vit_fast.use_backend("triton"):
        assert dispatch.choose("residual_layer_norm", [x, w, b], dim=24).backend == "reference"
        assert dispatch.choose("residual_layer_norm", [x.double()], dim=24).backend == "reference"
        other = [t.half() for t in (x, w, b)]
        assert dispatch.choose("residual_layer_norm", other, dim=24).backend == "triton"


def test_forward_and_backward_paths_share_one_memory_and_one_warning(monkeypatch):
    """dispatch.run's forward failure lands in fallback's table (forget() clears it), and the
    same launcher failing again inside the Block's fused op (fallback.reference_on_failure) is
    not a second warning."""
    from vit_fast.kernels import layer_norm
    monkeypatch.setattr(layer_norm, "residual_layer_norm_fwd_kernel",
                        FailingKernel(OutOfResources(1, 0, "shared memory")))
    x, w, b = _ln_inputs()
    block = vit_fast.Block(16, 2, mlp_ratio=2.0)  # another width: another key, so it tries
    x16 = torch.randn(2, 5, 16)
    with vit_fast.use_backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vit_fast.residual_layer_norm(x, w, b, 1e-6)
        key = dispatch.choose("residual_layer_norm", [x, w, b], dim=24).key
        assert "OutOfResources" in fallback.FELL_BACK[key]
        _device.LAUNCH_FAILURES.clear()  # the Block's fused op tries its LayerNorm kernel
        assert not block.why_not_fused()
        with torch.no_grad():
            torch.testing.assert_close(block(x16), _reference_block(block, x16))
    assert len([c for c in caught if "vit_fast" in str(c.message)]) == 1, \
        [str(c.message) for c in caught]
    assert ("layer_norm_linear", "cpu") in fallback.FELL_BACK
    fallback.forget()
    with vit_fast.use_backend("triton"):
        assert dispatch.choose("residual_layer_norm", [x, w, b], dim=24).backend == "triton"


def _reference_block(block, x):
    with vit_fast.use_backend("reference"):
        return block(x)


def test_failure_inside_a_nested_launcher(monkeypatch):
    """gelu_mlp's GEMM (matmul launcher inside gelu_mlp_fwd) failing to compile."""
    from triton.compiler.errors import CompilationError
    from vit_fast.kernels import matmul
    exc = CompilationError(None, ast.Module(body=[], type_ignores=[]), "injected compile failure")
    monkeypatch.setattr(matmul, "matmul_kernel", FailingKernel(exc))
    x = torch.randn(2, 3, 16)
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    with vit_fast.use_backend("triton"), pytest.warns(RuntimeWarning, match="gelu_mlp"):
        out = vit_fast.gelu_mlp(x, w1, b1, w2, b2)
    torch.testing.assert_close(out, reference.gelu_mlp(x, w1, b1, w2, b2))
    assert ("matmul", "cpu") in _device.LAUNCH_FAILURES


def test_extension_without_kernel_image_falls_back(monkeypatch):
    from vit_fast.ops import patch_embed as pe

    def no_image(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(pe, "patch_embed", no_image)
    images, weight, bias = torch.randn(1, 3, 8, 8), torch.randn(6, 3, 4, 4), torch.randn(6)
    choice = dispatch.choose("patch_embed", [images, weight, bias, None])
    if choice.backend != "extension":
        pytest.skip(f"the extension is not chosen here: {choice.reasons}")
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        out = vit_fast.patch_embed(images, weight, bias, patch_size=4)
    torch.testing.assert_close(out, reference.patch_embed(images, weight, bias, patch_size=(4, 4)))


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("CUDA error: an illegal memory access")])
def test_other_failures_propagate(monkeypatch, exc):
    """A bug or a broken CUDA context is not papered over by the reference."""
    from vit_fast.kernels import layer_norm
    monkeypatch.setattr(layer_norm, "residual_layer_norm_fwd_kernel", FailingKernel(exc))
    x, w, b = _ln_inputs()
    with vit_fast.use_backend("triton"), pytest.raises(type(exc), match=str(exc)):
        vit_fast.residual_layer_norm(x, w, b, 1e-6)
    assert not fallback.FELL_BACK and not _device.LAUNCH_FAILURES


def test_build_failure_classification():
    assert _device.is_build_failure(OutOfResources(1, 0, "registers"))
    assert _device.is_build_failure(RuntimeError("Triton Error [CUDA]: no kernel image is available"))
    assert _device.is_build_failure(RuntimeError("the provided PTX was compiled with an unsupported toolchain."))
    assert not _device.is_build_failure(RuntimeError("CUDA error: device-side assert triggered"))
    assert not _device.is_build_failure(ValueError("no kernel image"))
