"""Triton fused QKV attention (forward and backward) under the interpreter, against the float64
reference with docs/design.md's tolerance rule."""
import pytest
import torch

from tolerance import assert_close_by_rule
from vit_fast import reference
from vit_fast.kernels import attention as kernels
from vit_fast.kernels import attention_aot
from vit_fast.ops.attention import fused_qkv_attention

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# A covering set (every N, head dim and dtype appears; not the product), B=1, H=2.
# (N, head_dim, dtype, scale or None for D**-0.5)
CASES = [
    (1, 64, F32, None),
    (2, 32, F16, None),
    (17, 40, BF16, None),
    (17, 8, F32, 0.3),       # head dim far below the 16-wide padded tile
    (64, 96, F16, None),
    (64, 256, BF16, None),
    (197, 64, BF16, None),
    (197, 80, F16, 0.05),
    (257, 128, F32, None),
    (257, 40, F16, None),
    (577, 64, F16, None),
    (257, 80, BF16, None),
]


def _ours(qkv, num_heads, scale, grad):
    qkv = qkv.detach().clone().requires_grad_()
    out = fused_qkv_attention(qkv, num_heads, scale)
    out.backward(grad)
    return out.detach(), qkv.grad


def _ref(qkv, num_heads, scale, grad, dtype):
    qkv = qkv.detach().to(dtype).requires_grad_()
    out = reference.fused_qkv_attention(qkv, num_heads, scale=scale)
    out.backward(grad.to(dtype))
    return out.detach(), qkv.grad


def _check(qkv, num_heads, scale, grad=None):
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    if grad is None:
        grad = torch.randn(*qkv.shape[:2], num_heads * head_dim, dtype=qkv.dtype)
    out, dqkv = _ours(qkv, num_heads, scale, grad)
    out_same, dqkv_same = _ref(qkv, num_heads, scale, grad, qkv.dtype)
    out64, dqkv64 = _ref(qkv, num_heads, scale, grad, torch.float64)
    assert out.dtype == qkv.dtype and dqkv.dtype == qkv.dtype
    assert_close_by_rule(out, out_same, out64, "out")
    assert_close_by_rule(dqkv, dqkv_same, dqkv64, "dqkv")
    return out, dqkv


@pytest.mark.parametrize("n,head_dim,dtype,scale", CASES,
                         ids=[f"N{n}-D{d}-{str(t)[6:]}-s{s}" for n, d, t, s in CASES])
def test_matches_reference(n, head_dim, dtype, scale):
    qkv = torch.randn(1, n, 3 * 2 * head_dim, dtype=dtype)
    _check(qkv, 2, scale)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_negative_and_zero_scale(scale):
    # The forward folds the scale into the row max, which holds for scale >= 0 only; a negative
    # scale runs with q negated. The caller's qkv must come back untouched.
    qkv = torch.randn(1, 37, 3 * 2 * 16, dtype=F32)
    before = qkv.clone()
    _check(qkv, 2, scale)
    assert torch.equal(qkv, before)


def test_strided_qkv_slice_of_bigger_tensor():
    # B and N strides that are not those of a packed [B, N, 3C] tensor, and B > 1.
    B, N, H, D = 2, 33, 3, 40
    big = torch.randn(B, N + 5, 3 * H * D + 24, dtype=F16)
    qkv = big[:, 3:N + 3, 8:8 + 3 * H * D]
    assert not qkv.is_contiguous() and qkv.stride(-1) == 1
    _check(qkv, H, None)


def test_last_dim_not_unit_stride():
    B, N, H, D = 2, 20, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, 2, dtype=BF16)[..., 0]
    assert qkv.stride(-1) == 2
    _check(qkv, H, None)


