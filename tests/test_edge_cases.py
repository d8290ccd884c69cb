"""Unusual but valid input gives the reference's answer on every backend: strided and zero-stride
1-D parameters, empty batches and empty feature dims (forward and backward), a NaN confined to
its sample, and the same results from several threads as from one.

The triton backend runs its kernels under the interpreter here (tests/conftest.py)."""
import threading

import pytest
import torch

import vit_fast
from vit_fast import reference


def _strided_vector(n, view, *, positive=False):
    """A [n] leaf-backed view that is not contiguous: every other element of a [2n] tensor, or
    one value broadcast with stride 0 (what ``expand`` gives)."""
    if view == "slice":
        base = torch.randn(2 * n)
        out_of = lambda b: b[::2]  # noqa: E731
    else:
        base = torch.randn(1)
        out_of = lambda b: b.expand(n)  # noqa: E731
    if positive:
        base = base.abs() + 0.5
    base.requires_grad_()
    return base, out_of(base)


def _grads(out, leaves, seed=1):
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _assert_all_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None), f"{what}[{i}]"
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{what}[{i}]")


# --- 1-D inputs with strides other than 1 -------------------------------------------------------

@pytest.mark.parametrize("view", ["slice", "expand"])
def test_residual_layer_norm_strided_vectors(view):
    B, N, C = 3, 5, 24
    x = torch.randn(B, N, C, requires_grad=True)
    residual = torch.randn(B, N, C, requires_grad=True)
    bases, vecs = zip(*(_strided_vector(C, view) for _ in range(3)))
    ss_base, ss = _strided_vector(B, view, positive=True)
    leaves = [x, residual, *bases, ss_base]

    def run(fn):
        return fn(x, vecs[0], vecs[1], 1e-6, residual=residual, layer_scale=vecs[2],
                  sample_scale=ss)
    with vit_fast.use_backend("triton"):
        ours = run(vit_fast.residual_layer_norm)
    want = run(reference.residual_layer_norm)
    _assert_all_close(ours, want, "y, s")
    _assert_all_close(_grads(ours, leaves), _grads(want, leaves), "grads")


@pytest.mark.parametrize("view", ["slice", "expand"])
def test_gelu_mlp_strided_vectors(view):
    B, N, C, H = 2, 3, 16, 40
    x = torch.randn(B, N, C, requires_grad=True)
    residual = torch.randn(B, N, C, requires_grad=True)
    w1 = (torch.randn(H, C) * C ** -0.5).requires_grad_()
    w2 = (torch.randn(C, H) * H ** -0.5).requires_grad_()
    b1_base, b1 = _strided_vector(H, view)
    b2_base, b2 = _strided_vector(C, view)
    ls_base, ls = _strided_vector(C, view)
    ss_base, ss = _strided_vector(B, view, positive=True)
    leaves = [x, residual, w1, w2, b1_base, b2_base, ls_base, ss_base]

    def run(fn):
        return fn(x, w1, b1, w2, b2, residual=residual, layer_scale=ls, sample_scale=ss)
    with vit_fast.use_backend("triton"):
        ours = run(vit_fast.gelu_mlp)
    want = run(reference.gelu_mlp)
    _assert_all_close((ours,), (want,), "out")
    _assert_all_close(_grads(ours, leaves), _grads(want, leaves), "grads")


@pytest.mark.parametrize("view", ["slice", "expand"])
def test_patch_embed_strided_vectors(view):
    """The C++ extension (auto on CPU) with a strided bias and uint8 mean/std."""
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    bias_base, bias = _strided_vector(5, view)
    _, mean = _strided_vector(3, view)
    _, std = _strided_vector(3, view, positive=True)
    leaves = [weight, bias_base]

    def run(backend):
        with vit_fast.use_backend(backend):
            return vit_fast.patch_embed(images, weight, bias, patch_size=4, mean=mean.detach(),
                                        std=std.detach())
    ours, want = run("auto"), run("reference")
    _assert_all_close((ours,), (want,), "out")
    _assert_all_close(_grads(ours, leaves), _grads(want, leaves), "grads")


# --- empty batches and empty feature dims ---------------------------------------------------------

def _leaves(*tensors):
    return [t.requires_grad_() for t in tensors if t is not None]


