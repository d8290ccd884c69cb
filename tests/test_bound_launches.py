"""The launchers bound to one configuration (kernels/layer_norm_bound.py,
kernels/attention_bound.py), which the Block's one-node step calls: the same kernels, configs and
plan as the general launchers, so the same bits -- in every backward structure the attention's plan
can take (the two passes, the fused pass with one key tile and with dq partials)."""
import pytest
import torch

from vit_fast.kernels import attention, attention_bound, layer_norm, layer_norm_bound

FUSED_PARTIALS = ("fused", (16, 16, 4, 1), 3)
FUSED_ONE = ("fused", (16, 64, 4, 1), 1)
SPLIT = ("split", (16, 16, 4, 1), (16, 16, 4, 1))


@pytest.mark.parametrize("plan", [FUSED_PARTIALS, FUSED_ONE, SPLIT], ids=["partials", "one", "split"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bound_attention_matches_the_launchers(monkeypatch, plan, dropout):
    monkeypatch.setattr(attention, "_LAUNCHES", {})
    monkeypatch.setattr(attention, "bwd_plan", lambda *a, **k: plan)
    torch.manual_seed(0)
    B, N, H, D = 2, 37, 2, 16
    qkv = torch.randn(B, N, 3 * H * D)
    seed = torch.tensor([7], dtype=torch.int64) if dropout else None
    grad = torch.randn(B, N, H * D)
    want_out, want_lse = attention.attention_fwd(qkv, H, 0.3, dropout_p=dropout, seed=seed)
    want = attention.attention_bwd(grad, qkv, want_out, want_lse, H, 0.3, dropout_p=dropout,
                                   seed=seed)
    fwd = attention_bound.bind_fwd(qkv.shape, H, qkv.dtype, dropout > 0, qkv.device)
    bwd = attention_bound.bind_bwd(qkv.shape, H, qkv.dtype, dropout > 0, qkv.device)
    assert bwd.plan == plan[0]
    out, lse = fwd(qkv, 0.3, dropout, seed)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert torch.equal(bwd(grad, qkv, out, lse, 0.3, dropout, seed), want)
    # out and dout read with their own strides (SDPA's forward hands a view of its output)
    rows = torch.empty(B, N, 2 * H * D)[..., :H * D].copy_(out)
    cols = torch.empty(B, H * D, N).transpose(1, 2).copy_(grad)
    assert torch.equal(bwd(cols, qkv, rows, lse, 0.3, dropout, seed), want)


@pytest.mark.parametrize("ls, ss, bias_grad", [(False, False, True), (True, True, True),
                                               (True, False, False)])
def test_bound_layer_norm_matches_the_launchers(ls, ss, bias_grad):
    torch.manual_seed(0)
    B, N, C = 3, 7, 24
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    w, b = torch.randn(C), torch.randn(C)
    lsv = torch.randn(C) if ls else None
    ssv = torch.rand(B) if ss else None
    want_y, want_s = layer_norm.residual_layer_norm_fwd(x, w, b, 1e-5, res, lsv, ssv,
                                                        stats=False)[:2]
    y, s = layer_norm_bound.bind_fwd(x.shape, x.device, x.dtype, res.dtype, ls, ss)(
        x, w, b, 1e-5, res, lsv, ssv)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)
    want = layer_norm.residual_layer_norm_fwd(s, w, b, 1e-5)
    got = layer_norm_bound.bind_stats(s.shape, s.device, s.dtype)(s, w, b, 1e-5)
    for g, t in zip(got, (want[0], want[2], want[3])):
        assert torch.equal(g, t)
    dy, ds = torch.randn(B, N, C), torch.randn(B, N, C)
    want = layer_norm.residual_layer_norm_bwd(dy, ds, s, got[1], got[2], w, has_residual=True,
                                              need_bias_grad=bias_grad, x=x if ls else None,
                                              layer_scale=lsv, sample_scale=ssv,
                                              residual_dtype=res.dtype)
    bound = layer_norm_bound.bind_bwd(s.shape, s.device, s.dtype, has_ds=True,
                                      residual_dtype=res.dtype,
                                      layer_scale=lsv.dtype if ls else None, sample_scale=ss,
                                      bias_grad=bias_grad, weight_dtype=w.dtype)
    got = bound(dy, ds, s, got[1], got[2], w, x if ls else None, lsv, ssv)
    for g, t in zip(got, want):
        assert (g is None) == (t is None)
        assert g is None or torch.equal(g, t)


@pytest.mark.parametrize("ls, ss", [(False, False), (True, True)])
def test_bound_mlp_matches_the_launchers(ls, ss):
    """The GELU MLP with every GEMM and column sum bound (kernels/gelu_mlp.Gemms with a dict, as
    the step keeps it) gives the bits of the per-call launches, on its first call (binding) and
    on the next (bound only), and every launch did bind."""
    from vit_fast.kernels import gelu_mlp, matmul_bound
    torch.manual_seed(0)
    B, N, C, H = 2, 9, 24, 40
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    w1, b1, w2, b2 = torch.randn(H, C), torch.randn(H), torch.randn(C, H), torch.randn(C)
    lsv = torch.randn(C) if ls else None
    ssv = torch.rand(B) if ss else None
    args = (x, w1, b1, w2, b2, "none", res, lsv, ssv, True)
    want_out, want_pre = gelu_mlp.gelu_mlp_fwd(*args)
    g = torch.randn(B, N, C)
    wanted = gelu_mlp.MlpGrads()
    want = gelu_mlp.gelu_mlp_bwd(g, x, w1, w2, b2, want_pre, lsv, ssv, approximate="none",
                                 has_residual=True, wanted=wanted)
    fwd, bwd = gelu_mlp.Gemms(None, {}), gelu_mlp.Gemms(None, {})
    for _ in range(2):
        out, pre = gelu_mlp.mlp_forward(fwd, *args)
        assert torch.equal(out, want_out) and torch.equal(pre, want_pre)
        got = gelu_mlp.mlp_backward(bwd, g, x, w1, w2, b2, pre, lsv, ssv, "none", True, wanted)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b)
    assert sorted(fwd.bound) == ["fc1", "fc2"]
    assert sorted(bwd.bound) == ["d_b1", "dgelu", "dw1", "dx", "e", "g_sum"]
    kinds = (matmul_bound.GemmLaunch, matmul_bound.ColsumLaunch)
    assert all(isinstance(v, kinds) for v in (*fwd.bound.values(), *bwd.bound.values()))


