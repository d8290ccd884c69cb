"""The Block step's bodies recorded and replayed from C++ (vit_fast/step_program.py) on a GPU: the
compiled launchers called with data pointers, the current stream, the caching allocator. The
replayed step gives the general path's bits (fp32: SDPA's memory-efficient backward is not
deterministic on CUDA, so its gradients are compared within fp32 rounding)."""
import pytest
import torch

import vit_fast
from vit_fast import step_program
from vit_fast.modules import Block

from cuda_helpers import VIT

pytestmark = pytest.mark.cuda


def _call(block, x, gy, amp, general=False):
    x = x.detach().clone().requires_grad_()
    params = list(block.parameters())
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = block._forward_general(x, None, False, None) if general else block(x)
    return (out, *torch.autograd.grad(out, [x, *params], gy.to(out.dtype)))


@pytest.mark.parametrize("precision", ["bf16", "amp", "fp32"])
def test_replayed_step_gives_the_general_paths_bits(device, precision):
    if not step_program.ENABLED:
        pytest.skip("step programs are off here (VIT_FAST_STEP_PROGRAMS=0, the interpreter, or "
                    "vit_fast._C without the replay)")
    C, heads = VIT["S"]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    block = Block(C, heads, qkv_bias=True, init_values=0.1).to(device=device, dtype=dtype).train()
    x = torch.randn(4, 197, C, device=device, dtype=dtype)
    gy = torch.randn_like(x)
    amp = precision == "amp"
    with vit_fast.use_backend("triton"):
        for _ in range(4):  # the general path, then the step; its third call records
            _call(block, x, gy, amp)
        programs = block.__dict__["_block_plan"][1].step.programs
        assert programs is not None
        assert {type(p).__name__ for p in programs.by_key.values()} == {"Program"}
        replayed = _call(block, x, gy, amp)
        general = _call(block, x, gy, amp, general=True)
    assert torch.equal(replayed[0], general[0])
    for a, b in zip(replayed[1:], general[1:]):
        if precision == "fp32":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
