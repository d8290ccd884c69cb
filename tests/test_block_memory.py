"""vit_fast.Block's kernel path saves no LayerNorm output (docs/design.md, training memory).

With the triton backend (kernels under the Triton interpreter here) the Block runs LN1 -> qkv as
vit_fast::layer_norm_linear and LN2 -> MLP as vit_fast::residual_layer_norm_mlp, whose backwards
rebuild the LayerNorm outputs. Checked: outputs and every gradient against the reference backend
(tolerance rule), what autograd saves, and the ViT-B/16 memory ratio from the bench harness.
"""
import copy
import os

import pytest
import timm.layers
import torch

import vit_fast
from vit_fast.bench.memory import measure
from vit_fast.modules import Block, _drop_path_scale

from tolerance import assert_close_by_rule

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="TRITON_INTERPRET=1 is not set (tests/conftest.py sets it "
                                       "before triton is imported)")


def _run(block, x, gy, backend, seed=3):
    """Forward + backward of ``block`` under ``backend``; (out, dx, {param: grad})."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same drop-path draws in every run
    with vit_fast.use_backend(backend):
        out = block(x)
    out.backward(gy)
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


CASES = [
    # dtype, B, N, C, heads, Block kwargs, Attention.fused_attn
    (torch.float32, 2, 17, 64, 2, dict(qkv_bias=True), True),
    (torch.bfloat16, 4, 17, 64, 2, dict(init_values=0.1, drop_path=0.5), True),
    (torch.float32, 2, 13, 48, 3, dict(qkv_bias=True, init_values=0.5, drop_path=0.3,
                                       proj_bias=False, mlp_ratio=2.5,
                                       act_layer=timm.layers.activations.GELUTanh), False),
    (torch.bfloat16, 3, 5, 48, 3, dict(qkv_bias=True, mlp_ratio=2.5), False),
]


@pytest.mark.parametrize("dtype,B,N,C,heads,kw,fused_attn", CASES)
def test_block_kernel_path_matches_reference(dtype, B, N, C, heads, kw, fused_attn):
    torch.manual_seed(0)
    block = Block(C, heads, **kw).to(dtype).train()
    block.attn.fused_attn = fused_attn  # False: attention itself on the eager path
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for n in (block.norm1, block.norm2):
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.5, 0.5)
    x = torch.randn(B, N, C).to(dtype)
    gy = torch.randn(B, N, C).to(dtype)
    assert block._rebuilds_ln_outputs(x) is False  # 'auto' on CPU: today's reference path
    with vit_fast.use_backend("triton"):
        assert block._rebuilds_ln_outputs(x)

    ours = _run(block, x, gy, "triton")
    same = _run(block, x, gy, "reference")
    block64 = copy.deepcopy(block).double()
    ref64 = _run(block64, x.double(), gy.double(), "reference")
    if kw.get("drop_path"):  # the seed must drop some branches and keep others to test both
        torch.manual_seed(3)
        masks = torch.cat([_drop_path_scale(block.drop_path1, x),
                           _drop_path_scale(block.drop_path2, x)])
        assert 0 < int((masks == 0).sum()) < masks.numel()
    assert ours[0].dtype == dtype
    assert_close_by_rule(ours[0], same[0], ref64[0], "out")
    assert_close_by_rule(ours[1], same[1], ref64[1], "dx")
    for name, g in ref64[2].items():
        assert ours[2][name] is not None, f"{name}: no gradient"
        assert_close_by_rule(ours[2][name], same[2][name], g, f"d{name}")


def _saved(block, x):
    """(bytes of the unique non-parameter storages autograd saves in the forward, those tensors)."""
    params = {p.untyped_storage()._cdata for p in block.parameters()}
    found = []

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            found.append(t)
        return t
    x = x.detach().clone().requires_grad_()
    with vit_fast.use_backend("triton"):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x)
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in found}
    return sum(storages.values()), found


def _holds(tensors, value):
    return any(t.numel() == value.numel()
               and torch.allclose(t.reshape(value.shape), value, atol=1e-5) for t in tensors)


def test_block_saves_no_layer_norm_output(monkeypatch):
    B, N, C = 2, 17, 64
    torch.manual_seed(0)
    block = Block(C, 2, qkv_bias=True).train()
    x = torch.randn(B, N, C)
    with torch.no_grad(), vit_fast.use_backend("reference"):
        h1 = block.norm1(x)
        s = x + block.attn(h1)
        h2 = block.norm2(s)
    unit = B * N * C * x.element_size()

    after, tensors = _saved(block, x)
    assert not _holds(tensors, h1), "LN1's output is saved"
    assert not _holds(tensors, h2), "LN2's output is saved"
    assert _holds(tensors, x) and _holds(tensors, s)
    # x, qkv (3), o, s, fc1 pre-activation (4) = 10; plus fp32 mean/rstd (2x) and lse, C-times
    # smaller each.
    assert 10 <= after / unit < 10.25, [tuple(t.shape) for t in tensors]

    # The same Block without the rebuilding ops saves both LayerNorm outputs: 2 units more.
    monkeypatch.setattr(Block, "_rebuilds_ln_outputs", lambda self, x: False)
    from vit_fast import block_plan
    block_plan.forget(block)  # the decision above is kept per configuration: make it again
    before, tensors = _saved(block, x)
    assert _holds(tensors, h1) and _holds(tensors, h2)
    assert (before - after) / unit >= 2 - 1e-9, (before, after)


def test_vit_b16_block_memory_ratio():
    rows, notes = measure("vit_base_patch16_224", batch=8, what=("block",))
    by_impl = {r["impl"]: r for r in rows}
    assert "vit_fast" in by_impl, notes
    assert by_impl["vit_fast"]["ratio"] <= 0.65, by_impl["vit_fast"]
    assert by_impl["vit_fast"]["units"] < 10.1


@pytest.mark.parametrize("which", ["layer_norm_linear", "layer_norm_linear_no_affine",
                                   "residual_layer_norm_mlp"])
def test_opcheck(which):
    from vit_fast.ops import layer_norm_linear as lnl, residual_layer_norm_mlp as rlm
    B, N, C, H = 2, 5, 16, 24

    def t(*shape):
        return torch.randn(*shape, requires_grad=True)
    if which == "layer_norm_linear":
        op, args = lnl.layer_norm_linear_op, (t(B, N, C), t(C), t(C), 1e-6, t(3 * C, C), t(3 * C))
    elif which == "layer_norm_linear_no_affine":
        op, args = lnl.layer_norm_linear_op, (t(B, N, C), None, None, 1e-5, t(3 * C, C), None)
    else:
        op, args = rlm.residual_layer_norm_mlp_op, (
            t(B, N, C), t(B, N, C), t(C), torch.tensor([2.0, 0.0]), t(C), t(C), 1e-6, t(H, C),
            t(H), t(C, H), t(C), "none", t(C), None, True)
    torch.library.opcheck(op, args)
