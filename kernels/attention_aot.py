"""Ahead-of-time specs of the attention kernels: every config attention.py's tables can launch,
for vit_fast.aot and `python -m vit_fast.bench compile-check`."""
import itertools

import torch

from .attention import (attention_bwd_dbias_kernel, attention_bwd_delta_kernel,
                        attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                        attention_bwd_dq_reduce_kernel, attention_fwd_kernel)
from .attention_config import (_CUDA_CONFIGS, _DELTA_BLOCK_M, _FUSED_ARCHS, _MAX_DQ_PARTIALS,
                               _REDUCE_BLOCK_M, _SHORT_N, _block_d, dbias_config, fwd_configs,
                               shipped_config)
from .attention_fwd_tma import _TMA_CONFIGS, TensorDescriptor, attention_fwd_tma_kernel


# Head dims compiled ahead of time per bucket: the powers of two, and the padded ones real ViTs use
# (32, 48; ViT-H/14: 80; 96, 112), since HEAD_DIM and BLOCK_D are constexprs: each is a build.
_AOT_HEAD_DIMS = {64: (64, 32, 48), 128: (128, 80, 96, 112), 256: (256,)}
_TORCH_TO_SIG = {torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def launchable_configs(key, dropout, segments, bias=False):
    """The configs the launchers can pick for a table key: the forward's include the smaller
    tiles of GPUs with less shared memory (attention.fwd_configs)."""
    if key[0] == "fwd":
        return fwd_configs(key, dropout, segments, bias)
    cfg = shipped_config(key, dropout, segments, bias)
    return [] if cfg is None else [cfg]   # None: no fused build for it (attention.bwd_plan)


def _dq_targets(short: bool, block_n: int, ptr: str):
    """What a fused dK/dV build (WRITE_DQ) writes dq into over the sequence lengths its table
    entry serves: dqkv itself (qkv's pointer type) where one key tile covers N, fp32 partials
    where 2.._MAX_DQ_PARTIALS do (attention.bwd_plan)."""
    lo, hi = (1, _SHORT_N) if short else (_SHORT_N + 1, _MAX_DQ_PARTIALS * block_n)
    return [t for t, ok in ((ptr, lo <= block_n), ("*fp32", hi > block_n)) if ok]


def _reduce_spec(AotSpec, dtype, ptr, head_dim, key_block, segments):
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": _REDUCE_BLOCK_M,
              "KEY_BLOCK": key_block, "HAS_SEGMENTS": segments}
    sig = {"PART": "*fp32", "DQKV": ptr, "N": "i32", "H": "i32", "n_key_blocks": "i32",
           "stride_part_kb": "i32", "stride_part_b": "i32", "stride_part_n": "i32",
           "stride_dqkv_b": "i32", "stride_dqkv_n": "i32"}
    div = ["PART", "DQKV", "stride_part_kb", "stride_part_b", "stride_part_n", "stride_dqkv_b",
           "stride_dqkv_n"]
    if segments:
        sig["SPANS"] = "*i32"
        div.append("SPANS")
    else:
        consts["SPANS"] = None
    sig.update({k: "constexpr" for k in consts})
    sig = {name: sig[name] for name in attention_bwd_dq_reduce_kernel.arg_names}
    name = (f"attention_bwd_dq_reduce[{str(dtype).split('.')[-1]},D={head_dim},KB={key_block}"
            f"{',segments' if segments else ''}]")
    return AotSpec(name, attention_bwd_dq_reduce_kernel, sig, consts, tuple(div), 4, None,
                   uses_dot=False, archs=_FUSED_ARCHS)  # launch defaults


def shipped_builds():
    """{(kernel, bucket, dropout, segments, config, dq target, bias)} the launchers can pick.
    Short- and long-sequence entries that share a config are one build; a fused entry also
    lists what it writes dq into (one build each)."""
    return {(key[0], key[1], dropout, segments, cfg, dq, bias)
            for key in _CUDA_CONFIGS
            for dropout, segments, bias in itertools.product((False, True), repeat=3)
            for cfg in launchable_configs(key, dropout, segments, bias)
            for dq in (_dq_targets(key[2], cfg[1], "io") if key[0] == "dkdv_dq" else [None])}


def _bias_sig(sig, consts, div, bias):
    """A spec's bias arguments: an fp32 [B or 1, H, N, N] tensor (fresh: 16-byte aligned) whose
    batch stride is 0 (a bias shared by the batch) and other strides N·N and N (any value),
    or, without, None and the launcher's zero strides."""
    sig.update(stride_bias_b="i32", stride_bias_h="i32", stride_bias_m="i32")
    consts["HAS_BIAS"] = bias
    if bias:
        sig["BIAS"] = "*fp32"
        div += ["BIAS", "stride_bias_b"]
    else:
        consts["BIAS"] = None
        div += ["stride_bias_b", "stride_bias_h", "stride_bias_m"]


