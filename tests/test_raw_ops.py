"""The registered ops (torch.ops.vit_fast.*) check their own arguments: called directly, with
shapes, dtypes or devices their kernels were not written for, they raise ValueError/TypeError
naming the argument instead of reading out of bounds or returning garbage -- in the real
implementation and in the fake one torch.compile traces with. Valid calls still pass opcheck."""
import pytest
import torch

import vit_fast.ops.attention  # noqa: F401  (registers the ops)
import vit_fast.ops.gelu_mlp  # noqa: F401
import vit_fast.ops.layer_norm  # noqa: F401
import vit_fast.ops.layer_norm_linear  # noqa: F401
import vit_fast.ops.patch_embed as pe
import vit_fast.ops.residual_layer_norm_mlp  # noqa: F401

ops = torch.ops.vit_fast
BAD = (ValueError, TypeError)
r = torch.randn


def _ln(**over):
    kw = dict(x=r(4, 8), weight=r(8), bias=r(8), eps=1e-6, residual=None, layer_scale=None,
              sample_scale=None)
    kw.update(over)
    return lambda: ops.residual_layer_norm(*kw.values())


def _ln_bwd(**over):
    kw = dict(dy=r(4, 8), ds=r(4, 8), s=r(4, 8), x=r(4, 8), mean=r(4), rstd=r(4), weight=r(8),
              layer_scale=r(8), sample_scale=r(4), residual_dtype=torch.float32,
              bias_dtype=torch.float32)
    kw.update(over)
    return lambda: ops.residual_layer_norm_backward(*kw.values())


def _mlp(**over):
    kw = dict(x=r(2, 3, 6), fc1_weight=r(10, 6), fc1_bias=r(10), fc2_weight=r(6, 10),
              fc2_bias=r(6), approximate="none", residual=r(2, 3, 6), layer_scale=r(6),
              sample_scale=r(2), save_pre=True)
    kw.update(over)
    return lambda: ops.gelu_mlp(*kw.values())


def _mlp_bwd(**over):
    kw = dict(grad=r(2, 3, 6), x=r(2, 3, 6), fc1_weight=r(10, 6), fc2_weight=r(6, 10),
              fc2_bias=r(6), pre=r(6, 10), layer_scale=r(6), sample_scale=r(2),
              approximate="none", has_residual=True, needs_fc1_bias=True, needs_fc2_bias=True,
              needs_layer_scale=True, needs_sample_scale=True)
    kw.update(over)
    return lambda: ops.gelu_mlp_backward(**kw)


def _attn(**over):
    kw = dict(qkv=r(2, 5, 48), num_heads=2, scale=0.25, dropout_p=0.0, seed=None)
    kw.update(over)
    return lambda: ops.fused_qkv_attention(*kw.values())


def _attn_bwd(**over):
    kw = dict(dout=r(2, 5, 16), qkv=r(2, 5, 48), out=r(2, 5, 16), lse=r(2, 2, 5), num_heads=2,
              scale=0.25, dropout_p=0.0, seed=None)
    kw.update(over)
    return lambda: ops.fused_qkv_attention_backward(*kw.values())


def _lnl(**over):
    kw = dict(x=r(4, 8), ln_weight=r(8), ln_bias=r(8), eps=1e-6, weight=r(12, 8), bias=r(12))
    kw.update(over)
    return lambda: ops.layer_norm_linear(*kw.values())


def _pe(**over):
    kw = dict(images=r(2, 3, 8, 8), weight=r(5, 3, 4, 4), bias=r(5), patch_size=[4, 4],
              pos_embed=None, mean=None, std=None)
    kw.update(over)
    return lambda: ops.patch_embed_fwd(*kw.values())


