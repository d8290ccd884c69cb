"""patch_embed on CUDA: the vit_fast._C extension's CUDA kernels (float NCHW and uint8 NHWC input)."""
import pytest
import torch

import vit_fast

from cuda_helpers import (BF16, DTYPES, F32, VIT, assert_backward_deterministic, assert_kernel_chosen,
                          check, dtype_id)

pytestmark = pytest.mark.cuda
B = 2
# (image size, patch): 196, 256, 576 and 1024 patches, i.e. N = 197, 257, 577, 1025 with the class token
GRIDS = [(224, 16), (224, 14), (384, 16), (448, 14)]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _params(device, img, patch, D, dtype):
    n = (img // patch) ** 2
    fan_in = 3 * patch * patch
    return {"weight": (torch.randn(D, 3, patch, patch, device=device) * fan_in ** -0.5).to(dtype),
            "bias": (torch.randn(D, device=device) * 0.5).to(dtype),
            "pos_embed": (torch.randn(1, n, D, device=device) * 0.02).to(dtype)}


def _embed(patch, mean=None, std=None):
    def fn(images, weight, bias, pos_embed):
        return vit_fast.patch_embed(images, weight, bias, patch_size=patch, pos_embed=pos_embed,
                                    mean=mean, std=std)
    return fn


CASES = [(s, g, d) for s in VIT for g in GRIDS for d in DTYPES]


@pytest.mark.parametrize("shape,grid,dtype", CASES,
                         ids=[f"{s}-{g[0]}px-p{g[1]}-{dtype_id(d)}" for s, g, d in CASES])
def test_float_images_forward_backward(device, shape, grid, dtype):
    img, patch = grid
    t = {"images": torch.randn(B, 3, img, img, device=device).to(dtype),
         **_params(device, img, patch, VIT[shape][0], dtype)}
    assert_kernel_chosen("patch_embed", list(t.values()))
    check(_embed(patch), t, ["images", "weight", "bias", "pos_embed"])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_uint8_images(device, dtype):
    img, patch = 224, 16
    images = torch.randint(0, 256, (B, img, img, 3), dtype=torch.uint8, device=device)
    t = {"images": images, **_params(device, img, patch, VIT["B"][0], dtype)}
    assert_kernel_chosen("patch_embed", list(t.values()))
    check(_embed(patch, MEAN, STD), t, ["weight", "bias", "pos_embed"])


@pytest.mark.parametrize("dtype", (BF16, torch.float16), ids=dtype_id)
def test_autocast(device, dtype):
    img, patch = 224, 16
    t = {"images": torch.randn(B, 3, img, img, device=device),
         **_params(device, img, patch, VIT["S"][0], F32)}
    del t["pos_embed"]  # an fp32 pos_embed would make the add unfused (functional.patch_embed)
    outs, grads = check(lambda images, weight, bias: _embed(patch)(images, weight, bias, None),
                        t, ["images", "weight", "bias"], autocast=dtype)
    assert outs[0].dtype == dtype and grads["weight"].dtype == F32


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_bitwise_deterministic_over_10_runs(device, dtype):
    img, patch = 384, 16
    t = {"images": torch.randn(B, 3, img, img, device=device).to(dtype),
         **_params(device, img, patch, VIT["B"][0], dtype)}
    assert_backward_deterministic(_embed(patch), t, ["images", "weight", "bias", "pos_embed"])
