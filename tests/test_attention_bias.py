"""The additive attention bias (BEiT's relative position bias) in the attention kernels
(kernels/attention.py: attention_fwd / attention_bwd with bias=..., bias_grad=True) under the
interpreter, against the float64 reference with docs/design.md's tolerance rule; the reference
against timm's BEiT attention; determinism; the bias gradient's bounded temporary; the CUDA
configs a bias call can pick being the AOT-compiled ones."""
import pytest
import torch

from tolerance import assert_close_by_rule
from vit_fast import reference
from vit_fast.dropout_mask import attention_keep_mask
from vit_fast.kernels import attention as kernels
from vit_fast.kernels import attention_aot, attention_config

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _ref(qkv, H, bias, scale, grad, dtype, **kw):
    """(out, dqkv, dbias) of the reference in dtype."""
    qkv = qkv.detach().to(dtype).requires_grad_()
    bias = bias.detach().to(dtype).requires_grad_()
    out = reference.biased_qkv_attention(qkv, H, bias, scale=scale, **kw)
    out.backward(grad.to(dtype))
    return out.detach(), qkv.grad, bias.grad


def _ours(qkv, H, bias, scale, grad, fwd_cfg=None, bwd_cfg=None, **kw):
    out, lse = kernels.attention_fwd(qkv, H, scale, bias=bias, config=fwd_cfg, **kw)
    dqkv, dbias = kernels.attention_bwd(grad, qkv, out, lse, H, scale, bias=bias, bias_grad=True,
                                        config=bwd_cfg, **kw)
    return out, dqkv, dbias


def _check(qkv, H, bias, grad=None, scale=None, keep=None, fwd_cfg=None, bwd_cfg=None, **kw):
    D = qkv.shape[-1] // (3 * H)
    scale = D ** -0.5 if scale is None else scale
    if grad is None:
        grad = torch.randn(*qkv.shape[:2], H * D, dtype=qkv.dtype)
    ours = _ours(qkv, H, bias, scale, grad, fwd_cfg, bwd_cfg, **kw)
    ref_kw = {k: v for k, v in kw.items() if k != "seed"}
    if keep is not None:
        ref_kw["dropout_keep"] = keep
    same = _ref(qkv, H, bias, scale, grad, qkv.dtype, **ref_kw)
    ref64 = _ref(qkv, H, bias, scale, grad, torch.float64, **ref_kw)
    for name, o, s, r in zip(("out", "dqkv", "dbias"), ours, same, ref64):
        assert_close_by_rule(o, s.to(o.dtype), r, name)
    assert ours[2].shape == bias.shape and ours[2].dtype == bias.dtype
    return ours


# (B, N, H, D, qkv dtype, bias layout, bias dtype). Layouts: "H" [H, N, N]; "1H" [1, H, N, N]
# (timm's BEiT); "BH" [B, H, N, N] (one per batch row).
CASES = [
    (2, 17, 2, 40, F32, "H", F32),
    (3, 33, 2, 16, BF16, "1H", F32),     # 3 rows: two batch groups under the interpreter
    (2, 17, 3, 24, F16, "BH", F16),
    (1, 20, 2, 64, BF16, "H", BF16),
    (3, 9, 1, 8, F32, "BH", F32),
]


def _bias(layout, B, H, N, dtype):
    shape = {"H": (H, N, N), "1H": (1, H, N, N), "BH": (B, H, N, N)}[layout]
    return (torch.randn(shape) * 2).to(dtype)


@pytest.mark.parametrize("B,N,H,D,dtype,layout,bias_dtype", CASES,
                         ids=[f"B{c[0]}-N{c[1]}-D{c[3]}-{str(c[4])[6:]}-{c[5]}-{str(c[6])[6:]}"
                              for c in CASES])
def test_matches_float64_reference(B, N, H, D, dtype, layout, bias_dtype):
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    _check(qkv, H, _bias(layout, B, H, N, bias_dtype))


@pytest.mark.parametrize("bwd_cfg", [((16, 16, 4, 1), (16, 16, 4, 1)), ((16, 16, 4, 1), None)],
                         ids=["two-passes", "fused-dq-partials"])
