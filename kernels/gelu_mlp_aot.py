"""Ahead-of-time specs of the GELU MLP's GEMMs and column sums (kernels/gelu_mlp.py), for
vit_fast.aot and `python -m vit_fast.bench compile-check`.

Generated, not restated: every config comes from kernels/matmul.gemm_candidates and every
constexpr from matmul_constexprs, called over the shape classes, targets, dtypes and epilogues the
launchers use. Each launch is compiled with all of its optional inputs present (the most
registers): an absent one only removes code. tests/test_aot_specs.py checks real launches
against this list.
"""
import itertools

import torch

from ._device import Target
from .matmul import (Epilogue, colsum_block, colsum_kernel, gemm_candidates, matmul_constexprs,
                     matmul_kernel)

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The GPUs and (M, N, K) shape classes the config rule distinguishes: grids that fill the GPU,
# grids that do not, and a ViT-B weight gradient (144 tiles: a partly idle last wave, K = tokens)
# on an A100 (108 SMs, sm_80) and an H100 (132 SMs, sm_90).
TARGETS = (Target(108, 80), Target(132, 90))
SHAPES = ((1 << 16, 1 << 16, 1 << 16), (64, 64, 64), (768, 3072, 1 << 14))

# What the MLP launchers pass for a ViT MLP (C = C_out = 768, H = 3072, contiguous tensors):
# unit strides arrive as the constant 1 (the JIT specializes them), the rest are multiples of 16
# except M, the reduction length of the weight-gradient GEMMs, and rows_per_sample.
KINDS = {
    #          epilogue with every optional input present                 (am, ak, bk, bn) unit
    "fc1_fwd": (Epilogue("gelu", bias=True, store_pre=True), ("ak", "bk")),
    "fc2_fwd": (Epilogue(bias=True, residual=True, layer_scale=True, sample_scale=True),
                ("ak", "bk")),
    "dgelu": (Epilogue("dgelu", store_act=True, row_dot=True, sample_scale=True), ("ak", "bn")),
    "dx": (Epilogue(), ("ak", "bn")),
    "dw": (Epilogue(), ("am", "bn")),  # Aᵀ of a row-major activation: unit stride along M
}
_GELU_KINDS = ("fc1_fwd", "dgelu")  # the tanh form changes their epilogue: its own builds


def specialize_absent_inputs(sig, constants, epilogue):
    """The epilogue's optional pointers the launch passes as None become constexpr None in
    ``sig``/``constants``, as Triton specializes them (shared with matmul_hopper_aot)."""
    present = {"BIAS": epilogue.bias, "PRE": epilogue.reads_pre or epilogue.store_pre,
               "ACT": epilogue.store_act, "RES": epilogue.residual,
               "LSCALE": epilogue.layer_scale, "SSCALE": epilogue.sample_scale,
               "ROWDOT": epilogue.row_dot}
    for name, here in present.items():
        if not here:
            sig[name], constants[name] = "constexpr", None


def configs(kind, dtype, precision):
    """Every config gemm_candidates offers this launch over TARGETS × SHAPES, in a fixed order."""
    epilogue = KINDS[kind][0]
    seen = {}
    for target, (M, N, K) in itertools.product(TARGETS, SHAPES):
        for cfg in gemm_candidates(M, N, _DT[dtype], epilogue, precision, target, K):
            seen.setdefault(cfg, None)
    return list(seen)


