"""Launchers of the GELU MLP, y = residual + fc2(gelu(fc1(x)))·layer_scale·sample_scale[b].

Forward: two GEMMs (``matmul.matmul_kernel``). fc1's epilogue adds the bias and applies GELU,
writing the activation that fc2 reads and, when training, the pre-activation that backward keeps;
the activation is never kept. fc2's epilogue adds bias, LayerScale, drop-path and the residual.

Backward, with g = d_out [M, C_out] and ls, ss optional (1 when absent), b = m // rows_per_sample:
  d_pre = ((g @ (ls·W2)) · ss[b]) · gelu'(pre)       one GEMM, dGELU in its epilogue, which also
  act_s = gelu(pre) · ss[b]                           recomputes GELU from the saved pre for dW2
  E     = gᵀ @ act_s          dW2 = ls·E,  db2 = ls·Σ_m g·ss[b]
  dls   = Σ_h W2∘E + b2·Σ_m g·ss[b]                  (= Σ_m g·ss·fc2_out without rebuilding it)
  dss   = Σ_{m∈b} (Σ_h act·(g @ ls·W2) + g·(ls·b2))   (ROW_DOT epilogue output)
  dx = d_pre @ W1,  dW1 = d_preᵀ @ x,  db1 = Σ_m d_pre,  dresidual = g.
Everything is deterministic: no atomics; sums are per-tile then reduced in a fixed order.
"""
from __future__ import annotations

import math

import torch

from ._device import on_tensor_device
from .matmul import COLSUM_BLOCK, CONFIGS, colsum, colsum_kernel, config_name, matmul, matmul_kernel

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _rows_per_sample(x):
    # From the shape alone: x[0] does not exist for an empty batch, and C may be 0.
    return 1 if x.dim() < 2 else max(1, math.prod(x.shape[1:-1]))


def _rows(t, C):
    """[..., C] -> [M, C]; M spelled out since reshape(-1, 0) is ambiguous for C = 0."""
    return t.reshape(math.prod(t.shape[:-1]), C)


@on_tensor_device
def gelu_mlp_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, approximate, residual,
                 layer_scale, sample_scale, save_pre, out_dtype=None):
    """x [..., C], fc1_weight [H, C], fc2_weight [C_out, H] (nn.Linear layout), biases [H]/[C_out]
    or None, residual [..., C_out] or None, layer_scale [C_out], sample_scale [x.shape[0]].

    Returns (out [..., C_out] in out_dtype (default x's dtype), pre [M, H] when save_pre else an
    empty tensor). AMP passes an fp32 residual and out_dtype: fc2's epilogue adds into the stream.
    """
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    x2 = _rows(x, C)
    if residual is None:  # the contract scales only the residual branch
        layer_scale = sample_scale = None
    act, pre, _ = matmul(x2, fc1_weight.t(), x.dtype, bias=fc1_bias, epilogue="gelu",
                         approximate=approximate, store_pre=save_pre)
    res2 = _rows(residual, c_out) if residual is not None else None
    out, _, _ = matmul(act, fc2_weight.t(), out_dtype or x.dtype, bias=fc2_bias, residual=res2,
                       layer_scale=layer_scale, sample_scale=sample_scale,
                       rows_per_sample=_rows_per_sample(x))
    return out.reshape(*x.shape[:-1], c_out), (pre if save_pre else x.new_empty(0))