@pytest.mark.parametrize("fwd_tiles,kv_tiles,q_tiles", [
    ((16, 32), (16, 32), (32, 16)),
    ((32, 16), (32, 16), (16, 32)),
    ((16, 32), (16, 32), None),   # fused: 2 key tiles of dq partials, then the reduce
    ((32, 16), (32, 64), None),   # fused: one key tile, dq written directly
], ids=["split-16x32", "split-32x16", "fused-partials", "fused-direct"])
def test_launcher_tile_shapes(fwd_tiles, kv_tiles, q_tiles):
    # BLOCK_M != BLOCK_N with several partial blocks: the loop bounds and masks of each kernel.
    B, N, H, D = 1, 50, 2, 40
    scale = D ** -0.5
    qkv = torch.randn(B, N, 3 * H * D, dtype=F16)
    grad = torch.randn(B, N, H * D, dtype=F16)
    out, lse = kernels.attention_fwd(qkv, H, scale, config=(*fwd_tiles, 4, 1))
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, H, scale,
                                 config=((*kv_tiles, 4, 1), q_tiles and (*q_tiles, 4, 1)))
    out_same, dqkv_same = _ref(qkv, H, scale, grad, F16)
    out64, dqkv64 = _ref(qkv, H, scale, grad, torch.float64)
    assert_close_by_rule(out, out_same, out64, "out")
    assert_close_by_rule(dqkv, dqkv_same, dqkv64, "dqkv")
    # lse is the natural-log logsumexp of each row of the scaled logits.
    q, k, _ = qkv.double().reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    lse64 = torch.logsumexp(q @ k.transpose(-1, -2) * scale, dim=-1)
    assert lse.dtype == F32 and lse.shape == (B, H, N)
    torch.testing.assert_close(lse.double(), lse64, atol=2e-3, rtol=0)


def test_backward_is_deterministic():
    qkv = torch.randn(2, 197, 3 * 2 * 64, dtype=BF16)
    grad = torch.randn(2, 197, 2 * 64, dtype=BF16)
    assert kernels.bwd_plan(197, 64, BF16)[0::2] == ("fused", 4)  # the partials and the reduce
    _, first = _ours(qkv, 2, 0.125, grad)
    _, second = _ours(qkv, 2, 0.125, grad)
    assert torch.equal(first, second)


@pytest.mark.parametrize("config", [((32, 32, 4, 1), (32, 32, 4, 1)), ((32, 32, 4, 1), None)],
                         ids=["split", "fused"])
def test_both_backward_paths_are_deterministic_and_agree(config):
    B, N, H, D = 1, 40, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, dtype=F16)
    grad = torch.randn(B, N, H * D, dtype=F16)
    out, lse = kernels.attention_fwd(qkv, H, 0.2)
    first = kernels.attention_bwd(grad, qkv, out, lse, H, 0.2, config=config)
    assert torch.equal(first, kernels.attention_bwd(grad, qkv, out, lse, H, 0.2, config=config))
    # dk, dv: the same kernel either way, bitwise; dq: the same sum, in another order.
    other = kernels.attention_bwd(grad, qkv, out, lse, H, 0.2, config=(config[0], None if config[1] else (32, 32, 4, 1)))
    assert torch.equal(first[..., H * D:], other[..., H * D:])
    torch.testing.assert_close(first[..., :H * D], other[..., :H * D], atol=2e-3, rtol=2e-3)


def test_bwd_plan_fused_while_the_partials_are_few(monkeypatch):
    # Under the interpreter: one key tile writes dq itself, up to 4 write partials, more
    # take the two passes. On CUDA: fused on sm_90 only, the partials capped the same way.
    assert kernels.bwd_plan(17, 40, F16)[0::2] == ("fused", 1)
    assert kernels.bwd_plan(257, 64, F16)[0] == "split"
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    assert kernels.bwd_plan(197, 64, BF16, arch=90) == ("fused", (64, 128, 8, 2), 2)
    assert kernels.bwd_plan(512, 64, BF16, arch=90)[2] == 4
    assert kernels.bwd_plan(513, 64, BF16, arch=90)[0] == "split"
    assert kernels.bwd_plan(197, 64, BF16, arch=80)[0] == "split"
    assert kernels.bwd_plan(197, 256, BF16, arch=90)[0] == "split"


