"""Segment-masked attention (fused_qkv_attention(..., segment_ids=...)): packed variable-length
batches, each query attending to the keys of its own segment, negative ids = padding."""
import pytest
import torch
import torch.nn.functional as F

from test_attention_triton import _probe_mask, _seed
from tolerance import assert_close_by_rule
from vit_fast import dispatch, functional, reference, use_backend
from vit_fast.kernels import attention as kernels
from vit_fast.kernels import attention_aot
from vit_fast.kernels import attention_segments

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


# --- the Triton kernels (under the interpreter) -----------------------------------------------

def _ids(*rows):
    """segment_ids from per-row lists of (id, count) runs."""
    return torch.tensor([[i for i, n in row for _ in range(n)] for row in rows])


# Layouts of N = 48 tokens against 16-row tiles (forward 16 x 32, backward both ways).
LAYOUTS = {
    "one_segment": _ids([(0, 48)]),
    "many_short": _ids([(i, 1 + i % 3) for i in range(24)]),
    "padding_at_end": _ids([(0, 20), (1, 9), (-1, 19)]),
    "crossing_tiles": _ids([(3, 20), (7, 10), (9, 18)]),
    "row_of_padding": _ids([(0, 30), (1, 18)], [(-1, 48)]),
}
# (layout, head_dim, dtype): each layout in each dtype somewhere, head dims that pad.
CASES = [("one_segment", 16, BF16), ("many_short", 40, F32), ("padding_at_end", 16, F16),
         ("crossing_tiles", 16, F32), ("crossing_tiles", 24, BF16), ("row_of_padding", 16, F16),
         ("padding_at_end", 32, BF16), ("many_short", 16, F16)]
FWD_CFG = (16, 32, 4, 1)
BWD_CFG = ((16, 32, 4, 1), (32, 16, 4, 1))


def _kernel_run(qkv, H, scale, ids, grad, **kw):
    out, lse = kernels.attention_fwd(qkv, H, scale, segment_ids=ids, config=FWD_CFG, **kw)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, H, scale, segment_ids=ids, config=BWD_CFG, **kw)
    return out, lse, dqkv


def _with_grad(fn, qkv, grad, dtype):
    qkv = qkv.detach().to(dtype).requires_grad_()
    out = fn(qkv)
    out.backward(grad.to(dtype))
    return out.detach(), qkv.grad


