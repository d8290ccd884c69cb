"""Ahead-of-time specs of the residual LayerNorm kernels (kernels/layer_norm.py), for
vit_fast.aot and `python -m vit_fast.bench compile-check`.

Generated, not restated: block sizes and warps come from layer_norm.fwd_config / bwd_config /
reduce_config, called for every row width the launchers accept (64 .. MAX_C) on the TARGETS GPUs.
Each kernel is compiled with every optional input present (the most registers): an absent one,
passed as None, only removes code. tests/test_aot_specs.py checks real launches against this list.
"""
from .gelu_mlp_aot import TARGETS
from .layer_norm import (DS_MAX_C, MAX_C, _MIN_BLOCK_C, bwd_config, fwd_config,
                         layer_norm_param_grad_reduce_kernel, reduce_config,
                         residual_layer_norm_bwd_kernel, residual_layer_norm_fwd_kernel)

_FLAGS = dict(HAS_RESIDUAL=True, HAS_LAYER_SCALE=True, HAS_SAMPLE_SCALE=True, HAS_WEIGHT=True,
              HAS_BIAS=True)
_WIDTHS = [_MIN_BLOCK_C << i for i in range(MAX_C.bit_length() - _MIN_BLOCK_C.bit_length() + 1)]
_M = 1 << 16  # rows of a training batch: the GPU rules depend on M only through program counts


def _unique(items):
    return list(dict.fromkeys(items))


def _spec(kernel, name, sig, const, divisible, num_warps):
    from vit_fast.aot import AotSpec
    # Inputs a flag turns off are launched as None: Triton specializes them to constexpr None.
    for ptr, flag in (("RES", "HAS_RESIDUAL"), ("S", "HAS_RESIDUAL"), ("DRES", "HAS_RESIDUAL"),
                      ("MEAN", "STORE_STATS"), ("RSTD", "STORE_STATS"),
                      ("LS", "HAS_LAYER_SCALE"), ("X", "HAS_LAYER_SCALE"),
                      ("SS", "HAS_SAMPLE_SCALE"), ("W", "HAS_WEIGHT"), ("B", "HAS_BIAS")):
        # X is the forward's input and S the backward's whatever the flags
        keep = (ptr == "X" and "Y" in sig) or (ptr == "S" and "DY" in sig)
        if ptr in sig and not const.get(flag, True) and not keep:
            sig[ptr], const[ptr] = "constexpr", None
    sig.update({k: "constexpr" for k in const})
    sig = {n: sig[n] for n in kernel.arg_names}  # argument order, for the divisibility attrs
    divisible = tuple(n for n in divisible if sig[n] != "constexpr")
    return AotSpec(name, kernel, sig, const, divisible, num_warps=num_warps)  # default stages


def fwd_spec(cfg, x, y, stream, tag, **flags):
    """x: the branch's dtype, y: the output's, stream: residual, s and parameters (AMP: fp32)."""
    sig = {"X": f"*{x}", "RES": f"*{stream}", "LS": f"*{stream}", "SS": f"*{stream}",
           "W": f"*{stream}", "B": f"*{stream}", "Y": f"*{y}", "S": f"*{stream}",
           "MEAN": "*fp32", "RSTD": "*fp32", "M": "i32", "C": "i32", "stride_x": "i32",
           "stride_res": "i32", "rows_per_sample": "i32", "eps": "fp32"}
    const = dict(_FLAGS, STORE_STATS=True, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, **flags)
    return _spec(residual_layer_norm_fwd_kernel,
                 f"residual_layer_norm_fwd_{tag}_C{cfg.block_c}_M{cfg.block_m}_w{cfg.num_warps}",
                 sig, const, ("X", "RES", "LS", "SS", "W", "B", "Y", "S", "MEAN", "RSTD", "C",
                              "stride_x", "stride_res"), cfg.num_warps)


def bwd_spec(cfg, dt, dy=None, tag=None, **flags):
    """dt: every tensor's dtype but dy's (dt unless given); flags over the superset's."""
    dy, tag = dy or dt, tag or dt
    sig = {"DY": f"*{dy}", "DS": f"*{dt}", "S": f"*{dt}", "X": f"*{dt}", "MEAN": "*fp32",
           "RSTD": "*fp32", "W": f"*{dt}", "LS": f"*{dt}", "SS": f"*{dt}", "DX": f"*{dt}",
           "DRES": f"*{dt}", "DW_PART": "*fp32", "DB_PART": "*fp32", "DLS_PART": "*fp32",
           "M": "i32", "C": "i32", "stride_dy": "i32", "stride_ds": "i32", "stride_s": "i32",
           "stride_x": "i32", "rows_per_program": "i32", "rows_per_sample": "i32"}
    const = dict(_FLAGS, HAS_DS=True, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, **flags)
    return _spec(residual_layer_norm_bwd_kernel,
                 f"residual_layer_norm_bwd_{tag}_C{cfg.block_c}_M{cfg.block_m}_w{cfg.num_warps}",
                 sig, const, ("DY", "DS", "S", "X", "MEAN", "RSTD", "W", "LS", "SS", "DX", "DRES",
                              "DW_PART", "DB_PART", "DLS_PART", "C", "stride_dy", "stride_ds",
                              "stride_s", "stride_x"), cfg.num_warps)


def reduce_spec(block_p, block_n, dt):
    sig = {"PART": "*fp32", "OUT0": f"*{dt}", "OUT1": f"*{dt}", "OUT2": f"*{dt}", "P": "i32",
           "C": "i32"}
    return _spec(layer_norm_param_grad_reduce_kernel,
                 f"layer_norm_param_grad_reduce_{dt}_P{block_p}_N{block_n}", sig,
                 {"HAS_OUT1": True, "HAS_OUT2": True, "BLOCK_P": block_p, "BLOCK_N": block_n},
                 ("PART", "OUT0", "OUT1", "OUT2", "C"),
                 4)


def aot_specs():
    specs = []
    fwd = _unique(fwd_config(C, _M, t) for C in _WIDTHS for t in TARGETS)
    bwd = _unique(bwd_config(C, _M, t)._replace(programs=1, rows_per_program=0)
                  for C in _WIDTHS for t in TARGETS)
    reduce = _unique(reduce_config(4 * t.sms, C, t) for C in _WIDTHS for t in TARGETS)
    no_residual = dict(HAS_RESIDUAL=False, HAS_LAYER_SCALE=False, HAS_SAMPLE_SCALE=False)
    for dt in ("fp16", "bf16", "fp32"):
        for cfg in fwd:
            specs.append(fwd_spec(cfg, dt, dt, dt, dt))
            if dt != "fp32":
                # AMP (vit_fast/ops/layer_norm_linear.py, residual_layer_norm_mlp.py): LN1 reads
                # the fp32 stream, LN2 adds the low-precision branch into it; both write dt.
                specs.append(fwd_spec(cfg, "fp32", dt, "fp32", f"amp_ln1_{dt}", **no_residual))
                specs.append(fwd_spec(cfg, dt, dt, "fp32", f"amp_ln2_{dt}"))
        specs += [bwd_spec(cfg, dt) for cfg in bwd]
        # The Block step's LayerNorm 1 in an fp32 stream: adds the residual's gradient (its own
        # add, kernels/layer_norm._add_rounded); dy in dt (AMP: the qkv GEMM's), the rest fp32.
        specs += [bwd_spec(cfg, "fp32", dt, f"ln1_ds_{dt}", **no_residual) for cfg in bwd
                  if cfg.block_c <= DS_MAX_C]
        specs += [reduce_spec(block_p, block_n, dt) for block_p, block_n in reduce]
    return specs