def test_reduce_reads_only_the_partials_written(monkeypatch):
    # Partials start as NaN: a reduce reading an entry no key tile wrote would make dq NaN.
    monkeypatch.setattr(kernels, "_dq_partials",
                        lambda kb, B, N, C, device: torch.full((kb, B, N, C), float("nan")))
    qkv = torch.randn(1, 50, 3 * 2 * 16, dtype=F32)
    grad = torch.randn(1, 50, 2 * 16, dtype=F32)
    _check(qkv, 2, None, grad)  # the default plan: 50 rows, 2 key tiles of 32 under the interpreter
    out, lse = kernels.attention_fwd(qkv, 2, 0.25)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, 2, 0.25, config=((16, 16, 4, 1), None))
    assert torch.isfinite(dqkv).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_in_one_query_row_stays_in_that_row():
    B, N, H, D = 1, 37, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, dtype=F16)
    row, head = 5, 1
    qkv[0, row, head * D + 3] = float("nan")  # q of one token in one head
    out, dqkv = _check(qkv, H, None)  # NaN positions must match the float64 reference
    nan_rows = torch.isnan(out).any(-1)[0]
    assert nan_rows.tolist() == [i == row for i in range(N)]
    assert torch.isnan(out[0, row, head * D:(head + 1) * D]).all()
    assert not torch.isnan(out[0, row, :head * D]).any()  # the other head of that token is clean
    # dq: only that row of that head; dk, dv of that head: every key saw the NaN probability row.
    dq = dqkv[0, :, :H * D]
    assert torch.isnan(dq).nonzero()[:, 0].unique().tolist() == [row]
    assert not torch.isnan(dqkv[0, :, H * D:].reshape(N, 2, H, D)[:, :, 1 - head]).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_in_one_key_row_spreads_over_that_head_only():
    # As in the reference: every query attends to the NaN key, so the whole head is NaN.
    B, N, H, D = 1, 37, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, dtype=BF16)
    qkv[0, 20, H * D + D + 7] = float("nan")  # k of token 20 in head 1
    out, _ = _check(qkv, H, None)
    assert torch.isnan(out[0, :, D:]).all() and not torch.isnan(out[0, :, :D]).any()


# The dk/dv kernel's padded key rows (never stored) do overflow here; numpy says so.
@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_very_negative_logits():
    # Every logit about -300: exp(-lse) overflows fp32, so padded key slots must stay masked in
    # the backward too (a zero key times an infinite probability is NaN).
    B, N, H, D = 1, 17, 2, 16
    c = torch.randn(H, D)
    c = 4.0 * c / c.norm(dim=-1, keepdim=True)  # q ≈ c and k ≈ -c for every token: q·k ≈ -16
    noise = 0.05 * torch.randn(2, B, N, H, D)
    qkv = torch.stack([c + noise[0], -c + noise[1], torch.randn(B, N, H, D)], 2)
    qkv = qkv.reshape(B, N, 3 * H * D)
    _check(qkv, H, 20.0)


def test_opcheck():
    qkv = torch.randn(1, 17, 3 * 2 * 16, dtype=F32, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_fast.fused_qkv_attention.default, (qkv, 2, 0.25))
    out, lse = torch.ops.vit_fast.fused_qkv_attention(qkv.detach(), 2, 0.25)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.vit_fast.fused_qkv_attention_backward.default,
                          (dout, qkv.detach(), out, lse, 2, 0.25))


