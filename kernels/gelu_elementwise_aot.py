"""Ahead-of-time specs of the cuBLAS MLP's elementwise kernels (kernels/gelu_elementwise.py), for
vit_fast.aot and `python -m vit_fast.bench compile-check`.

Generated from gelu_elementwise.elementwise_blocks on the TARGETS GPUs, per dtype, with every
optional input present (the most registers) and both GELU forms.
"""
from .gelu_elementwise import (NUM_WARPS, elementwise_blocks, gelu_bwd_kernel, gelu_fwd_kernel,
                               residual_epilogue_kernel)
from .gelu_mlp_aot import TARGETS


def aot_specs():
    from vit_fast.aot import AotSpec
    specs = []
    for blocks in dict.fromkeys(elementwise_blocks(t) for t in TARGETS):
        for dtype in ("bf16", "fp16", "fp32"):
            p = "*" + dtype
            for tanh in (False, True):
                tag = dtype + (",tanh" if tanh else "")  # one family per kernel in the summary
                specs.append(AotSpec(
                    f"gelu_fwd_kernel[{tag}]", gelu_fwd_kernel,
                    {"PRE": p, "ACT": p, "numel": "i32", "APPROX_TANH": "constexpr",
                     "BLOCK": "constexpr"},
                    {"APPROX_TANH": tanh, "BLOCK": blocks.fwd}, ("PRE", "ACT", "numel"),
                    num_warps=NUM_WARPS))
                specs.append(AotSpec(
                    f"gelu_bwd_kernel[{tag}]", gelu_bwd_kernel,
                    {"DACT": p, "PRE": p, "DPRE": p, "ACTS": p, "SSCALE": p, "ROWDOT": "*fp32",
                     "DBPART": "*fp32", "M": "i32", "N": "i32", "rows_per_sample": "i32",
                     "APPROX_TANH": "constexpr", "HAS_SAMPLE_SCALE": "constexpr",
                     "STORE_ACT": "constexpr", "ROW_DOT": "constexpr", "COL_SUM": "constexpr",
                     "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                    {"APPROX_TANH": tanh, "HAS_SAMPLE_SCALE": True, "STORE_ACT": True,
                     "ROW_DOT": True, "COL_SUM": True, "BLOCK_M": blocks.bwd[0],
                     "BLOCK_N": blocks.bwd[1]},
                    ("DACT", "PRE", "DPRE", "ACTS", "SSCALE", "ROWDOT", "DBPART", "N"),
                    num_warps=NUM_WARPS))
            specs.append(AotSpec(
                f"residual_epilogue_kernel[{dtype}]", residual_epilogue_kernel,
                {"Y": p, "BIAS": p, "LSCALE": p, "SSCALE": p, "RES": p, "OUT": p, "M": "i32",
                 "N": "i32", "rows_per_sample": "i32", "stride_rm": "i32",
                 "stride_rn": "constexpr", "HAS_BIAS": "constexpr",
                 "HAS_LAYER_SCALE": "constexpr", "HAS_SAMPLE_SCALE": "constexpr",
                 "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                {"stride_rn": 1, "HAS_BIAS": True, "HAS_LAYER_SCALE": True,
                 "HAS_SAMPLE_SCALE": True, "BLOCK_M": blocks.epilogue[0],
                 "BLOCK_N": blocks.epilogue[1]},
                ("Y", "BIAS", "LSCALE", "SSCALE", "RES", "OUT", "N", "stride_rm"),
                num_warps=NUM_WARPS))
    return specs
