"""The cuBLAS-GEMM GELU MLP (vit_fast.ops.gelu_mlp_cublas, kernels/gelu_elementwise.py) and the
tuned op under the interpreter: tolerance rule against the float64 reference for every candidate,
the same tensors saved for backward as the Triton op (counted), determinism, opcheck, the
`cublas` backend policy (op and Block), and AOT builds of the new elementwise kernels."""
import pytest
import torch

import vit_fast
from vit_fast.kernels import _device
from test_gelu_mlp_triton import NAMES, _grad_for, make_inputs
from tolerance import assert_close_by_rule
from vit_fast import reference, tuning
from vit_fast.ops import gelu_mlp as triton_op
from vit_fast.ops import gelu_mlp_cublas as cublas_op
from vit_fast.ops import gelu_mlp_tuned as tuned_op
from vit_fast.ops import residual_layer_norm_mlp as block_mlp_op

IMPLS = {"triton": triton_op.gelu_mlp, "cublas": cublas_op.gelu_mlp,
         "tuned": tuned_op.gelu_mlp_tuned}


def run(impl, t, approximate, grad):
    args = [t[n] for n in NAMES]
    if impl == "reference" or impl == "reference64":
        if impl == "reference64":
            args = [a.detach().double().requires_grad_() if a is not None else None for a in args]
        out = reference.gelu_mlp(*args[:5], approximate=approximate, residual=args[5],
                                 layer_scale=args[6], sample_scale=args[7])
    else:
        out = IMPLS[impl](*args[:5], approximate, *args[5:])
    given = [i for i, a in enumerate(args) if a is not None]
    grads = torch.autograd.grad(out, [args[i] for i in given], grad.to(out.dtype))
    return out, {NAMES[i]: g for i, g in zip(given, grads)}


CASES = [
    # lead,   C,   H,   dtype,          approx, options
    ((1, 1),  64,  256, torch.float32,  "none", dict()),
    ((3, 11), 64,  256, torch.float16,  "tanh", dict(bias=False, residual=True, sample_scale=True)),
    ((3, 11), 200, 800, torch.bfloat16, "tanh", dict(residual=True, layer_scale=True, sample_scale=True)),
    ((33,),   64,  256, torch.float16,  "none", dict(c_out=96, noncontig=True)),
    ((4, 5),  40,  160, torch.float32,  "none", dict(residual=True, layer_scale=True, sample_scale=True)),
]


@pytest.mark.parametrize("impl", ["cublas", "tuned"])
@pytest.mark.parametrize("lead,C,H,dtype,approximate,opts", CASES,
                         ids=[f"M{torch.Size(c[0]).numel()}-{c[1]}x{c[2]}-{str(c[3])[6:]}-{c[4]}"
                              for c in CASES])
def test_candidate_matches_float64_reference(impl, lead, C, H, dtype, approximate, opts):
    t = make_inputs(lead, C, H, dtype, **opts)
    g = _grad_for(t)
    out, grads = run(impl, t, approximate, g)
    same, same_grads = run("reference", t, approximate, g)
    ref64, ref_grads = run("reference64", t, approximate, g)
    assert out.dtype == dtype
    assert_close_by_rule(out, same, ref64, "out")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].dtype == t[name].dtype, name
        assert_close_by_rule(grads[name], same_grads[name], ref_grads[name].to(t[name].dtype), name)