def test_saves_only_qkv_out_lse():
    B, N, H, D = 2, 19, 2, 16
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused_qkv_attention(qkv, H, 0.25)
    storages = {t.untyped_storage().data_ptr(): t for t in saved}
    assert len(storages) == 3, [tuple(t.shape) for t in saved]
    assert qkv.untyped_storage().data_ptr() in storages
    assert out.untyped_storage().data_ptr() in storages
    (lse,) = [t for p, t in storages.items() if p not in (qkv.data_ptr(), out.data_ptr())]
    assert lse.shape == (B, H, N) and lse.dtype == F32
    out.sum().backward()  # what was saved suffices
    assert qkv.grad.shape == qkv.shape


def test_cuda_config_table_is_what_aot_compiles(monkeypatch):
    # On CUDA every (N, head_dim) must find a table entry, and that entry must be one of the
    # builds the AOT test checks (same kernel, tiles, warps, stages and head-dim bucket).
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    fn_names = {"fwd": "attention_fwd_kernel", "dkdv": "attention_bwd_dkdv_kernel",
                "dq": "attention_bwd_dq_kernel", "dkdv_dq": "attention_bwd_dkdv_kernel"}
    specs = attention_aot.aot_specs()
    compiled = {(s.kernel.fn.__name__, s.constants["BLOCK_M"], s.constants["BLOCK_N"], s.num_warps,
                 s.num_stages, max(64, s.constants["BLOCK_D"]), s.constants.get("HAS_DROPOUT", False),
                 s.signature["DQ"] if s.constants.get("WRITE_DQ") else "-", arch)
                for s in specs if "BLOCK_N" in s.constants for arch in (80, 90) if s.for_arch(arch)}
    reduces = {(s.constants["HEAD_DIM"], s.constants["KEY_BLOCK"], s.constants["HAS_SEGMENTS"])
               for s in specs if s.kernel.fn.__name__ == "attention_bwd_dq_reduce_kernel"}
    for head_dim in range(1, 257):
        bucket = max(64, kernels._block_d(head_dim))
        for n in (1, 64, 65, 128, 129, 197, 512, 577):
            for dropout in (False, True):
                for arch in (80, 90):
                    plan = kernels.bwd_plan(n, head_dim, F16, dropout, arch=arch)
                    if plan[0] == "split":
                        launches = [("fwd", kernels._config("fwd", n, head_dim, F16, dropout), "-"),
                                    ("dkdv", plan[1], "-"), ("dq", plan[2], "-")]
                    else:
                        launches = [("dkdv_dq", plan[1], "*fp16" if plan[2] == 1 else "*fp32")]
                        if plan[2] > 1 and head_dim in (32, 48, 64, 80, 96, 112, 128):
                            assert (head_dim, plan[1][1], False) in reduces, (n, head_dim)
                    for kernel, cfg, dq in launches:
                        key = (fn_names[kernel], *cfg, bucket, dropout, dq, arch)
                        assert key in compiled, (kernel, n, head_dim, cfg, dropout, arch)


# --- attention dropout ------------------------------------------------------------------------

def _seed(value):
    return torch.tensor([value], dtype=torch.int64)


def _probe_mask(B, H, N, dropout_p, seed, config=None):
    """The kernel's keep mask [B, H, N, N] for this seed, read off the forward itself: with q = k = 0
    every probability is 1/N, and with v_j = e_j (head dim N) row i of the output is the dropped
    probability row, 1/(N·(1 - p)) where kept and 0 where dropped. The mask depends only on
    (seed, b, h, i, j), not on qkv or the head dim, so it is the mask of any same-shaped call."""
    probe = torch.zeros(B, N, 3, H, N, dtype=F32)
    probe[:, :, 2] = torch.eye(N)[None, :, None, :]
    out, _ = kernels.attention_fwd(probe.reshape(B, N, 3 * H * N), H, 1.0, dropout_p=dropout_p,
                                   seed=seed, config=config)
    z = out.reshape(B, N, H, N).permute(0, 2, 1, 3)
    kept = z != 0
    torch.testing.assert_close(z[kept], torch.full_like(z[kept], 1 / (N * (1 - dropout_p))))
    return kept


