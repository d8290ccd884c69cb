"""A converted model under CUDA graphs (issue 26): trained with torch.cuda.make_graphed_callables
and with torch.compile(mode="reduce-overhead"), the same losses and gradients as eagerly; and,
after warm-up, a training step that synchronizes nothing with the host (the uint8 patch embed used
to copy mean/std to the device and read std back on every call).

No tuning runs while a graph is captured (vit_fast.tuning takes its fixed table then), and the
keys seen during warm-up are already chosen: a capture replays what eager ran."""
import copy

import pytest
import torch

import vit_fast

import sync_check

pytestmark = pytest.mark.cuda


def _model(device):
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64,
                              init_values=1e-2, drop_path_rate=0.0)
    return vit_fast.convert(model).to(device).train()


def _step(model, opt, images, labels):
    opt.zero_grad(set_to_none=False)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
    loss.backward()
    opt.step()
    return loss.detach()


def _data(device, n=4):
    g = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(n, 3, 64, 64, generator=g).to(device)
    labels = torch.randint(0, 1000, (n,), generator=g).to(device)
    return images, labels


def test_make_graphed_callables_trains_like_eager(device):
    model = _model(device)
    eager = copy.deepcopy(model)
    images, labels = _data(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    for _ in range(3):  # warm-up on a side stream (the tuner chooses here), as the docs ask
        _step(eager, opt_eager, images, labels)
    model.load_state_dict(eager.state_dict())
    graphed = torch.cuda.make_graphed_callables(model, (images,))
    losses, want = [], []
    for _ in range(3):
        losses.append(_step(graphed, opt, images, labels))
        want.append(_step(eager, opt_eager, images, labels))
    torch.testing.assert_close(torch.stack(losses), torch.stack(want), rtol=2e-2, atol=2e-2)


def test_reduce_overhead_compile_trains_like_eager(device):
    model = _model(device)
    eager = copy.deepcopy(model)
    images, labels = _data(device)
    compiled = torch.compile(model, mode="reduce-overhead")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.1)
    losses, want = [], []
    for _ in range(4):
        losses.append(_step(compiled, opt, images, labels))
        want.append(_step(eager, opt_eager, images, labels))
    torch.testing.assert_close(torch.stack(losses), torch.stack(want), rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
def test_training_step_does_not_sync_after_warm_up(device, uint8):
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = _data(device)
    if uint8:  # the uint8 NHWC input path: normalize, patchify, project in one op
        pe = model.patch_embed
        raw = (images.clamp(-1, 1) * 127 + 128).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

        def embed():
            return vit_fast.patch_embed(raw, pe.proj.weight, pe.proj.bias, patch_size=16,
                                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        for _ in range(2):
            embed()
        with sync_check.no_host_sync():  # always, not only under VIT_FAST_SYNC_CHECK=1
            embed()
        return
    for _ in range(2):
        _step(model, opt, images, labels)
    with sync_check.no_host_sync():
        _step(model, opt, images, labels)
