"""Ahead-of-time specs of the Hopper GEMM (kernels/matmul_hopper.py), for vit_fast.aot and
`python -m vit_fast.bench compile-check` (sm_90 only: TMA descriptors and wgmma).

Generated, not restated: the configs come from matmul_hopper.hopper_candidates for an H100 and
the constexprs from hopper_constexprs, over the MLP launch kinds of kernels/gelu_mlp_aot.py
(their epilogues with every optional input present, and their operand layouts).
"""
from __future__ import annotations

import torch

from ._device import Target
from .gelu_mlp_aot import _GELU_KINDS, KINDS, specialize_absent_inputs
from .matmul_hopper import hopper_candidates, hopper_constexprs, hopper_matmul_kernel

ARCHS = (90,)  # the only target hopper_candidates offers the kernel on
H100 = Target(132, 90)
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def hopper_spec(kind, dtype, config, approximate="none", out=None):
    """hopper_matmul_kernel as one MLP launch of ``kind`` compiles (out: the output dtype)."""
    from vit_fast.aot import AotSpec
    epilogue, unit = KINDS[kind]
    epilogue = epilogue._replace(approximate=approximate)
    a_t, b_t = "am" in unit, "bk" in unit  # which operands are read through their transpose
    a_block = [config.block_k, config.block_m] if a_t else [config.block_m, config.block_k]
    b_block = [config.block_n, config.block_k] if b_t else [config.block_k, config.block_n]
    ptr = "*" + dtype
    sig = {"a_desc": f"tensordesc<{dtype}[{a_block[0]}, {a_block[1]}]>",
           "b_desc": f"tensordesc<{dtype}[{b_block[0]}, {b_block[1]}]>",
           "C": "*" + (out or dtype), "BIAS": ptr, "PRE": ptr, "ACT": ptr, "RES": ptr,
           "LSCALE": ptr, "SSCALE": ptr, "ROWDOT": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "rows_per_sample": "i32",
           "stride_cm": "i32", "stride_cn": "constexpr", "stride_pm": "i32", "stride_rm": "i32",
           "stride_rn": "constexpr"}
    constants = dict(stride_cn=1, stride_rn=1)
    specialize_absent_inputs(sig, constants, epilogue)
    for name, value in hopper_constexprs(epilogue, config, a_t, b_t).items():
        sig[name], constants[name] = "constexpr", value
    divisible = tuple(n for n in sig if sig[n].startswith("*")) + (
        "N", "stride_cm", "stride_pm", "stride_rm")
    tag = "/".join([kind, dtype, config.name] + (["tanh"] if approximate == "tanh" else [])
                   + ([f"out={out}"] if out and out != dtype else []))
    return AotSpec(f"hopper_matmul_kernel[{tag}]", hopper_matmul_kernel, sig, constants,
                   divisible, num_warps=config.num_warps, num_stages=config.num_stages,
                   uses_dot=True, archs=ARCHS)


def aot_specs():
    """Every config × dtype × MLP launch kind hopper_candidates offers on an H100."""
    specs = []
    for dtype in _DT:
        for kind, (epilogue, _) in KINDS.items():
            for config in hopper_candidates(_DT[dtype], epilogue, H100):
                for approximate in (("none", "tanh") if kind in _GELU_KINDS else ("none",)):
                    specs.append(hopper_spec(kind, dtype, config, approximate))
                if kind == "dw":  # dW2 with LayerScale: fp32 output
                    specs.append(hopper_spec(kind, dtype, config, out="fp32"))
    return specs