def test_bind_refuses_what_matmul_does_otherwise():
    """bind answers None where matmul would not make one matmul_kernel launch of a chosen config
    -- the caller then calls matmul -- and a launch that binds reads its operands' strides."""
    from vit_fast.kernels import matmul, matmul_bound
    a, b = torch.randn(9, 16), torch.randn(16, 12)
    assert matmul_bound.bind(a, b, a.dtype) is not None
    assert matmul_bound.bind(a[:0], b, a.dtype) is None  # empty: no launch
    assert matmul_bound.bind(a[:, :0], b[:0], a.dtype) is None  # empty reduction: zeros
    assert matmul_bound.bind(a, b, a.dtype, epilogue="glu") is None  # GLU: C is not [M, N]
    strided = torch.randn(24)[::2]
    assert matmul_bound.bind(a, b, a.dtype, bias=strided) is None
    never = type("Never", (), {"lookup": staticmethod(lambda key: None)})()
    # a chooser that has not answered the key yet: unbound (matmul chooses, then launches)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matmul, "gemm_candidates", lambda *args: (matmul.INTERPRET_CONFIG,) * 2)
        mp.setattr(matmul, "_PLANS", {})
        assert matmul_bound.bind(a, b, a.dtype, choose=never) is None
    bound = matmul_bound.bind(a, b, a.dtype)
    bt = torch.randn(12, 16).t()  # another layout than the one bound: read as it is
    assert torch.equal(bound(a, bt)[0], matmul.matmul(a, bt, a.dtype)[0])


def test_bound_layer_norm_backward_adds_a_gradient_without_a_residual():
    """has_ds without the residual form (the step's LayerNorm 1 in an fp32 stream): dx is the
    launcher's dx plus ds, with the bits of that add done afterwards."""
    torch.manual_seed(0)
    B, N, C = 3, 7, 24
    x, w, b = torch.randn(B, N, C), torch.randn(C), torch.randn(C)
    _, mean, rstd = layer_norm_bound.bind_stats(x.shape, x.device, x.dtype)(x, w, b, 1e-5)
    dy, ds = torch.randn(B, N, C), torch.randn(B, N, C)
    want = layer_norm.residual_layer_norm_bwd(dy, None, x, mean, rstd, w, has_residual=False,
                                              need_bias_grad=True)
    got = layer_norm_bound.bind_bwd(x.shape, x.device, x.dtype, has_ds=True)(
        dy, ds, x, mean, rstd, w)
    assert torch.equal(got[0], want[0] + ds)
    assert got[1] is None
    for g, t in zip(got[2:4], want[2:4]):
        assert torch.equal(g, t)
