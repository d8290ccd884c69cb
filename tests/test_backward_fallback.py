"""A backward kernel that cannot launch on the device: the training step still completes, the
gradients are the reference's (recomputed from the saved tensors, vit_fast/reference_grad.py),
one warning is given, and the failure is remembered.

Failures are injected by replacing each backward launcher with one that raises triton's
OutOfResources inside the launcher's device guard, as a GPU without enough shared memory would.
"""
import warnings

import pytest
import torch
from triton.runtime.errors import OutOfResources

import vit_fast
# The bound launchers (the Block's step) take their @triton.jit kernels by name when first
# imported: imported here, before any test replaces a kernel, so that none binds a failing
# stand-in for the rest of the session.
import vit_fast.block_step  # noqa: F401
from test_fallback import _forget_failures  # noqa: F401  (autouse: each test starts afresh)
from vit_fast import fallback
from vit_fast.kernels import _device




class FailingLauncher:
    """A launcher of kernels/<stem>.py whose launches raise OutOfResources (``when`` decides)."""

    def __init__(self, stem, name, when=lambda: True, real=None):
        self.launches = 0

        def launch(*args, **kwargs):
            self.launches += 1
            if when():
                raise OutOfResources(81920, 65536, "shared memory")
            return real(*args, **kwargs)
        launch.__module__, launch.__name__ = f"vit_fast.kernels.{stem}", name
        self.guarded = _device.on_tensor_device(launch)


def _inject(monkeypatch, module, attr, stem, **kw):
    failing = FailingLauncher(stem, attr, **kw)
    monkeypatch.setattr(module, attr, failing.guarded)
    return failing


def _vit_fast_warnings(caught):
    return [w for w in caught if "vit_fast" in str(w.message)]


def _step(fn, inputs, policy="triton", grad_seed=1):
    """One forward + backward under the kernel backend ``policy``: (inputs' grads, warnings)."""
    with vit_fast.use_backend(policy), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*inputs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
        grads = torch.autograd.grad(out, inputs, g)
    return grads, _vit_fast_warnings(caught)


def _reference_grads(fn, inputs, grad_seed=1):
    with vit_fast.use_backend("reference"):
        out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    return torch.autograd.grad(out, inputs, g)


def _check(fn, inputs, failing, atol=1e-5, policy="triton"):
    grads, caught = _step(fn, inputs, policy)
    assert failing.launches == 1
    assert len(caught) == 1 and "reference" in str(caught[0].message), [str(w.message) for w in caught]
    for got, want in zip(grads, _reference_grads(fn, inputs)):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    # Remembered: the next step runs without the kernel and without a warning.
    grads, caught = _step(fn, inputs, policy)
    assert failing.launches == 1 and not caught


def _leaves(*shapes):
    return [torch.randn(s, requires_grad=True) for s in shapes]


def test_attention_backward_falls_back(monkeypatch):
    from vit_fast.ops import attention_sdpa  # where the op calls the kernel's launchers
    failing = _inject(monkeypatch, attention_sdpa, "attention_bwd", "attention")
    (qkv,) = _leaves((2, 5, 3 * 2 * 8))
    _check(lambda q: vit_fast.fused_qkv_attention(q, 2), [qkv], failing)


def test_attention_backward_falls_back_when_the_dq_reduce_fails(monkeypatch):
    """The fused backward's second launch (the dq partials' reduce) failing inside the real
    launcher: the same fallback as any of its launches."""
    from vit_fast.kernels import attention

    class FailingKernel:
        launches = 0

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                FailingKernel.launches += 1
                raise OutOfResources(81920, 65536, "shared memory")
            return launch
    failing = FailingKernel()
    monkeypatch.setattr(attention, "attention_bwd_dq_reduce_kernel", failing)
    (qkv,) = _leaves((1, 70, 3 * 1 * 32))
    assert attention.bwd_plan(70, 32, torch.float32)[0::2] == ("fused", 2)  # partials: a reduce
    _check(lambda q: vit_fast.fused_qkv_attention(q, 1), [qkv], failing)


def test_segment_attention_backward_falls_back(monkeypatch):
    """The reference recompute keeps the segments (and the padding rows' zero gradient)."""
    from vit_fast.ops import attention_sdpa
    failing = _inject(monkeypatch, attention_sdpa, "attention_bwd", "attention")
    (qkv,) = _leaves((2, 6, 3 * 2 * 8))
    ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    _check(lambda q: vit_fast.functional.fused_qkv_attention(q, 2, segment_ids=ids), [qkv],
           failing)