@pytest.mark.parametrize("layout,head_dim,dtype", CASES,
                         ids=[f"{n}-D{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_kernels_match_per_image_attention(layout, head_dim, dtype):
    ids = LAYOUTS[layout]
    B, N, H = ids.shape[0], ids.shape[1], 2
    scale = head_dim ** -0.5
    qkv = torch.randn(B, N, 3 * H * head_dim, dtype=dtype)
    grad = torch.randn(B, N, H * head_dim, dtype=dtype)
    out, lse, dqkv = _kernel_run(qkv, H, scale, ids, grad)
    same = _with_grad(lambda t: reference.fused_qkv_attention(t, H, scale=scale, segment_ids=ids),
                      qkv, grad, dtype)
    per_image64 = _with_grad(lambda t: _per_image(t, H, ids, scale), qkv, grad, torch.float64)
    ref64 = _with_grad(lambda t: reference.fused_qkv_attention(t, H, scale=scale, segment_ids=ids),
                       qkv, grad, torch.float64)
    torch.testing.assert_close(ref64, per_image64)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_close_by_rule(out, same[0], per_image64[0], "out")
    assert_close_by_rule(dqkv, same[1], per_image64[1], "dqkv")
    pad = ids < 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    assert torch.equal(dqkv[pad], torch.zeros_like(dqkv[pad]))
    # Padding rows keep a lse that makes the backward's probabilities 0; real rows are finite.
    assert torch.isfinite(lse.transpose(1, 2)[~pad]).all()
    assert (lse.transpose(1, 2)[pad] == float("inf")).all()


def test_int32_int64_strided_and_unsorted_ids():
    # Ids in any order are exact (only the skip assumes runs); any int dtype and stride.
    B, N, H, D = 1, 40, 2, 16
    ids = torch.tensor([[2, 5, 2, -1, 5, 5, 0] * 5 + [2, 0, 0, -3, 5]])
    qkv = torch.randn(B, N, 3 * H * D)
    grad = torch.randn(B, N, H * D)
    out, _, dqkv = _kernel_run(qkv, H, 0.3, ids, grad)
    ref = _with_grad(lambda t: _per_image(t, H, ids, 0.3), qkv, grad, torch.float64)
    torch.testing.assert_close(out.double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref[1], atol=1e-5, rtol=1e-5)
    wide = torch.stack([ids, ids], -1)[..., 0]  # a strided int64 view
    assert wide.stride(1) == 2
    for same in (ids.to(torch.int32), wide):  # the forward suffices: one segment_args for all
        again, _ = kernels.attention_fwd(qkv, H, 0.3, segment_ids=same, config=FWD_CFG)
        assert torch.equal(again, out)


def test_int64_ids_beyond_int32_stay_distinct():
    # 2^40 and 2^40 + 2^32 agree in their low 32 bits: a plain cast to int32 would merge them.
    big = 2 ** 40
    ids = torch.tensor([[big] * 7 + [big + 2 ** 32] * 9 + [-2 ** 40] * 2 + [3] * 6])
    labels = attention_segments._int32_ids(ids)
    # Ranks among the row's distinct ids (the negative one included), padding -1.
    assert labels.dtype == torch.int32 and labels.tolist() == [[2] * 7 + [3] * 9 + [-1] * 2 + [1] * 6]
    qkv = torch.randn(1, 24, 3 * 2 * 8)
    out, _ = kernels.attention_fwd(qkv, 2, 0.3, segment_ids=ids, config=FWD_CFG)
    torch.testing.assert_close(out.double(), _per_image(qkv.double(), 2, ids, 0.3), atol=1e-5, rtol=1e-5)


def test_backward_is_deterministic():
    ids = LAYOUTS["crossing_tiles"]
    qkv = torch.randn(1, 48, 3 * 2 * 16, dtype=BF16)
    grad = torch.randn(1, 48, 2 * 16, dtype=BF16)
    out, lse, first = _kernel_run(qkv, 2, 0.25, ids, grad)
    second = kernels.attention_bwd(grad, qkv, out, lse, 2, 0.25, segment_ids=ids, config=BWD_CFG)
    assert torch.equal(first, second)


def test_changing_one_segment_leaves_the_others_bitwise_unchanged():
    ids = LAYOUTS["crossing_tiles"]  # segments share tiles: the mask, not the skip, isolates them
    H, D = 2, 16
    qkv = torch.randn(1, 48, 3 * H * D, dtype=F16)
    grad = torch.randn(1, 48, H * D, dtype=F16)
    out, _, dqkv = _kernel_run(qkv, H, 0.25, ids, grad)
    other = ids[0] == 7
    changed = qkv.clone()
    changed[0, other] = torch.randn_like(changed[0, other]) * 3
    grad2 = grad.clone()
    grad2[0, other] = torch.randn_like(grad2[0, other])
    out2, _, dqkv2 = _kernel_run(changed, H, 0.25, ids, grad2)
    assert torch.equal(out2[0, ~other], out[0, ~other])
    assert torch.equal(dqkv2[0, ~other], dqkv[0, ~other])
    assert not torch.equal(out2[0, other], out[0, other])


def _tile_pairs_sharing_a_segment(ids, rows, cols):
    B, N = ids.shape
    count = 0
    for b in range(B):
        for r in range(0, N, rows):
            for c in range(0, N, cols):
                a, k = ids[b, r:r + rows], ids[b, c:c + cols]
                count += bool(((a[:, None] == k[None, :]) & (a[:, None] >= 0)).any())
    return count


def _spy_spans(monkeypatch, edit=None):
    """Record every spans table the launchers make (and let ``edit`` change it)."""
    calls = []
    real = attention_segments.segment_spans

    def spy(seg, block_rows, block_cols):
        spans = real(seg, block_rows, block_cols)
        if edit is not None:
            spans = edit(spans)
        calls.append((block_rows, block_cols, spans))
        return spans
    monkeypatch.setattr(attention_segments, "segment_spans", spy)
    return calls


@pytest.mark.parametrize("layout", ["many_short", "crossing_tiles", "row_of_padding"])
def test_skipping_visits_only_tiles_that_share_a_segment(monkeypatch, layout):
    ids = LAYOUTS[layout]
    calls = _spy_spans(monkeypatch)
    qkv = torch.randn(ids.shape[0], 48, 3 * 2 * 16)
    _kernel_run(qkv, 2, 0.25, ids, torch.randn(ids.shape[0], 48, 2 * 16))
    assert [(r, c) for r, c, _ in calls] == [(16, 32), (32, 16), (32, 16)]  # fwd, dK/dV, dQ
    dense = ids.shape[0] * 3 * 2  # 48/16 x 48/32 tiles per row
    for rows, cols, spans in calls:
        visited = int(((spans[..., 1] - spans[..., 0]) // cols).sum())
        # Runs: exactly the pairs that share a segment, and fewer than all of them.
        assert visited == _tile_pairs_sharing_a_segment(ids, rows, cols) < dense, (rows, cols)


def test_kernels_loop_over_the_spans_only(monkeypatch):
    # Emptying the span of tile 1 must silence it: its queries (forward, dQ) or keys (dK/dV)
    # meet nothing. A kernel that looped over all of N would not notice.
    ids = LAYOUTS["one_segment"]
    H, D = 2, 16

    def starve_tile_1(spans):
        spans = spans.clone()
        spans[:, 1] = 0
        return spans
    qkv = torch.randn(1, 48, 3 * H * D)
    grad = torch.randn(1, 48, H * D)
    out, _, dqkv = _kernel_run(qkv, H, 0.25, ids, grad)
    _spy_spans(monkeypatch, starve_tile_1)
    out2, _, dqkv2 = _kernel_run(qkv, H, 0.25, ids, grad)
    # Tile 1: queries 16..31 in the forward (16-row tiles), keys 32..47 in dK/dV and queries
    # 32..47 in dQ (32-row tiles).
    assert torch.equal(out2[0, 16:32], torch.zeros_like(out2[0, 16:32]))
    assert torch.equal(out2[0, :16], out[0, :16]) and torch.equal(out2[0, 32:], out[0, 32:])
    dq, dkv = dqkv2[0, :, :H * D], dqkv2[0, :, H * D:]
    assert torch.equal(dkv[32:], torch.zeros_like(dkv[32:]))
    assert torch.equal(dq[32:], torch.zeros_like(dq[32:]))
    assert dq[:32].abs().sum() > 0 and dkv[:32].abs().sum() > 0


def test_dropout_composes_with_segments():
    B, N, H, D, p = 1, 40, 2, 16, 0.4
    ids = _ids([(0, 15), (1, 19), (-1, 6)])
    seed = _seed(0x5EED)
    keep = _probe_mask(B, H, N, p, seed)
    qkv = torch.randn(B, N, 3 * H * D)
    grad = torch.randn(B, N, H * D)
    out, lse, dqkv = _kernel_run(qkv, H, 0.25, ids, grad, dropout_p=p, seed=seed)

    def ref(dtype):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(reference.F, "dropout", lambda attn, p: attn * keep.to(attn.dtype) / (1 - p))
            return _with_grad(lambda t: reference.fused_qkv_attention(
                t, H, scale=0.25, dropout_p=p, segment_ids=ids), qkv, grad, dtype)
    same, ref64 = ref(F32), ref(torch.float64)
    assert_close_by_rule(out, same[0], ref64[0], "out")
    assert_close_by_rule(dqkv, same[1], ref64[1], "dqkv")
    assert torch.equal(out[0, 34:], torch.zeros_like(out[0, 34:]))
    assert torch.equal(dqkv[0, 34:], torch.zeros_like(dqkv[0, 34:]))
    # The saved lse is that of the undropped, segment-masked softmax.
    assert torch.equal(lse, kernels.attention_fwd(qkv, H, 0.25, segment_ids=ids, config=FWD_CFG)[1])


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_no_n_by_n_tensor_is_saved_for_backward():
    ids = LAYOUTS["padding_at_end"]
    N = ids.shape[1]
    qkv = torch.randn(1, N, 3 * 2 * 16, requires_grad=True)

    def run(backend):
        def call():
            with use_backend(backend):
                functional.fused_qkv_attention(qkv, 2, segment_ids=ids)
        return call
    ours = _saved_shapes(run("triton"))
    assert sorted(ours) == sorted([(1, N, 96), (1, N, 32), (1, 2, N), (1, N)])  # qkv out lse ids
    # The count can fail: the reference (what eager code does) keeps an [.., N, N] mask.
    assert any(s[-2:] == (N, N) for s in _saved_shapes(run("reference")))


def test_functional_triton_backend_takes_segments():
    ids = functional.segment_ids_from_lengths([[5, 11], [16]], total_len=20)
    qkv = torch.randn(2, 20, 3 * 2 * 8, requires_grad=True)
    assert dispatch.choose("fused_qkv_attention", [qkv], head_dim=8, dropout_p=0.0,
                           segmented=True).backend == "reference"  # auto: CPU goes to reference
    with use_backend("triton"):
        assert dispatch.choose("fused_qkv_attention", [qkv], head_dim=8, dropout_p=0.0,
                               segmented=True).backend == "triton"
        out = functional.fused_qkv_attention(qkv, 2, segment_ids=ids)
    torch.testing.assert_close(out, _per_image(qkv.detach(), 2, ids), atol=1e-5, rtol=1e-5)


def test_opcheck_with_segment_ids():
    ids = _ids([(0, 5), (1, 4), (-1, 3)], [(2, 12)]).to(torch.int32)
    qkv = torch.randn(2, 12, 3 * 2 * 8, requires_grad=True)
    fwd = torch.ops.vit_fast.fused_qkv_attention
    torch.library.opcheck(fwd.default, (qkv, 2, 0.3, 0.0, None, ids))
    out, lse = fwd(qkv.detach(), 2, 0.3, 0.0, None, ids)
    torch.library.opcheck(torch.ops.vit_fast.fused_qkv_attention_backward.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, 2, 0.3, 0.0, None, ids))
    with pytest.raises(TypeError, match="segment_ids"):
        fwd(qkv.detach(), 2, 0.3, 0.0, None, ids.float())
    with pytest.raises(ValueError, match="segment_ids"):
        fwd(qkv.detach(), 2, 0.3, 0.0, None, ids[:, :5])


def test_aot_specs_build_the_segment_variants_as_launched():
    specs = [s for s in attention_aot.aot_specs() if "QKV" in s.signature]  # the reduce: no SEG
    for s in specs:
        if s.constants.get("HAS_SEGMENTS"):
            # (the bias gradient's kernel masks every tile and takes no spans)
            assert s.signature["SEG"] == "*i32" and s.signature.get("SPANS", "*i32") == "*i32", s.name
            assert "segments" in s.name
        elif "HAS_SEGMENTS" in s.constants:
            assert s.constants["SEG"] is None and s.constants.get("SPANS") is None, s.name
    def builds(segments):
        return {(s.kernel.fn.__name__, s.signature["QKV"], s.constants["HEAD_DIM"],
                 s.constants["HAS_DROPOUT"]) for s in specs
                if "HAS_SEGMENTS" in s.constants and s.constants["HAS_SEGMENTS"] == segments}
    assert builds(True) == builds(False)  # every kernel, dtype, head dim and dropout mode


def test_segment_configs_the_launchers_pick_are_compiled_ahead(monkeypatch):
    # On CUDA, the config of every segmented launch (overrides included) is an AOT-checked build.
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    fn_names = {"fwd": "attention_fwd_kernel", "dkdv": "attention_bwd_dkdv_kernel",
                "dq": "attention_bwd_dq_kernel"}
    compiled = {(s.kernel.fn.__name__, s.constants["BLOCK_M"], s.constants["BLOCK_N"], s.num_warps,
                 s.num_stages, s.constants["HEAD_DIM"], s.constants["HAS_DROPOUT"],
                 s.constants.get("WRITE_DQ", False))
                for s in attention_aot.aot_specs() if s.constants.get("HAS_SEGMENTS") and "BLOCK_N" in s.constants}
    for head_dim in (32, 48, 64, 80, 96, 112, 128, 256):
        for n in (64, 197, 577):
            for kernel, fn in fn_names.items():
                for dropout in (False, True):
                    cfg = kernels._config(kernel, n, head_dim, F16, dropout, True)
                    assert (fn, *cfg, head_dim, dropout, False) in compiled, (kernel, n, head_dim, dropout)
            for dropout in (False, True):
                plan = kernels.bwd_plan(n, head_dim, F16, dropout, True, arch=90)
                if plan[0] == "fused":  # the dK/dV pass that writes dq
                    assert ("attention_bwd_dkdv_kernel", *plan[1], head_dim, dropout, True) in compiled
    # The overrides are used: the 128-bucket dK/dV build with segments is not the plain one.
    assert kernels._config("dkdv", 577, 80, F16, False, True) != kernels._config("dkdv", 577, 80, F16)


# The fused backward (the dK/dV pass writes dq): 2 key tiles of partials + the reduce, and one
# key tile writing dq directly.
FUSED_CFGS = {"partials": ((16, 32, 4, 1), None), "direct": ((16, 64, 4, 1), None)}


@pytest.mark.parametrize("layout,head_dim,dtype,bwd", [
    ("crossing_tiles", 16, F32, "partials"), ("row_of_padding", 16, F16, "partials"),
    ("many_short", 24, BF16, "partials"), ("row_of_padding", 16, BF16, "direct")])
def test_fused_backward_matches_per_image_attention(monkeypatch, layout, head_dim, dtype, bwd):
    # Partials start as NaN: the reduce must read exactly the query rows each key tile's span
    # covered (the dK/dV launch's spans), and a direct write must zero padding-only tiles.
    monkeypatch.setattr(kernels, "_dq_partials",
                        lambda kb, B, N, C, device: torch.full((kb, B, N, C), float("nan")))
    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **k: torch.full(a, float("nan"), **k)
                        if k.get("dtype") not in (None, torch.int32, torch.int64) else torch.zeros(*a, **k))
    ids = LAYOUTS[layout]
    B, N, H = ids.shape[0], ids.shape[1], 2
    scale = head_dim ** -0.5
    qkv = torch.randn(B, N, 3 * H * head_dim, dtype=dtype)
    grad = torch.randn(B, N, H * head_dim, dtype=dtype)
    out, lse = kernels.attention_fwd(qkv, H, scale, segment_ids=ids, config=FWD_CFG)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, H, scale, segment_ids=ids, config=FUSED_CFGS[bwd])
    monkeypatch.undo()
    same = _with_grad(lambda t: reference.fused_qkv_attention(t, H, scale=scale, segment_ids=ids),
                      qkv, grad, dtype)
    per_image64 = _with_grad(lambda t: _per_image(t, H, ids, scale), qkv, grad, torch.float64)
    assert_close_by_rule(dqkv, same[1], per_image64[1], "dqkv")
    pad = ids < 0
    assert torch.equal(dqkv[pad], torch.zeros_like(dqkv[pad]))
    again = kernels.attention_bwd(grad, qkv, out, lse, H, scale, segment_ids=ids, config=FUSED_CFGS[bwd])
    assert torch.equal(dqkv, again)


def test_fused_backward_computes_the_spans_once(monkeypatch):
    # One spans table for the dK/dV pass, which the reduce reads too (the forward makes its own).
    calls = _spy_spans(monkeypatch)
    ids = LAYOUTS["crossing_tiles"]
    qkv = torch.randn(1, 48, 3 * 2 * 16)
    out, lse = kernels.attention_fwd(qkv, 2, 0.25, segment_ids=ids, config=FWD_CFG)
    kernels.attention_bwd(torch.randn(1, 48, 32), qkv, out, lse, 2, 0.25, segment_ids=ids,
                          config=FUSED_CFGS["partials"])
    assert [(r, c) for r, c, _ in calls] == [(16, 32), (32, 16)]  # fwd, then dK/dV (+ reduce)
