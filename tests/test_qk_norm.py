"""qk_norm: the Triton kernels (kernels/qk_norm.py through vit_fast/ops/qk_norm.py) under the
interpreter against the float64 reference with docs/design.md's tolerance rule, forward and every
gradient; the reference against timm's and vit-pytorch's own norm modules; determinism; what the
op saves; bad inputs; opcheck; dispatch."""
import pytest
import torch
import torch.nn as nn

import vit_fast
from tolerance import DTYPES, assert_close_by_rule
from vit_fast import dispatch, functional, reference
from vit_fast.ops import qk_norm as qk_op

BAD = (ValueError, TypeError)
# (B, N, H, D, kind, weight shape ("D", "HD" or None), bias shape): a covering set, shapes not
# powers of two, each dtype meeting both kinds and all parameter layouts.
CASES = [
    (2, 17, 3, 40, "layer", "D", "D"),     # timm qk_norm=True: LayerNorm(head_dim)
    (1, 9, 2, 64, "layer", "HD", "HD"),
    (2, 5, 2, 24, "layer", None, None),    # LayerNorm(elementwise_affine=False)
    (1, 13, 2, 80, "layer", "HD", "D"),
    (2, 7, 3, 32, "rms", "D", None),       # timm RmsNorm
    (1, 11, 4, 16, "rms", "HD", None),     # NaViT RMSNorm(heads, dim_head): gamma per head
    (2, 3, 1, 96, "rms", None, "HD"),
]
PARAM_SHAPES = {"D": lambda H, D: (D,), "HD": lambda H, D: (H, D)}


def _inputs(B, N, H, D, wshape, bshape, dtype, pdtype=None):
    pdtype = pdtype or dtype
    # An offset, scaled qkv: LayerNorm must centre, RMSNorm must not.
    qkv = (torch.randn(B, N, 3 * H * D) * 2 + 0.5).to(dtype).requires_grad_()

    def param(shape, scale, shift):
        if shape is None:
            return None
        return (torch.randn(PARAM_SHAPES[shape](H, D)) * scale + shift).to(pdtype).requires_grad_()
    return dict(qkv=qkv, q_weight=param(wshape, 0.5, 1.0), k_weight=param(wshape, 0.5, 1.0),
                q_bias=param(bshape, 0.5, 0.0), k_bias=param(bshape, 0.5, 0.0))


def _copy(inp, dtype):
    return {k: v.detach().to(dtype).requires_grad_() if v is not None else None
            for k, v in inp.items()}


def _run(fn, inp, H, kind, eps, dy):
    y = fn(inp["qkv"], H, inp["q_weight"], inp["k_weight"], inp["q_bias"], inp["k_bias"],
           kind=kind, eps=eps)
    leaves = {k: v for k, v in inp.items() if v is not None}
    grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()))
    return y, dict(zip(leaves, grads))


def _triton(*args, **kw):
    with vit_fast.use_backend("triton"):
        return functional.qk_norm(*args, **kw)


def _check(inp, H, kind, eps, dtype):
    dy = torch.randn(inp["qkv"].shape).to(dtype).double()
    y, g = _run(_triton, inp, H, kind, eps, dy)
    y_ref, g_ref = _run(reference.qk_norm, _copy(inp, dtype), H, kind, eps, dy)
    y64, g64 = _run(reference.qk_norm, _copy(inp, torch.float64), H, kind, eps, dy)
    assert y.dtype == dtype and y.is_contiguous()
    assert_close_by_rule(y, y_ref, y64, "out")
    for name in g64:
        assert g[name].dtype == inp[name].dtype and g[name].shape == inp[name].shape, name
        assert_close_by_rule(g[name], g_ref[name].to(g[name].dtype), g64[name], f"d{name}")
    return y, g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[4]}-w{c[5]}-b{c[6]}-D{c[3]}")
