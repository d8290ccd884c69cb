"""HBM-traffic and FLOP model of every kernel (and of eager PyTorch's op sequence), in ONE place.

Everything here is a *model*, not a measurement:
- bytes: every tensor a kernel touches crosses HBM once (compulsory traffic). Tile re-reads (K/V
  per query block, GEMM operands per output tile) are assumed to hit L2: a ViT head's K/V (N·D·2
  bytes, ~25 KB at N=197) and one GEMM operand panel fit easily. tests/test_roofline.py checks the
  vit_fast kernel formulas byte-exactly against the unique addresses the Triton interpreter loads
  and stores (masked-off elements excluded).
- FLOPs: 2·M·N·K per GEMM, 4·B·H·N²·D for attention forward (QKᵀ and PV), 10·B·H·N²·D for the
  fused attention backward (5 products; 14 where the dq pass recomputes S and dP, see
  attention_bwd) and for FlashAttention-2's; elementwise work is counted with
  small per-element constants that never decide the roofline.
- time: max(bytes / (bandwidth·η_mem), FLOPs / (peak·η_class)) per kernel, summed over kernels (no
  overlap between kernels, no launch latency). η are the achievable fractions of EFFICIENCY, per
  kernel class (cuBLAS GEMM, Triton GEMM, FA2/FA3-class attention, elementwise), taken from public
  figures named in roofline_time.py; ``achievable=False`` gives the datasheet-peak roofline.

Shapes: M = B·N rows of C features, H heads of D = C/H, hidden = mlp_ratio·C.
"""
from __future__ import annotations

import dataclasses
import math

# The time model (peaks, achievable fractions, Op) lives in roofline_time.py; its names are
# re-exported here, the model's one entry point for the bench and the tests.
from .roofline_time import (EFFICIENCY, HARDWARE, KINDS, Op, efficiency_note, time_s,  # noqa: F401
                            total)

F32 = 4  # bytes of the fp32 statistics (mean, rstd, lse, delta) and partial sums
LN1_ADDS_MAX_C = 4096  # kernels/layer_norm.DS_MAX_C: wider fp32 streams add x's gradient apart
IMPLS = ("eager", "torch.compile", "vit_fast", "vit_fast cublas")

VIT_CONFIGS = {  # name -> (embed dim C, heads H, depth, patch)
    "vit_small_patch16_224": (384, 6, 12, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 16, 24, 16),
    "vit_base_patch16_384": (768, 12, 12, 16),
}


