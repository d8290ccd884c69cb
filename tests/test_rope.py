"""Rotary position embeddings (kernels/rope.py: rope_fwd / rope_bwd) under the interpreter against
the float64 reference with docs/design.md's tolerance rule: both of timm's layouts, prefix
tokens, every sin/cos shape timm's rope modules give, the sin/cos gradients (from the forward's
input and from its output), determinism; the reference against timm's EvaAttention and mixed
RoPE (learnable frequencies); NaFlexViT's per-sample rope with segment attention."""
import pytest
import torch

from tolerance import assert_close_by_rule
from vit_fast import reference
from vit_fast.kernels import attention
from vit_fast.kernels import rope as kernels

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _angles(shape, D, half):
    """sin, cos of shape [..., D] laid out as timm's rope modules lay them out: one angle per
    pair of columns (interleaved: repeated; half-split: concatenated)."""
    f = torch.randn(*shape, D // 2) * 3
    angle = torch.cat([f, f], -1) if half else f.repeat_interleave(2, -1)
    return angle.sin(), angle.cos()


def _ref(qkv, H, sin, cos, grad, dtype, **kw):
    """(out, dqkv, dsin, dcos) of the reference in dtype (sin/cos in it too)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (qkv, sin, cos)]
    out = reference.rotary_qk(leaves[0], H, leaves[1], leaves[2],
                              upcast=dtype == torch.float64, **kw)
    out.backward(grad.to(dtype))
    return (out.detach(), *(t.grad for t in leaves))


def _ours(qkv, H, sin, cos, grad, source="qkv", **kw):
    out = kernels.rope_fwd(qkv, H, sin, cos, **kw)
    fwd = {"qkv": qkv} if source == "qkv" else {"out": out}
    return (out, *kernels.rope_bwd(grad, H, sin, cos, sin_cos_grad=True, **fwd, **kw))


def _check(qkv, H, sin, cos, source="qkv", **kw):
    grad = torch.randn(qkv.shape, dtype=qkv.dtype)
    ours = _ours(qkv, H, sin, cos, grad, source, **kw)
    same = _ref(qkv, H, sin, cos, grad, qkv.dtype, **kw)
    ref64 = _ref(qkv, H, sin, cos, grad, torch.float64, **kw)
    for name, o, s, r in zip(("out", "dqkv", "dsin", "dcos"), ours, same, ref64):
        assert_close_by_rule(o, s.to(o.dtype), r, name)
    assert ours[0].dtype == ours[1].dtype == qkv.dtype
    assert ours[2].shape == sin.shape and ours[2].dtype == sin.dtype
    return ours


# (B, N, H, D, dtype, half, prefix tokens, sin/cos leading dims, sin/cos dtype). Leading dims:
# "" [N', D] (axial, DINOv3), "H" [H, N', D] (mixed), "1H" [1, H, N', D], "B1" [B, 1, N', D]
# (NaFlexViT), "BH" [B, H, N', D], "1" [1, N', D].
CASES = [
    (2, 17, 2, 40, F32, False, 1, "", F32),
    (2, 17, 2, 40, BF16, True, 4, "", F32),     # DINOv3: half-split, 1 class + 4 registers
    (3, 13, 2, 24, F16, False, 0, "H", F32),    # mixed RoPE, 3 rows: two batch groups
    (2, 9, 3, 16, BF16, True, 1, "1H", BF16),
    (2, 11, 2, 32, F32, True, 1, "B1", F32),
    (2, 10, 2, 64, F16, False, 2, "BH", F16),
    (3, 7, 2, 8, F32, False, 1, "1", F32),
]


def _lead(code, B, H):
    return {"": (), "H": (H,), "1H": (1, H), "B1": (B, 1), "BH": (B, H), "1": (1,)}[code]


@pytest.mark.parametrize("B,N,H,D,dtype,half,npt,lead,sc_dtype", CASES,
                         ids=[f"N{c[1]}-D{c[3]}-{str(c[4])[6:]}-{'half' if c[5] else 'inter'}-p{c[6]}"
                              f"-[{c[7]}]" for c in CASES])
def test_matches_float64_reference(B, N, H, D, dtype, half, npt, lead, sc_dtype):
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    sin, cos = (t.to(sc_dtype) for t in _angles((*_lead(lead, B, H), N - npt), D, half))
    out, dqkv, _, _ = _check(qkv, H, sin, cos, num_prefix_tokens=npt, half=half)
    # Prefix tokens and v pass through bit for bit.
    assert torch.equal(out[:, :npt], qkv[:, :npt])
    assert torch.equal(out[..., 2 * H * D:], qkv[..., 2 * H * D:])


@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
def test_sin_cos_gradients_from_the_output(half):
    """The backward recovers x from the forward's output (nothing but sin/cos saved)."""
    B, N, H, D, npt = 3, 12, 2, 24, 1
    qkv = torch.randn(B, N, 3 * H * D)
    sin, cos = _angles((H, N - npt), D, half)
    _check(qkv, H, sin, cos, source="out", num_prefix_tokens=npt, half=half)


def test_views_of_timms_cat_tensor_and_strided_qkv():
    """sin, cos as the two halves of timm's [N', 2·D] rope tensor (views), qkv a column slice."""
    B, N, H, D = 2, 9, 2, 16
    sin, cos = _angles((N - 1,), D, True)
    rope = torch.cat([sin, cos], -1)
    big = torch.randn(B, N, 3 * H * D + 8)
    qkv = big[..., 8:]
    out = kernels.rope_fwd(qkv, H, *rope.chunk(2, -1), num_prefix_tokens=1, half=True)
    ref = reference.rotary_qk(qkv, H, sin, cos, num_prefix_tokens=1, half=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_backward_without_sin_cos_gradients_reads_only_dout():
    B, N, H, D = 2, 9, 2, 16
    sin, cos = _angles((N,), D, False)
    grad = torch.randn(B, N, 3 * H * D)
    dqkv, dsin, dcos = kernels.rope_bwd(grad, H, sin, cos)
    assert dsin is None and dcos is None
    qkv = torch.randn(B, N, 3 * H * D, dtype=torch.float64, requires_grad=True)
    reference.rotary_qk(qkv, H, sin.double(), cos.double(), upcast=True).backward(grad.double())
    torch.testing.assert_close(dqkv.double(), qkv.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lead", ["", "B1"])
def test_backward_is_deterministic(lead):
    B, N, H, D = 5, 11, 2, 16  # 5 rows: batch groups of 3 and 2 under the interpreter
    qkv = torch.randn(B, N, 3 * H * D)
    sin, cos = _angles((*_lead(lead, B, H), N), D, False)
    grad = torch.randn(B, N, 3 * H * D)
    runs = [_ours(qkv, H, sin, cos, grad) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_batch():
    sin, cos = _angles((4,), 8, False)
    qkv = torch.randn(0, 5, 3 * 2 * 8)
    out = kernels.rope_fwd(qkv, 2, sin, cos, num_prefix_tokens=1)
    dqkv, dsin, dcos = kernels.rope_bwd(qkv, 2, sin, cos, num_prefix_tokens=1, sin_cos_grad=True,
                                        qkv=qkv)
    assert out.shape == dqkv.shape == qkv.shape
    assert dsin.shape == sin.shape and not dsin.any() and not dcos.any()


@pytest.mark.parametrize("bad,err,word", [
    (dict(sin=torch.randn(5, 8)), ValueError, "sin"),                  # N' = 4 wanted
    (dict(sin=torch.randn(3, 4, 8), cos=torch.randn(3, 4, 8)), ValueError, "sin"),  # H = 2
    (dict(cos=torch.randn(4, 6)), ValueError, "sin and cos"),
    (dict(sin=torch.randn(4, 8).to(torch.int32)), TypeError, "sin"),
    (dict(num_prefix_tokens=6), ValueError, "num_prefix_tokens"),
], ids=["length", "heads", "mismatch", "int", "prefix"])
def test_bad_arguments_raise_naming_them(bad, err, word):
    args = dict(sin=torch.randn(4, 8), cos=torch.randn(4, 8), num_prefix_tokens=1)
    args.update(bad)
    with pytest.raises(err, match=word):
        kernels.rope_fwd(torch.randn(2, 5, 3 * 2 * 8), 2, **args)


def test_odd_head_dim_and_missing_forward_tensor_raise():
    with pytest.raises(ValueError, match="odd"):
        kernels.rope_fwd(torch.randn(1, 4, 3 * 2 * 7), 2, torch.randn(4, 7), torch.randn(4, 7))
    sin, cos = _angles((4,), 8, False)
    with pytest.raises(ValueError, match="qkv"):
        kernels.rope_bwd(torch.randn(1, 4, 48), 2, sin, cos, sin_cos_grad=True)


# --- the reference is timm's -------------------------------------------------------------------

@pytest.mark.parametrize("half,npt", [(False, 1), (True, 5)], ids=["eva02-interleaved", "dinov3-half"])
def test_reference_is_timms_eva_attention(half, npt):
    from timm.layers import RotaryEmbeddingCat
    from timm.models.eva import EvaAttention
    H, D, grid = 2, 16, (3, 4)
    attn = EvaAttention(H * D, num_heads=H, qkv_bias=True, num_prefix_tokens=npt,
                        scale_norm=False).eval()
    attn.rotate_half = half
    rope = RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(grid), rotate_half=half).get_embed()
    x = torch.randn(2, npt + grid[0] * grid[1], H * D)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight,
                                     torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    turned = reference.rotary_qk(qkv, H, *rope.chunk(2, -1), num_prefix_tokens=npt, half=half)
    ours = attn.proj(reference.fused_qkv_attention(turned, H, scale=attn.scale))
    torch.testing.assert_close(ours, attn(x, rope=rope), atol=1e-5, rtol=1e-5)


def test_mixed_rope_frequency_gradients_match_timm():
    """timm's mixed RoPE (learnable frequencies, [H, N', 2·D] per block): the kernels' dsin/dcos
    carry the gradient to the frequencies as timm's own autograd does."""
    from timm.layers import RotaryEmbeddingMixed
    H, D, grid, npt = 2, 16, (3, 3), 1
    mixed = RotaryEmbeddingMixed(H * D, depth=1, num_heads=H, feat_shape=list(grid))
    qkv = torch.randn(2, npt + 9, 3 * H * D)
    grad = torch.randn(qkv.shape)
    # timm: the frequencies' gradient through its own rotation (apply_rot_embed_cat)
    from timm.layers import apply_rot_embed_cat
    rope = mixed.get_embed()[0]
    q, k, v = qkv.reshape(2, -1, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope)], 2) for t in (q, k))
    out = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(qkv.shape)
    (want,) = torch.autograd.grad((out * grad).sum(), mixed.freqs)
    # the kernels: dsin/dcos handed to the rope tensor's own graph
    rope = mixed.get_embed()[0]
    sin, cos = rope.detach().chunk(2, -1)
    ours_out = kernels.rope_fwd(qkv, H, sin, cos, num_prefix_tokens=npt)
    _, dsin, dcos = kernels.rope_bwd(grad, H, sin, cos, num_prefix_tokens=npt, sin_cos_grad=True,
                                     out=ours_out)
    (got,) = torch.autograd.grad(rope, mixed.freqs, torch.cat([dsin, dcos], -1))
    torch.testing.assert_close(ours_out, out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_naflex_per_sample_rope_with_segment_attention():
    """NaFlexViT-RoPE: per-sample sin/cos [B, 1, N', D] (zeros on padding, as timm pads them),
    the pre-pass, then segment attention: matches the reference, forward and backward."""
    B, N, H, D, npt = 2, 13, 2, 16, 1
    lengths = [13, 8]  # tokens per row, prefix included; the rest is padding
    ids = torch.tensor([[0 if t < n else -1 for t in range(N)] for n in lengths], dtype=torch.int32)
    sin, cos = _angles((B, 1, N - npt), D, True)
    for b, n in enumerate(lengths):
        sin[b, :, n - npt:] = 0
        cos[b, :, n - npt:] = 0
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    grad = torch.randn(B, N, H * D)
    turned = kernels.rope_fwd(qkv.detach(), H, sin, cos, num_prefix_tokens=npt, half=True)
    out, lse = attention.attention_fwd(turned, H, D ** -0.5, segment_ids=ids)
    d_turned = attention.attention_bwd(grad, turned, out, lse, H, D ** -0.5, segment_ids=ids)
    dqkv, _, _ = kernels.rope_bwd(d_turned, H, sin, cos, num_prefix_tokens=npt, half=True)
    ref = reference.fused_qkv_attention(
        reference.rotary_qk(qkv, H, sin, cos, num_prefix_tokens=npt, half=True), H, segment_ids=ids)
    ref.backward(grad)
    torch.testing.assert_close(out, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv, qkv.grad, atol=1e-5, rtol=1e-5)


def test_reference_gradient_fallback_matches_the_kernels():
    """vit_fast.reference_grad.rotary_qk_backward (the backward's fallback) answers what
    rope_bwd answers."""
    from vit_fast import reference_grad
    B, N, H, D = 2, 9, 2, 16
    qkv = torch.randn(B, N, 3 * H * D)
    sin, cos = _angles((H, N - 1), D, True)
    grad = torch.randn(qkv.shape)
    want = kernels.rope_bwd(grad, H, sin, cos, num_prefix_tokens=1, half=True, sin_cos_grad=True,
                            qkv=qkv)
    got = reference_grad.rotary_qk_backward(grad, H, sin, cos, 1, True, True, qkv)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert reference_grad.rotary_qk_backward(grad, H, sin, cos, 1, True)[1:] == (None, None)
