"""Triton GELU MLP (vit_fast.ops.gelu_mlp) under the interpreter against the float64 reference:
output and every gradient, saved-for-backward contents, determinism, opcheck."""
import pytest
import torch
import torch.nn.functional as F

from tolerance import assert_close_by_rule
from vit_fast import reference
from vit_fast.ops.gelu_mlp import gelu_mlp, gelu_mlp_op

NAMES = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "residual", "layer_scale",
         "sample_scale")


def make_inputs(lead, C, H, dtype, *, c_out=None, bias=True, residual=False, layer_scale=False,
                sample_scale=False, noncontig=False):
    c_out = c_out or C
    x = torch.randn(*lead, C)
    if noncontig:  # a transposed view of [C, ...] data, like a channels-first activation
        x = torch.randn(C, *lead).movedim(0, -1)
    t = {
        "x": x,
        "fc1_weight": torch.randn(H, C) * C ** -0.5,
        "fc1_bias": torch.randn(H) * 0.5 if bias else None,
        "fc2_weight": torch.randn(c_out, H) * H ** -0.5,
        "fc2_bias": torch.randn(c_out) * 0.5 if bias else None,
        "residual": torch.randn(*lead, c_out) if residual else None,
        "layer_scale": torch.rand(c_out) + 0.1 if (residual and layer_scale) else None,
        # drop-path: dropped samples are 0, kept ones 1/keep_prob
        "sample_scale": (torch.tensor([1.25, 0.0, 1.25, 1.25])[torch.arange(lead[0]) % 4]
                         if (residual and sample_scale) else None),
    }
    if noncontig:
        t["fc1_weight"] = t["fc1_weight"].t().contiguous().t()
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in t.items()}


def run(fn, t, approximate, grad, upcast=False):
    """Output and the gradient of every given input, for ours (fn=None) or the reference."""
    if upcast:
        t = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    args = [t[n] for n in NAMES]
    if fn is None:
        out = gelu_mlp(*args[:5], approximate, *args[5:])
    else:
        out = fn(*args[:5], approximate=approximate, residual=args[5], layer_scale=args[6],
                 sample_scale=args[7])
    given = [n for n in NAMES if t[n] is not None]
    grads = torch.autograd.grad(out, [t[n] for n in given], grad.to(out.dtype))
    return out, dict(zip(given, grads))


def check(t, approximate):
    out, grads = run(None, t, approximate, _grad_for(t))
    same, same_grads = run(reference.gelu_mlp, t, approximate, _grad_for(t))
    ref64, ref_grads = run(reference.gelu_mlp, t, approximate, _grad_for(t), upcast=True)
    assert out.dtype == t["x"].dtype
    assert_close_by_rule(out, same, ref64, "out")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].dtype == t[name].dtype, name
        assert_close_by_rule(grads[name], same_grads[name], ref_grads[name].to(t[name].dtype), name)


def _grad_for(t):
    lead = t["x"].shape[:-1]
    c_out = t["fc2_weight"].shape[0]
    g = torch.Generator().manual_seed(1)
    return torch.randn(*lead, c_out, generator=g)


# A covering set: every M, width, dtype, GELU form and epilogue option appears; the large widths
# only twice (interpreter GEMMs are slow).
CASES = [
    # lead,      C,   H,    dtype,          approx, options
    ((1, 1),     64,  256,  torch.float32,  "none", dict()),
    ((1, 1),     192, 768,  torch.bfloat16, "tanh", dict(residual=True, layer_scale=True, sample_scale=True)),
    ((3, 11),    64,  256,  torch.float16,  "tanh", dict(bias=False, residual=True, sample_scale=True)),
    ((3, 11),    200, 800,  torch.bfloat16, "tanh", dict(residual=True, layer_scale=True, sample_scale=True)),
    ((3, 11),    200, 800,  torch.float32,  "none", dict(residual=True, layer_scale=True, sample_scale=True)),
    ((33,),      64,  256,  torch.float16,  "none", dict(c_out=96, noncontig=True)),
    ((1, 197),   192, 768,  torch.float16,  "none", dict(residual=True, layer_scale=True)),
    ((3, 11),    384, 1536, torch.bfloat16, "none", dict(residual=True, layer_scale=True, sample_scale=True)),
    ((4, 5),     200, 800,  torch.float32,  "tanh", dict(bias=False, residual=True)),
    ((4, 5),     64,  256,  torch.bfloat16, "none", dict(bias=False)),
]


@pytest.mark.parametrize("lead,C,H,dtype,approximate,opts", CASES,
                         ids=[f"M{torch.Size(c[0]).numel()}-{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}-"
                              + ("+".join(k for k, v in c[5].items() if v) or "plain") for c in CASES])
def test_gelu_mlp_matches_float64_reference(lead, C, H, dtype, approximate, opts):
    check(make_inputs(lead, C, H, dtype, **opts), approximate)


def test_saved_for_backward_is_pre_activation_not_gelu_output():
    t = make_inputs((2, 9), 64, 256, torch.float32, residual=True, layer_scale=True,
                    sample_scale=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        out = gelu_mlp(*[t[n] for n in NAMES[:5]], "none", *[t[n] for n in NAMES[5:]])
    x2 = t["x"].detach().reshape(-1, 64)
    pre = F.linear(x2, t["fc1_weight"].detach(), t["fc1_bias"].detach())
    act = F.gelu(pre)
    hidden = [s for s in saved if s.shape[-1] == 256 and s.numel() == pre.numel()]
    assert len(hidden) == 1, f"expected only the pre-activation at hidden width, got {len(hidden)}"
    torch.testing.assert_close(hidden[0].reshape(pre.shape), pre, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden[0].reshape(pre.shape), act, atol=1e-3)
    # x, both weights, fc2's bias, pre, layer_scale, sample_scale; nothing else
    assert {s.data_ptr() for s in saved} <= {t[n].data_ptr() for n in NAMES if t[n] is not None} | {
        hidden[0].data_ptr()}
    out.sum().backward()  # the saved set is enough for backward


def test_no_pre_activation_kept_without_grad():
    t = make_inputs((2, 5), 64, 256, torch.float32)
    args = [t[n].detach() if t[n] is not None else None for n in NAMES]
    out, pre = gelu_mlp_op(*args[:5], "none", *args[5:], False)
    assert pre.numel() == 0
    ref = reference.gelu_mlp(*args[:5])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    t = make_inputs((3, 11), 64, 256, torch.bfloat16, residual=True, layer_scale=True,
                    sample_scale=True)
    g = _grad_for(t)
    _, first = run(None, t, "tanh", g)
    _, second = run(None, t, "tanh", g)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_opcheck_forward_op():
    t = make_inputs((2, 3), 64, 256, torch.float32, residual=True, layer_scale=True,
                    sample_scale=True)
    args = tuple(t[n] for n in NAMES[:5]) + ("tanh",) + tuple(t[n] for n in NAMES[5:]) + (True,)
    torch.library.opcheck(gelu_mlp_op, args)
