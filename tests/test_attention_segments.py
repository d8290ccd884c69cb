"""Segment-masked attention (fused_qkv_attention(..., segment_ids=...)): packed variable-length
batches, each query attending to the keys of its own segment, negative ids = padding."""
import pytest
import torch
import torch.nn.functional as F

from vit_fast import functional, reference

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _per_image(qkv, num_heads, ids, scale=None):
    """Each segment of each row run through plain SDPA on its own; padding rows 0."""
    B, N, three_c = qkv.shape
    D = three_c // (3 * num_heads)
    out = qkv.new_zeros(B, N, num_heads * D)
    for b in range(B):
        for s in ids[b][ids[b] >= 0].unique().tolist():
            idx = (ids[b] == s).nonzero().flatten()
            q, k, v = qkv[b, idx].reshape(len(idx), 3, num_heads, D).permute(1, 2, 0, 3)
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            out[b, idx] = o.transpose(0, 1).reshape(len(idx), -1)
    return out


# --- the contract and the reference -----------------------------------------------------------

def test_segment_ids_from_lengths():
    ids = functional.segment_ids_from_lengths([[3, 2], [4], []], total_len=6)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1], [-1] * 6]
    assert functional.segment_ids_from_lengths([[1, 2]], dtype=torch.int64).tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="total_len"):
        functional.segment_ids_from_lengths([[3, 2]], total_len=4)
    with pytest.raises(ValueError, match="lengths"):
        functional.segment_ids_from_lengths([[3, -1]])
    with pytest.raises(TypeError, match="lengths"):
        functional.segment_ids_from_lengths([3, 2])


@pytest.mark.parametrize("bad,err", [
    (lambda ids: ids.float(), TypeError),
    (lambda ids: ids.to(torch.int16), TypeError),
    (lambda ids: ids[:, :-1], ValueError),
    (lambda ids: ids[0], ValueError),
    (lambda ids: ids.tolist(), TypeError),
    (lambda ids: ids.to("meta"), ValueError),
], ids=["float", "int16", "short", "1-D", "list", "device"])
def test_bad_segment_ids_raise_naming_them(bad, err):
    qkv = torch.randn(2, 5, 3 * 2 * 4)
    ids = torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(err, match="segment_ids"):
        functional.fused_qkv_attention(qkv, 2, segment_ids=bad(ids))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_is_per_image_attention(dropout_p):
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1], [5, 5, 5, 5, 5, 5, 5], [-1] * 7])
    qkv = torch.randn(3, 7, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    if dropout_p:
        # With dropout only the padding guarantees are deterministic.
        out = reference.fused_qkv_attention(qkv, 2, dropout_p=dropout_p, segment_ids=ids)
    else:
        out = reference.fused_qkv_attention(qkv, 2, segment_ids=ids)
        torch.testing.assert_close(out, _per_image(qkv, 2, ids))
    grad = torch.randn_like(out)
    out.backward(grad)
    pad = ids < 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    assert torch.equal(qkv.grad[pad], torch.zeros_like(qkv.grad[pad]))
    assert not torch.isnan(qkv.grad).any()
    if not dropout_p:
        per = qkv.detach().clone().requires_grad_()
        _per_image(per, 2, ids).backward(grad)
        torch.testing.assert_close(qkv.grad, per.grad)


def test_functional_reference_backend_matches_per_image():
    ids = functional.segment_ids_from_lengths([[4, 3], [2, 2, 2]], total_len=8)
    qkv = torch.randn(2, 8, 3 * 3 * 4)
    out = functional.fused_qkv_attention(qkv, 3, scale=0.7, segment_ids=ids)
    torch.testing.assert_close(out, _per_image(qkv, 3, ids, scale=0.7))
    # Without segment_ids the call means what it always did.
    torch.testing.assert_close(functional.fused_qkv_attention(qkv, 3),
                               reference.fused_qkv_attention(qkv, 3))
