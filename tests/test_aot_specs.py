"""The AOT specs are the builds the launchers make: the same num_stages (triton's default where a
launcher passes none), every output dtype, every head dim real ViTs use. (Compiling them is
tests/test_aot_*.py; this only compares the specs with the launchers, so it needs no compiler.)"""
import ast
import inspect

import pytest

from aot_builds import ARCHS, archs_of, covering_jobs, family
from vit_fast.kernels import (attention, attention_aot, gelu_elementwise_aot, gelu_mlp_aot,
                              layer_norm, layer_norm_aot, matmul, qk_norm_aot)


def _launch_keywords(fn):
    """{kernel name: set of keyword names} of every ``kernel[grid](...)`` call in ``fn``'s source."""
    tree = ast.parse(inspect.getsource(inspect.unwrap(fn)).lstrip())
    launches = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            name = getattr(node.func.value, "id", "")
            launches.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
    return launches


@pytest.mark.parametrize("launcher, kernel, spec_kernels", [
    (layer_norm.residual_layer_norm_fwd, "residual_layer_norm_fwd_kernel", layer_norm_aot),
    (layer_norm.residual_layer_norm_bwd, "residual_layer_norm_bwd_kernel", layer_norm_aot),
    (layer_norm.residual_layer_norm_bwd, "layer_norm_param_grad_reduce_kernel", layer_norm_aot),
    (matmul.colsum, "colsum_kernel", gelu_mlp_aot),
    (attention.attention_bwd, "attention_bwd_delta_kernel", attention_aot),
])
def test_specs_use_the_launchers_num_stages(launcher, kernel, spec_kernels):
    keywords = _launch_keywords(launcher)[kernel]
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