def test_kernel_matches_float64_reference(case, dtype):
    B, N, H, D, kind, wshape, bshape = case
    inp = _inputs(B, N, H, D, wshape, bshape, dtype)
    y, _ = _check(inp, H, kind, 1e-6 if kind == "layer" else 1e-5, dtype)
    # v is copied bit for bit.
    v = slice(2 * H * D, 3 * H * D)
    assert torch.equal(y[..., v], inp["qkv"][..., v].detach())


def test_fp32_parameters_with_half_qkv_under_autocast():
    """AMP: fp32 norm weights, a bf16 qkv; the affine in fp32, gradients in the weights' dtype."""
    inp = _inputs(2, 9, 2, 40, "D", "D", torch.bfloat16, pdtype=torch.float32)
    dy = torch.randn(inp["qkv"].shape).to(torch.bfloat16).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = _run(_triton, inp, 2, "layer", 1e-6, dy)
        y_ref, g_ref = _run(reference.qk_norm, inp, 2, "layer", 1e-6, dy)
    y64, g64 = _run(reference.qk_norm, _copy(inp, torch.float64), 2, "layer", 1e-6, dy)
    assert y.dtype == torch.bfloat16
    assert_close_by_rule(y, y_ref, y64, "out")
    for name in g64:
        assert g[name].dtype == inp[name].dtype, name
        assert_close_by_rule(g[name], g_ref[name], g64[name], f"d{name}")


@pytest.mark.parametrize("B,N", [(0, 5), (1, 1)])
def test_empty_batch_and_single_token(B, N):
    inp = _inputs(B, N, 2, 24, "HD", "D", torch.float32)
    _check(inp, 2, "layer", 1e-6, torch.float32)


# The interpreter computes the tile's padding rows too: rsqrt(0) = inf there, masked out.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")
def test_navit_mapping_on_the_kernel():
    """NaViT's RMSNorm (gamma [H, 1, D], F.normalize·sqrt(D)) as kind="rms", eps=0, on the kernel."""
    from vit_pytorch.na_vit import RMSNorm as NaVitRMSNorm
    B, N, H, D = 2, 6, 2, 16
    qkv = torch.randn(B, N, 3 * H * D)
    norm_q, norm_k = NaVitRMSNorm(H, D), NaVitRMSNorm(H, D)
    nn.init.normal_(norm_q.gamma)
    nn.init.normal_(norm_k.gamma)
    with vit_fast.use_backend("triton"):
        y = functional.qk_norm(qkv, H, norm_q.gamma.reshape(H, D), norm_k.gamma.reshape(H, D),
                               kind="rms", eps=0.0)
    q, k, _ = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    yq, yk, _ = y.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    assert torch.allclose(yq, norm_q(q), atol=1e-5) and torch.allclose(yk, norm_k(k), atol=1e-5)


def test_strided_qkv_and_broadcast_gradient():
    """qkv a column slice of a wider buffer (row stride > 3·H·D), and y.sum()'s stride-0 dy."""
    H, D = 2, 24
    base = torch.randn(2, 6, 3 * H * D + 8, requires_grad=True)
    w = torch.randn(H, D, requires_grad=True)
    args = (base[..., 8:], H, w, w)
    with vit_fast.use_backend("triton"):
        y = functional.qk_norm(*args, kind="rms")
    y.sum().backward()
    got = (base.grad.clone(), w.grad.clone())
    base.grad = w.grad = None
    reference.qk_norm(*args, kind="rms").sum().backward()
    assert torch.allclose(got[0], base.grad, atol=1e-5) and torch.allclose(got[1], w.grad, atol=1e-5)
    assert not got[0][..., :8].any()