def _check_empty(call, tensors):
    """call(fn-or-None, tensors) on the triton backend and the reference: same shapes, values,
    and gradients (zeros of the input's shape where nothing flowed)."""
    leaves = _leaves(*tensors)
    with vit_fast.use_backend("triton"):
        ours = call()
    with vit_fast.use_backend("reference"):
        want = call()
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    want_t = want if isinstance(want, tuple) else (want,)
    for a, b in zip(ours_t, want_t):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    got = _grads(ours, leaves)
    ref = _grads(want, leaves)
    for leaf, a, b in zip(leaves, got, ref):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        assert a.shape == leaf.shape
        torch.testing.assert_close(a, b)


EMPTY_SHAPES = [  # (B, N, C, hidden)
    (0, 5, 8, 16),   # empty batch
    (2, 0, 8, 16),   # no tokens
    (2, 3, 0, 16),   # no channels
    (2, 3, 8, 0),    # no hidden units
]


@pytest.mark.parametrize("B,N,C,H", EMPTY_SHAPES)
def test_gelu_mlp_empty(B, N, C, H):
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    w1, b1, w2, b2 = torch.randn(H, C), torch.randn(H), torch.randn(C, H), torch.randn(C)
    ls, ss = torch.randn(C), torch.rand(B)
    _check_empty(lambda: vit_fast.gelu_mlp(x, w1, b1, w2, b2, residual=res, layer_scale=ls,
                                           sample_scale=ss), [x, w1, b1, w2, b2, res, ls, ss])
    _check_empty(lambda: vit_fast.gelu_mlp(x, w1, b1, w2, b2), [x, w1, b1, w2, b2])


@pytest.mark.parametrize("B,N,C,H", EMPTY_SHAPES)
def test_residual_layer_norm_empty(B, N, C, H):
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    w, b, ls, ss = torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(B)
    _check_empty(lambda: vit_fast.residual_layer_norm(x, w, b, 1e-6, residual=res, layer_scale=ls,
                                                      sample_scale=ss), [x, w, b, res, ls, ss])
    _check_empty(lambda: vit_fast.residual_layer_norm(x, w, b, 1e-6), [x, w, b])


@pytest.mark.parametrize("B,N", [(0, 5), (2, 0)])
def test_attention_empty(B, N):
    qkv = torch.randn(B, N, 3 * 2 * 8)
    _check_empty(lambda: vit_fast.fused_qkv_attention(qkv, 2), [qkv])


@pytest.mark.parametrize("B,C,D", [(0, 3, 8), (2, 0, 8)])
def test_patch_embed_empty(B, C, D):
    images, w, b = torch.randn(B, C, 8, 8), torch.randn(D, C, 4, 4), torch.randn(D)
    _check_empty(lambda: vit_fast.patch_embed(images, w, b, patch_size=4), [images, w, b])


@pytest.mark.parametrize("grad", [False, True])
def test_block_empty_batch(grad):
    block = vit_fast.Block(16, 2, init_values=0.1)
    x = torch.randn(0, 5, 16, requires_grad=grad)
    with torch.set_grad_enabled(grad), vit_fast.use_backend("triton"):
        out = block(x)
    assert out.shape == (0, 5, 16)
    if grad:
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in block.parameters())


# --- a NaN stays in its sample -----------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_nan_in_one_sample_stays_there(backend):
    torch.manual_seed(0)
    block = vit_fast.Block(16, 2, init_values=0.1)
    x = torch.randn(3, 5, 16)
    x[1, 2, 3] = float("nan")
    x.requires_grad_()
    with vit_fast.use_backend(backend):
        out = block(x)
    out.sum().backward()
    finite = [0, 2]
    assert torch.isnan(out[1]).any()
    assert torch.isfinite(out[finite]).all()
    assert torch.isfinite(x.grad[finite]).all()


# --- threads --------------------------------------------------------------------------------------

def test_threads_match_single_thread():
    """The default (auto) path on CPU -- reference ops and the C++ patch embed -- run from four
    threads at once, each with its own backend policy, gives the single-thread results."""
    torch.manual_seed(0)
    model = vit_fast.convert(__import__("timm").create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
        depth=2, num_heads=3, num_classes=10, init_values=0.1)).eval()
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    policies = ["auto", "reference", "auto", "reference"]

    def run(i):
        with torch.no_grad(), vit_fast.use_backend(policies[i]):
            return model(inputs[i])
    want = [run(i) for i in range(4)]
    got = [None] * 4
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                got[i] = run(i)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
