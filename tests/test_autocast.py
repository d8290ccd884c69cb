"""torch.autocast: the ops compute in the autocast dtype like the eager modules they replace.

Policy (vit_fast/functional.py): attention, the MLP and the patch projection take the autocast
dtype; LayerNorm runs in float32 (so an fp32 residual stream stays fp32, as in eager timm); an
fp32 residual or pos_embed added to a low-precision branch is added in fp32.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import vit_fast
from tiny_models import tiny_vit
from tolerance import assert_close_by_rule

CUDA = torch.cuda.is_available()


def _vit(**kw):
    return tiny_vit(img_size=32, embed_dim=48, num_heads=3, num_classes=10, **kw)


def _logits_and_grads(model, x, amp_dtype):
    model.zero_grad()
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        y = model(x)
    y.float().square().sum().backward()
    return y, {n: p.grad.clone() for n, p in model.named_parameters()}


def _check_model_against_timm(device, dtype):
    timm_model = _vit(init_values=0.1).to(device).eval()
    ours = vit_fast.convert(copy.deepcopy(timm_model))
    model64 = copy.deepcopy(timm_model).double()
    x = torch.randn(2, 3, 32, 32, device=device)
    y64, g64 = _logits_and_grads(model64, x.double(), None)
    y_timm, g_timm = _logits_and_grads(timm_model, x, dtype)
    y_ours, g_ours = _logits_and_grads(ours, x, dtype)
    assert y_ours.dtype == y_timm.dtype == dtype
    assert_close_by_rule(y_ours, y_timm, y64, "logits")
    for name in g64:
        assert g_ours[name].dtype == torch.float32
        assert_close_by_rule(g_ours[name], g_timm[name], g64[name], name)


def test_converted_vit_matches_timm_under_cpu_bf16_autocast():
    _check_model_against_timm("cpu", torch.bfloat16)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (autocast fp16/bf16 on the kernels)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_vit_matches_timm_under_cuda_autocast(dtype):
    _check_model_against_timm("cuda", dtype)


def test_block_keeps_fp32_residual_stream():
    timm_model = _vit(init_values=0.1).eval()
    ours = vit_fast.convert(copy.deepcopy(timm_model))
    x = torch.randn(2, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = timm_model.blocks[0](x), ours.blocks[0](x)
    assert isinstance(ours.blocks[0], vit_fast.Block)
    assert got.dtype == want.dtype == torch.float32


# --- each op against the eager code it replaces, under autocast -----------------------------------

def _inputs(C=16, hidden=24, B=2, N=5):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    return dict(qkv=r(B, N, 3 * C), x=r(B, N, C), low=r(B, N, C).bfloat16(), w=r(C), b=r(C),
                ls=r(C), ss=torch.tensor([2.0, 0.0]), w1=r(hidden, C), b1=r(hidden),
                w2=r(C, hidden), b2=r(C), images=r(B, 3, 8, 8), pw=r(C, 3, 4, 4), pb=r(C),
                pos=r(1, 4, C))


def _eager(op, t):
    """What eager PyTorch computes (autocast on) for the same math, and the vit_fast call."""
    B, N = t["x"].shape[:2]
    if op == "attention":
        q, k, v = t["qkv"].reshape(B, N, 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
        want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        return want, lambda: vit_fast.fused_qkv_attention(t["qkv"], 2)
    if op == "layer_norm":
        s = t["x"] + t["low"] * t["ls"] * t["ss"][:, None, None]
        want = (F.layer_norm(s, s.shape[-1:], t["w"], t["b"], 1e-6), s)
        return want, lambda: vit_fast.residual_layer_norm(
            t["low"], t["w"], t["b"], 1e-6, residual=t["x"], layer_scale=t["ls"],
            sample_scale=t["ss"])
    if op == "mlp":
        want = F.linear(F.gelu(F.linear(t["x"], t["w1"], t["b1"])), t["w2"], t["b2"])
        return want, lambda: vit_fast.gelu_mlp(t["x"], t["w1"], t["b1"], t["w2"], t["b2"])
    if op == "mlp_residual":
        branch = F.linear(F.gelu(F.linear(t["x"], t["w1"], t["b1"])), t["w2"], t["b2"])
        want = t["x"] + branch * t["ls"] * t["ss"][:, None, None]
        return want, lambda: vit_fast.gelu_mlp(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                               residual=t["x"], layer_scale=t["ls"],
                                               sample_scale=t["ss"])
    if op == "patch_embed":
        want = F.conv2d(t["images"], t["pw"], t["pb"], stride=4).flatten(2).transpose(1, 2)
        return want, lambda: vit_fast.patch_embed(t["images"], t["pw"], t["pb"], patch_size=4)
    if op == "patch_embed_pos":
        want = F.conv2d(t["images"], t["pw"], t["pb"], stride=4).flatten(2).transpose(1, 2)
        want = want + t["pos"]
        return want, lambda: vit_fast.patch_embed(t["images"], t["pw"], t["pb"], patch_size=4,
                                                  pos_embed=t["pos"])
    raise AssertionError(op)


OPS = ["attention", "layer_norm", "mlp", "mlp_residual", "patch_embed", "patch_embed_pos"]
EXPECTED_DTYPE = {"attention": torch.bfloat16, "layer_norm": torch.float32, "mlp": torch.bfloat16,
                  "mlp_residual": torch.float32, "patch_embed": torch.bfloat16,
                  "patch_embed_pos": torch.float32}


def _flat(v):
    return list(v) if isinstance(v, tuple) else [v]


@pytest.mark.parametrize("op", OPS)
def test_op_under_cpu_autocast_matches_eager(op):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, call = _eager(op, _inputs())
        got = call()
    for w, g in zip(_flat(want), _flat(got)):
        assert g.dtype == w.dtype == EXPECTED_DTYPE[op], (g.dtype, w.dtype)
        tol = 1e-5 if g.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)


def _triton_available():
    try:
        with vit_fast.use_backend("triton"):
            vit_fast.fused_qkv_attention(torch.randn(1, 3, 12), 2)
            x, w = torch.randn(1, 3, 4), torch.ones(4)
            vit_fast.residual_layer_norm(x, w, w, 1e-6)
            vit_fast.gelu_mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None)
    except (NotImplementedError, ImportError, RuntimeError) as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", ["attention", "layer_norm", "mlp", "mlp_residual"])
def test_triton_kernels_under_cpu_autocast(op, amp, monkeypatch):
    """The kernels (interpreter) get the autocast dtype and agree with eager autocast.

    Both dtypes are held to docs/design.md's rule: the interpreter's fp32 -> bf16 casts round to
    nearest even as a GPU's do (tests/interpreter_rounding.py, applied by tests/conftest.py).
    """
    missing = _triton_available()
    if missing:
        pytest.skip(f"the triton ops are not available: {missing}")
    from vit_fast.ops import attention, gelu_mlp, layer_norm
    module, name = {"attention": (attention, "fused_qkv_attention"),
                    "layer_norm": (layer_norm, "residual_layer_norm"),
                    "mlp": (gelu_mlp, "gelu_mlp"), "mlp_residual": (gelu_mlp, "gelu_mlp")}[op]
    seen = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        assert not torch.is_autocast_enabled("cpu"), "kernels must run with autocast off"
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    t = _inputs()
    with torch.autocast("cpu", dtype=amp):
        same_dtype = _eager(op, t)[0]
        with vit_fast.use_backend("triton"):
            got = _eager(op, t)[1]()
    assert seen, "the triton backend was not used"
    kernel_dtype = torch.float32 if op == "layer_norm" else amp
    assert seen[0] == {kernel_dtype}, f"the kernel got {seen[0]}, want {kernel_dtype}"
    want_dtype = amp if EXPECTED_DTYPE[op] == torch.bfloat16 else EXPECTED_DTYPE[op]
    ref64 = _eager(op, {k: v.double() for k, v in t.items()})[0]
    for g, s, r in zip(_flat(got), _flat(same_dtype), _flat(ref64)):
        assert g.dtype == s.dtype == want_dtype
        assert_close_by_rule(g, s, r, op)


def test_compiled_under_autocast_matches_eager():
    """Compiled outside autocast first: entering autocast recompiles, not reusing the fp32 graph."""
    torch._dynamo.reset()
    model = vit_fast.convert(_vit(init_values=0.1)).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert compiled(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(x)
            got = compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compiled_triton_block_under_autocast():
    missing = _triton_available()
    if missing:
        pytest.skip(f"the triton ops are not available: {missing}")
    from torch._dynamo.testing import AotEagerAndRecordGraphs
    torch._dynamo.reset()
    model = tiny_vit(depth=1, init_values=0.1, block_fn=vit_fast.Block)

    def fn(x):
        with vit_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.float16):
            return model(x)

    x = torch.randn(2, 3, 16, 16)
    want = fn(x)
    backend = AotEagerAndRecordGraphs()
    got = torch.compile(fn, fullgraph=True, backend=backend)(x)
    assert got.dtype == want.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    code = backend.graphs[0].code
    # AMP runs the Block's fused ops (fp32 stream inside the kernels, issue 16)
    for op in ("fused_qkv_attention", "layer_norm_linear", "residual_layer_norm_mlp"):
        assert f"vit_fast.{op}" in code
    torch._dynamo.reset()