def dbias_spec(dtype, ptr, head_dim, dropout, segments):
    """attention_bwd_dbias_kernel for one head dim and variant (attention_config.dbias_config)."""
    from vit_fast.aot import AotSpec

    bm, bn, warps, stages = dbias_config(head_dim, dropout, segments)
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": bm, "BLOCK_N": bn,
              "HAS_DROPOUT": dropout, "HAS_SEGMENTS": segments, "DOT_FP32": False,
              "DOT_PRECISION": "tf32"}
    sig = {"QKV": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "BIAS": "*fp32",
           "DBIAS": "*fp32", "SEED": "*i64", "N": "i32", "H": "i32", "B": "i32", "rows_per_group": "i32",
           "stride_qkv_b": "i32", "stride_qkv_n": "i32", "stride_do_b": "i32", "stride_do_n": "i32",
           "stride_bias_b": "i32", "stride_bias_h": "i32", "stride_bias_m": "i32",
           "qk_scale": "fp32", "dropout_p": "fp32", "keep_scale": "fp32"}
    div = ["QKV", "DO", "LSE", "DELTA", "BIAS", "DBIAS", "stride_qkv_b", "stride_qkv_n",
           "stride_do_b", "stride_do_n", "stride_bias_b"]
    _seed_and_segment_sig(sig, consts, div, dropout, segments)
    sig.pop("SPANS", None)
    consts.pop("SPANS", None)
    if "SPANS" in div:
        div.remove("SPANS")
    sig.update({k: "constexpr" for k in consts})
    sig = {name: sig[name] for name in attention_bwd_dbias_kernel.arg_names}
    name = (f"attention_dbias[{str(dtype).split('.')[-1]},D={head_dim},BM={bm},BN={bn},w={warps},"
            f"s={stages}{',dropout' if dropout else ''}{',segments' if segments else ''}]")
    return AotSpec(name, attention_bwd_dbias_kernel, sig, consts, tuple(div), warps, stages,
                   uses_dot=True)


def _seed_and_segment_sig(sig, consts, div, dropout, segments):
    if dropout:
        div.append("SEED")  # a fresh allocation, so 16-byte aligned as the JIT sees it
    else:
        sig["SEED"] = "constexpr"  # launched with None
        consts["SEED"] = None
    if segments:
        # Both fresh allocations of the launcher (attention_segments.segment_args).
        sig.update(SEG="*i32", SPANS="*i32")
        div += ["SEG", "SPANS"]
    else:
        consts.update(SEG=None, SPANS=None)


def tma_fwd_spec(ptr: str, head_dim: int, config):
    """attention_fwd_tma_kernel (kernels/attention_fwd_tma.py) for one config, sm_90 only."""
    from vit_fast.aot import AotSpec

    bm, bn, warps, stages = config
    bd, dt = _block_d(head_dim), ptr.lstrip("*")
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": bd, "BLOCK_M": bm, "BLOCK_N": bn,
              "DOT_FP32": False, "DOT_PRECISION": "tf32"}
    sig = {"q_desc": f"tensordesc<{dt}[1, {bm}, 1, {bd}]>", "kv_desc": f"tensordesc<{dt}[1, {bn}, 1, {bd}]>",
           "O": ptr, "LSE": "*fp32", "N": "i32", "H": "i32", "stride_o_b": "i32",
           "stride_o_n": "i32", "qk_scale": "fp32", **{k: "constexpr" for k in consts}}
    dtype = {"*fp16": "float16", "*bf16": "bfloat16"}[ptr]
    return AotSpec(f"attention_fwd_tma[{dtype},D={head_dim},BM={bm},BN={bn},w={warps},s={stages}]",
                   attention_fwd_tma_kernel, sig, consts, ("O", "LSE", "stride_o_b", "stride_o_n"),
                   warps, stages, uses_dot=True, archs=(90,))


