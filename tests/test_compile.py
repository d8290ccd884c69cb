"""torch.compile(fullgraph=True) over vit_fast ViTs: no graph break, same outputs and gradients.

Inductor compiles once (the expensive case, ~30 s cold on 2 cores); the other cases use
aot_eager, which still runs Dynamo (graph breaks), fake tensors (register_fake) and AOTAutograd
(register_autograd), i.e. everything torch.compile needs from vit_fast.
"""
import copy
import os

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

import vit_fast
from vit_fast import dispatch
from tiny_models import tiny_vit
from tolerance import assert_close_by_rule


def _vit(depth=2, **kw):
    return tiny_vit(depth=depth, **kw)


def _step(fn, model, x, seed=1):
    """Output and parameter gradients of one forward/backward, drop-path draws seeded."""
    model.zero_grad()
    torch.manual_seed(seed)
    y = fn(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    (y1, g1), (y0, g0) = got, want
    torch.testing.assert_close(y1, y0, rtol=rtol, atol=atol)
    assert g1.keys() == g0.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_inductor_fullgraph_converted_training_step():
    """convert(timm ViT) with LayerScale and drop-path, training, inductor, reference backend."""
    model = vit_fast.convert(_vit(depth=1, init_values=0.1, drop_path_rate=0.2)).train()
    assert "blocks.0" in model.vit_fast_summary.swapped
    x = torch.randn(3, 3, 16, 16)
    want = _step(model, model, x)
    # fallback_random: inductor draws the drop-path masks with torch's RNG, as eager does, so the
    # same seed drops the same samples.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        got = _step(compiled, model, x)
    _assert_same(got, want)


def test_block_fn_fullgraph_no_graph_break_with_policy_and_env(monkeypatch):
    """block_fn=vit_fast.Block; use_backend() inside the compiled region, VIT_FAST_BACKEND set."""
    model = _vit(block_fn=vit_fast.Block, init_values=0.1, drop_path_rate=0.2).train()
    x = torch.randn(3, 3, 16, 16)
    monkeypatch.setenv("VIT_FAST_BACKEND", "auto")

    def fn(x):
        with vit_fast.use_backend("reference"):
            return model(x)

    explanation = torch._dynamo.explain(fn)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    want = _step(fn, model, x)
    got = _step(torch.compile(fn, fullgraph=True, backend="aot_eager"), model, x)
    _assert_same(got, want)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_compiled_eval_matches_timm():
    timm_model = _vit(init_values=0.1).eval()
    model = vit_fast.convert(copy.deepcopy(timm_model)).eval()
    x = torch.randn(2, 3, 16, 16)
    backend = AotEagerAndRecordGraphs()
    with torch.no_grad():
        want = timm_model(x)
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if dispatch.extension_missing_reason("cpu") is None:  # auto runs the C++ patch embed on CPU
        assert "vit_fast.patch_embed_fwd" in backend.graphs[0].code


# --- the triton backend under the interpreter ----------------------------------------------------

def _triton_missing_reason():
    """Why the triton backend cannot run the four ops here, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (tests/conftest.py sets it before triton is imported)"
    qkv = torch.randn(1, 3, 12)
    x, w = torch.randn(1, 3, 4), torch.ones(4)
    try:
        with vit_fast.use_backend("triton"):
            vit_fast.fused_qkv_attention(qkv, 2)
            vit_fast.residual_layer_norm(x, w, w, 1e-6, residual=x)
            vit_fast.gelu_mlp(x, torch.randn(8, 4), None, torch.randn(4, 8), None)
    except (NotImplementedError, ImportError, RuntimeError) as exc:
        return f"the triton ops are not available: {exc}"
    return None


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_triton_backend_compiled_block_matches_eager():
    reason = _triton_missing_reason()
    if reason:
        pytest.skip(reason)
    model = _vit(depth=1, block_fn=vit_fast.Block, init_values=0.1, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 16, 16)

    def fn(x):
        with vit_fast.use_backend("triton"):
            return model(x)

    backend = AotEagerAndRecordGraphs()
    got = _step(torch.compile(fn, fullgraph=True, backend=backend), model, x)
    want = _step(fn, model, x)
    _assert_same(got, want)
    graph = "\n".join(g.code for g in backend.graphs)
    for op in ("fused_qkv_attention", "layer_norm_linear", "residual_layer_norm_mlp"):
        assert f"vit_fast.{op}" in graph, f"the compiled graph does not call the {op} kernel op"
    # ... and the kernels agree with the float64 reference by docs/design.md's rule.
    model64 = copy.deepcopy(model).double()
    with vit_fast.use_backend("reference"):
        ref64 = _step(model64, model64, x.double())
        ref32 = _step(model, model, x)
    assert_close_by_rule(got[0], ref32[0], ref64[0], "logits")
    for name in ref64[1]:
        assert_close_by_rule(got[1][name], ref32[1][name], ref64[1][name], name)


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")
def test_backend_policy_change_recompiles(monkeypatch):
    """The policy is read while tracing: switching it must not reuse the other policy's graph."""
    reason = _triton_missing_reason()
    if reason:
        pytest.skip(reason)
    backend = AotEagerAndRecordGraphs()
    fn = torch.compile(lambda qkv: vit_fast.fused_qkv_attention(qkv, 2), fullgraph=True,
                       backend=backend)
    qkv = torch.randn(1, 5, 24)
    with vit_fast.use_backend("reference"):
        want = fn(qkv)
    with vit_fast.use_backend("triton"):
        got = fn(qkv)
    monkeypatch.setenv("VIT_FAST_BACKEND", "triton")
    got_env = fn(qkv)  # no use_backend(): the environment variable decides
    assert len(backend.graphs) == 3
    assert "vit_fast" not in backend.graphs[0].code
    assert "vit_fast.fused_qkv_attention" in backend.graphs[1].code
    assert "vit_fast.fused_qkv_attention" in backend.graphs[2].code
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_env, want, rtol=1e-5, atol=1e-6)


def test_traced_check_messages_read_no_outer_variable():
    """torch 2.11's dynamo (the declared floor) cannot trace a torch._check message that reads a
    variable from outside its lambda: every compiled call would break its graph there (make compat
    found it). The messages are constants."""
    import ast
    from pathlib import Path
    root = Path(vit_fast.__file__).resolve().parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "_check" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Lambda)
                    and any(isinstance(n, ast.Name) for n in ast.walk(node.args[1].body))):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == [], offenders
