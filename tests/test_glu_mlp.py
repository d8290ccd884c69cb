"""GLU MLP launchers (kernels/glu_mlp.py) under the interpreter against the float64 reference:
timm's GluMlp (SiLU, both gate halves) and SwiGLU layouts, the hidden LayerNorm, biases,
residual / LayerScale / drop-path, fp32/bf16/fp16, the AMP contract, determinism, weight
gradients in timm's layouts, and the bytes kept for backward against timm's eager modules."""
import pytest
import torch
import torch.nn as nn

from tolerance import FLOOR, assert_close_by_rule
from vit_fast import reference
from vit_fast.kernels import glu_mlp as glu
from vit_fast.kernels import matmul

LAYOUTS = ("packed", "packed_gate_last", "pair")


class GluMlpFn(torch.autograd.Function):
    """The autograd an op wraps around the launchers, saving exactly the launchers' contract:
    x, fc1's weights, fc2_weight, fc2_bias, pre, the norm's parameters, layer_scale,
    sample_scale. fc1 arrives flat: (a, b) = (packed weight, None) or (gate, value)."""

    @staticmethod
    def forward(ctx, x, w1a, w1b, b1a, b1b, w2, b2, res, ls, ss, nw, nb, opts):
        fc1 = w1a if w1b is None else (w1a, w1b)
        bias1 = None if b1a is None else (b1a if b1b is None else (b1a, b1b))
        out, pre = glu.glu_mlp_fwd(x, fc1, bias1, w2, b2, res, ls, ss, True, norm_weight=nw,
                                   norm_bias=nb, out_dtype=res.dtype if res is not None else None,
                                   **opts)
        ctx.save_for_backward(x, w1a, w1b, w2, b2, pre, nw, nb, ls, ss)
        ctx.opts, ctx.has_residual, ctx.has_bias1 = opts, res is not None, b1a is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1a, w1b, w2, b2, pre, nw, nb, ls, ss = ctx.saved_tensors
        fc1 = w1a if w1b is None else (w1a, w1b)
        lp = x.dtype  # AMP: the GEMMs' dtype; the op casts grad and the scales to it
        cast = (lambda t: None if t is None else t.to(lp))
        g = glu.glu_mlp_bwd(grad.to(lp), x, fc1, w2, b2, pre, cast(ls), cast(ss),
                            has_residual=ctx.has_residual, norm_weight=nw, norm_bias=nb,
                            wanted=glu.GluMlpGrads(fc1_bias=ctx.has_bias1), **ctx.opts)
        d1 = g.fc1_weight if w1b is not None else (g.fc1_weight, None)
        db1 = (None, None) if g.fc1_bias is None else (
            g.fc1_bias if w1b is not None else (g.fc1_bias, None))
        dls = g.layer_scale.to(ls.dtype) if g.layer_scale is not None else None
        dss = g.sample_scale.to(ss.dtype) if g.sample_scale is not None else None
        return (g.x, *d1, *db1, g.fc2_weight, g.fc2_bias, grad if ctx.has_residual else None,
                dls, dss, g.norm_weight, g.norm_bias, None)


NAMES = ("x", "w1a", "w1b", "b1a", "b1b", "w2", "b2", "res", "ls", "ss", "nw", "nb")


def make_inputs(layout, lead, C, H, dtype, *, bias=True, norm=False, affine=True,
                residual=False, layer_scale=False, sample_scale=False, c_out=None,
                stream=None, norm_dtype=None):
    """Tensors by NAMES (requires_grad), and the launcher options. stream: the residual's and
    its scales' dtype (AMP: fp32); norm_dtype: the norm parameters' (AMP: fp32)."""
    c_out = c_out or C
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_()
    pair = layout == "pair"
    t = dict.fromkeys(NAMES)
    t["x"] = r(*lead, C)
    t["w1a"] = r(H if pair else 2 * H, C, scale=C ** -0.5)
    t["w1b"] = r(H, C, scale=C ** -0.5) if pair else None
    if bias:
        t["b1a"] = r(H if pair else 2 * H, scale=0.5)
        t["b1b"] = r(H, scale=0.5) if pair else None
    t["w2"] = r(c_out, H, scale=H ** -0.5)
    t["b2"] = r(c_out, scale=0.5) if bias else None
    stream = stream or dtype
    if residual:
        t["res"] = r(*lead, c_out, dt=stream)
        if layer_scale:
            t["ls"] = (torch.rand(c_out, generator=g) + 0.1).to(stream).requires_grad_()
        if sample_scale:  # drop-path: dropped samples 0, kept ones 1/keep_prob
            t["ss"] = torch.tensor([1.25, 0.0, 1.25])[torch.arange(lead[0]) % 3].to(
                stream).requires_grad_()
    opts = dict(gate_last=layout == "packed_gate_last")
    if norm:
        nd = norm_dtype or dtype
        opts["norm_eps"] = 1e-6
        if affine:
            t["nw"] = (torch.rand(H, generator=g) + 0.5).to(nd).requires_grad_()
            t["nb"] = r(H, scale=0.2, dt=nd)
    return t, opts


def run_ours(t, opts, grad):
    out = GluMlpFn.apply(*(t[n] for n in NAMES), opts)
    return out, _grads(out, t, grad)


def run_reference(t, opts, grad, upcast=False):
    if upcast:
        t = {k: (v.detach().double().requires_grad_() if v is not None else None)
             for k, v in t.items()}
    pair = t["w1b"] is not None
    fc1 = (t["w1a"], t["w1b"]) if pair else t["w1a"]
    b1 = None if t["b1a"] is None else ((t["b1a"], t["b1b"]) if pair else t["b1a"])
    out = reference.glu_mlp(t["x"], fc1, b1, t["w2"], t["b2"], gate_last=opts["gate_last"],
                            norm_weight=t["nw"], norm_bias=t["nb"],
                            norm_eps=opts.get("norm_eps"), residual=t["res"],
                            layer_scale=t["ls"], sample_scale=t["ss"])
    return out, _grads(out, t, grad)


def _grads(out, t, grad):
    given = [n for n in NAMES if t[n] is not None]
    return dict(zip(given, torch.autograd.grad(out, [t[n] for n in given], grad.to(out.dtype))))


def grad_for(t):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*t["x"].shape[:-1], t["w2"].shape[0], generator=g)


def check(t, opts, amp=None):
    """The tolerance rule for the output and every gradient. amp: the autocast dtype, whose
    floor then holds for the fp32 tensors too (their gradients come from its GEMMs), as
    tests/test_amp_block.py holds the AMP Block."""
    g = grad_for(t)
    out, grads = run_ours(t, opts, g)
    same, same_grads = run_reference(t, opts, g)
    ref64, ref_grads = run_reference(t, opts, g, upcast=True)
    assert out.dtype == same.dtype
    close = assert_close_by_rule if amp is None else _amp_close(amp)
    close(out, same, ref64, "out")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == t[name].dtype and grad.shape == t[name].shape, name
        close(grad, same_grads[name], ref_grads[name].to(t[name].dtype), name)


def _amp_close(lp):
    def close(ours, same, ref64, name):
        ours, same, ref64 = ours.double(), same.double(), ref64.double()
        bound = (2 * (same - ref64).abs().max().item()
                 + FLOOR[lp] * max(1.0, ref64.abs().max().item()))
        err = (ours - ref64).abs().max().item()
        assert err <= bound, f"{name}: max err {err:.3e} > bound {bound:.3e}"
    return close


# A covering set: every layout, dtype and option appears; each case about a second.
CASES = [
    # layout,            lead,    C,  H,  dtype,          options
    ("packed",           (2, 9),  40, 72, torch.float32,  dict()),
    ("packed_gate_last", (2, 9),  40, 72, torch.bfloat16, dict(residual=True, layer_scale=True,
                                                               sample_scale=True)),
    ("pair",             (3, 11), 24, 40, torch.float16,  dict(norm=True, residual=True,
                                                               sample_scale=True)),
    ("pair",             (2, 9),  40, 72, torch.bfloat16, dict(norm=True, residual=True,
                                                               layer_scale=True,
                                                               sample_scale=True)),
    ("packed",           (1, 17), 40, 56, torch.float32,  dict(norm=True, affine=False,
                                                               bias=False, residual=True,
                                                               layer_scale=True)),
    ("packed_gate_last", (33,),   24, 40, torch.float16,  dict(bias=False, c_out=48)),
    ("pair",             (3, 11), 40, 72, torch.float32,  dict(residual=True, layer_scale=True,
                                                               sample_scale=True)),
    ("packed",           (3, 11), 24, 40, torch.bfloat16, dict(norm=True, bias=False,
                                                               residual=True, sample_scale=True)),
]


@pytest.mark.parametrize("layout,lead,C,H,dtype,opts", CASES, ids=[
    f"{c[0]}-M{torch.Size(c[1]).numel()}-{c[2]}x{c[3]}-{str(c[4])[6:]}-"
    + ("+".join(k for k, v in c[5].items() if v is True) or "plain") for c in CASES])
def test_glu_mlp_matches_float64_reference(layout, lead, C, H, dtype, opts):
    check(*make_inputs(layout, lead, C, H, dtype, **opts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["packed", "pair"])
def test_amp_contract(layout, dtype):
    """fp32 residual stream, LayerScale, drop-path and norm parameters; x and the GEMM weights in
    the autocast dtype; out fp32. The norm normalizes in fp32 as autocast's layer_norm does."""
    t, opts = make_inputs(layout, (3, 5), 24, 40, dtype, norm=layout == "pair", residual=True,
                          layer_scale=True, sample_scale=True, stream=torch.float32,
                          norm_dtype=torch.float32)
    check(t, opts, amp=dtype)


@pytest.mark.parametrize("norm", [False, True])
def test_backward_is_deterministic(norm):
    t, opts = make_inputs("pair", (3, 7), 24, 40, torch.bfloat16, norm=norm, residual=True,
                          layer_scale=True, sample_scale=True)
    g = grad_for(t)
    _, first = run_ours(t, opts, g)
    _, second = run_ours(t, opts, g)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_no_pre_activation_kept_without_grad():
    t, opts = make_inputs("packed", (2, 5), 24, 40, torch.float32)
    d = {k: (v.detach() if v is not None else None) for k, v in t.items()}
    out, pre = glu.glu_mlp_fwd(d["x"], d["w1a"], d["b1a"], d["w2"], d["b2"], None, None, None,
                               False)
    assert pre.numel() == 0
    torch.testing.assert_close(out, reference.glu_mlp(d["x"], d["w1a"], d["b1a"], d["w2"],
                                                      d["b2"]), rtol=1e-5, atol=1e-5)


def test_activation_recompute_agrees_bit_for_bit():
    """The elementwise recompute (hidden-norm backward) gives the fc1 epilogue's own act."""
    from vit_fast.kernels.glu_elementwise import glu_forward
    t, _ = make_inputs("pair", (3, 11), 24, 40, torch.bfloat16)
    x = t["x"].detach().reshape(-1, 24)
    w1i = glu._interleaved((t["w1a"].detach(), t["w1b"].detach()), False)
    act, pre, _ = matmul.matmul(x, w1i.t(), x.dtype, epilogue="glu", store_pre=True)
    assert act.shape == (33, 40) and pre.shape == (33, 80)
    assert torch.equal(glu_forward(pre), act)


# --- timm's own modules ------------------------------------------------------------------------

def _timm_mlp(kind, C, H):
    from timm.layers.mlp import GluMlp, SwiGLU
    torch.manual_seed(0)
    if kind == "swiglu_norm":  # EVA02 base: SwiGLU with a LayerNorm inside (scale_mlp)
        m = SwiGLU(C, H, norm_layer=nn.LayerNorm)
        with torch.no_grad():
            m.norm.weight.uniform_(0.5, 1.5)
            m.norm.bias.normal_(0, 0.2)
        return m
    return GluMlp(C, 2 * H, act_layer=nn.SiLU, gate_last=kind == "glu_gate_last")


def _ours_from_timm(m, x):
    """Our launchers on the module's own parameters; grads by parameter name."""
    if hasattr(m, "fc1_g"):
        w1a, w1b, b1a, b1b = m.fc1_g.weight, m.fc1_x.weight, m.fc1_g.bias, m.fc1_x.bias
        opts = dict(gate_last=False)
    else:
        w1a, w1b, b1a, b1b = m.fc1.weight, None, m.fc1.bias, None
        opts = dict(gate_last=m.gate_last)
    nw = nb = None
    if isinstance(m.norm, nn.LayerNorm):
        nw, nb, opts["norm_eps"] = m.norm.weight, m.norm.bias, m.norm.eps
    return GluMlpFn.apply(x, w1a, w1b, b1a, b1b, m.fc2.weight, m.fc2.bias, None, None, None,
                          nw, nb, opts)


@pytest.mark.parametrize("kind", ["glu", "glu_gate_last", "swiglu_norm"])
def test_timm_modules_and_their_weight_gradient_layouts(kind):
    m = _timm_mlp(kind, 24, 40).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 24, dtype=torch.float64)
    ref = m(x)
    ref_grads = torch.autograd.grad(ref, [x, *m.parameters()], g)
    mf = m.float()
    xf = x.detach().float().requires_grad_()
    out = _ours_from_timm(mf, xf)
    grads = torch.autograd.grad(out, [xf, *mf.parameters()], g.float())
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    for (name, p), ours, theirs in zip([("x", x), *m.named_parameters()], grads, ref_grads):
        assert ours.shape == p.shape, name
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-4, atol=2e-5, msg=name)


# --- memory: what is kept for backward -------------------------------------------------------

def saved_bytes(fn, params):
    """Bytes of the distinct tensors autograd keeps for backward while fn() runs, leaving out
    the parameters and autocast's casts of them (weight-sized, alive anyway / the same for any
    MLP implementation under AMP)."""
    seen = {}
    skip = {p.untyped_storage().data_ptr() for p in params}
    weight_shapes = {tuple(p.shape) for p in params}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and tuple(t.shape) not in weight_shapes:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("amp", [False, True])
def test_saved_bytes_against_timm_eager_swiglu(amp):
    """EVA02 base's SwiGLU with its LayerNorm: timm keeps the gate, silu(gate), the value, their
    product (the norm's input), the norm's output and its fp32 mean/rstd; the GLU MLP keeps
    pre = gate | value, 2/5 of eager's hidden-width bytes. Both keep x. (CPU autocast runs the
    norm in bf16; CUDA autocast would keep its input in fp32 besides.)"""
    M, C, H = 6 * 5, 24, 40
    m = _timm_mlp("swiglu_norm", C, H)
    x = torch.randn(6, 5, C, requires_grad=True)
    lp = torch.bfloat16

    def eager():
        with torch.autocast("cpu", dtype=lp, enabled=amp):
            return m(x)
    p = {n: (q.detach().to(lp).requires_grad_() if amp and n.startswith("fc") else q)
         for n, q in m.named_parameters()}
    xl = x.detach().to(lp).requires_grad_() if amp else x

    def ours():
        return GluMlpFn.apply(xl, p["fc1_g.weight"], p["fc1_x.weight"], p["fc1_g.bias"],
                              p["fc1_x.bias"], p["fc2.weight"], p["fc2.bias"], None, None,
                              None, p["norm.weight"], p["norm.bias"],
                              dict(gate_last=False, norm_eps=m.norm.eps))
    es = 2 if amp else 4
    assert saved_bytes(eager, list(m.parameters())) == M * C * es + 5 * M * H * es + 2 * M * 4
    assert saved_bytes(ours, list(p.values())) == M * C * es + 2 * M * H * es


# --- launch plumbing ---------------------------------------------------------------------------

def test_glu_gemms_are_not_offered_to_the_hopper_kernel(monkeypatch):
    """The Hopper GEMM allocates C as [M, N]; the GLU epilogues' C is [M, N/2] or [M, 2N], so
    their tuning candidates must not reach matmul_hopper.hopper_launches' extension."""
    from vit_fast.kernels import matmul_hopper
    from vit_fast.kernels._device import Target
    h100 = Target(132, 90)
    monkeypatch.setattr(matmul_hopper, "gpu_target", lambda device: h100)
    monkeypatch.setattr(matmul, "gpu_target", lambda device: h100)
    a = torch.randn(256, 64, dtype=torch.bfloat16)
    offered = {}

    def choose(a_, fields, candidates):
        offered[fields[7][0]] = matmul_hopper.hopper_launches(fields, candidates)  # GemmKey order
        return "not run"
    w = torch.randn(128, 64, dtype=torch.bfloat16)
    pre = torch.randn(256, 256, dtype=torch.bfloat16)
    matmul.matmul(a, w.t(), a.dtype, epilogue="glu", store_pre=True, choose=choose)
    matmul.matmul(a, w, a.dtype, epilogue="dglu", pre=pre, store_act=True, choose=choose)
    matmul.matmul(a, w.t(), a.dtype, choose=choose)  # a plain GEMM still is (when it can be)
    assert offered["glu"] == {} and offered["dglu"] == {}
    if matmul_hopper.TensorDescriptor is not None:
        assert offered["none"]


@pytest.mark.parametrize("fc1,bias,norm,match", [
    (torch.randn(7, 8), None, {}, "fc1_weight: packed"),
    (torch.randn(8, 5), None, {}, "fc1_weight: packed"),
    ((torch.randn(4, 8), torch.randn(5, 8)), None, {}, "fc1_weight: gate"),
    ((torch.randn(4, 8), torch.randn(4, 8)), torch.randn(8), {}, "fc1_bias"),
    (torch.randn(8, 8), torch.randn(4), {}, "fc1_bias"),
    (torch.randn(8, 8), None, dict(norm_weight=torch.ones(4)), "norm_eps"),
    (torch.randn(8, 8), None, dict(norm_weight=torch.ones(5), norm_eps=1e-6), "norm_weight"),
])
def test_bad_fc1_or_norm_arguments_are_named(fc1, bias, norm, match):
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=match):
        glu.glu_mlp_fwd(x, fc1, bias, torch.randn(8, 4), None, None, None, None, False, **norm)
