"""Ahead-of-time specs of the rotary-embedding kernels: every config rope.py's launchers pick on a
GPU, for vit_fast.aot and `python -m vit_fast.bench compile-check --match rope`.

Per BLOCK_D bucket (head dims 16..256; D is a runtime argument), both layouts, each qkv dtype
(sin/cos are always read as fp32): the forward, and the backward without sin/cos gradients and
with them from the forward's input or from its output. The gradients' sum over batch groups is
layer_norm.py's reduce kernel, built among its specs.
"""
from .rope import NUM_WARPS, block_d, gpu_block_m, rope_bwd_kernel, rope_fwd_kernel

_HEAD_DIMS = (16, 32, 64, 128, 256)  # one build per BLOCK_D bucket
_DTYPES = ("fp16", "bf16", "fp32")


def _spec(name, fn, sig, consts, divisible):
    from vit_fast.aot import AotSpec
    sig = dict(sig, **{k: "constexpr" for k in consts})
    sig = {n: sig[n] for n in fn.arg_names}  # argument order, for the divisibility attributes
    return AotSpec(name, fn, sig, consts, divisible, NUM_WARPS)  # num_stages: as launched


def aot_specs():
    specs = []
    for io in _DTYPES:
        for head_dim in _HEAD_DIMS:
            bd = block_d(head_dim)
            for half in (False, True):
                layout = "half" if half else "interleaved"
                fwd = dict(HALF=half, BLOCK_M=gpu_block_m(bd), BLOCK_D=bd)
                specs.append(_spec(
                    f"rope_fwd[{io},{layout},D={head_dim},BM={fwd['BLOCK_M']}]", rope_fwd_kernel,
                    {"X": f"*{io}", "Y": f"*{io}", "SIN": "*fp32", "COS": "*fp32", "N": "i32",
                     "H": "i32", "D": "i32", "npt": "i32", "stride_x_b": "i32", "stride_x_n": "i32",
                     "stride_s_b": "i32", "stride_s_h": "i32", "stride_s_n": "i32"}, fwd,
                    ("X", "Y", "SIN", "COS", "D", "stride_x_b", "stride_x_n", "stride_s_b",
                     "stride_s_h", "stride_s_n")))
                for need_grad, from_output in ((False, False), (True, False), (True, True)):
                    bwd = dict(HALF=half, NEED_GRAD=need_grad, FROM_OUTPUT=from_output,
                               BLOCK_M=gpu_block_m(bd, backward=True), BLOCK_D=bd)
                    sig = {"DY": f"*{io}", "DX": f"*{io}", "X": f"*{io}", "SIN": "*fp32",
                           "COS": "*fp32", "PART": "*fp32", "N": "i32", "H": "i32", "D": "i32",
                           "npt": "i32", "B": "i32", "rows_per_group": "i32",
                           "stride_dy_b": "i32", "stride_dy_n": "i32", "stride_x_b": "i32",
                           "stride_x_n": "i32", "stride_s_b": "i32", "stride_s_h": "i32",
                           "stride_s_n": "i32", "stride_part_g": "i32", "stride_part_h": "i32",
                           "stride_part_slot": "i32"}
                    div = ["DY", "DX", "SIN", "COS", "D", "stride_dy_b", "stride_dy_n",
                           "stride_x_b", "stride_x_n", "stride_s_b", "stride_s_h", "stride_s_n",
                           "stride_part_g", "stride_part_h", "stride_part_slot"]
                    if need_grad:
                        div += ["X", "PART"]
                    else:  # launched with None and zero strides
                        bwd.update(X=None, PART=None)
                    tag = ("" if not need_grad else ",grad_from_output" if from_output
                           else ",grad")
                    specs.append(_spec(
                        f"rope_bwd[{io},{layout},D={head_dim},BM={bwd['BLOCK_M']}{tag}]",
                        rope_bwd_kernel, sig, bwd, tuple(div)))
    return specs
