"""Each reference op against an independent formulation of the same math."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vit_fast import reference


def _softmax_attention(qkv, H, scale):
    """Per-head loops over an explicitly materialized softmax: an independent formulation."""
    B, N, _ = qkv.shape
    D = qkv.shape[-1] // (3 * H)
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
    heads = []
    for h in range(H):
        logits = torch.einsum("bnd,bmd->bnm", q[:, :, h], k[:, :, h]) * scale
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        heads.append(torch.einsum("bnm,bmd->bnd", p / p.sum(-1, keepdim=True), v[:, :, h]))
    return torch.cat(heads, dim=-1)


@pytest.mark.parametrize("B,N,H,D", [(2, 17, 3, 40), (1, 1, 2, 64), (2, 197, 4, 16)])
def test_attention_matches_materialized_softmax(B, N, H, D):
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.float64)
    torch.testing.assert_close(reference.fused_qkv_attention(qkv, H), _softmax_attention(qkv, H, D ** -0.5))
    torch.testing.assert_close(reference.fused_qkv_attention(qkv, H, scale=0.3), _softmax_attention(qkv, H, 0.3))


def test_attention_dropout_drops_probabilities():
    qkv = torch.randn(2, 9, 3 * 2 * 8)
    torch.manual_seed(1)
    a = reference.fused_qkv_attention(qkv, 2, dropout_p=0.5)
    torch.manual_seed(1)
    b = reference.fused_qkv_attention(qkv, 2, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, reference.fused_qkv_attention(qkv, 2))


@pytest.mark.parametrize("shape", [(2, 7, 192), (5, 1000), (3, 1, 64)])
@pytest.mark.parametrize("flags", ["plain", "residual", "layer_scale", "all"])
def test_residual_layer_norm_matches_formula(shape, flags):
    x = torch.randn(shape, dtype=torch.float64)
    C = shape[-1]
    w, b = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    kw = {}
    s = x
    if flags != "plain":
        kw["residual"] = torch.randn(shape, dtype=torch.float64)
        branch = x
        if flags in ("layer_scale", "all"):
            kw["layer_scale"] = torch.randn(C, dtype=torch.float64)
            branch = branch * kw["layer_scale"]
        if flags == "all":
            kw["sample_scale"] = torch.tensor([0.0, 2.0, 1.25, 4.0, 1.0], dtype=torch.float64)[: shape[0]]
            branch = branch * kw["sample_scale"].view(-1, *([1] * (len(shape) - 1)))
        s = kw["residual"] + branch
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    expected = (s - mean) / torch.sqrt(var + 1e-6) * w + b
    y, s_out = reference.residual_layer_norm(x, w, b, 1e-6, **kw)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(s_out, s)


def test_residual_layer_norm_half_uses_fp32_statistics():
    x = (torch.randn(4, 384) * 100 + 1000).half()
    y, _ = reference.residual_layer_norm(x, None, None, 1e-6)
    expected = F.layer_norm(x.float(), (384,), eps=1e-6).half()
    torch.testing.assert_close(y, expected)
    assert y.dtype == torch.float16


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mlp_matches_modules(approximate):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(48, 200), nn.GELU(approximate=approximate), nn.Linear(200, 48)).double()
    x = torch.randn(2, 33, 48, dtype=torch.float64)
    out = reference.gelu_mlp(x, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias,
                             approximate=approximate)
    torch.testing.assert_close(out, mlp(x))
    r, g, keep = torch.randn_like(x), torch.randn(48, dtype=torch.float64), torch.tensor([0.0, 2.0], dtype=torch.float64)
    out = reference.gelu_mlp(x, mlp[0].weight, None, mlp[2].weight, mlp[2].bias, approximate=approximate,
                             residual=r, layer_scale=g, sample_scale=keep)
    no_bias = F.linear(F.gelu(F.linear(x, mlp[0].weight), approximate=approximate), mlp[2].weight, mlp[2].bias)
    torch.testing.assert_close(out, r + no_bias * g * keep.view(2, 1, 1))


@pytest.mark.parametrize("C,H,W,ph,pw", [(3, 32, 48, 16, 16), (1, 64, 96, 16, 8), (4, 28, 28, 14, 7)])
def test_patch_embed_matches_unfold_matmul(C, H, W, ph, pw):
    images = torch.randn(2, C, H, W, dtype=torch.float64)
    weight, bias = torch.randn(24, C, ph, pw, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    # Independent formulation: unfold into patches, one matmul.
    cols = F.unfold(images, (ph, pw), stride=(ph, pw)).transpose(1, 2)    # [B, Np, C*ph*pw]
    expected = cols @ weight.reshape(24, -1).t() + bias
    pos = torch.randn(1, expected.shape[1], 24, dtype=torch.float64)
    torch.testing.assert_close(reference.patch_embed(images, weight, bias, patch_size=(ph, pw)), expected)
    torch.testing.assert_close(
        reference.patch_embed(images, weight, None, patch_size=(ph, pw), pos_embed=pos),
        expected - bias + pos)


def test_patch_embed_uint8_normalizes_then_projects():
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    weight, bias = torch.randn(8, 3, 16, 16), torch.randn(8)
    x = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = F.conv2d(x, weight, bias, stride=16).flatten(2).transpose(1, 2)
    out = reference.patch_embed(images, weight, bias, patch_size=(16, 16), mean=mean, std=std)
    torch.testing.assert_close(out, expected)


def test_upcast_is_closer_to_float64_and_keeps_dtype():
    qkv = torch.randn(1, 64, 3 * 2 * 32).bfloat16()
    ref64 = reference.fused_qkv_attention(qkv.double(), 2)
    up = reference.fused_qkv_attention(qkv, 2, upcast=True)
    same = reference.fused_qkv_attention(qkv, 2)
    assert up.dtype == same.dtype == torch.bfloat16
    assert (up.double() - ref64).abs().max() <= (same.double() - ref64).abs().max()