def test_both_backward_paths_agree_and_are_deterministic(bwd_cfg):
    """Several key and query tiles, 3 batch rows (two groups of the bias gradient): the split and
    fused dq paths match the reference, and two runs of each are bitwise equal."""
    B, N, H, D = 3, 20, 1, 16
    qkv = torch.randn(B, N, 3 * H * D, dtype=F32)
    bias = _bias("H", B, H, N, F32)
    grad = torch.randn(B, N, H * D)
    first = _check(qkv, H, bias, grad, fwd_cfg=(16, 16, 4, 1), bwd_cfg=bwd_cfg)
    again = _ours(qkv, H, bias, D ** -0.5, grad, (16, 16, 4, 1), bwd_cfg)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_segment_ids_and_dropout_with_the_kernels_mask():
    """Packed rows with padding, dropout, a bias: the reference drops with the kernels' mask."""
    B, N, H, D, p = 2, 21, 2, 16, 0.3
    qkv = torch.randn(B, N, 3 * H * D)
    bias = _bias("BH", B, H, N, F32)  # one per row: its gradient shows each row's pairs
    ids = torch.tensor([[0] * 8 + [1] * 10 + [-1] * 3, [0] * 21], dtype=torch.int32)
    seed = torch.tensor([0x5EED_0042], dtype=torch.int64)
    keep = attention_keep_mask(seed, B, H, N, p)
    out, dqkv, dbias = _check(qkv, H, bias, keep=keep, dropout_p=p, seed=seed, segment_ids=ids)
    assert not out[0, 18:].any() and not dqkv[0, 18:].any()
    # Pairs of different segments or with padding get no gradient.
    assert not dbias[0, :, :8, 8:18].any() and not dbias[0, :, 18:].any()


def test_minus_infinity_entries_mask_like_the_reference():
    """A bias that is -inf over a row's first key tile (a mask): the rows stay finite."""
    B, N, H, D = 1, 40, 2, 16
    qkv = torch.randn(B, N, 3 * H * D)
    bias = _bias("H", B, H, N, F32)
    bias[:, :5, :20] = float("-inf")
    grad = torch.randn(B, N, H * D)
    out, lse = kernels.attention_fwd(qkv, H, 0.25, bias=bias, config=(16, 16, 4, 1))
    dqkv, dbias = kernels.attention_bwd(grad, qkv, out, lse, H, 0.25, bias=bias, bias_grad=True,
                                        config=((16, 16, 4, 1), (16, 16, 4, 1)))
    q, b = qkv.double().requires_grad_(), bias.double().requires_grad_()
    ref = reference.biased_qkv_attention(q, H, b, scale=0.25)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dqkv.double(), q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dbias.double(), b.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_negative_and_zero_scale(scale):
    qkv = torch.randn(2, 13, 3 * 2 * 16)
    _check(qkv, 2, _bias("H", 2, 2, 13, F32), scale=scale)


def test_without_bias_the_launchers_are_unchanged():
    """bias=None runs the unbiased kernels: bitwise what the launchers gave before."""
    qkv = torch.randn(2, 17, 3 * 2 * 40)
    grad = torch.randn(2, 17, 2 * 40)
    out, lse = kernels.attention_fwd(qkv, 2, 0.2)
    out_b, lse_b = kernels.attention_fwd(qkv, 2, 0.2, bias=torch.zeros(2, 17, 17))
    torch.testing.assert_close(out_b, out, atol=1e-6, rtol=1e-6)
    dqkv = kernels.attention_bwd(grad, qkv, out, lse, 2, 0.2)
    assert isinstance(dqkv, torch.Tensor) and dqkv.shape == qkv.shape
    assert torch.equal(dqkv, kernels.attention_bwd(grad, qkv, out, lse, 2, 0.2, bias=None))


@pytest.mark.parametrize("bad,err", [
    (lambda b: b[0], ValueError),                          # [N, N]
    (lambda b: b[:, :-1], ValueError),                     # [H, N - 1, N]
    (lambda b: b[None].expand(3, -1, -1, -1), ValueError),  # [3, H, N, N] with B = 2
    (lambda b: b.to(torch.int64), TypeError),
    (lambda b: b.tolist(), TypeError),
    (lambda b: b.to("meta"), ValueError),
], ids=["2-D", "short", "batch", "int", "list", "device"])
def test_bad_bias_raises_naming_it(bad, err):
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    with pytest.raises(err, match="bias"):
        kernels.attention_fwd(qkv, 2, 0.3, bias=bad(torch.randn(2, 5, 5)))


