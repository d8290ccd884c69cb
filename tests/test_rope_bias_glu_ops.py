"""The public ops of issue 28 -- functional.rotary_qk, fused_qkv_attention(..., bias=) and
functional.glu_mlp -- on the triton backend (kernels under the interpreter, through the eager
twins and through the registered custom ops) against the reference backend: outputs and every
gradient, learnable sin/cos and the bias's gradient included; bad input named."""
import pytest
import torch

import vit_fast
from vit_fast import functional as F
from vit_fast.ops import attention_bias, glu_mlp as glu_ops, rotary_qk as rope_ops

F32 = torch.float32


def _angles(shape, D, half):
    f = torch.randn(*shape, D // 2) * 3
    angle = torch.cat([f, f], -1) if half else f.repeat_interleave(2, -1)
    return angle.sin(), angle.cos()


def _grads(fn, inputs, seed=1):
    """(out, grads of every input that requires grad) of fn(*inputs) against a fixed cotangent."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
              else t for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    wanted = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), torch.autograd.grad(out, wanted, g)


def _both(fn, inputs, atol=2e-5):
    with vit_fast.use_backend("reference"):
        ref = _grads(fn, inputs)
    with vit_fast.use_backend("triton"):
        ours = _grads(fn, inputs)
    torch.testing.assert_close(ours[0], ref[0], atol=atol, rtol=1e-4)
    assert len(ours[1]) == len(ref[1])
    for i, (a, b) in enumerate(zip(ours[1], ref[1])):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=f"gradient {i}")
    return ours


@pytest.mark.parametrize("half,npt,sin_shape", [(False, 1, ()), (True, 5, (2,)), (False, 0, (3, 1))])
def test_rotary_qk_matches_reference_with_learnable_sin_cos(half, npt, sin_shape):
    B, H, D, N = 3, 2, 8, 9
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    sin, cos = _angles((*sin_shape, N - npt), D, half)
    sin.requires_grad_(), cos.requires_grad_()
    out, (dqkv, dsin, dcos) = _both(
        lambda q, s, c: F.rotary_qk(q, H, s, c, num_prefix_tokens=npt, half=half),
        (qkv, sin, cos))
    assert dsin.shape == sin.shape and dcos.shape == cos.shape
    assert torch.equal(out[:, :npt], qkv[:, :npt].detach())  # prefix tokens pass through


def test_rotary_qk_custom_op_and_fixed_sin_cos():
    """The registered op (what torch.compile sees) gives the twin's gradients; with fixed
    sin/cos nothing but sin and cos is saved."""
    B, H, D, N = 2, 2, 8, 5
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    sin, cos = _angles((N - 1,), D, False)
    with vit_fast.use_backend("triton"):
        twin = rope_ops.rotary_qk(qkv, H, sin, cos, 1, False, op=rope_ops.RotaryFn.apply)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            op = rope_ops.rotary_qk(qkv, H, sin, cos, 1, False)
    assert {id(t.untyped_storage()) for t in saved} <= {id(sin.untyped_storage()),
                                                          id(cos.untyped_storage())}
    torch.testing.assert_close(op, twin)
    g = torch.randn_like(op)
    (a,) = torch.autograd.grad(op, qkv, g)
    (b,) = torch.autograd.grad(twin, qkv, g)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shared", [True, False])
def test_biased_attention_matches_reference_with_bias_gradient(shared):
    B, H, D, N = 2, 2, 8, 7
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    bias = torch.randn(*(() if shared else (B,)), H, N, N, requires_grad=True)
    out, (dqkv, dbias) = _both(lambda q, b: F.fused_qkv_attention(q, H, bias=b), (qkv, bias))
    assert dbias.shape == bias.shape


def test_biased_attention_custom_op_is_deterministic():
    B, H, D, N = 3, 2, 8, 6
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    bias = torch.randn(H, N, N, requires_grad=True)
    with vit_fast.use_backend("triton"):
        runs = [_grads(lambda q, b: attention_bias.biased_qkv_attention(q, H, D ** -0.5, 0.0,
                                                                          None, b), (qkv, bias))
                for _ in range(2)]
    assert torch.equal(runs[0][1][1], runs[1][1][1])


@pytest.mark.parametrize("form", ["packed", "packed_gate_last", "pair_norm"])
def test_glu_mlp_matches_reference(form):
    M, C, H = 7, 12, 10
    x = torch.randn(2, M, C, requires_grad=True)
    w2, b2 = torch.randn(C, H) * 0.3, torch.randn(C) * 0.1
    res = torch.randn(2, M, C, requires_grad=True)
    ls = torch.rand(C) + 0.5
    ss = torch.tensor([0.0, 2.0])
    for t in (w2, b2, ls, ss):
        t.requires_grad_()
    if form == "pair_norm":
        w1 = [torch.randn(H, C, requires_grad=True) * 0.3 for _ in range(2)]
        b1 = [torch.randn(H, requires_grad=True) * 0.1 for _ in range(2)]
        w1 = [t.detach().requires_grad_() for t in w1]
        b1 = [t.detach().requires_grad_() for t in b1]
        nw, nb = torch.rand(H, requires_grad=True), torch.randn(H, requires_grad=True)

        def fn(x, wg, wv, bg, bv, w2, b2, res, ls, ss, nw, nb):
            return F.glu_mlp(x, (wg, wv), (bg, bv), w2, b2, norm_weight=nw, norm_bias=nb,
                             norm_eps=1e-6, residual=res, layer_scale=ls, sample_scale=ss)
        _both(fn, (x, *w1, *b1, w2, b2, res, ls, ss, nw, nb))
    else:
        w1 = (torch.randn(2 * H, C) * 0.3).requires_grad_()
        b1 = (torch.randn(2 * H) * 0.1).requires_grad_()
        last = form == "packed_gate_last"

        def fn(x, w1, b1, w2, b2, res, ls, ss):
            return F.glu_mlp(x, w1, b1, w2, b2, gate_last=last, residual=res, layer_scale=ls,
                             sample_scale=ss)
        _both(fn, (x, w1, b1, w2, b2, res, ls, ss))


def test_glu_mlp_custom_op_matches_twin():
    M, C, H = 5, 8, 6
    x = torch.randn(M, C, requires_grad=True)
    w1, w2 = torch.randn(2 * H, C, requires_grad=True), torch.randn(C, H, requires_grad=True)
    with vit_fast.use_backend("triton"):
        a = glu_ops.glu_mlp(x, w1, None, w2, None, False, None, None, None, None, None, None)
        b = glu_ops.glu_mlp(x, w1, None, w2, None, False, None, None, None, None, None, None,
                            op=glu_ops.GluMlpFn.apply)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    for u, v in zip(torch.autograd.grad(a, (x, w1, w2), g), torch.autograd.grad(b, (x, w1, w2), g)):
        torch.testing.assert_close(u, v)


def test_bad_input_is_named():
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    sin, cos = _angles((4,), 8, False)
    with pytest.raises(ValueError, match="sin"):
        F.rotary_qk(qkv, 2, sin[:3], cos[:3], num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        F.rotary_qk(qkv, 2, sin, cos, num_prefix_tokens=9)
    with pytest.raises(ValueError, match="bias"):
        F.fused_qkv_attention(qkv, 2, bias=torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="fc2_weight"):
        F.glu_mlp(torch.randn(3, 4), torch.randn(6, 4), None, torch.randn(4, 5), None)
    with pytest.raises(ValueError, match="norm_eps"):
        F.glu_mlp(torch.randn(3, 4), torch.randn(6, 4), None, torch.randn(4, 3), None,
                  norm_weight=torch.ones(3))


def _opcheck_args(which):
    B, H, D, N = 2, 2, 8, 5
    qkv = torch.randn(B, N, 3 * H * D, requires_grad=True)
    if which == "rotary_qk":
        sin, cos = _angles((N - 1,), D, True)
        return qkv, H, sin.requires_grad_(), cos.requires_grad_(), 1, True
    if which == "biased_qkv_attention":
        return qkv, H, D ** -0.5, 0.0, None, None, torch.randn(H, N, N, requires_grad=True)
    x = torch.randn(3, 6, requires_grad=True)
    wg, wv = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    w2, nw = torch.randn(6, 4, requires_grad=True), torch.rand(4, requires_grad=True)
    return x, wg, wv, None, None, w2, None, None, None, None, False, nw, None, 1e-6, True


@pytest.mark.parametrize("which", ["rotary_qk", "biased_qkv_attention", "glu_mlp"])
def test_opcheck_of_the_new_custom_ops(which):
    """Schemas, fake implementations and autograd registrations agree with the kernels
    (torch.library.opcheck: what torch.compile and export rely on). It found the glu_mlp
    backward returning a pair's gate and value gradients as views of one tensor."""
    torch.library.opcheck(getattr(torch.ops.vit_fast, which).default, _opcheck_args(which))


def test_the_registered_ops_check_their_own_arguments():
    """Called directly (torch.ops.vit_fast.*), bad shapes raise naming the argument before any
    kernel reads past a tensor's end."""
    ops = torch.ops.vit_fast
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    sin, cos = _angles((4,), 8, False)
    with pytest.raises(ValueError, match="sin"):
        ops.rotary_qk(qkv, 2, sin[:3], cos[:3], 1, False)
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rotary_qk(torch.randn(2, 5, 3 * 2 * 7), 2, sin[:, :7], cos[:, :7], 1, False)
    with pytest.raises(ValueError, match="bias"):
        ops.biased_qkv_attention(qkv, 2, 0.3, 0.0, None, None, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="fc2_weight"):
        ops.glu_mlp(torch.randn(3, 6), torch.randn(8, 6), None, None, None, torch.randn(6, 5),
                    None, None, None, None, False, None, None, None, False)
