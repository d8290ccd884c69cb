"""Bad input raises ValueError/TypeError naming the argument, before any backend runs."""
import pytest
import torch

import vit_fast


def _attn(**over):
    kw = dict(qkv=torch.randn(2, 5, 3 * 4 * 8), num_heads=4)
    kw.update(over)
    return vit_fast.fused_qkv_attention(kw.pop("qkv"), kw.pop("num_heads"), **kw)


@pytest.mark.parametrize("over,exc,word", [
    (dict(qkv=torch.randn(10, 96)), ValueError, "qkv"),                           # wrong rank
    (dict(qkv=torch.randn(2, 5, 100)), ValueError, "num_heads"),                  # not 3*H*D
    (dict(num_heads=5), ValueError, "3*num_heads"),
    (dict(qkv=torch.randint(0, 3, (2, 5, 96))), TypeError, "qkv"),                # integer qkv
    (dict(qkv=[[1.0]]), TypeError, "qkv"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_heads=1, qkv=torch.randn(1, 2, 3 * 264)), ValueError, "head_dim"),  # > 256
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(scale="x"), TypeError, "scale"),
])
def test_attention_bad_input(over, exc, word):
    with pytest.raises(exc, match=word.replace("*", r"\*")):
        _attn(**over)


@pytest.mark.parametrize("exc", [TypeError, ValueError])
def test_wrong_dtype_is_both_type_and_value_error(exc):
    with pytest.raises(exc, match="qkv must be a floating-point tensor"):
        vit_fast.fused_qkv_attention(torch.randint(0, 3, (2, 5, 96)), 4)


@pytest.mark.parametrize("over,exc,word", [
    (dict(weight=torch.randn(5)), ValueError, "weight"),
    (dict(bias=torch.randn(8, 1)), ValueError, "bias"),
    (dict(residual=torch.randn(2, 3, 7)), ValueError, "residual"),
    (dict(residual=torch.randn(2, 3, 8), sample_scale=torch.ones(3)), ValueError, "sample_scale"),
    (dict(residual=torch.randn(2, 3, 8), layer_scale=torch.ones(9)), ValueError, "layer_scale"),
    (dict(layer_scale=torch.ones(8)), ValueError, "residual"),
    (dict(x=torch.ones(2, 3, 8, dtype=torch.int32)), TypeError, "x"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(weight=torch.randn(8, device="meta")), ValueError, "weight"),          # mismatched devices
])
def test_residual_layer_norm_bad_input(over, exc, word):
    kw = dict(x=torch.randn(2, 3, 8), weight=torch.randn(8), bias=torch.randn(8), eps=1e-6)
    kw.update(over)
    with pytest.raises(exc, match=word):
        vit_fast.residual_layer_norm(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), kw.pop("eps"), **kw)


@pytest.mark.parametrize("over,exc,word", [
    (dict(fc1_weight=torch.randn(32, 9)), ValueError, "fc1_weight"),
    (dict(fc2_weight=torch.randn(8, 31)), ValueError, "fc2_weight"),
    (dict(fc1_bias=torch.randn(31)), ValueError, "fc1_bias"),
    (dict(approximate="sigmoid"), ValueError, "approximate"),
    (dict(residual=torch.randn(2, 3, 9)), ValueError, "residual"),
    (dict(x=torch.randn(2, 3, 8).to(torch.int64)), TypeError, "x"),
])
def test_gelu_mlp_bad_input(over, exc, word):
    kw = dict(x=torch.randn(2, 3, 8), fc1_weight=torch.randn(32, 8), fc1_bias=torch.randn(32),
              fc2_weight=torch.randn(8, 32), fc2_bias=torch.randn(8))
    kw.update(over)
    args = [kw.pop(k) for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    with pytest.raises(exc, match=word):
        vit_fast.gelu_mlp(*args, **kw)


@pytest.mark.parametrize("over,exc,word", [
    (dict(images=torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)), ValueError, "mean"),
    (dict(images=torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8), mean=(0.5,) * 2,
          std=(0.5,) * 3), ValueError, "mean"),
    (dict(images=torch.randn(2, 32, 32, 3)), ValueError, "NHWC"),                 # float NHWC
    (dict(images=torch.randn(2, 4, 32, 32)), ValueError, "images"),               # wrong channels
    (dict(images=torch.randn(2, 3, 30, 32)), ValueError, "30x32"),                # not divisible
    (dict(images=torch.randn(3, 32, 32)), ValueError, "images"),
    (dict(images=torch.randint(0, 9, (2, 3, 32, 32), dtype=torch.int32)), TypeError, "images"),
    (dict(patch_size=8), ValueError, "patch_size"),
    (dict(bias=torch.randn(7)), ValueError, "bias"),
    (dict(pos_embed=torch.randn(1, 5, 16)), ValueError, "pos_embed"),
    (dict(mean=(0.5,) * 3, std=(0.5,) * 3), ValueError, "uint8"),
])
def test_patch_embed_bad_input(over, exc, word):
    kw = dict(images=torch.randn(2, 3, 32, 32), weight=torch.randn(16, 3, 16, 16),
              bias=torch.randn(16), patch_size=16)
    kw.update(over)
    with pytest.raises(exc, match=word):
        vit_fast.patch_embed(kw.pop("images"), kw.pop("weight"), kw.pop("bias"), **kw)


