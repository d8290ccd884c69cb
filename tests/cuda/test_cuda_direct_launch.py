"""The Block's step with its bound launches made directly (kernels/direct_launch.py) computes what
it computes through Triton's own launch path, bit for bit, and does launch directly.

On CPU the direct launch is checked against Triton's JITFunction.run with a stand-in driver
(tests/test_direct_launch.py); here the compiled kernels' launchers run for real."""
import copy
import gc

import pytest
import torch

import vit_fast
from vit_fast.kernels import direct_launch
from vit_fast.modules import Block

from cuda_helpers import BF16, F32

pytestmark = pytest.mark.cuda


def _steps(block, x, gy, autocast, n=4):
    """n training steps; the last one's output, dx and parameter gradients."""
    for _ in range(n):
        block.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        ctx = torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None)
        with vit_fast.use_backend("triton"), ctx:
            out = block(xi)
        out.backward(gy.to(out.dtype))
    return [out.detach(), xi.grad, *(p.grad for p in block.parameters())]


def _direct_launches():
    return [o for o in gc.get_objects() if isinstance(o, direct_launch.DirectLaunch)]


@pytest.mark.parametrize("dtype,autocast", [(BF16, None), (F32, BF16)], ids=["bf16", "amp"])
def test_direct_launches_compute_what_tritons_launches_do(device, monkeypatch, dtype, autocast):
    if device.type != "cuda":
        pytest.skip("the direct launch needs compiled kernels (the interpreter has none)")
    torch.manual_seed(0)
    block = Block(768, 12, qkv_bias=True).to(device=device, dtype=dtype).train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 197, 768, device=device).to(dtype)
    gy = torch.randn_like(x)
    before = set(map(id, _direct_launches()))
    monkeypatch.setattr(direct_launch, "ENABLED", True)
    direct = _steps(block, x, gy, autocast)
    made = [d for d in _direct_launches() if id(d) not in before]
    assert made, "the Block's step made no bound launch"
    assert all(d.fast is not None for d in made if d.calls >= 2), (
        "a bound launch called more than once still goes through Triton: "
        + ", ".join(str(d.kernel) for d in made if d.fast is None and d.calls >= 2))
    monkeypatch.setattr(direct_launch, "ENABLED", False)
    through_triton = _steps(twin, x, gy, autocast)
    for a, b in zip(direct, through_triton):
        assert torch.equal(a, b)