def saved_for_backward(impl, t):
    """(count, unique bytes, sorted (shape, dtype)) of what autograd saves, parameters included."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        IMPLS[impl](*[t[n] for n in NAMES[:5]], "none", *[t[n] for n in NAMES[5:]])
    storages = {s.untyped_storage().data_ptr(): s.untyped_storage().nbytes() for s in saved}
    return len(saved), sum(storages.values()), sorted((tuple(s.shape), str(s.dtype)) for s in saved)


@pytest.mark.parametrize("opts", [dict(), dict(residual=True, layer_scale=True, sample_scale=True)])
def test_every_candidate_saves_the_same_tensors(opts):
    t = make_inputs((2, 9), 64, 256, torch.bfloat16, **opts)
    counted = {impl: saved_for_backward(impl, t) for impl in IMPLS}
    assert counted["cublas"] == counted["triton"] == counted["tuned"], counted
    n, nbytes, _ = counted["triton"]
    # x, W1, W2, b2 and the pre-activation [18, 256]; ls and ss with the residual options
    assert n == (7 if opts else 5) and nbytes > 18 * 256 * 2


def test_backward_is_deterministic():
    t = make_inputs((3, 11), 64, 256, torch.bfloat16, residual=True, layer_scale=True,
                    sample_scale=True)
    g = _grad_for(t)
    _, first = run("cublas", t, "tanh", g)
    _, second = run("cublas", t, "tanh", g)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_triton_forward_feeds_cublas_backward():
    """The saved contract is shared: the tuned op may pick the forward and backward separately."""
    t = make_inputs((2, 5), 64, 256, torch.float32, residual=True, layer_scale=True,
                    sample_scale=True)
    args = [t[n].detach() for n in NAMES]
    _, pre = triton_op.gelu_mlp_op(*args[:5], "none", *args[5:], True)
    g = _grad_for(t).reshape(2, 5, 64)
    opts = dict(approximate="none", has_residual=True, needs_fc1_bias=True, needs_fc2_bias=True,
                needs_layer_scale=True, needs_sample_scale=True)
    tri = triton_op.gelu_mlp_backward_op(g, args[0], args[1], args[3], args[4], pre, args[6],
                                         args[7], **opts)
    cub = cublas_op.gelu_mlp_cublas_backward_op(g, args[0], args[1], args[3], args[4], pre,
                                                args[6], args[7], **opts)
    for a, b in zip(tri, cub):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", [cublas_op.gelu_mlp_cublas_op, tuned_op.gelu_mlp_tuned.op])
def test_opcheck(op):
    t = make_inputs((2, 3), 64, 256, torch.float32, residual=True, layer_scale=True,
                    sample_scale=True)
    args = tuple(t[n] for n in NAMES[:5]) + ("tanh",) + tuple(t[n] for n in NAMES[5:]) + (True,)
    torch.library.opcheck(op, args)


def test_cublas_policy_runs_the_cublas_launchers(monkeypatch):
    from vit_fast.kernels import gelu_elementwise
    calls = []
    for name in ("gelu_mlp_cublas_fwd", "gelu_mlp_cublas_bwd"):
        orig = getattr(gelu_elementwise, name)
        monkeypatch.setattr(gelu_elementwise, name,
                            lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    t = make_inputs((2, 3), 64, 256, torch.float32, residual=True)
    with vit_fast.use_backend("cublas"):
        out = vit_fast.gelu_mlp(*[t[n] for n in NAMES[:5]], residual=t["residual"])
    out.sum().backward()
    assert calls == ["gelu_mlp_cublas_fwd", "gelu_mlp_cublas_bwd"]


def test_cublas_policy_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_device, "_INTERPRET", False)  # as if unset at import
    x = torch.randn(2, 8)
    with vit_fast.use_backend("cublas"), pytest.raises(RuntimeError, match="'cublas'"):
        vit_fast.gelu_mlp(x, torch.randn(16, 8), None, torch.randn(8, 16), None)


def test_block_with_cublas_policy_matches_triton_policy():
    """The Block's residual->LayerNorm->MLP op runs the cuBLAS launchers under 'cublas'."""
    torch.manual_seed(0)
    blk = vit_fast.Block(32, 2, init_values=0.5).train()
    x = torch.randn(2, 5, 32, requires_grad=True)
    outs = {}
    for policy in ("triton", "cublas"):
        with vit_fast.use_backend(policy):
            out = blk(x)
        grads = torch.autograd.grad(out, [x, blk.mlp.fc1.weight, blk.ls2.gamma], torch.ones_like(out))
        outs[policy] = (out, *grads)
    assert tuned_op.mlp_launchers("cublas")[0] is tuned_op.FWD["cublas"]
    for a, b in zip(outs["triton"], outs["cublas"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_block_memory_ratio_holds_with_cublas_policy(monkeypatch):
    """`bench memory --backend cublas` (fake CUDA): the cuBLAS launchers run and save the same
    bytes as the triton policy's."""
    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch (this one is CPU-only)")
    from vit_fast.bench import memory
    policies = []
    real = tuned_op.mlp_launchers
    monkeypatch.setattr(block_mlp_op, "mlp_launchers",
                        lambda policy=None: policies.append(vit_fast.dispatch.current_policy())
                        or real(policy))
    rows = {}
    for backend in ("triton", "cublas"):
        got, notes = memory.measure("test_vit", 2, torch.bfloat16, "fake-cuda", ("block",),
                                    backend=backend)
        rows[backend] = {r["impl"]: r for r in got}
    assert "cublas" in policies and "triton" in policies
    assert rows["cublas"]["vit_fast"]["bytes"] == rows["triton"]["vit_fast"]["bytes"]
    assert rows["cublas"]["vit_fast"]["ratio"] <= 0.65


def test_fc1_bias_grad_comes_from_the_dgelu_pass_not_a_second_read(monkeypatch):
    """db1 is summed from per-program partial rows the dGELU pass writes beside d_pre (the values
    it stores), not by a column sum that reads the [M, H] gradient back from memory; the sum is
    that of the stored d_pre and the same bits on every run."""
    from vit_fast.kernels import gelu_elementwise as ge
    t = make_inputs((3, 11), 64, 256, torch.bfloat16, residual=True, layer_scale=True,
                    sample_scale=True)
    args = [t[n].detach() for n in NAMES]
    out, pre = ge.gelu_mlp_cublas_fwd(*args[:5], "none", *args[5:], True)
    g = _grad_for(t).reshape(out.shape).to(out.dtype)
    read = []
    real_colsum = ge.colsum
    monkeypatch.setattr(ge, "colsum", lambda x, *a: read.append(tuple(x.shape)) or
                        real_colsum(x, *a))
    grads = [ge.gelu_mlp_cublas_bwd(g, args[0], args[1], args[3], args[4], pre, args[6],
                                    args[7], approximate="none", has_residual=True)
             for _ in range(2)]
    assert pre.shape not in read, read
    assert torch.equal(grads[0][2], grads[1][2])
    d_pre = torch.mm(g.reshape(-1, 64), (args[3].float() * args[6].float()[:, None])
                     .to(g.dtype))  # d_act, turned into d_pre in place by the dGELU pass:
    ge.gelu_backward(d_pre, pre, "none", args[7], 11, store_act=False)
    torch.testing.assert_close(grads[0][2].float(), d_pre.float().sum(0), rtol=1e-2, atol=1e-2)