def test_bias_grad_needs_the_bias():
    qkv = torch.randn(1, 5, 3 * 2 * 8)
    out, lse = kernels.attention_fwd(qkv, 2, 0.3)
    with pytest.raises(ValueError, match="bias"):
        kernels.attention_bwd(torch.randn(1, 5, 16), qkv, out, lse, 2, 0.3, bias_grad=True)


def test_empty_batch():
    qkv = torch.randn(0, 5, 3 * 2 * 8)
    bias = torch.randn(2, 5, 5)
    out, lse = kernels.attention_fwd(qkv, 2, 0.3, bias=bias)
    dqkv, dbias = kernels.attention_bwd(torch.randn(0, 5, 16), qkv, out, lse, 2, 0.3, bias=bias,
                                        bias_grad=True)
    assert out.shape == (0, 5, 16) and dqkv.shape == qkv.shape
    assert dbias.shape == bias.shape and not dbias.any()


# --- the reference is timm's BEiT ---------------------------------------------------------------

@pytest.mark.parametrize("fused_attn", [False, True], ids=["eager", "sdpa"])
def test_reference_is_timms_beit_attention(fused_attn):
    from timm.models.beit import Attention as BeitAttention
    attn = BeitAttention(32, num_heads=2, qkv_bias=True, window_size=(4, 4)).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    attn.fused_attn = fused_attn
    x = torch.randn(2, 17, 32)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight,
                                     torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    bias = attn._get_rel_pos_bias()
    ours = attn.proj(reference.biased_qkv_attention(qkv, 2, bias, scale=attn.scale))
    torch.testing.assert_close(ours, attn(x), atol=1e-5, rtol=1e-5)


# --- what the bias gradient takes while it runs, and which builds a GPU launches ----------------