BAD_CALLS = {
    "ln weight [3] for C=8": (_ln(weight=r(3)), "weight"),
    "ln residual [1,8] for x [4,8]": (_ln(residual=r(1, 8)), "residual"),
    "ln sample_scale [3] for B=4": (_ln(residual=r(4, 8), sample_scale=r(3)), "sample_scale"),
    "ln f16 bias": (_ln(bias=r(8).half()), "bias"),
    "ln f64 x": (_ln(x=r(4, 8).double(), weight=None, bias=None), "x"),
    "ln eps nan": (_ln(eps=float("nan")), "eps"),
    "ln meta weight": (_ln(weight=torch.empty(8, device="meta")), "weight"),
    "ln C above max": (_ln(x=r(1, 8200), weight=None, bias=None), "maximum"),
    "ln bwd mean [3]": (_ln_bwd(mean=r(3)), "mean"),
    "ln bwd layer_scale without x": (_ln_bwd(x=None), "x"),
    "ln bwd dy shape": (_ln_bwd(dy=r(4, 7)), "dy"),
    "mlp fc1 [10,7] for x [..,6]": (_mlp(fc1_weight=r(10, 7)), "fc1_weight"),
    "mlp fc2 [6,9] after fc1 [10,6]": (_mlp(fc2_weight=r(6, 9)), "fc2_weight"),
    "mlp fc1_bias [9]": (_mlp(fc1_bias=r(9)), "fc1_bias"),
    "mlp residual [1,3,6]": (_mlp(residual=r(1, 3, 6)), "residual"),
    "mlp layer_scale [5]": (_mlp(layer_scale=r(5)), "layer_scale"),
    "mlp f64 x": (_mlp(x=r(2, 3, 6).double()), "x must be"),
    "mlp f16 fc2_bias": (_mlp(fc2_bias=r(6).half()), "fc2_bias"),
    "mlp approximate": (_mlp(approximate="fast"), "approximate"),
    "mlp bwd pre [5,10]": (_mlp_bwd(pre=r(5, 10)), "pre"),
    "mlp bwd grad [2,3,5]": (_mlp_bwd(grad=r(2, 3, 5)), "grad"),
    "attn heads do not divide": (_attn(num_heads=5), "num_heads"),
    "attn 2-D qkv": (_attn(qkv=r(5, 48)), "qkv"),
    "attn f8 qkv": (_attn(qkv=r(2, 5, 48).to(torch.float8_e4m3fn)), "qkv"),
    "attn nan scale": (_attn(scale=float("nan")), "scale"),
    "attn dropout without seed": (_attn(dropout_p=0.1), "seed"),
    "attn bwd lse [2,2,4]": (_attn_bwd(lse=r(2, 2, 4)), "lse"),
    "attn bwd out shape": (_attn_bwd(out=r(2, 5, 15)), "out"),
    "lnl weight [12,7]": (_lnl(weight=r(12, 7)), "weight"),
    "lnl bias [11]": (_lnl(bias=r(11)), "bias"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_raw_op_rejects(case):
    call, word = BAD_CALLS[case]
    with pytest.raises(BAD, match=word):
        call()


@pytest.mark.parametrize("case", ["ln weight [3] for C=8", "mlp fc1 [10,7] for x [..,6]",
                                  "attn heads do not divide", "ln bwd mean [3]",
                                  "mlp bwd pre [5,10]", "lnl weight [12,7]"])
def test_fake_rejects_too(case):
    """Under FakeTensorMode (what torch.compile traces with) the same calls raise the same way."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    call, word = BAD_CALLS[case]
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(BAD, match=word):
        call()


@pytest.mark.skipif(not pe.extension_available(), reason="vit_fast._C is not built")
@pytest.mark.parametrize("over,word", [
    (dict(weight=torch.empty(5, 3, 4, 4, device="meta")), "device|on meta|on cpu"),
    (dict(bias=torch.empty(5, device="meta")), "bias"),
    (dict(images=torch.empty(2, 3, 8, 8, device="meta")), "images"),
])
def test_patch_embed_op_rejects_mixed_cpu_and_meta(over, word):
    with pytest.raises(BAD, match=word):
        _pe(**over)()


@pytest.mark.skipif(not pe.extension_available(), reason="vit_fast._C is not built")
def test_patch_embed_fake_checks_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(BAD, match="pos_embed"):
            _pe(pos_embed=r(1, 3, 5))()
        with pytest.raises(BAD, match="grad_out"):
            ops.patch_embed_bwd_weight(r(2, 4, 6), r(2, 3, 8, 8), r(5, 3, 4, 4), [4, 4], None, None)


def test_opcheck_backward_ops():
    """The checks leave valid calls alone (opcheck runs them eagerly, faked, and compiled)."""
    ln_bwd = (r(4, 8), r(4, 8), r(4, 8), r(4, 8), r(4), r(4).abs() + 0.5, r(8), r(8), r(4),
              torch.float32, torch.float32)
    torch.library.opcheck(ops.residual_layer_norm_backward.default, ln_bwd)
    mlp_bwd = (r(2, 3, 6), r(2, 3, 6), r(10, 6), r(6, 10), r(6), r(6, 10), r(6), r(2))
    torch.library.opcheck(ops.gelu_mlp_backward.default, mlp_bwd, dict(
        approximate="none", has_residual=True, needs_fc1_bias=True, needs_fc2_bias=True,
        needs_layer_scale=True, needs_sample_scale=True))
    torch.library.opcheck(ops.layer_norm_linear.default,
                          (r(4, 8, requires_grad=True), r(8), r(8), 1e-6, r(12, 8), r(12)))


def test_checks_trace_with_dynamic_shapes():
    """The checks compile into the graph (guards / runtime asserts on symbolic sizes): no graph
    break, and the compiled function still gives the eager results at two batch sizes."""
    torch._dynamo.reset()

    def fn(x, w, b, w1, w2):
        y, _, _, _ = ops.residual_layer_norm(x, w, b, 1e-6, None, None, None)
        return ops.gelu_mlp(y, w1, None, w2, None, "tanh", x, None, None, False)[0]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    w, b, w1, w2 = r(8), r(8), r(16, 8), r(8, 16)
    for rows in (3, 5):
        x = r(2, rows, 8)
        torch.testing.assert_close(compiled(x, w, b, w1, w2), fn(x, w, b, w1, w2))
    # a bad shape is caught while tracing (dynamo wraps the op's ValueError in its own error)
    with pytest.raises(Exception, match=r"ValueError\('vit_fast::gelu_mlp: fc1_weight"):
        compiled(r(2, 4, 8), w, b, r(16, 7), w2)
    torch._dynamo.reset()
