"""The AOT specs are the builds the launchers make: the same num_stages (triton's default where a
launcher passes none), every output dtype, every head dim real ViTs use. (Compiling them is
tests/test_aot_*.py; this only compares the specs with the launchers, so it needs no compiler.)"""
import ast
import inspect

import pytest
import torch

from aot_builds import ARCHS, archs_of, covering_jobs, family
from vit_fast.kernels import (attention, attention_aot, gelu_elementwise_aot, gelu_mlp_aot,
                              layer_norm, layer_norm_aot, matmul, qk_norm_aot)


def _launch_keywords(fn, kept_consts=None):
    """{kernel name: set of keyword names} of every ``kernel[grid](...)`` call in ``fn``'s source;
    a kept direct launch, ``kept(kernel, grid, consts)(...)``, passes the keys of its launcher's
    per-configuration constexprs (``kept_consts()``: one configuration's)."""
    tree = ast.parse(inspect.getsource(inspect.unwrap(fn)).lstrip())
    launches = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            name = getattr(node.func.value, "id", "")
            launches.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "kept" and node.args:
            name = getattr(node.args[0], "id", "")
            launches.setdefault(name, set()).update(kept_consts())
    return launches


# One configuration of each launcher's kept constexprs (the keys do not depend on the sizes).
_LN_BWD = (64, 768, None, 2, False, True, False, False, True, True)


@pytest.mark.parametrize("launcher, kernel, spec_kernels, kept_consts", [
    (layer_norm.residual_layer_norm_fwd, "residual_layer_norm_fwd_kernel", layer_norm_aot,
     lambda: layer_norm._fwd_launch(64, 768, None, True, False, False, True, True, True)[1]),
    (layer_norm.residual_layer_norm_bwd, "residual_layer_norm_bwd_kernel", layer_norm_aot,
     lambda: layer_norm._bwd_launch(*_LN_BWD)[2]),
    (layer_norm.residual_layer_norm_bwd, "layer_norm_param_grad_reduce_kernel", layer_norm_aot,
     lambda: layer_norm._bwd_launch(*_LN_BWD)[4]),
    (matmul.colsum, "colsum_kernel", gelu_mlp_aot, lambda: matmul.colsum_launch(64, 768, None,
                                                                                False)[2]),
    (attention.attention_bwd, "attention_bwd_delta_kernel", attention_aot,
     lambda: attention._bwd_launch(2, 197, 12, 64, torch.bfloat16, False, False, False, None,
                                   None)[2]),
])
def test_specs_use_the_launchers_num_stages(launcher, kernel, spec_kernels, kept_consts):
    keywords = _launch_keywords(launcher, kept_consts)[kernel]
    assert keywords, kernel
    specs = [s for s in spec_kernels.aot_specs() if s.kernel.fn.__name__ == kernel]
    assert specs, kernel
    if "num_stages" not in keywords:  # launched with triton's default: compile with it too
        assert all(s.num_stages is None for s in specs), [s.name for s in specs if s.num_stages]


def test_weight_gradient_gemm_is_checked_with_both_output_dtypes():
    outs = {}
    for s in gelu_mlp_aot.aot_specs():
        if s.name.startswith("matmul_kernel[dw/"):
            outs.setdefault(s.signature["A"], set()).add(s.signature["C"])
    # dW1 (and dW2 without LayerScale) in the input dtype; dW2 with LayerScale in fp32
    assert outs["*bf16"] == {"*bf16", "*fp32"} and outs["*fp16"] == {"*fp16", "*fp32"}


def test_attention_specs_cover_the_vit_head_dims():
    specs = attention_aot.aot_specs()
    for kernel in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel",
                   "attention_bwd_delta_kernel"):
        for ptr in ("*fp16", "*bf16"):
            dims = {s.constants["HEAD_DIM"] for s in specs if s.kernel.fn.__name__ == kernel
                    and s.signature.get("QKV", s.signature.get("O")) == ptr}
            assert {32, 48, 64, 80, 96, 112, 128, 256} <= dims, (kernel, ptr, sorted(dims))


@pytest.mark.parametrize("module", [attention_aot, gelu_mlp_aot, gelu_elementwise_aot,
                                    layer_norm_aot, qk_norm_aot],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_the_tests_build_every_family_on_both_archs_and_every_value_once(module):
    """tests/aot_builds.covering_jobs, the subset tests/test_aot_*.py compile."""
    specs = {s.name: s for s in module.aot_specs()}
    jobs = covering_jobs(list(specs.values()))
    assert len(set(jobs)) == len(jobs) < len(specs) * len(ARCHS)
    built = [specs[name] for name, _ in jobs]
    families = {(family(specs[n]), a) for n, a in jobs}
    for spec in specs.values():
        assert {(family(spec), a) for a in archs_of(spec)} <= families, spec.name
        for name, value in spec.constants.items():
            assert any(b.kernel is spec.kernel and b.constants.get(name, ...) == value
                       for b in built), (spec.name, name, value)
        for name, dtype in spec.signature.items():
            assert any(b.kernel is spec.kernel and b.signature.get(name) == dtype for b in built), \
                (spec.name, name, dtype)