@pytest.mark.parametrize("segmented", [False, True], ids=["plain", "segments"])
def test_attention_dropout_backward_falls_back(monkeypatch, segmented):
    """The reference recompute redraws the kernel's own dropout mask from the saved seed
    (vit_fast/dropout_mask.py): the gradient is the kernel's, not that of another mask."""
    from vit_fast.ops import attention_sdpa
    (qkv,) = _leaves((1, 20, 3 * 2 * 8))
    ids = torch.tensor([[0] * 7 + [1] * 11 + [-1] * 2], dtype=torch.int32)

    def fn(q):
        return vit_fast.functional.fused_qkv_attention(q, 2, dropout_p=0.5,
                                                       segment_ids=ids if segmented else None)
    torch.manual_seed(5)  # the op draws its dropout seed from torch's generator
    kernel_grads, caught = _step(fn, [qkv])
    assert not caught
    failing = _inject(monkeypatch, attention_sdpa, "attention_bwd", "attention")
    torch.manual_seed(5)
    grads, caught = _step(fn, [qkv])
    assert failing.launches == 1
    assert len(caught) == 1 and "reference" in str(caught[0].message), [str(w.message) for w in caught]
    torch.testing.assert_close(grads[0], kernel_grads[0], atol=1e-5, rtol=1e-4)
    torch.manual_seed(6)  # another seed, another mask: the comparison above could fail
    assert not torch.allclose(_step(fn, [qkv])[0][0], kernel_grads[0], atol=1e-3)
    assert failing.launches == 1  # remembered: the reference answered directly


@pytest.mark.parametrize("branch", ["plain", "residual"])
def test_layer_norm_backward_falls_back(monkeypatch, branch):
    from vit_fast.ops import layer_norm
    failing = _inject(monkeypatch, layer_norm, "residual_layer_norm_bwd", "layer_norm")
    x, w, b = _leaves((2, 3, 24), (24,), (24,))
    if branch == "plain":
        def fn(x, w, b):
            return vit_fast.residual_layer_norm(x, w, b, 1e-6)[0]
        _check(fn, [x, w, b], failing)
        return
    res, ls = _leaves((2, 3, 24), (24,))
    keep = torch.tensor([2.0, 0.0])  # drop-path: sample 1 dropped

    def fn(x, w, b, res, ls):
        y, s = vit_fast.residual_layer_norm(x, w, b, 1e-6, residual=res, layer_scale=ls,
                                            sample_scale=keep)
        return y * 2 + s  # a gradient into both outputs
    _check(fn, [x, w, b, res, ls], failing)


@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_gelu_mlp_backward_falls_back(monkeypatch, backend):
    if backend == "triton":
        from vit_fast.ops import gelu_mlp as module
        attr = "gelu_mlp_bwd"
    else:
        from vit_fast.kernels import gelu_elementwise as module
        attr = "gelu_mlp_cublas_bwd"
    failing = _inject(monkeypatch, module, attr, "gelu_mlp")
    x, w1, b1, w2, b2, res, ls = _leaves((2, 3, 16), (32, 16), (32,), (16, 32), (16,), (2, 3, 16),
                                         (16,))

    def fn(*t):
        return vit_fast.gelu_mlp(*t[:5], approximate="tanh", residual=t[5], layer_scale=t[6],
                                 sample_scale=torch.tensor([1.0, 0.5]))
    _check(fn, [x, w1, b1, w2, b2, res, ls], failing, atol=1e-4, policy=backend)


def _block():
    block = vit_fast.Block(16, 2, mlp_ratio=2.0, qkv_bias=True, init_values=0.5)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block


@pytest.mark.parametrize("which", ["layer_norm_bwd", "mlp_bwd", "layer_norm_recompute",
                                   "layer_norm_fwd"])
def test_block_falls_back(monkeypatch, which):
    """The Block's fused ops (LN->qkv Linear, residual->LN->MLP): their backward runs the LN and
    MLP backward ops and reruns the LN forward; each failing alone still completes the step. The
    LN forward failing everywhere (both fused ops, forward and backward) is one warning."""
    from vit_fast.kernels import layer_norm as ln_kernels
    from vit_fast.ops import gelu_mlp, layer_norm, layer_norm_linear, residual_layer_norm_mlp
    if which == "layer_norm_bwd":
        failing = _inject(monkeypatch, layer_norm, "residual_layer_norm_bwd", "layer_norm")
    elif which == "mlp_bwd":
        failing = _inject(monkeypatch, gelu_mlp, "gelu_mlp_bwd", "gelu_mlp")
    else:  # the LN forward kernel failing where the backward reruns it, or everywhere
        when = fallback.in_backward if which == "layer_norm_recompute" else (lambda: True)
        for module in (layer_norm, layer_norm_linear, residual_layer_norm_mlp):
            failing = _inject(monkeypatch, module, "residual_layer_norm_fwd", "layer_norm",
                              when=when, real=ln_kernels.residual_layer_norm_fwd)
    block = _block()
    params = list(block.parameters())
    (x,) = _leaves((2, 5, 16))

    def fn(x, *_params):
        return block(x)
    grads, caught = _step(fn, [x, *params])
    assert len(caught) == 1, [str(w.message) for w in caught]
    for got, want in zip(grads, _reference_grads(fn, [x, *params])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if which in ("layer_norm_bwd", "mlp_bwd"):
        assert failing.launches == 1