def gemm_spec(kind, dtype, config, approximate="none", precision="ieee", out=None, stream=None,
              kinds=KINDS):
    """matmul_kernel as one MLP launch compiles: dtype the operands', out the output's (dW2 with
    LayerScale: fp32), stream the residual's and its scales' (AMP's fc2 adds into fp32). A
    split-K config writes fp32 partials whatever the output dtype. kinds: the launch kinds
    (epilogue, unit strides) ``kind`` is one of (kernels/glu_mlp_aot.py passes its own)."""
    from vit_fast.aot import AotSpec
    epilogue, unit = kinds[kind]
    epilogue = epilogue._replace(approximate=approximate)
    out = "fp32" if config.split_k > 1 else out
    ptr = "*" + dtype
    res_ptr = "*" + (stream or dtype)
    out_ptr = res_ptr if stream else "*" + (out or dtype)
    sig = {"A": ptr, "B": ptr, "C": out_ptr, "BIAS": ptr, "PRE": ptr, "ACT": ptr, "RES": res_ptr,
           "LSCALE": res_ptr, "SSCALE": res_ptr, "ROWDOT": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "rows_per_sample": "i32"}
    constants = {}
    specialize_absent_inputs(sig, constants, epilogue)
    for name in ("stride_am", "stride_ak", "stride_bk", "stride_bn"):
        unit_stride = name[-2:] in unit
        sig[name] = "constexpr" if unit_stride else "i32"
        if unit_stride:
            constants[name] = 1
    sig.update({"stride_cm": "i32", "stride_cn": "constexpr", "stride_pm": "i32",
                "stride_rm": "i32", "stride_rn": "constexpr"})
    constants.update(stride_cn=1, stride_rn=1)
    for name, value in matmul_constexprs(epilogue, config, precision).items():
        sig[name], constants[name] = "constexpr", value
    divisible = tuple(n for n in sig if sig[n].startswith("*")) + tuple(
        n for n in ("N", "stride_cm", "stride_pm", "stride_rm", "stride_am", "stride_ak",
                    "stride_bk", "stride_bn") if sig[n] == "i32")
    if kind not in ("dx", "dw"):
        divisible += ("K",)
    tag = "/".join([kind, dtype, config.name] + (["tanh"] if approximate == "tanh" else [])
                   + [precision] + ([f"out={out}"] if out and out != dtype else [])
                   + ([f"stream={stream}"] if stream else []))
    uses_tc = not (dtype == "fp32" and precision == "ieee")
    return AotSpec(f"matmul_kernel[{tag}]", matmul_kernel, sig, constants, divisible,
                   num_warps=config.num_warps, num_stages=config.num_stages, uses_dot=uses_tc)


def aot_specs():
    """Every GEMM config × dtype × epilogue the MLP launchers can launch, plus the column sum."""
    from vit_fast.aot import AotSpec
    specs = []
    # fp32 runs tf32 dots when torch allows them for matmuls, exact FMA dots otherwise.
    for dtype, precision in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"),
                             ("fp32", "ieee")):
        for kind in KINDS:
            for config in configs(kind, dtype, precision):
                for approximate in (("none", "tanh") if kind in _GELU_KINDS else ("none",)):
                    specs.append(gemm_spec(kind, dtype, config, approximate, precision))
                if config.split_k > 1:  # fp32 partials whatever the output: built above
                    continue
                if kind == "dw" and dtype != "fp32":  # dW2 with LayerScale: fp32 output
                    specs.append(gemm_spec(kind, dtype, config, precision=precision, out="fp32"))
                if kind == "fc2_fwd" and dtype != "fp32":  # AMP: adds into the fp32 stream
                    specs.append(gemm_spec(kind, dtype, config, precision=precision,
                                           stream="fp32"))
    block_m, block_n = colsum_block(TARGETS[0])
    for dtype in ("bf16", "fp16", "fp32"):
        sig = {"X": "*" + dtype, "SSCALE": "*" + dtype, "OUT": "*fp32", "M": "i32", "N": "i32",
               "rows_per_chunk": "i32", "rows_per_sample": "i32", "stride_xm": "i32",
               "stride_xn": "constexpr", "HAS_SAMPLE_SCALE": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr"}
        specs.append(AotSpec(f"colsum_kernel[{dtype}]", colsum_kernel, sig,
                             dict(stride_xn=1, HAS_SAMPLE_SCALE=True, BLOCK_M=block_m,
                                  BLOCK_N=block_n),
                             ("X", "SSCALE", "OUT", "N", "rows_per_chunk", "stride_xm"),
                             num_warps=4))  # no num_stages: triton's default, as launched
    return specs