def test_backward_is_deterministic():
    inp = _inputs(2, 21, 2, 24, "D", "D", torch.float32)  # 3 row programs, 2 heads: 2 stages
    dy = torch.randn(inp["qkv"].shape).double()
    runs = [_run(_triton, inp, 2, "layer", 1e-6, dy)[1] for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_reference_matches_timm_and_vit_pytorch_norms():
    """Each documented mapping, on the reference: timm's LayerNorm and RmsNorm q_norm (shared
    [D] parameters) and NaViT's RMSNorm (F.normalize·sqrt(D)·gamma [H, 1, D]) as rms, eps=0."""
    from timm.layers import RmsNorm
    from vit_pytorch.na_vit import RMSNorm as NaVitRMSNorm
    B, N, H, D = 2, 5, 3, 16
    qkv = torch.randn(B, N, 3 * H * D)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # timm's [B, H, N, D] views

    def slots(y):
        return y.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    ln_q, ln_k = nn.LayerNorm(D, eps=1e-6), nn.LayerNorm(D, eps=1e-6)
    rms_q, rms_k = RmsNorm(D), RmsNorm(D)
    nav_q, nav_k = NaVitRMSNorm(H, D), NaVitRMSNorm(H, D)
    for m in (ln_q, ln_k, rms_q, rms_k, nav_q, nav_k):
        for p in m.parameters():
            nn.init.normal_(p)
    y = slots(reference.qk_norm(qkv, H, ln_q.weight, ln_k.weight, ln_q.bias, ln_k.bias))
    assert torch.allclose(y[0], ln_q(q), atol=1e-6) and torch.allclose(y[1], ln_k(k), atol=1e-6)
    assert torch.equal(y[2], v)
    y = slots(reference.qk_norm(qkv, H, rms_q.weight, rms_k.weight, kind="rms", eps=rms_q.eps))
    assert torch.allclose(y[0], rms_q(q), atol=1e-6) and torch.allclose(y[1], rms_k(k), atol=1e-6)
    y = slots(reference.qk_norm(qkv, H, nav_q.gamma.reshape(H, D), nav_k.gamma.reshape(H, D),
                                kind="rms", eps=0.0))
    assert torch.allclose(y[0], nav_q(q), atol=1e-5) and torch.allclose(y[1], nav_k(k), atol=1e-5)


def test_op_saves_only_its_input():
    """The backward recomputes the statistics: autograd keeps qkv (the parameters are resident
    anyway) and nothing else -- no normalized copy, no fp32 statistics."""
    from vit_fast.bench.memory import count_saved
    H, D = 2, 40
    qkv = torch.randn(3, 7, 3 * H * D, requires_grad=True)
    params = [torch.randn(D, requires_grad=True) for _ in range(4)]
    with count_saved(params) as saved, vit_fast.use_backend("triton"):
        functional.qk_norm(qkv, H, *params)
    assert saved.shapes == [((3, 7, 3 * H * D), "float32")]
    assert saved.bytes == qkv.numel() * 4


def test_block_saves_less_than_timm_with_qk_norm():
    """Per Block with qk_norm=True at ViT-S/16 size, bf16, counted on fake CUDA tensors (the
    kernels' registered shapes): vit_fast's fused Block against timm's eager Block."""
    from timm.models.vision_transformer import Block as TimmBlock

    from vit_fast.bench.memory import _run_fake
    kw = dict(dim=384, num_heads=6, qk_norm=True)
    shape = (8, 197, 384)
    ours = _run_fake(vit_fast.Block(**kw), shape, torch.bfloat16).bytes
    timm_qk = _run_fake(TimmBlock(**kw, norm_layer=nn.LayerNorm), shape, torch.bfloat16).bytes
    ours_plain = _run_fake(vit_fast.Block(384, 6), shape, torch.bfloat16).bytes
    unit = 8 * 197 * 384 * 2
    # The op adds its input qkv (3 units) to what the Block saves; eager timm adds the normed
    # q and k (2 units) and keeps the LayerNorm statistics.
    assert ours == ours_plain + 3 * unit
    assert ours < timm_qk


@pytest.mark.parametrize("call,match", [
    (lambda q, w: functional.qk_norm(q, 5, w, w), "num_heads"),
    (lambda q, w: functional.qk_norm(q, 0, w, w), "num_heads"),
    (lambda q, w: functional.qk_norm(q, 2, torch.randn(7), w), "q_weight"),
    (lambda q, w: functional.qk_norm(q, 2, w, w, None, torch.randn(3, 8)), "k_bias"),
    (lambda q, w: functional.qk_norm(q, 2, w, w, kind="batch"), "kind"),
    (lambda q, w: functional.qk_norm(q, 2, w, w, eps=-1.0), "eps"),
    (lambda q, w: functional.qk_norm(q, 2, w, w, eps=float("nan")), "eps"),
    (lambda q, w: functional.qk_norm(q, 2, w.double(), w), "k_weight"),
    (lambda q, w: functional.qk_norm(q.half(), 2, w, w), "qkv"),
    (lambda q, w: functional.qk_norm(q[0], 2, w, w), "qkv"),
    (lambda q, w: functional.qk_norm(q, 2, [1.0] * 8, w), "q_weight"),
    (lambda q, w: functional.qk_norm(q.int(), 2, w, w), "qkv"),
])
def test_bad_inputs_raise_naming_the_argument(call, match):
    with pytest.raises(BAD, match=match):
        call(torch.randn(2, 3, 48), torch.randn(8))


@pytest.mark.parametrize("over,match", [
    (dict(q_weight=torch.randn(5)), "q_weight"),
    (dict(k_bias=torch.randn(8).double()), "k_bias"),
    (dict(num_heads=5), "num_heads"),
    (dict(eps=-1.0), "eps"),
    (dict(qkv=torch.randn(2, 3, 3 * 2 * 512)), "head_dim"),
])
def test_raw_op_checks_its_arguments(over, match):
    kw = dict(qkv=torch.randn(2, 3, 48), num_heads=2, q_weight=torch.randn(8),
              k_weight=torch.randn(2, 8), q_bias=None, k_bias=torch.randn(8), rms=False, eps=1e-6)
    kw.update(over)
    with pytest.raises(BAD, match=match):
        torch.ops.vit_fast.qk_norm(*kw.values())


@pytest.mark.parametrize("rms", [False, True])
def test_opcheck(rms):
    H, D = 2, 8
    qkv = torch.randn(2, 3, 3 * H * D, requires_grad=True)
    w, b = torch.randn(H, D, requires_grad=True), torch.randn(D, requires_grad=True)
    torch.library.opcheck(torch.ops.vit_fast.qk_norm.default, (qkv, H, w, w, b, None, rms, 1e-6))
    dy = torch.randn(qkv.shape)
    torch.library.opcheck(torch.ops.vit_fast.qk_norm_backward.default,
                          (dy, qkv.detach(), H, w.detach(), None, b.detach(), None, rms, 1e-6,
                           True, False))


def test_dispatch_reasons():
    qkv = torch.randn(2, 3, 48)
    w = torch.randn(8)
    assert dispatch.not_supported_reasons("qk_norm", [qkv, w, w, None, None], head_dim=8) == []
    assert dispatch.not_supported_reasons("qk_norm", [qkv.half(), w, w, None, None], head_dim=8) == []
    why = dispatch.not_supported_reasons("qk_norm", [qkv.double(), w, w, None, None], head_dim=8)
    assert any("float64" in r for r in why)
    why = dispatch.not_supported_reasons("qk_norm", [qkv.half(), w.bfloat16(), w.bfloat16()],
                                         head_dim=8)
    assert any("bfloat16" in r for r in why)
    why = dispatch.not_supported_reasons("qk_norm", [qkv, w, w.half()], head_dim=8)
    assert any("mixed" in r for r in why)
    assert any("head_dim" in r for r in dispatch.not_supported_reasons(
        "qk_norm", [torch.randn(1, 1, 3 * 512)], head_dim=512))
    # A float64 call under the forced triton policy takes the reference, correctly.
    q64 = torch.randn(2, 3, 48, dtype=torch.float64)
    with vit_fast.use_backend("triton"):
        y = functional.qk_norm(q64, 2, w.double(), None)
    assert torch.equal(y, reference.qk_norm(q64, 2, w.double(), None))
