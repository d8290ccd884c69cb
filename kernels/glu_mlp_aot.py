"""Ahead-of-time specs of what the GLU MLP launchers (kernels/glu_mlp.py) launch beyond the GELU
MLP's builds, for vit_fast.aot and `python -m vit_fast.bench compile-check --match glu`.

- matmul_kernel with the GLU epilogues: fc1's "glu" (bias, pre stored), the backward's "dglu"
  and, with the hidden LayerNorm, "dident" (both with act stored, the row dot and drop-path).
  Their fc2, dx, dW and column-sum launches are the GELU MLP's own (kernels/gelu_mlp_aot.py).
- the elementwise glu_fwd_kernel / glu_bwd_kernel of the hidden-LayerNorm path;
- under AMP, the LayerNorm backward over the hidden units with low-precision activations and
  fp32 parameters (the forward's mix is layer_norm_aot's "amp_ln2" build).

Generated, not restated: configs from matmul.gemm_candidates, glu_elementwise.glu_blocks and
layer_norm.bwd_config over gelu_mlp_aot's TARGETS and shape classes; constexprs from
matmul_constexprs; each launch compiled with all of its optional inputs present.
"""
import itertools

from ._device import Target  # noqa: F401  (the TARGETS' type)
from .gelu_mlp_aot import _DT, SHAPES, TARGETS, gemm_spec
from .glu_elementwise import NUM_WARPS, glu_blocks, glu_bwd_kernel, glu_fwd_kernel
from .layer_norm import bwd_config
from .layer_norm_aot import _M, _WIDTHS, _unique, bwd_spec
from .matmul import Epilogue, gemm_candidates

# The GLU launches of matmul_kernel: epilogue with every optional input present, unit strides.
KINDS = {
    "glu_fwd": (Epilogue("glu", bias=True, store_pre=True), ("ak", "bk")),
    "dglu": (Epilogue("dglu", store_act=True, row_dot=True, sample_scale=True), ("ak", "bn")),
    "glu_dident": (Epilogue("dident", store_act=True, row_dot=True, sample_scale=True),
                   ("ak", "bn")),
}
# fp32 runs tf32 dots when torch allows them for matmuls, exact FMA dots otherwise.
PRECISIONS = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))


def configs(kind, dtype, precision):
    """Every config gemm_candidates offers this launch over TARGETS × SHAPES, in a fixed order."""
    epilogue = KINDS[kind][0]
    seen = {}
    for target, (M, N, K) in itertools.product(TARGETS, SHAPES):
        for cfg in gemm_candidates(M, N, _DT[dtype], epilogue, precision, target, K):
            seen.setdefault(cfg, None)
    return list(seen)


def elementwise_specs(dtype):
    from vit_fast.aot import AotSpec
    p = "*" + dtype
    specs = []
    for blocks in dict.fromkeys(glu_blocks(t) for t in TARGETS):
        specs.append(AotSpec(
            f"glu_fwd_kernel[{dtype}]", glu_fwd_kernel,
            {"PRE": p, "ACT": p, "M": "i32", "H": "i32", "stride_pm": "i32",
             "BLOCK_M": "constexpr", "BLOCK_H": "constexpr"},
            {"BLOCK_M": blocks.fwd[0], "BLOCK_H": blocks.fwd[1]},
            ("PRE", "ACT", "H", "stride_pm"), num_warps=NUM_WARPS))
        specs.append(AotSpec(
            f"glu_bwd_kernel[{dtype}]", glu_bwd_kernel,
            {"DACT": p, "PRE": p, "DPRE": p, "M": "i32", "H": "i32", "stride_dm": "i32",
             "stride_pm": "i32", "BLOCK_M": "constexpr", "BLOCK_H": "constexpr"},
            {"BLOCK_M": blocks.bwd[0], "BLOCK_H": blocks.bwd[1]},
            ("DACT", "PRE", "DPRE", "H", "stride_dm", "stride_pm"), num_warps=NUM_WARPS))
    return specs


def amp_norm_bwd_specs(dtype):
    """The hidden LayerNorm's backward under AMP: dy, s (the activation) and dx in ``dtype``,
    weight fp32 (named ..._glu_amp_... so `--match glu` finds them). Built as launched: no
    residual, LayerScale, drop-path or ds (the full build with the fp32 weight spilled on sm_90
    at 1024 and 2048 columns)."""
    specs = []
    for cfg in _unique(bwd_config(C, _M, t)._replace(programs=1, rows_per_program=0)
                       for C in _WIDTHS for t in TARGETS):
        spec = bwd_spec(cfg, dtype)
        spec.signature["W"] = "*fp32"
        spec.name = spec.name.replace("_bwd_", "_bwd_glu_amp_", 1)
        for ptr, flag in (("DS", "HAS_DS"), ("DRES", "HAS_RESIDUAL"), ("X", "HAS_LAYER_SCALE"),
                          ("LS", "HAS_LAYER_SCALE"), ("SS", "HAS_SAMPLE_SCALE"),
                          ("DLS_PART", "HAS_LAYER_SCALE")):
            spec.constants[flag] = False
            spec.signature[ptr], spec.constants[ptr] = "constexpr", None
        spec.divisible = tuple(n for n in spec.divisible if spec.signature[n] != "constexpr")
        specs.append(spec)
    return specs


def aot_specs():
    """Every GLU epilogue config × dtype, the elementwise kernels, the AMP norm backward."""
    specs = []
    for dtype, precision in PRECISIONS:
        for kind in KINDS:
            for config in configs(kind, dtype, precision):
                specs.append(gemm_spec(kind, dtype, config, precision=precision, kinds=KINDS))
    for dtype in ("bf16", "fp16", "fp32"):
        specs += elementwise_specs(dtype)
    for dtype in ("bf16", "fp16"):
        specs += amp_norm_bwd_specs(dtype)
    return specs