@pytest.mark.parametrize("sms", [108, 132])
def test_bias_gradient_partials_are_bounded_whatever_the_batch(sms):
    """A shared bias: G groups of fp32 [H, N, N] partials, G at most the batch and at most what
    keeps 4 programs per SM busy, so the temporary stays under (4·SMs·BM·BN + H·N²)·4 bytes."""
    for N, H, D in ((197, 12, 64), (577, 16, 64), (50, 6, 128)):
        bm, bn, _, _ = attention_config.dbias_config(D)
        tiles = -(-N // bm) * -(-N // bn)
        for B in (1, 2, 7, 64, 1024):
            G = attention_config.dbias_groups(B, tiles, H, True, sms)
            assert 1 <= G <= B
            assert G * H * N * N <= 4 * sms * bm * bn + H * N * N, (N, B, G)
            assert attention_config.dbias_groups(B, tiles, H, False, sms) == B  # per-row bias


def test_cuda_bias_configs_are_what_aot_compiles(monkeypatch):
    """Every launch a bias call makes on sm_80 / sm_90 (forward, both backward structures, the
    bias gradient) is an AOT spec: same kernel, tiles, warps, stages, bucket and variant."""
    from vit_fast.aot import SHARED_LIMIT
    from vit_fast.support import MIN_TRITON_SHARED_BYTES
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    specs = attention_aot.aot_specs()

    def key(s):
        c = s.constants
        return (s.kernel.fn.__name__, c["BLOCK_M"], c["BLOCK_N"], s.num_warps, s.num_stages,
                c["HEAD_DIM"], c["HAS_DROPOUT"], c["HAS_SEGMENTS"], c.get("HAS_BIAS", True),
                s.signature["DQ"] if c.get("WRITE_DQ") else "-")
    compiled = {(key(s), arch) for s in specs if "HAS_DROPOUT" in s.constants
                for arch in (80, 90) if s.for_arch(arch)}
    names = {"fwd": "attention_fwd_kernel", "dkdv": "attention_bwd_dkdv_kernel",
             "dq": "attention_bwd_dq_kernel", "dkdv_dq": "attention_bwd_dkdv_kernel",
             "dbias": "attention_bwd_dbias_kernel"}
    for head_dim in (32, 48, 64, 80, 96, 112, 128, 256):
        for n in (1, 50, 64, 65, 197, 577):
            for dropout in (False, True):
                for segments in (False, True):
                    for arch in (80, 90):
                        plan = kernels.bwd_plan(n, head_dim, F16, dropout, segments, arch, bias=True)
                        fwd = [kernels._config("fwd", n, head_dim, F16, dropout, segments, limit, bias=True)
                               for limit in (SHARED_LIMIT[arch], MIN_TRITON_SHARED_BYTES)]
                        launches = [("fwd", c, "-") for c in fwd]
                        launches.append(("dbias", attention_config.dbias_config(head_dim, dropout, segments), "-"))
                        if plan[0] == "split":
                            launches += [("dkdv", plan[1], "-"), ("dq", plan[2], "-")]
                        else:
                            launches.append(("dkdv_dq", plan[1], "*fp16" if plan[2] == 1 else "*fp32"))
                        for kernel, cfg, dq in launches:
                            k = (names[kernel], *cfg, head_dim, dropout, segments, True, dq)
                            assert (k, arch) in compiled, (kernel, n, head_dim, cfg, dropout, segments, arch)
                        for cfg in fwd[1:]:  # what a 99 KB GPU picks fits it, by the model
                            bd = kernels._block_d(head_dim)
                            assert attention_config.fwd_shared_bytes(
                                cfg, bd, segments=segments, bias=True) <= MIN_TRITON_SHARED_BYTES


def test_reference_gradient_fallback_matches_the_kernels():
    """vit_fast.reference_grad.biased_qkv_attention_backward (the backward's fallback) answers
    what attention_bwd answers, from the same saved tensors."""
    from vit_fast import reference_grad
    B, N, H, D, p = 2, 13, 2, 16, 0.2
    qkv, bias = torch.randn(B, N, 3 * H * D), _bias("1H", B, H, N, F32)
    seed = torch.tensor([99], dtype=torch.int64)
    grad = torch.randn(B, N, H * D)
    out, lse = kernels.attention_fwd(qkv, H, 0.25, bias=bias, dropout_p=p, seed=seed)
    want = kernels.attention_bwd(grad, qkv, out, lse, H, 0.25, bias=bias, bias_grad=True,
                                 dropout_p=p, seed=seed)
    got = reference_grad.biased_qkv_attention_backward(grad, qkv, out, lse, bias, H, 0.25, p, seed,
                                                       bias_grad=True)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bias_launches_on_a_gpu_are_compiled(monkeypatch):
    """attention_fwd / attention_bwd with a bias under the interpreter with an H100's and an
    A100's configs: every launch (forward, Δ, dK/dV (fused or not), dQ or the dq reduce, the
    bias gradient and its reduce) is one of the AOT specs, flags and pointer dtypes included."""
    from test_aot_coverage import _mismatches, launches_on
    from vit_fast.kernels import layer_norm_aot
    from vit_fast.kernels._device import Target
    specs = attention_aot.aot_specs() + layer_norm_aot.aot_specs()
    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    for target in (Target(132, 90), Target(108, 80)):
        monkeypatch.setattr(kernels, "gpu_target", lambda device, t=target: t)
        with launches_on(monkeypatch, target) as seen:
            B, N, H, D = 2, 80, 1, 64
            qkv = torch.randn(B, N, 3 * H * D).to(F16)
            grad = torch.randn(B, N, H * D).to(F16)
            for bias in (torch.randn(1, H, N, N), torch.randn(B, H, N, N).to(F16)):
                out, lse = kernels.attention_fwd(qkv, H, 0.125, bias=bias)
                kernels.attention_bwd(grad, qkv, out, lse, H, 0.125, bias=bias, bias_grad=True)
        names = {s["kernel"] for s in seen}
        assert {"attention_fwd_kernel", "attention_bwd_dbias_kernel",
                "layer_norm_param_grad_reduce_kernel"} <= names
        for launch in seen:
            if launch["kernel"] == "attention_bwd_dbias_kernel":
                assert launch["args"]["DOT_PRECISION"] == "tf32"
            candidates = [s for s in specs if s.kernel.fn.__name__ == launch["kernel"]]
            assert any(not _mismatches(launch, s) for s in candidates), \
                (launch["kernel"], {k: v for k, v in launch["args"].items() if not torch.is_tensor(v)})