@on_tensor_device
def gelu_mlp_bwd(grad, x, fc1_weight, fc2_weight, fc2_bias, pre, layer_scale, sample_scale,
                 approximate, has_residual, needs_fc1_bias, needs_fc2_bias, needs_layer_scale,
                 needs_sample_scale):
    """Gradients (dx, d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, d_layer_scale,
    d_sample_scale); the optional ones not asked for are None. pre is fwd's saved [M, H].
    dresidual is grad itself and is left to the caller.
    """
    C = x.shape[-1]
    c_out = fc2_weight.shape[0]
    dtype = x.dtype
    x2 = _rows(x, C)
    g = _rows(grad, c_out)
    ls = layer_scale if has_residual else None
    ss = sample_scale if has_residual else None
    rps = _rows_per_sample(x)
    needs_layer_scale = needs_layer_scale and ls is not None
    needs_sample_scale = needs_sample_scale and ss is not None

    # LayerScale folded into fc2's weight (weight-sized, cheap) so the dGELU GEMM reads g as is.
    w2s = fc2_weight if ls is None else (fc2_weight.float() * ls.float()[:, None]).to(dtype)
    d_pre, act_s, rowdot = matmul(g, w2s, dtype, epilogue="dgelu", approximate=approximate,
                                  pre=pre, store_act=True, row_dot=needs_sample_scale,
                                  sample_scale=ss, rows_per_sample=rps)
    e, _, _ = matmul(g.t(), act_s, torch.float32 if ls is not None else dtype)
    del act_s
    d_w2 = e if ls is None else (e * ls.float()[:, None]).to(dtype)
    g_sum = colsum(g, ss, rps) if (needs_fc2_bias or needs_layer_scale) else None
    d_b2 = None
    if needs_fc2_bias and fc2_bias is not None:
        d_b2 = (g_sum if ls is None else g_sum * ls.float()).to(fc2_bias.dtype)
    d_ls = None
    if needs_layer_scale:
        d_ls = (fc2_weight.float() * e).sum(1)
        if fc2_bias is not None:
            d_ls = d_ls + fc2_bias.float() * g_sum
        d_ls = d_ls.to(ls.dtype)
    d_ss = None
    if needs_sample_scale:
        per_row = rowdot.sum(0)
        if fc2_bias is not None:
            lsb = fc2_bias.float() * (ls.float() if ls is not None else 1.0)
            per_row = per_row + g.float() @ lsb
        d_ss = per_row.reshape(x.shape[0], math.prod(x.shape[1:-1])).sum(1).to(ss.dtype)
    d_x, _, _ = matmul(d_pre, fc1_weight, dtype)
    d_w1, _, _ = matmul(d_pre.t(), x2, dtype)
    d_b1 = colsum(d_pre).to(dtype) if needs_fc1_bias else None
    return d_x.reshape(x.shape), d_w1, d_b1, d_w2, d_b2, d_ls, d_ss


# What the launchers above pass for a ViT MLP (C = C_out = 768, H = 3072, contiguous tensors):
# unit strides arrive as the constant 1 (the JIT specializes them), the rest are multiples of 16
# except M, the reduction length of the weight-gradient GEMMs, and rows_per_sample.
_KINDS = {
    #            epilogue flags                                     (am, ak, bk, bn) unit strides
    "fc1_fwd": (dict(HAS_BIAS=True, EPILOGUE=1, STORE_PRE=True), ("ak", "bk")),
    "fc2_fwd": (dict(HAS_BIAS=True, HAS_RESIDUAL=True, HAS_LAYER_SCALE=True,
                     HAS_SAMPLE_SCALE=True), ("ak", "bk")),
    "dgelu": (dict(EPILOGUE=2, STORE_ACT=True, ROW_DOT=True, HAS_SAMPLE_SCALE=True), ("ak", "bn")),
    "dx": (dict(), ("ak", "bn")),
    "dw": (dict(), ("am", "bn")),  # Aᵀ of a row-major activation: unit stride along M
}


