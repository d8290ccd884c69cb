"""patch_embed's extension path against the reference beyond first-order float gradients:
second-order gradients (create_graph=True), learnable mean/std of the uint8 path, and uint8
input under torch.compile(fullgraph=True)."""
import pytest
import torch

import vit_fast
from vit_fast.ops import patch_embed as pe

pytestmark = pytest.mark.skipif(not pe.extension_available(), reason="vit_fast._C is not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _on(backend, fn):
    with vit_fast.use_backend(backend):
        return fn()


def _assert_grads_close(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, i
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-5, msg=f"grad {i}")


def test_second_order_gradients_match_reference():
    images = torch.randn(2, 3, 8, 8, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4, requires_grad=True)
    bias = torch.randn(5, requires_grad=True)
    pos = torch.randn(1, 4, 5, requires_grad=True)
    leaves = (images, weight, bias, pos)

    def second_order():
        out = vit_fast.patch_embed(images, weight, bias, patch_size=4, pos_embed=pos)
        first = torch.autograd.grad((out ** 3).sum(), leaves, create_graph=True)
        loss = sum((g ** 2).sum() for g in first)
        return torch.autograd.grad(loss, leaves, allow_unused=True)
    got = _on("auto", second_order)
    want = _on("reference", second_order)
    assert any(w.abs().max() > 0 for w in want)
    _assert_grads_close(got, want)


def _uint8_leaves(B, D):
    """uint8 NHWC images and learnable weight, mean and std."""
    return (torch.randint(0, 256, (B, 8, 8, 3), dtype=torch.uint8),
            torch.randn(D, 3, 4, 4, requires_grad=True), torch.tensor(MEAN, requires_grad=True),
            torch.tensor(STD, requires_grad=True))


def test_learnable_mean_std_get_gradients():
    images, weight, mean, std = _uint8_leaves(2, 5)

    def grads():
        out = vit_fast.patch_embed(images, weight, None, patch_size=4, mean=mean, std=std)
        return torch.autograd.grad((out ** 2).sum(), (weight, mean, std))
    got = _on("auto", grads)
    want = _on("reference", grads)
    _assert_grads_close(got, want)


def test_uint8_second_order_through_mean_std():
    images, weight, mean, std = _uint8_leaves(1, 4)

    def second_order():
        out = vit_fast.patch_embed(images, weight, None, patch_size=4, mean=mean, std=std)
        gw, = torch.autograd.grad(out.square().sum(), (weight,), create_graph=True)
        return torch.autograd.grad(gw.square().sum(), (weight, mean, std))
    _assert_grads_close(_on("auto", second_order), _on("reference", second_order))


@pytest.mark.parametrize("std_kind", ["tuple", "tensor"])
def test_uint8_compiles_without_graph_breaks(std_kind):
    torch._dynamo.reset()
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    weight, bias = torch.randn(5, 3, 4, 4), torch.randn(5)
    std = STD if std_kind == "tuple" else torch.tensor(STD)

    def fn(images, weight, bias):
        return vit_fast.patch_embed(images, weight, bias, patch_size=4, mean=MEAN, std=std)
    want = fn(images, weight, bias)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(images, weight, bias)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_zero_std_is_rejected():
    images = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8)
    weight = torch.randn(4, 3, 4, 4)
    for std in ((0.2, 0.0, 0.2), torch.tensor((0.2, 0.0, 0.2))):
        with pytest.raises(ValueError, match="std"):
            vit_fast.patch_embed(images, weight, None, patch_size=4, mean=MEAN, std=std)
