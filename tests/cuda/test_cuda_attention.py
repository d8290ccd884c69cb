"""fused_qkv_attention on CUDA: the compiled kernels at ViT sizes, forward and backward."""
import pytest
import torch

import vit_fast
from vit_fast import dispatch, reference

from cuda_helpers import (BF16, F16, F32, HEADS, TOKENS, VIT, assert_backward_deterministic,
                          assert_kernel_chosen, check, dtype_id)

pytestmark = pytest.mark.cuda
B = 2


def _qkv(device, n, heads, head_dim, dtype):
    return torch.randn(B, n, 3 * heads * head_dim, device=device).to(dtype)


def _attention(heads, dropout_p=0.0):
    def fn(qkv):
        return vit_fast.fused_qkv_attention(qkv, heads, dropout_p=dropout_p)
    return fn


CASES = [(s, n, d) for s in HEADS for n in TOKENS for d in (F16, BF16)]


@pytest.mark.parametrize("shape,n,dtype", CASES, ids=[f"{s}-N{n}-{dtype_id(d)}" for s, n, d in CASES])
def test_forward_backward(device, shape, n, dtype):
    heads, head_dim = HEADS[shape]
    qkv = _qkv(device, n, heads, head_dim, dtype)
    assert_kernel_chosen("fused_qkv_attention", [qkv], head_dim=head_dim)
    check(_attention(heads), {"qkv": qkv}, ["qkv"])


@pytest.mark.parametrize("shape", list(VIT))
def test_float32_goes_to_the_reference_and_says_why(device, shape):
    if device.type != "cuda":
        pytest.skip("the float32 routing concerns CUDA tensors")
    heads, head_dim = HEADS[shape]
    qkv = _qkv(device, 197, heads, head_dim, F32)
    with vit_fast.use_backend("triton"):
        choice = dispatch.choose("fused_qkv_attention", [qkv], head_dim=head_dim)
        out = vit_fast.fused_qkv_attention(qkv, heads)
    assert choice.backend == "reference"
    assert any("float32 attention on CUDA" in r for r in choice.reasons), choice.reasons
    assert torch.equal(out, reference.fused_qkv_attention(qkv, heads))


AMP = [(s, d) for s in VIT for d in (BF16, F16)]


@pytest.mark.parametrize("shape,dtype", AMP, ids=[f"{s}-{dtype_id(d)}" for s, d in AMP])
def test_autocast(device, shape, dtype):
    heads, head_dim = HEADS[shape]
    outs, grads = check(_attention(heads), {"qkv": _qkv(device, 197, heads, head_dim, F32)}, ["qkv"],
                        autocast=dtype)
    assert outs[0].dtype == dtype and grads["qkv"].dtype == F32


@pytest.mark.parametrize("dtype", (F16, BF16), ids=dtype_id)
def test_backward_bitwise_deterministic_over_10_runs(device, dtype):
    heads, head_dim = HEADS["B"]
    assert_backward_deterministic(_attention(heads), {"qkv": _qkv(device, 577, heads, head_dim, dtype)},
                                  ["qkv"])


def test_dropout_backward_bitwise_deterministic_over_10_runs(device):
    heads, head_dim = HEADS["B"]
    import vit_fast.ops.attention  # noqa: F401  (registers vit_fast::fused_qkv_attention)
    qkv = _qkv(device, 197, heads, head_dim, BF16).requires_grad_()
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    out, _ = torch.ops.vit_fast.fused_qkv_attention(qkv, heads, head_dim ** -0.5, 0.1, seed)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, qkv, grad, retain_graph=True)[0]
    for _ in range(9):
        assert torch.equal(first, torch.autograd.grad(out, qkv, grad, retain_graph=True)[0])


# --- dropout ---------------------------------------------------------------------------------

def _keep_mask(device, B, H, N, p, seed):
    """The kernel's keep mask [B, H, N, N], read off its forward: with q = k = 0 each probability
    is 1/N, and with v_j = e_j (head dim N) output row i is the dropped probability row."""
    from vit_fast.kernels import attention as kernels
    probe = torch.zeros(B, N, 3, H, N, device=device)
    probe[:, :, 2] = torch.eye(N, device=device)[None, :, None, :]
    out, _ = kernels.attention_fwd(probe.reshape(B, N, 3 * H * N).to(F16), H, 1.0, dropout_p=p,
                                   seed=torch.tensor([seed], dtype=torch.int64, device=device))
    z = out.float().reshape(B, N, H, N).permute(0, 2, 1, 3)
    kept = z != 0
    torch.testing.assert_close(z[kept], torch.full_like(z[kept], 1 / (N * (1 - p))), rtol=4e-3, atol=0)
    return kept


def test_dropout_statistics(device):
    B, H, N, p = 2, 4, 128, 0.1
    keep = _keep_mask(device, B, H, N, p, 7)
    # 131,072 Bernoulli(0.1) draws: 6 standard deviations is 0.005.
    assert abs((~keep).float().mean().item() - p) < 0.005
    # Per row too (128 draws each): no row far off (a stuck stream would show here).
    row = (~keep).float().mean(-1)
    assert row.max().item() < 0.4 and row.min().item() >= 0.0
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert not torch.equal(keep, _keep_mask(device, B, H, N, p, 7 + 2 ** 40))
    assert torch.equal(keep, _keep_mask(device, B, H, N, p, 7))


def test_dropout_matches_reference_with_the_kernels_mask(device):
    from tolerance import assert_close_by_rule
    from vit_fast.kernels import attention as kernels
    Bq, N, (H, D), p = 2, 197, HEADS["B"], 0.1
    keep = _keep_mask(device, Bq, H, N, p, 99)
    qkv = torch.randn(Bq, N, 3 * H * D, device=device).to(BF16)
    grad = torch.randn(Bq, N, H * D, device=device).to(BF16)
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    out, lse = kernels.attention_fwd(qkv, H, D ** -0.5, dropout_p=p, seed=seed)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, H, D ** -0.5, dropout_p=p, seed=seed)

    def masked_reference(dtype):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(reference.F, "dropout", lambda a, p: a * keep.to(a.dtype) / (1 - p))
            x = qkv.detach().to(dtype).requires_grad_()
            o = reference.fused_qkv_attention(x, H, dropout_p=p)
            o.backward(grad.to(dtype))
        return o.detach(), x.grad

    (o_same, d_same), (o64, d64) = masked_reference(BF16), masked_reference(torch.float64)
    assert_close_by_rule(out, o_same, o64, "out")
    assert_close_by_rule(dqkv, d_same, d64, "dqkv")


def test_dropout_follows_torch_manual_seed(device):
    heads, head_dim = HEADS["S"]
    qkv = _qkv(device, 197, heads, head_dim, BF16)
    with vit_fast.use_backend("triton"):
        torch.manual_seed(3)
        a = vit_fast.fused_qkv_attention(qkv, heads, dropout_p=0.2)
        b = vit_fast.fused_qkv_attention(qkv, heads, dropout_p=0.2)
        torch.manual_seed(3)
        c = vit_fast.fused_qkv_attention(qkv, heads, dropout_p=0.2)
    assert torch.equal(a, c) and not torch.equal(a, b)
