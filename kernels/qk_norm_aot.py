"""Ahead-of-time specs of the q/k norm kernels: every config qk_norm.py's launchers pick on a GPU,
for vit_fast.aot and `python -m vit_fast.bench compile-check`.

Per BLOCK_D bucket (head dims 16..256), LayerNorm and RMSNorm, every parameter present, for the
(qkv, parameter) dtypes the ops take: one dtype, or a half qkv with fp32 parameters (autocast).
The parameter-gradient reduce is layer_norm.py's kernel, built among its specs.
"""
from .qk_norm import (NUM_WARPS, block_d, gpu_bwd_block_m, gpu_fwd_block_m, qk_norm_bwd_kernel,
                      qk_norm_fwd_kernel)

_HEAD_DIMS = (16, 32, 64, 128, 256)  # one build per BLOCK_D bucket (D is a runtime argument)
_DTYPES = (("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32"), ("fp16", "fp32"),
           ("bf16", "fp32"))  # (qkv, parameters)


def _spec(name, fn, sig, consts, divisible):
    from vit_fast.aot import AotSpec
    sig = dict(sig, **{k: "constexpr" for k in consts})
    sig = {n: sig[n] for n in fn.arg_names}  # argument order, for the divisibility attributes
    return AotSpec(name, fn, sig, consts, divisible, NUM_WARPS)  # num_stages: as launched


def aot_specs():
    specs = []
    for io, par in _DTYPES:
        for head_dim in _HEAD_DIMS:
            bd = block_d(head_dim)
            for rms in (False, True):
                tag = f"{io},{par}" if io != par else io
                kind = "rms" if rms else "layer"
                fwd = dict(IS_RMS=rms, HAS_QW=True, HAS_QB=True, HAS_KW=True, HAS_KB=True,
                           BLOCK_M=gpu_fwd_block_m(bd), BLOCK_D=bd)
                specs.append(_spec(
                    f"qk_norm_fwd[{tag},{kind},D={head_dim},BM={fwd['BLOCK_M']}]",
                    qk_norm_fwd_kernel,
                    {"X": f"*{io}", "Y": f"*{io}", "QW": f"*{par}", "QB": f"*{par}",
                     "KW": f"*{par}", "KB": f"*{par}", "M": "i32", "H": "i32", "D": "i32",
                     "stride_x": "i32", "stride_qw": "i32", "stride_qb": "i32", "stride_kw": "i32",
                     "stride_kb": "i32", "eps": "fp32"}, fwd,
                    ("X", "Y", "QW", "QB", "KW", "KB", "D", "stride_x", "stride_qw", "stride_qb",
                     "stride_kw", "stride_kb")))
                bwd = dict(IS_RMS=rms, HAS_QW=True, HAS_KW=True, NEED_QW=True, NEED_QB=True,
                           NEED_KW=True, NEED_KB=True, BLOCK_M=gpu_bwd_block_m(bd, io == "fp32"), BLOCK_D=bd)
                specs.append(_spec(
                    f"qk_norm_bwd[{tag},{kind},D={head_dim},BM={bwd['BLOCK_M']}]",
                    qk_norm_bwd_kernel,
                    {"DY": f"*{io}", "X": f"*{io}", "DX": f"*{io}", "QW": f"*{par}",
                     "KW": f"*{par}", "PART": "*fp32", "M": "i32", "H": "i32", "D": "i32",
                     "stride_dy": "i32", "stride_x": "i32", "stride_qw": "i32", "stride_kw": "i32",
                     "rows_per_program": "i32", "eps": "fp32"}, bwd,
                    ("DY", "X", "DX", "QW", "KW", "PART", "D", "stride_dy", "stride_x",
                     "stride_qw", "stride_kw")))
    return specs