def aot_specs(shipped=None):
    """Every config the launchers can pick (the tables in attention.py) × fp16/bf16 × with/
    without dropout × with/without segment ids, as vit_fast.aot.AotSpec; shipped: those
    builds instead (shipped_builds' tuples), for studies of other tiles."""
    from vit_fast.aot import AotSpec

    specs = []
    shipped_default = shipped is None
    shipped = sorted(shipped_builds() if shipped is None else shipped)
    reduces = set()
    for dtype, ptr in _TORCH_TO_SIG.items():
        for kernel, bucket, dropout, segments, (bm, bn, warps, stages), dq, *bias in shipped:
            bias = bool(bias and bias[0])  # studies may pass the 6-tuples of builds without one
            for head_dim in _AOT_HEAD_DIMS[bucket]:
                consts = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": bm,
                          "BLOCK_N": bn, "HAS_DROPOUT": dropout, "HAS_SEGMENTS": segments,
                          "DOT_FP32": False, "DOT_PRECISION": "tf32"}
                if kernel == "fwd":
                    fn, sig = attention_fwd_kernel, {
                        "QKV": ptr, "O": ptr, "LSE": "*fp32", "SEED": "*i64", "N": "i32", "H": "i32",
                        "stride_qkv_b": "i32", "stride_qkv_n": "i32", "stride_o_b": "i32",
                        "stride_o_n": "i32", "qk_scale": "fp32", "dropout_p": "fp32"}
                    div = ["QKV", "O", "LSE", "stride_qkv_b", "stride_qkv_n", "stride_o_b", "stride_o_n"]
                else:
                    fn = attention_bwd_dq_kernel if kernel == "dq" else attention_bwd_dkdv_kernel
                    sig = {"QKV": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQKV": ptr,
                           "SEED": "*i64", "N": "i32", "H": "i32", "stride_qkv_b": "i32",
                           "stride_qkv_n": "i32", "stride_do_b": "i32", "stride_do_n": "i32",
                           "stride_dqkv_b": "i32", "stride_dqkv_n": "i32", "sm_scale": "fp32",
                           "qk_scale": "fp32", "dropout_p": "fp32"}
                    div = ["QKV", "DO", "LSE", "DELTA", "DQKV", "stride_qkv_b", "stride_qkv_n",
                           "stride_do_b", "stride_do_n", "stride_dqkv_b", "stride_dqkv_n"]
                if fn is attention_bwd_dkdv_kernel:
                    # Launched with DQ None and zero strides without WRITE_DQ; with it, DQ is
                    # dqkv (its strides) or the fresh fp32 partials.
                    sig.update(stride_dq_kb="i32", stride_dq_b="i32", stride_dq_n="i32")
                    div += ["stride_dq_kb", "stride_dq_b", "stride_dq_n"]
                    consts["WRITE_DQ"] = dq is not None
                    if dq is None:
                        consts["DQ"] = None
                    else:
                        sig["DQ"] = ptr if dq == "io" else dq
                        div.append("DQ")
                        if dq != "io":
                            reduces.add((head_dim, bn, segments))
                _seed_and_segment_sig(sig, consts, div, dropout, segments)
                _bias_sig(sig, consts, div, bias)
                sig.update({k: "constexpr" for k in consts})
                sig = {name: sig[name] for name in fn.arg_names}  # argument order, for the attrs
                name = (f"attention_{kernel}[{str(dtype).split('.')[-1]},D={head_dim},"
                        f"BM={bm},BN={bn},w={warps},s={stages}{',dropout' if dropout else ''}"
                        f"{',segments' if segments else ''}"
                        f"{'' if dq is None else ',dq=' + sig['DQ'].lstrip('*')}"
                        f"{',bias' if bias else ''}]")
                specs.append(AotSpec(name, fn, sig, consts, tuple(div), warps, stages, uses_dot=True,
                                     archs=None if dq is None else _FUSED_ARCHS))
        specs += [_reduce_spec(AotSpec, dtype, ptr, *r) for r in sorted(reduces)]
        if shipped_default:  # the bias gradient's builds (attention_bwd_dbias_kernel)
            specs += [dbias_spec(dtype, ptr, d, dropout, segments)
                      for d in sorted(d for dims in _AOT_HEAD_DIMS.values() for d in dims)
                      for dropout, segments in itertools.product((False, True), repeat=2)]
        reduces.clear()
        for head_dim in sorted(d for dims in _AOT_HEAD_DIMS.values() for d in dims):
            consts = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim), "BLOCK_M": _DELTA_BLOCK_M}
            sig = {"O": ptr, "DO": ptr, "DELTA": "*fp32", "N": "i32", "H": "i32", "stride_o_b": "i32",
                   "stride_o_n": "i32", "stride_do_b": "i32", "stride_do_n": "i32"}
            sig.update({k: "constexpr" for k in consts})
            specs.append(AotSpec(f"attention_bwd_delta[{str(dtype).split('.')[-1]},D={head_dim}]",
                                 attention_bwd_delta_kernel, sig, consts,
                                 ("O", "DO", "DELTA", "stride_o_b", "stride_o_n", "stride_do_b",
                                  "stride_do_n"), 4, None, uses_dot=False))  # launch defaults
        if shipped_default and TensorDescriptor is not None:  # the TMA forward (sm_90 candidate)
            specs += [tma_fwd_spec(ptr, d, cfg) for bucket, cfg in sorted(_TMA_CONFIGS.items())
                      for d in _AOT_HEAD_DIMS[bucket]]
    return specs