def _masked_reference(qkv, num_heads, scale, grad, dtype, keep, dropout_p):
    """The reference (out, dqkv) in dtype, dropping with the kernel's mask: its F.dropout is
    swapped for that mask, so the math checked is still the reference's own."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reference.F, "dropout", lambda attn, p: attn * keep.to(attn.dtype) / (1 - p))
        qkv = qkv.detach().to(dtype).requires_grad_()
        out = reference.fused_qkv_attention(qkv, num_heads, scale=scale, dropout_p=dropout_p)
        out.backward(grad.to(dtype))
    return out.detach(), qkv.grad


# (B, N, H, head_dim, dtype, dropout_p, fwd config, (dkdv config, dq config)); None = launcher's.
DROPOUT_CASES = [
    (2, 50, 2, 40, F16, 0.5, None, None),
    (1, 17, 2, 64, BF16, 0.25, None, None),
    (1, 37, 2, 16, F32, 0.9, (16, 32, 4, 1), ((16, 32, 4, 1), (32, 16, 4, 1))),
    (1, 37, 2, 24, BF16, 0.3, (16, 32, 4, 1), ((32, 16, 4, 1), None)),  # fused, 3 key tiles
]


@pytest.mark.parametrize("B,N,H,D,dtype,dropout_p,fwd_cfg,bwd_cfg", DROPOUT_CASES,
                         ids=[f"B{c[0]}-N{c[1]}-D{c[3]}-{str(c[4])[6:]}-p{c[5]}" for c in DROPOUT_CASES])
def test_dropout_matches_reference_with_the_kernels_mask(B, N, H, D, dtype, dropout_p,
                                                         fwd_cfg, bwd_cfg):
    scale = D ** -0.5
    seed = _seed(0x5EED_1234_ABCD_0042)
    keep = _probe_mask(B, H, N, dropout_p, seed)
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    grad = torch.randn(B, N, H * D, dtype=dtype)
    out, lse = kernels.attention_fwd(qkv, H, scale, dropout_p=dropout_p, seed=seed, config=fwd_cfg)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, H, scale, dropout_p=dropout_p, seed=seed,
                                 config=bwd_cfg)
    out_same, dqkv_same = _masked_reference(qkv, H, scale, grad, dtype, keep, dropout_p)
    out64, dqkv64 = _masked_reference(qkv, H, scale, grad, torch.float64, keep, dropout_p)
    assert_close_by_rule(out, out_same, out64, "out")
    assert_close_by_rule(dqkv, dqkv_same, dqkv64, "dqkv")
    # The saved lse is that of the undropped softmax.
    assert torch.equal(lse, kernels.attention_fwd(qkv, H, scale, config=fwd_cfg)[1])


def test_dropout_mask_statistics_and_independence():
    B, H, N, p = 2, 2, 50, 0.3
    keep = _probe_mask(B, H, N, p, _seed(7))
    # 10,000 Bernoulli(0.3) draws: 6 standard deviations is 0.028.
    assert abs((~keep).float().mean().item() - p) < 0.028
    # Each (b, h) has its own stream, and the mask does not depend on the tiling.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, _probe_mask(B, H, N, p, _seed(7), config=(16, 32, 4, 1)))
    # Both 32-bit halves of the seed are used; a row and its column are not swapped.
    assert not torch.equal(keep, _probe_mask(B, H, N, p, _seed(7 + 2 ** 40)))
    assert not torch.equal(keep, keep.transpose(-1, -2))


def _backward_masks(B, H, N, dropout_p, seed, config):
    """The keep masks [B, H, N, N] the two backward kernels use, read off their outputs. q = 0
    makes every probability 1/N. dk/dv kernel: with k = v = 0 and dO_i = e_i (head dim >= N),
    dv_j[i] = M_ij / (N·(1 - p)). dq kernel: with k_j = e_j, v_j = dO_i = e_0, dP_ij = M_ij/(1 - p)
    and dq_i[j] = (dP_ij - Δ_i) / N (scale 1), Δ_i = out_i[0]."""
    D = 64
    assert N <= D
    eye = torch.eye(N, D)
    qkv = torch.zeros(B, N, 3, H, D)
    dout = eye[None, :, None, :].expand(B, N, H, D).reshape(B, N, H * D).contiguous()
    out, lse = kernels.attention_fwd(qkv.reshape(B, N, -1), H, 1.0, dropout_p=dropout_p, seed=seed)
    dqkv = kernels.attention_bwd(dout, qkv.reshape(B, N, -1), out, lse, H, 1.0,
                                 dropout_p=dropout_p, seed=seed, config=config)
    dv = dqkv.reshape(B, N, 3, H, D)[:, :, 2, :, :N]                 # [b, j, h, i]
    kv_mask = torch.round(dv * N * (1 - dropout_p)).permute(0, 2, 3, 1)

    qkv[:, :, 1] = eye[None, :, None, :]
    qkv[:, :, 2, :, 0] = 1.0
    dout = torch.zeros(B, N, H, D)
    dout[..., 0] = 1.0
    dout = dout.reshape(B, N, H * D)
    out, lse = kernels.attention_fwd(qkv.reshape(B, N, -1), H, 1.0, dropout_p=dropout_p, seed=seed)
    dqkv = kernels.attention_bwd(dout, qkv.reshape(B, N, -1), out, lse, H, 1.0,
                                 dropout_p=dropout_p, seed=seed, config=config)
    dq = dqkv.reshape(B, N, 3, H, D)[:, :, 0, :, :N].permute(0, 2, 1, 3)      # [b, h, i, j]
    delta = out.reshape(B, N, H, D)[..., 0].permute(0, 2, 1)[..., None]
    q_mask = torch.round((dq * N + delta) * (1 - dropout_p))
    for m in (kv_mask, q_mask):
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    return kv_mask.bool(), q_mask.bool()


@pytest.mark.parametrize("bwd_cfg", [None, ((16, 32, 4, 1), (32, 16, 4, 1)), ((64, 16, 4, 1), (16, 64, 4, 1)),
                                     ((32, 16, 4, 1), None)],
                         ids=["default", "16x32-32x16", "64x16-16x64", "fused-partials"])
def test_dropout_backward_regenerates_exactly_the_forwards_mask(bwd_cfg):
    B, H, N, p = 1, 2, 40, 0.5
    seed = _seed(0x1234_5678_9ABC)
    keep = _probe_mask(B, H, N, p, seed, config=(32, 16, 4, 1))
    kv_mask, q_mask = _backward_masks(B, H, N, p, seed, bwd_cfg)
    assert torch.equal(kv_mask, keep), "dk/dv kernel's mask differs from the forward's"
    assert torch.equal(q_mask, keep), "dq kernel's mask differs from the forward's"


def test_dropout_keep_fraction_per_philox_word_and_half():
    # Each Philox call serves a 2 x 4 group of entries (rows r, r + 8; columns 2t, 2t + 1,
    # 2t + 8, 2t + 9 of a 16 x 16 block): every one of the 16 x 16 positions, and the whole mask,
    # must keep 1 - p of its entries. 4 x 128 x 128 draws; 6 sigma on the positions (256 draws
    # each, sigma 0.03) and overall (65536 draws, sigma 0.0018).
    B, H, N, p = 2, 2, 128, 0.3
    keep = _probe_mask(B, H, N, p, _seed(99)).float()
    assert abs(keep.mean().item() - (1 - p)) < 6 * (p * (1 - p) / keep.numel()) ** 0.5
    per_position = keep.reshape(B, H, N // 16, 16, N // 16, 16).mean((0, 1, 2, 4))
    assert (per_position - (1 - p)).abs().max().item() < 6 * (p * (1 - p) / 256) ** 0.5
    # Neighbours that share a call are not copies of each other.
    assert not torch.equal(keep[..., 0::2], keep[..., 1::2])
    assert not torch.equal(keep[..., 0:8, :], keep[..., 8:16, :])


def test_dropout_seeds_and_torch_manual_seed():
    import vit_fast
    qkv = torch.randn(1, 33, 3 * 2 * 32, dtype=F16)
    first, _ = kernels.attention_fwd(qkv, 2, 0.2, dropout_p=0.4, seed=_seed(1))
    again, _ = kernels.attention_fwd(qkv, 2, 0.2, dropout_p=0.4, seed=_seed(1))
    other, _ = kernels.attention_fwd(qkv, 2, 0.2, dropout_p=0.4, seed=_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    # The public op draws its seed from torch's generator: manual_seed reproduces a run.
    with vit_fast.use_backend("triton"):
        torch.manual_seed(3)
        a = vit_fast.fused_qkv_attention(qkv, 2, dropout_p=0.4)
        b = vit_fast.fused_qkv_attention(qkv, 2, dropout_p=0.4)
        torch.manual_seed(3)
        c = vit_fast.fused_qkv_attention(qkv, 2, dropout_p=0.4)
        undropped = vit_fast.fused_qkv_attention(qkv, 2)
    assert torch.equal(a, c) and not torch.equal(a, b)
    assert torch.equal(undropped, kernels.attention_fwd(qkv, 2, 32 ** -0.5)[0])


def test_dropout_zero_is_the_undropped_kernel():
    qkv = torch.randn(1, 20, 3 * 2 * 16, dtype=BF16)
    grad = torch.randn(1, 20, 2 * 16, dtype=BF16)
    out, lse = kernels.attention_fwd(qkv, 2, 0.25)
    out0, lse0 = kernels.attention_fwd(qkv, 2, 0.25, dropout_p=0.0, seed=_seed(9))
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert torch.equal(kernels.attention_bwd(grad, qkv, out, lse, 2, 0.25),
                       kernels.attention_bwd(grad, qkv, out, lse, 2, 0.25, dropout_p=0.0, seed=_seed(9)))
    with pytest.raises(ValueError, match="seed"):
        kernels.attention_fwd(qkv, 2, 0.25, dropout_p=0.1)


def test_dropout_backward_is_deterministic():
    qkv = torch.randn(2, 70, 3 * 2 * 32, dtype=BF16, requires_grad=True)
    seed = _seed(11)
    out, _ = torch.ops.vit_fast.fused_qkv_attention(qkv, 2, 0.2, 0.5, seed)
    grad = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, qkv, grad, retain_graph=True)
    (second,) = torch.autograd.grad(out, qkv, grad)
    assert torch.equal(first, second)


def test_opcheck_with_dropout():
    qkv = torch.randn(1, 17, 3 * 2 * 16, dtype=F32, requires_grad=True)
    args = (qkv, 2, 0.25, 0.5, _seed(5))
    torch.library.opcheck(torch.ops.vit_fast.fused_qkv_attention.default, args)
    out, lse = torch.ops.vit_fast.fused_qkv_attention(qkv.detach(), *args[1:])
    torch.library.opcheck(torch.ops.vit_fast.fused_qkv_attention_backward.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, 2, 0.25, 0.5, _seed(5)))


def test_dropout_saves_only_qkv_out_lse_and_the_seed():
    B, N, H, D = 1, 19, 2, 16
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fused_qkv_attention(qkv, H, 0.25, dropout_p=0.2)
    sizes = sorted(t.numel() for t in {t.untyped_storage().data_ptr(): t for t in saved}.values())
    assert sizes == [1, B * H * N, B * N * H * D, B * N * 3 * H * D], sizes
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape
