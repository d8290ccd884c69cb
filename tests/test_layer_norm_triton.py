"""Triton residual_layer_norm (kernels/layer_norm.py through vit_fast/ops/layer_norm.py), run under
the interpreter on CPU, against the float64 reference with docs/design.md's tolerance rule: y, s and
every gradient; backward determinism; constant rows; opcheck."""
import itertools

import pytest
import torch

from tolerance import DTYPES, assert_close_by_rule
from vit_fast import reference
from vit_fast.ops import layer_norm as ln_op

CS = (64, 192, 384, 768, 1000, 1280)
SHAPES = ((1,), (7,), (1, 197), (2, 197))  # leading dims: 1, 7, 197, 394 rows
# (residual, layer_scale, sample_scale, weight, bias): branch factors exist only with a residual.
FLAGS = [(False, False, False, w, b) for w, b in itertools.product((True, False), repeat=2)] + \
        [(True,) + f for f in itertools.product((True, False), repeat=4)]
# A covering set, not the product: every flag combination once, C, row count and dtype rotating
# at different rates so each C meets several row counts and dtypes.
CASES = [(flags, CS[i % len(CS)], SHAPES[(i // 2) % len(SHAPES)], DTYPES[(i + i // 6) % len(DTYPES)])
         for i, flags in enumerate(FLAGS)]
# Sizes past the ViT set: C = 1, the widest non-powers of two, and the largest supported C.
CASES += [((True, True, True, True, True), 1, (2, 3), torch.float32),
          ((True, False, True, True, True), 1408, (2, 3), torch.bfloat16),
          ((False, False, False, True, True), 1664, (5,), torch.float16),
          ((True, True, False, True, False), 8192, (3,), torch.bfloat16)]


def _inputs(flags, C, lead, dtype, requires_grad=True):
    has_res, has_ls, has_ss, has_w, has_b = flags
    B = lead[0]

    def make(shape, scale=1.0, shift=0.0):
        return (torch.randn(shape) * scale + shift).to(dtype).requires_grad_(requires_grad)

    x = make((*lead, C))
    # An offset residual stream: the statistics must not assume zero-mean rows.
    residual = make((*lead, C), 2.0, 1.0) if has_res else None
    weight = make((C,), 0.5, 1.0) if has_w else None
    bias = make((C,), 0.5) if has_b else None
    layer_scale = make((C,), 0.1, 0.2) if has_ls else None
    # Drop-path keep mask divided by the keep probability; sample 0 is always dropped when B > 1.
    sample_scale = None
    if has_ss:
        keep = (torch.rand(B) < 0.7).float()
        if B > 1:
            keep[0] = 0.0
            keep[1] = 1.0
        sample_scale = (keep / 0.7).to(dtype)
    return dict(x=x, weight=weight, bias=bias, residual=residual, layer_scale=layer_scale,
                sample_scale=sample_scale)


def _leaves(inp):
    return {k: v for k, v in inp.items() if v is not None and v.requires_grad}


def _grads(y, s, dy, ds, inp):
    leaves = _leaves(inp)
    loss = (y.double() * dy).sum() + (s.double() * ds).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _copy(inp, dtype):
    return {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in inp.items()}


def _ours(inp, eps):
    return ln_op.residual_layer_norm(inp["x"], inp["weight"], inp["bias"], eps, inp["residual"],
                                     inp["layer_scale"], inp["sample_scale"])


def _ref(inp, eps):
    return reference.residual_layer_norm(inp["x"], inp["weight"], inp["bias"], eps,
                                         residual=inp["residual"], layer_scale=inp["layer_scale"],
                                         sample_scale=inp["sample_scale"])


def _check_against_reference(inp, dtype, eps, dy, ds):
    ref = _copy(inp, dtype)
    r64 = _copy(inp, torch.float64)
    y, s = _ours(inp, eps)
    y_ref, s_ref = _ref(ref, eps)
    y64, s64 = _ref(r64, eps)
    assert y.dtype == dtype and s.dtype == dtype
    assert_close_by_rule(y, y_ref, y64, "y")
    assert_close_by_rule(s, s_ref, s64, "s")
    g, g_ref, g64 = _grads(y, s, dy, ds, inp), _grads(y_ref, s_ref, dy, ds, ref), _grads(y64, s64, dy, ds, r64)
    assert set(g) == set(g64)
    for name in g64:
        assert g[name].dtype == inp[name].dtype, name
        assert_close_by_rule(g[name], g_ref[name], g64[name], f"d{name}")


@pytest.mark.parametrize("flags,C,lead,dtype", CASES,
                         ids=[f"res{int(f[0])}ls{int(f[1])}ss{int(f[2])}w{int(f[3])}b{int(f[4])}-C{C}-"
                              f"{'x'.join(map(str, lead))}-{str(dt)[6:]}" for f, C, lead, dt in CASES])
def test_forward_backward_matches_float64_reference(flags, C, lead, dtype):
    inp = _inputs(flags, C, lead, dtype)
    eps = 1e-6 if C % 2 else 1e-5
    dy = torch.randn(*lead, C).to(dtype).double()
    ds = torch.randn(*lead, C).to(dtype).double()
    _check_against_reference(inp, dtype, eps, dy, ds)


def test_eps_is_used_as_given():
    # A large eps changes y visibly; a kernel that clamps or replaces eps fails the rule.
    inp = _inputs((True, True, False, True, True), 192, (7,), torch.float32)
    dy, ds = torch.randn(7, 192).double(), torch.randn(7, 192).double()
    _check_against_reference(inp, torch.float32, 0.5, dy, ds)


@pytest.mark.parametrize("use", ["y_only", "s_only"])
def test_gradient_into_one_output_only(use):
    """ds is None (s unused) or dy is None (y unused): the op must not need both."""
    inp = _inputs((True, True, True, True, True), 384, (2, 5), torch.float32)
    ref64 = _copy(inp, torch.float64)
    y, s = _ours(inp, 1e-6)
    y64, s64 = _ref(ref64, 1e-6)
    out, out64 = (y, y64) if use == "y_only" else (s, s64)
    w = torch.randn(out.shape, dtype=torch.float64)
    leaves, leaves64 = _leaves(inp), _leaves(ref64)
    got = torch.autograd.grad((out.double() * w).sum(), list(leaves.values()), allow_unused=True)
    want = torch.autograd.grad((out64 * w).sum(), list(leaves64.values()), allow_unused=True)
    for name, a, b in zip(leaves, got, want):
        if b is None:
            assert a is None or not a.abs().any(), name
        else:
            assert_close_by_rule(a, b.float(), b, f"d{name}")


def test_non_contiguous_inputs_and_broadcast_gradient():
    """Row-strided x, a transposed residual, and y.sum()'s stride-0 gradient."""
    C = 192
    base = torch.randn(7, 2 * C, requires_grad=True)
    x = base[:, :C]  # row stride 2C
    residual = torch.randn(C, 7).t().requires_grad_()  # column stride 7
    weight = torch.randn(C, requires_grad=True)
    y, s = ln_op.residual_layer_norm(x, weight, None, 1e-6, residual, None, None)
    (y.sum() + s.sum()).backward()
    x64 = x.detach().double().requires_grad_()
    r64 = residual.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64, s64 = reference.residual_layer_norm(x64, w64, None, 1e-6, residual=r64)
    (y64.sum() + s64.sum()).backward()
    assert_close_by_rule(y, y64.float(), y64, "y")
    assert_close_by_rule(base.grad[:, :C], x64.grad.float(), x64.grad, "dx")
    assert not base.grad[:, C:].any()
    assert_close_by_rule(residual.grad, r64.grad.float(), r64.grad, "dresidual")
    assert_close_by_rule(weight.grad, w64.grad.float(), w64.grad, "dweight")


def test_backward_is_bitwise_deterministic():
    inp = _inputs((True, True, True, True, True), 1000, (2, 197), torch.bfloat16)
    dy = torch.randn(2, 197, 1000).to(torch.bfloat16)
    ds = torch.randn(2, 197, 1000).to(torch.bfloat16)
    runs = []
    for _ in range(2):
        y, s = _ours(inp, 1e-6)
        leaves = _leaves(inp)
        runs.append((y, s) + torch.autograd.grad((y, s), list(leaves.values()), (dy, ds)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_res", [False, True])
def test_constant_rows_give_bias_exactly(dtype, has_res):
    C = 1000
    x = torch.randn(6, C).to(dtype)
    # Constants whose fp32 sum over 1000 elements is not exact: a plain mean would leave a
    # residue that rstd ≈ 1/sqrt(eps) blows up.
    for row, value in zip((0, 2, 5), (0.1, -1234.567, 3.3)):
        x[row] = value
    residual = None
    if has_res:
        residual = x.clone()
        x = torch.zeros_like(x)
        x[1] = torch.randn(C).to(dtype)
    weight = torch.randn(C).to(dtype)
    bias = torch.randn(C).to(dtype)
    y, s = ln_op.residual_layer_norm(x, weight, bias, 1e-6, residual,
                                     torch.full((C,), 0.5, dtype=dtype) if has_res else None, None)
    assert not torch.isnan(y).any()
    for row in (0, 2, 5):
        assert torch.equal(y[row], bias), f"row {row}"
    assert not torch.equal(y[1], bias)


@pytest.mark.parametrize("flags", [(True, True, True, True, True), (False, False, False, False, False)],
                         ids=["all", "none"])
def test_opcheck_forward_op(flags):
    inp = _inputs(flags, 192, (2, 3), torch.float32)
    args = (inp["x"], inp["weight"], inp["bias"], 1e-6, inp["residual"], inp["layer_scale"],
            inp["sample_scale"])
    torch.library.opcheck(torch.ops.vit_fast.residual_layer_norm.default, args)