def _gemm_spec(kind, dtype, config_name, approximate="none", precision=None, out=None,
               stream=None):
    from vit_fast.aot import AotSpec
    flags, unit = _KINDS[kind]
    BM, BN, BK, GM, warps, stages = CONFIGS[config_name]
    ptr = "*" + {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[dtype]
    # Outputs are in the input dtype, except the dW2 GEMM of the LayerScale path (out="fp32").
    out_ptr = "*" + (out or dtype)
    # AMP's fc2 (stream="fp32"): the residual stream and its scales fp32, the output added into it.
    res_ptr = "*" + (stream or dtype)
    if stream:
        out_ptr = res_ptr
    sig = {"A": ptr, "B": ptr, "C": out_ptr, "BIAS": ptr, "PRE": ptr, "ACT": ptr, "RES": res_ptr,
           "LSCALE": res_ptr, "SSCALE": res_ptr, "ROWDOT": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "rows_per_sample": "i32"}
    strides = {"stride_am": "am", "stride_ak": "ak", "stride_bk": "bk", "stride_bn": "bn"}
    constants = {}
    for name, short in strides.items():
        sig[name] = "constexpr" if short in unit else "i32"
        if short in unit:
            constants[name] = 1
    sig.update({"stride_cm": "i32", "stride_cn": "constexpr", "stride_pm": "i32",
                "stride_rm": "i32", "stride_rn": "constexpr"})
    constants.update(stride_cn=1, stride_rn=1)
    meta = dict(HAS_BIAS=False, EPILOGUE=0, APPROX_TANH=approximate == "tanh", STORE_PRE=False,
                STORE_ACT=False, ROW_DOT=False, HAS_RESIDUAL=False, HAS_LAYER_SCALE=False,
                HAS_SAMPLE_SCALE=False, DOT_FP32=False,
                INPUT_PRECISION=precision or ("tf32" if dtype == "fp32" else "ieee"),
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM)
    meta.update(flags)
    for name, value in meta.items():
        sig[name] = "constexpr"
        constants[name] = value
    divisible = tuple(n for n in sig if sig[n].startswith("*")) + tuple(
        n for n in ("N", "stride_cm", "stride_pm", "stride_rm", "stride_am", "stride_ak",
                    "stride_bk", "stride_bn") if sig[n] == "i32")
    if kind not in ("dx", "dw"):
        divisible += ("K",)
    tag = f"{kind}/{dtype}/{config_name}" + ("/tanh" if approximate == "tanh" else "") + (
        f"/{precision}" if precision else "") + (f"/out={out}" if out and out != dtype else "") + (
        f"/stream={stream}" if stream else "")
    uses_tc = not (dtype == "fp32" and meta["INPUT_PRECISION"] == "ieee")
    return AotSpec(f"matmul_kernel[{tag}]", matmul_kernel, sig, constants, divisible,
                   num_warps=warps, num_stages=stages, uses_dot=uses_tc)


def aot_specs():
    """Every shipped GEMM config × dtype × epilogue the launchers use, plus the column sum."""
    from vit_fast.aot import AotSpec
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for kind in _KINDS:
            epilogue = "dgelu" if kind == "dgelu" else "none"
            # config_name with 0 SMs gives the large config, with a huge count the small one
            for sms in (0, 1 << 30):
                name = config_name(1 << 20, 1 << 20, _DT[dtype], epilogue, sms, "tf32")
                specs.append(_gemm_spec(kind, dtype, name))
                if kind == "dw" and dtype != "fp32":  # dW2 with LayerScale: fp32 output
                    specs.append(_gemm_spec(kind, dtype, name, out="fp32"))
                if kind == "fc2_fwd" and dtype != "fp32":  # AMP: adds into the fp32 stream
                    specs.append(_gemm_spec(kind, dtype, name, stream="fp32"))
        for kind in ("fc1_fwd", "dgelu"):  # the tanh form changes only the epilogue
            large = config_name(1 << 20, 1 << 20, _DT[dtype],
                                "dgelu" if kind == "dgelu" else "none", 0, "tf32")
            specs.append(_gemm_spec(kind, dtype, large, approximate="tanh"))
    # fp32 without allow_tf32 (torch's default) runs exact dots: FMA, no tensor cores.
    for kind in _KINDS:
        specs.append(_gemm_spec(kind, "fp32", config_name(1, 1, torch.float32, "none", 0, "ieee"),
                                precision="ieee"))
    for dtype in ("bf16", "fp16", "fp32"):
        sig = {"X": "*" + dtype, "SSCALE": "*" + dtype, "OUT": "*fp32", "M": "i32", "N": "i32",
               "rows_per_chunk": "i32", "rows_per_sample": "i32", "stride_xm": "i32",
               "stride_xn": "constexpr", "HAS_SAMPLE_SCALE": "constexpr", "BLOCK_M": "constexpr",
               "BLOCK_N": "constexpr"}
        specs.append(AotSpec(f"colsum_kernel[{dtype}]", colsum_kernel, sig,
                             dict(stride_xn=1, HAS_SAMPLE_SCALE=True, BLOCK_M=COLSUM_BLOCK[0],
                                  BLOCK_N=COLSUM_BLOCK[1]),
                             ("X", "SSCALE", "OUT", "N", "rows_per_chunk", "stride_xm"),
                             num_warps=4))  # no num_stages: triton's default, as launched
    return specs