# --- dtypes that do not fit together, and non-finite scalars ------------------------------------

def _mlp_args(**over):
    kw = dict(x=torch.randn(2, 3, 8), fc1_weight=torch.randn(32, 8), fc1_bias=torch.randn(32),
              fc2_weight=torch.randn(8, 32), fc2_bias=torch.randn(8))
    kw.update(over)
    return [kw.pop(k) for k in ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")], kw


@pytest.mark.parametrize("call,word", [
    (lambda: vit_fast.gelu_mlp(*_mlp_args(x=torch.randn(2, 3, 8, dtype=torch.float64))[0]),
     "fc1_weight"),
    (lambda: vit_fast.gelu_mlp(*_mlp_args(fc2_bias=torch.randn(8).half())[0]), "fc2_bias"),
    (lambda: vit_fast.patch_embed(torch.randn(2, 3, 32, 32).half(), torch.randn(16, 3, 16, 16),
                                  None, patch_size=16), "images"),
    (lambda: vit_fast.patch_embed(torch.randn(2, 3, 32, 32), torch.randn(16, 3, 16, 16),
                                  torch.randn(16).half(), patch_size=16), "bias"),
    (lambda: vit_fast.fused_qkv_attention(torch.randn(2, 5, 96).to(torch.float8_e4m3fn), 4),
     "qkv"),
    (lambda: vit_fast.residual_layer_norm(torch.randn(2, 8).to(torch.float8_e5m2), None, None,
                                          1e-6), "x"),
])
@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_mixed_or_unsupported_dtypes_name_the_argument(call, word, backend):
    with vit_fast.use_backend(backend), pytest.raises(TypeError, match=word):
        call()


def test_mixed_dtypes_are_legal_under_autocast():
    args, _ = _mlp_args(x=torch.randn(2, 3, 8).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vit_fast.gelu_mlp(*args).dtype == torch.bfloat16
        out = vit_fast.patch_embed(torch.randn(2, 3, 32, 32).half(), torch.randn(16, 3, 16, 16),
                                   torch.randn(16), patch_size=16)
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_eps_and_scale_are_rejected(bad):
    with pytest.raises(ValueError, match="eps"):
        vit_fast.residual_layer_norm(torch.randn(2, 8), None, None, bad)
    with pytest.raises(ValueError, match="scale"):
        vit_fast.fused_qkv_attention(torch.randn(2, 5, 96), 4, scale=bad)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_wider_residual_promotes_like_torch(backend):
    """residual + branch in eager torch takes the wider dtype; so do s, y and the MLP's output."""
    x, res = torch.randn(2, 3, 8), torch.randn(2, 3, 8, dtype=torch.float64)
    w, b = torch.randn(8), torch.randn(8)
    with vit_fast.use_backend(backend):
        y, s = vit_fast.residual_layer_norm(x, w, b, 1e-6, residual=res)
        args, _ = _mlp_args(x=x)
        out = vit_fast.gelu_mlp(*args, residual=res)
    assert y.dtype == s.dtype == out.dtype == torch.float64
    torch.testing.assert_close(s, res + x.double())
    want = torch.nn.functional.layer_norm(res + x.double(), (8,), w.double(), b.double(), 1e-6)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    args64 = [t.double() for t in args]
    branch = torch.nn.functional.linear(torch.nn.functional.gelu(
        torch.nn.functional.linear(args64[0], args64[1], args64[2])), args64[3], args64[4])
    torch.testing.assert_close(out, res + branch, rtol=1e-5, atol=1e-5)
