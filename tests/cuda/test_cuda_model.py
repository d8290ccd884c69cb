"""Whole timm ViTs converted with vit_fast.convert, on CUDA: AMP (the training recipe) forward and a
training backward against the same model on the reference backend and in float64."""
import copy

import pytest
import torch

import vit_fast

import sync_check
from cuda_helpers import BF16, F16, dtype_id
from tolerance import assert_close_by_rule

pytestmark = pytest.mark.cuda
MODELS = {"S": "vit_small_patch16_224", "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}
CHECKED = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight",
           "head.weight")


def _run(model, images, labels, backend, autocast=None):
    """The logits and CHECKED's gradients under ``backend`` (the kernels' step checked for host
    syncs after a warm-up under VIT_FAST_SYNC_CHECK=1)."""
    def step():
        return _step(model, images, labels, backend, autocast)
    return step() if backend == "reference" else sync_check.kernel_step(step, images.device)


def _step(model, images, labels, backend, autocast):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None)
    with vit_fast.use_backend(backend), ctx:
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
    loss.backward()
    grads = dict(model.named_parameters())
    return logits.detach().float(), {n: grads[n].grad for n in CHECKED}


@pytest.mark.parametrize("name,dtype", [(m, d) for m in MODELS for d in (BF16, F16)],
                         ids=[f"{m}-{dtype_id(d)}" for m in MODELS for d in (BF16, F16)])
def test_amp_training_step_matches_reference(device, name, dtype):
    import timm
    torch.manual_seed(0)
    model = vit_fast.convert(timm.create_model(MODELS[name], pretrained=False)).to(device).train()
    swapped = model.vit_fast_summary.swapped
    assert all(f"blocks.{i}" in swapped for i in range(len(model.blocks))), model.vit_fast_summary
    images = torch.randn(2, 3, 224, 224, device=device)
    labels = torch.tensor([1, 7], device=device)
    ours = _run(model, images, labels, "triton", dtype)
    same = _run(model, images, labels, "reference", dtype)
    ref64 = _run(copy.deepcopy(model).double(), images.double(), labels, "reference")
    assert torch.isfinite(ours[0]).all()
    assert_close_by_rule(ours[0].to(dtype), same[0].to(dtype), ref64[0], "logits")
    for n in CHECKED:
        assert_close_by_rule(ours[1][n], same[1][n], ref64[1][n], f"d{n}")