def tokens(model: str) -> int:
    """N = patches + class token, from the image size in timm's model name."""
    img = int(model.rsplit("_", 1)[-1])
    patch = VIT_CONFIGS[model][3]
    return (img // patch) ** 2 + 1


# ------------------------------------------------------------------------------------------------
# vit_fast kernels (kernels/*.py). Arguments in elements; e = bytes per element of the I/O dtype.

def attention_fwd(B, N, H, D, e) -> Op:
    """attention_fwd_kernel: reads q, k, v from packed qkv; writes out and the fp32 lse."""
    return Op("attention_fwd", B * N * 3 * H * D * e, B * N * H * D * e + B * H * N * F32,
              4 * B * H * N * N * D, "attention", (B * H, N, D))


def attention_bwd(B, N, H, D, e, plan=None) -> list:
    """attention_bwd_delta, then the launch structure of kernels/attention.bwd_plan (plan: its
    answer; None: what it picks on H100, sm_90, for bf16 without dropout or segments):
    - "split": dk, dv per key block (S, dP, dV, dK: 4 products) and dq per query block (S, dP,
      dQ: 3), each pass reading all of q, k, v and dO (and lse, Δ);
    - "fused": one pass of 5 products writing dk, dv and, per key block, its fp32 share of dq
      (key_blocks of them; with one, dq itself in the I/O dtype), then the reduce reading the
      partials back and writing dq: one pass over q, k, v and dO fewer, 8·key_blocks bytes per
      dq element more."""
    if plan is None:
        import torch

        from vit_fast.kernels.attention import bwd_plan
        plan = bwd_plan(N, D, torch.bfloat16, arch=90)
    qkv, row, stats = B * N * 3 * H * D * e, B * N * H * D * e, B * H * N * F32
    ops = [Op("attention_bwd_delta", 2 * row, stats, 2 * B * N * H * D)]
    if plan[0] == "split":
        return ops + [
            Op("attention_bwd_dkdv", qkv + row + 2 * stats, 2 * row, 8 * B * H * N * N * D,
               "attention", (B * H, N, D)),
            Op("attention_bwd_dq", qkv + row + 2 * stats, row, 6 * B * H * N * N * D, "attention",
               (B * H, N, D)),
        ]
    key_blocks = plan[2]
    partials = row if key_blocks == 1 else key_blocks * B * N * H * D * F32
    ops.append(Op("attention_bwd_dkdv_dq", qkv + row + 2 * stats, 2 * row + partials,
                  10 * B * H * N * N * D, "attention", (B * H, N, D)))
    if key_blocks > 1:
        ops.append(Op("attention_bwd_dq_reduce", partials, row, key_blocks * B * N * H * D))
    return ops


def layer_norm_fwd(M, C, e, *, residual=False, layer_scale=False, samples=0, weight=True,
                   bias=True, stats=True) -> Op:
    """residual_layer_norm_fwd_kernel: reads x (+ residual, layer_scale, sample_scale[samples]) and
    weight/bias; writes y (+ s with a residual) and, with ``stats``, fp32 mean/rstd (the Block's
    forward ops write none: their backward recomputes them)."""
    read = M * C * e * (2 if residual else 1) + C * e * (int(weight) + int(bias))
    if residual:
        read += C * e * int(layer_scale) + samples * e
    write = M * C * e * (2 if residual else 1) + 2 * M * F32 * int(stats)
    return Op("layer_norm_fwd", read, write, 10 * M * C)


def layer_norm_bwd(M, C, e, programs, *, residual=False, has_ds=False, layer_scale=False,
                   samples=0, weight=True, bias=True, dy_e=None, dx_e=None, x_e=None) -> list:
    """residual_layer_norm_bwd_kernel (dx, dresidual, one fp32 partial row of each parameter
    gradient per program) and layer_norm_param_grad_reduce_kernel over the partials. dy, dx (the
    branch's gradient in the residual form) and x (the branch, read with LayerScale) at ``e``
    bytes unless given their own (AMP's step: in the GEMMs' dtype). has_ds: a gradient of the
    input read and added to dx (the residual form's s; without it, the Block step's LayerNorm 1 in
    an fp32 stream adding the residual's)."""
    ls = residual and layer_scale
    ds = has_ds
    dy_e, dx_e, x_e = (e if v is None else v for v in (dy_e, dx_e, x_e))
    read = (M * C * (dy_e + e * (1 + int(ds)) + x_e * int(ls)) + 2 * M * F32
            + C * e * (int(weight) + int(ls)))
    if residual:
        read += samples * e
    write = M * C * (dx_e + (e if residual else 0))
    k = int(weight) + int(bias) + int(ls)
    ops = [Op("layer_norm_bwd", read, write + k * programs * C * F32, 16 * M * C)]
    if k:
        ops.append(Op("layer_norm_grad_reduce", k * programs * C * F32, k * C * e, k * programs * C))
    return ops


def matmul(M, N, K, e, *, out_e=None, name="matmul", bias=False, read_pre=False, store_pre=False,
           store_act=False, residual=False, layer_scale=False, samples=0, rowdot_tiles=0,
           epilogue_flops=0, kind="triton_gemm") -> Op:
    """matmul_kernel: C[M, N] = epilogue(A[M, K] @ B[K, N]); the optional epilogue tensors as
    flagged (pre-activation read or stored, activation stored, residual, LayerScale, per-sample
    scale, fp32 row-dot partials [rowdot_tiles, M])."""
    out_e = e if out_e is None else out_e
    read = (M * K + K * N) * e + N * e * (int(bias) + int(layer_scale)) + samples * e
    read += M * N * e * (int(read_pre) + int(residual))
    write = M * N * out_e + M * N * e * (int(store_pre) + int(store_act)) + rowdot_tiles * M * F32
    return Op(name, read, write, 2 * M * N * K + epilogue_flops * M * N, kind, (M, N, K))


def colsum(M, N, e, chunks, *, samples=0, name="colsum") -> Op:
    """colsum_kernel: fp32 column sums of X[M, N] (· sample_scale) in `chunks` partial rows."""
    return Op(name, M * N * e + samples * e, chunks * N * F32, M * N)


def gelu_mlp_fwd(M, C, Hd, e, *, train, residual=True, layer_scale=False, samples=0) -> list:
    """fc1 GEMM + bias + GELU epilogue (+ stored pre-activation when training), then fc2 GEMM +
    bias (+ LayerScale, drop-path, residual) epilogue. The activation makes one HBM round trip."""
    return [
        matmul(M, Hd, C, e, name="mlp_fc1_gelu", bias=True, store_pre=train, epilogue_flops=20),
        matmul(M, C, Hd, e, name="mlp_fc2_residual", bias=True, residual=residual,
               layer_scale=residual and layer_scale, samples=samples if residual else 0,
               epilogue_flops=3),
    ]


def gelu_mlp_bwd(M, C, Hd, e, *, layer_scale=False, samples=0, colsum_chunks=None,
                 rowdot_tiles=None, fc2_bias=True) -> list:
    """The launches of kernels/gelu_mlp.gelu_mlp_bwd: dGELU GEMM (stores act·ss for dW2), dW2 GEMM,
    column sums for db2/dls, dx GEMM, dW1 GEMM, db1 column sum; plus the weight-sized torch op that
    folds LayerScale into fc2's weight."""
    chunks_g = colsum_chunks(M) if colsum_chunks else _colsum_chunks(M)
    tiles = rowdot_tiles if rowdot_tiles is not None else math.ceil(Hd / 128)
    ops = []
    if layer_scale:
        ops.append(Op("torch_fold_layer_scale", C * Hd * e + C * e, C * Hd * e, C * Hd))
    ops += [
        matmul(M, Hd, C, e, name="mlp_dgelu", read_pre=True, store_act=True, samples=samples,
               rowdot_tiles=tiles if samples else 0, epilogue_flops=25),
        matmul(C, Hd, M, e, out_e=F32 if layer_scale else e, name="mlp_dW2"),
    ]
    if fc2_bias or layer_scale:
        ops.append(colsum(M, C, e, chunks_g, samples=samples, name="mlp_db2_colsum"))
    ops += [
        matmul(M, C, Hd, e, name="mlp_dx"),
        matmul(Hd, C, M, e, name="mlp_dW1"),
        colsum(M, Hd, e, chunks_g, name="mlp_db1_colsum"),
    ]
    return ops


def _colsum_chunks(M, block_m=32):
    """kernels/matmul.colsum's chunking on CUDA (at most ~64 chunks of whole BLOCK_M tiles)."""
    rows_per_chunk = block_m * max(1, math.ceil(math.ceil(M / block_m) / 64))
    return math.ceil(M / rows_per_chunk)


def gelu_mlp_cublas_fwd(M, C, Hd, e, *, train, residual=True, layer_scale=False,
                        samples=0) -> list:
    """kernels/gelu_elementwise.gelu_mlp_cublas_fwd: fc1 addmm (bias in cuBLAS's epilogue), GELU
    pass (pre -> act, in place without training), fc2 GEMM, then the residual epilogue pass (or
    fc2 as addmm without a residual). Each epilogue costs one extra round trip of its output."""
    ops = [eager_linear(M, Hd, C, e, "mlp_fc1_addmm"),
           Op("gelu_fwd_kernel", M * Hd * e, M * Hd * e, 20 * M * Hd)]
    if not residual:
        return ops + [eager_linear(M, C, Hd, e, "mlp_fc2_addmm")]
    return ops + [eager_linear(M, C, Hd, e, "mlp_fc2_mm", bias=False),
                  Op("residual_epilogue_kernel",
                     2 * M * C * e + C * e * (1 + int(layer_scale)) + samples * e, M * C * e,
                     3 * M * C)]


def gelu_mlp_cublas_bwd(M, C, Hd, e, *, layer_scale=False, samples=0, colsum_chunks=None,
                        fc2_bias=True, gelu_rows=16) -> list:
    """kernels/gelu_elementwise.gelu_mlp_cublas_bwd: d_act GEMM, dGELU pass (d_pre in place,
    act·ss stored, fp32 row dots for d sample_scale, fp32 column partials of d_pre per program of
    ``gelu_rows`` rows), E = gᵀ·act_s in fp32, column sums (db2 over g, db1 over the partials),
    dx and dW1 GEMMs; plus the weight-sized torch ops (LayerScale fold)."""
    chunks = colsum_chunks or _colsum_chunks
    parts = math.ceil(M / gelu_rows)
    ops = []
    if layer_scale:
        ops.append(Op("torch_fold_layer_scale", C * Hd * e + C * e, C * Hd * e, C * Hd))
    ops += [
        eager_linear(M, Hd, C, e, "mlp_dact_mm", bias=False),
        Op("gelu_bwd_kernel", 2 * M * Hd * e + samples * e,
           2 * M * Hd * e + (M * F32 if samples else 0) + parts * Hd * F32,
           25 * M * Hd + (M - parts) * Hd),  # a program's column sums: rows - 1 adds each
        matmul(C, Hd, M, e, out_e=F32, name="mlp_dW2_mm", kind="cublas_gemm"),
    ]
    if fc2_bias or layer_scale:
        ops.append(colsum(M, C, e, chunks(M), samples=samples, name="mlp_db2_colsum"))
    return ops + [eager_linear(M, C, Hd, e, "mlp_dx_mm", bias=False),
                  eager_linear(Hd, C, M, e, "mlp_dW1_mm", bias=False),
                  colsum(parts, Hd, F32, chunks(parts), name="mlp_db1_colsum")]


def _ln_programs(M, C, sms=132):
    """kernels/layer_norm's backward program count on CUDA: min(tiles, 4·SMs) (H100 SXM: 132)."""
    block_c = max(16, 1 << (C - 1).bit_length())
    block_m = max(1, 1024 // block_c)
    return max(1, min(math.ceil(M / block_m), 4 * sms))


# ------------------------------------------------------------------------------------------------
# Eager PyTorch ops (what timm's Block launches on CUDA), same conventions.

def eager_linear(M, N, K, e, name, bias=True) -> Op:
    """cuBLAS GEMM with the bias in its epilogue (addmm)."""
    return matmul(M, N, K, e, name=name, bias=bias, kind="cublas_gemm")


def eager_linear_bwd(M, N, K, e, name, bias=True) -> list:
    """dX = dY @ W, dW = dYᵀ @ X, db = Σ dY, for Y[M, N] = X[M, K] Wᵀ."""
    ops = [matmul(M, K, N, e, name=name + "_dX", kind="cublas_gemm"),
           matmul(N, K, M, e, name=name + "_dW", kind="cublas_gemm")]
    if bias:
        ops.append(Op(name + "_db", M * N * e, N * e, M * N))
    return ops


def elementwise(name, numel, e, n_in, n_out=1, *, extra_read=0, flops_per=1) -> Op:
    return Op(name, n_in * numel * e + extra_read, n_out * numel * e, flops_per * numel)


def eager_layer_norm_fwd(M, C, e, name) -> Op:
    return Op(name, M * C * e + 2 * C * e, M * C * e + 2 * M * F32, 10 * M * C)


def eager_layer_norm_bwd(M, C, e, name) -> list:
    # native_layer_norm_backward: dx in one kernel, dweight/dbias in a second pass over dy and x.
    return [Op(name + "_dx", 2 * M * C * e + 2 * M * F32 + C * e, M * C * e, 16 * M * C),
            Op(name + "_dwdb", 2 * M * C * e + 2 * M * F32, 2 * C * e, 4 * M * C)]


def flash_sdpa_fwd(B, N, H, D, e) -> Op:
    op = attention_fwd(B, N, H, D, e)
    return dataclasses.replace(op, name="sdpa_flash_fwd")


def flash_sdpa_bwd(B, N, H, D, e) -> list:
    """FlashAttention-2 backward as PyTorch runs it: Δ preprocessing, one pass writing dk, dv and
    an fp32 dq accumulator, dq conversion; dq/dk/dv are separate [B, H, N, D] tensors."""
    row, stats = B * N * H * D * e, B * H * N * F32
    return [Op("sdpa_flash_bwd_delta", 2 * row, stats, 2 * B * N * H * D),
            Op("sdpa_flash_bwd", 4 * row + 2 * stats, 2 * row + 2 * B * N * H * D * F32,
               10 * B * H * N * N * D, "attention", (B * H, N, D)),
            Op("sdpa_flash_bwd_dq_convert", B * N * H * D * F32, row, B * N * H * D)]


# ------------------------------------------------------------------------------------------------
# One ViT block, forward and forward+backward, both ways.

def block_ops(impl, B, N, C, H, e, *, backward, layer_scale=False, mlp_ratio=4.0):
    """The op sequence of one pre-norm ViT block (LN1, qkv, attention, proj, residual, LN2, MLP,
    residual) for an impl of IMPLS. backward=True: training forward then backward.
    'vit_fast cublas' is vit_fast with the MLP's GEMMs on cuBLAS (VIT_FAST_BACKEND=cublas)."""
    M, D, Hd = B * N, C // H, int(C * mlp_ratio)
    ls = layer_scale
    MC = M * C
    if impl == "torch.compile":
        return compiled_block_ops(B, N, C, H, e, backward=backward, layer_scale=ls,
                                  mlp_ratio=mlp_ratio)
    if impl in ("vit_fast", "vit_fast cublas"):
        cublas = impl == "vit_fast cublas"
        mlp_fwd = gelu_mlp_cublas_fwd if cublas else gelu_mlp_fwd
        mlp_bwd = gelu_mlp_cublas_bwd if cublas else gelu_mlp_bwd
        fwd = [layer_norm_fwd(M, C, e, stats=False), eager_linear(M, 3 * C, C, e, "qkv_linear"),
               attention_fwd(B, N, H, D, e), eager_linear(M, C, C, e, "proj_linear"),
               dataclasses.replace(layer_norm_fwd(M, C, e, residual=True, layer_scale=ls,
                                                  stats=False),
                                   name="residual_layer_norm_fwd"),
               *mlp_fwd(M, C, Hd, e, train=backward, layer_scale=ls)]
        if not backward:
            return fwd
        P = _ln_programs(M, C)
        # The Block's backward rebuilds each LayerNorm output (from s, resp. x, and the saved
        # statistics) right before the weight-gradient GEMM that needs it, instead of saving it
        # (vit_fast/ops/residual_layer_norm_mlp.py, layer_norm_linear.py).
        bwd = [dataclasses.replace(layer_norm_fwd(M, C, e), name="layer_norm2_rebuild"),
               *mlp_bwd(M, C, Hd, e, layer_scale=ls),
               *layer_norm_bwd(M, C, e, P, residual=True, has_ds=True, layer_scale=ls),
               *eager_linear_bwd(M, C, C, e, "proj_linear"),
               *attention_bwd(B, N, H, D, e),
               dataclasses.replace(layer_norm_fwd(M, C, e), name="layer_norm1_rebuild"),
               *eager_linear_bwd(M, 3 * C, C, e, "qkv_linear")]
        # x's gradient: LN1's backward adds the residual's in an fp32 stream (block_step.py's
        # ln1_adds), a pass of its own in a 16-bit one
        if e == F32 and C <= LN1_ADDS_MAX_C:
            bwd += layer_norm_bwd(M, C, e, P, has_ds=True)
        else:
            bwd += [*layer_norm_bwd(M, C, e, P), elementwise("add_grad_x", MC, e, 2)]
        return fwd + bwd
    if impl != "eager":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    # Flash SDPA writes its output in [B, N, H, D] memory order, so timm's transpose(1, 2).reshape
    # is a view (no copy); its backward stacks dq, dk, dv ([3, B, H, N, D]) and copies that into
    # the [B, N, 3C] layout of qkv (aten stack + clone, as a traced timm Block runs them).
    fwd = [eager_layer_norm_fwd(M, C, e, "layer_norm1"), eager_linear(M, 3 * C, C, e, "qkv_linear"),
           flash_sdpa_fwd(B, N, H, D, e), eager_linear(M, C, C, e, "proj_linear")]
    fwd += [elementwise("mul_ls1", MC, e, 1, extra_read=C * e)] if ls else []
    fwd += [elementwise("add_residual1", MC, e, 2), eager_layer_norm_fwd(M, C, e, "layer_norm2"),
            eager_linear(M, Hd, C, e, "fc1_linear"), elementwise("gelu", M * Hd, e, 1, flops_per=20),
            eager_linear(M, C, Hd, e, "fc2_linear")]
    fwd += [elementwise("mul_ls2", MC, e, 1, extra_read=C * e)] if ls else []
    fwd += [elementwise("add_residual2", MC, e, 2)]
    if not backward:
        return fwd
    bwd = []
    if ls:
        bwd += _eager_mul_bwd("ls2", MC, C, e)
    bwd += [*eager_linear_bwd(M, C, Hd, e, "fc2_linear"),
            elementwise("gelu_bwd", M * Hd, e, 2, flops_per=25),
            *eager_linear_bwd(M, Hd, C, e, "fc1_linear"),
            *eager_layer_norm_bwd(M, C, e, "layer_norm2"),
            elementwise("add_grad_x1", MC, e, 2)]
    if ls:
        bwd += _eager_mul_bwd("ls1", MC, C, e)
    bwd += [*eager_linear_bwd(M, C, C, e, "proj_linear"),
            *flash_sdpa_bwd(B, N, H, D, e),
            elementwise("stack_dqkv", 3 * MC, e, 1), elementwise("clone_dqkv", 3 * MC, e, 1),
            *eager_linear_bwd(M, 3 * C, C, e, "qkv_linear"),
            *eager_layer_norm_bwd(M, C, e, "layer_norm1"),
            elementwise("add_grad_x", MC, e, 2)]
    return fwd + bwd


def compiled_block_ops(B, N, C, H, e, *, backward, layer_scale=False, mlp_ratio=4.0):
    """timm's Block under torch.compile (Inductor's default mode): GEMMs stay cuBLAS calls and
    attention the flash SDPA kernel; each chain of pointwise ops and row reductions between them
    becomes one generated kernel (mul_ls + residual add + LayerNorm; mul_ls + residual add; the
    gradient adds folded into the LayerNorm backward). GELU stays its own pass: Inductor does not
    fuse into cuBLAS epilogues without max-autotune's Triton GEMM templates."""
    M, D, Hd = B * N, C // H, int(C * mlp_ratio)
    MC, ls = M * C, int(layer_scale)
    fwd = [eager_layer_norm_fwd(M, C, e, "layer_norm1"), eager_linear(M, 3 * C, C, e, "qkv_linear"),
           flash_sdpa_fwd(B, N, H, D, e), eager_linear(M, C, C, e, "proj_linear"),
           Op("fused_ls1_residual_layer_norm2", 2 * MC * e + (2 + ls) * C * e,
              2 * MC * e + 2 * M * F32, 12 * MC),
           eager_linear(M, Hd, C, e, "fc1_linear"), elementwise("gelu", M * Hd, e, 1, flops_per=20),
           eager_linear(M, C, Hd, e, "fc2_linear"),
           Op("fused_ls2_residual", 2 * MC * e + ls * C * e, MC * e, 2 * MC)]
    if not backward:
        return fwd

    def ln_bwd(name, grad_inputs):
        """LayerNorm backward with the residual stream's gradient add fused into its dx kernel."""
        dx, dwdb = eager_layer_norm_bwd(M, C, e, name)
        return [dataclasses.replace(dx, read=dx.read + (grad_inputs - 1) * MC * e), dwdb]

    def ls_bwd(name):  # d branch = g·gamma and d gamma = Σ g·branch, one kernel
        return [Op(f"fused_{name}_bwd", 2 * MC * e + C * e, MC * e + C * F32, 2 * MC)] if ls else []

    bwd = [*ls_bwd("ls2"), *eager_linear_bwd(M, C, Hd, e, "fc2_linear"),
           elementwise("gelu_bwd", M * Hd, e, 2, flops_per=25),
           *eager_linear_bwd(M, Hd, C, e, "fc1_linear"), *ln_bwd("layer_norm2", 2),
           *ls_bwd("ls1"), *eager_linear_bwd(M, C, C, e, "proj_linear"),
           *flash_sdpa_bwd(B, N, H, D, e),
           # Inductor writes the stacked dq, dk, dv straight in qkv's layout: one copy, not two
           elementwise("stack_dqkv", 3 * MC, e, 1), *eager_linear_bwd(M, 3 * C, C, e, "qkv_linear"),
           *ln_bwd("layer_norm1", 2)]
    return fwd + bwd


def _eager_mul_bwd(name, MC, C, e):
    """Backward of branch·gamma: d branch = g·gamma, d gamma = Σ g·branch (mul, then a reduction)."""
    return [elementwise(f"mul_{name}_bwd_input", MC, e, 1, extra_read=C * e),
            elementwise(f"mul_{name}_bwd_gamma", MC, e, 2),
            Op(f"sum_{name}_bwd_gamma", MC * e, C * e, MC)]


def residual_layer_norm_ops(impl, M, C, e, *, layer_scale, backward=True):
    """Only the residual (+LayerScale) + LayerNorm segment between attention and MLP."""
    if impl == "vit_fast":
        ops = [layer_norm_fwd(M, C, e, residual=True, layer_scale=layer_scale)]
        if backward:
            ops += layer_norm_bwd(M, C, e, _ln_programs(M, C), residual=True, has_ds=True,
                                  layer_scale=layer_scale)
        return ops
    ops = [elementwise("mul_ls1", M * C, e, 1, extra_read=C * e)] if layer_scale else []
    ops += [elementwise("add_residual1", M * C, e, 2), eager_layer_norm_fwd(M, C, e, "layer_norm2")]
    if backward:
        ops += [*eager_layer_norm_bwd(M, C, e, "layer_norm2"), elementwise("add_grad_x1", M * C, e, 2)]
        ops += _eager_mul_bwd("ls1", M * C, C, e) if layer_scale else []
    return ops
