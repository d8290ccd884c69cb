"""AMP training (fp32 parameters and residual stream, torch.autocast to bf16/fp16) in the roofline
model of vit_fast/bench/roofline.py: the same conventions (compulsory HBM traffic, model, not
measured), with each tensor at its own element size. ``l`` is the autocast dtype's bytes, F32 = 4.

Two implementations of one pre-norm ViT block, forward and backward:
- ``eager``: timm's Block under autocast. LayerNorm runs in fp32 (autocast's fp32 list) and writes
  an fp32 output that the next Linear casts; the Linears cast their fp32 weights (autocast's cache:
  once per step) and compute in ``l``; LayerScale multiplies an ``l`` branch by an fp32 gamma
  (fp32 result by type promotion); the residual adds are fp32. Backward: autograd casts each
  gradient back to its input's dtype (an extra pass per cast) and the weight gradients to fp32.
- ``vit_fast``: the Block's AMP path (vit_fast/ops/layer_norm_linear.py,
  residual_layer_norm_mlp.py): the LayerNorm kernels read the fp32 stream and write the
  normalized activations in ``l`` (the forward writes no statistics: nothing keeps them); s stays
  fp32; fc2's epilogue adds into the fp32 stream; the weights are cast once per step. Its
  backward as the code runs it today: each LayerNorm output is rebuilt from the fp32 stream by
  the same kernel, written in ``l`` directly; the stream's gradient is cast to ``l`` for the MLP
  backward; the LayerNorm backwards read their dy (and LN2 its LayerScale branch) in ``l`` and
  LN2's writes the branch's gradient in ``l`` for the proj GEMMs (the one-node step,
  vit_fast/block_step.py: no casts between them).
tests/test_roofline.py checks the mixed-dtype kernels byte-exactly against the interpreter and
the activation-sized casts against the ops a traced AMP Block runs. Weight-sized ops of C
elements (LayerScale's power-of-two split) are left out.
"""
from __future__ import annotations

import dataclasses

from . import roofline as rl
from .roofline import F32, Op

AMP_IMPLS = ("eager", "vit_fast")


def to_dtype(name, numel, src, dst) -> Op:
    """A dtype cast of ``numel`` elements (torch's _to_copy): read at src bytes, write at dst."""
    return Op(name, numel * src, numel * dst, numel)


def weight_casts(C, Hd, l, *, grads) -> list:
    """The Linears' fp32 weights and biases cast to l once per step (forward), or, with grads,
    their l gradients cast to fp32 (the casts' backward)."""
    shapes = (("qkv", 3 * C, C), ("proj", C, C), ("fc1", Hd, C), ("fc2", C, Hd))
    ops = []
    for layer, rows, cols in shapes:
        for part, n in (("weight", rows * cols), ("bias", rows)):
            ops.append(to_dtype(f"{layer}_{part}_grad_to_fp32" if grads else f"{layer}_{part}_to_lp",
                                n, l if grads else F32, F32 if grads else l))
    return ops


def layer_norm_fwd(M, C, l, *, residual=False, layer_scale=False, samples=0, stats=True) -> Op:
    """residual_layer_norm_fwd_kernel under AMP: reads the fp32 stream (x, or the residual plus
    the l branch · fp32 LayerScale · fp32 drop-path scale), fp32 weight/bias; writes y in l (and
    s in fp32) and, with ``stats``, the fp32 statistics."""
    read = M * C * F32 + 2 * C * F32
    write = M * C * l + 2 * M * F32 * int(stats)
    if residual:
        read += M * C * l + C * F32 * int(layer_scale) + samples * F32
        write += M * C * F32
    return Op("layer_norm_fwd_amp", read, write, 10 * M * C)


def fc2_fwd(M, C, Hd, l, *, layer_scale=False, samples=0) -> Op:
    """matmul_kernel for fc2 under AMP: act [M, Hd] and the weights in l, the fp32 stream s, fp32
    LayerScale and drop-path scale read by the epilogue, the output written in fp32."""
    read = (M * Hd + Hd * C + C) * l + M * C * F32 + C * F32 * int(layer_scale) + samples * F32
    return Op("mlp_fc2_residual_amp", read, M * C * F32, 2 * M * C * Hd + 3 * M * C,
              "triton_gemm", (M, C, Hd))


def vit_fast_ops(B, N, C, H, l, *, backward, layer_scale=False, mlp_ratio=4.0):
    M, D, Hd, MC, ls = B * N, C // H, int(C * mlp_ratio), B * N * C, layer_scale
    fwd = [*weight_casts(C, Hd, l, grads=False),
           dataclasses.replace(layer_norm_fwd(M, C, l, stats=False), name="layer_norm1_fwd_amp"),
           rl.eager_linear(M, 3 * C, C, l, "qkv_linear"), rl.attention_fwd(B, N, H, D, l),
           rl.eager_linear(M, C, C, l, "proj_linear"),
           dataclasses.replace(layer_norm_fwd(M, C, l, residual=True, layer_scale=ls,
                                              stats=False),
                               name="residual_layer_norm2_fwd_amp"),
           rl.matmul(M, Hd, C, l, name="mlp_fc1_gelu", bias=True, store_pre=backward,
                     epilogue_flops=20),
           fc2_fwd(M, C, Hd, l, layer_scale=ls)]
    if not backward:
        return fwd
    P = rl._ln_programs(M, C)
    ln1_adds = C <= rl.LN1_ADDS_MAX_C  # LN1's backward adds the residual's gradient (fp32 stream)
    g_lp = ([Op("mul_grad_ls2_pow2", MC * F32 + C * F32, MC * F32, MC)] if ls else [])
    bwd = [dataclasses.replace(layer_norm_fwd(M, C, l), name="layer_norm2_rebuild_amp"),
           *g_lp, to_dtype("grad_out_to_lp", MC, F32, l),
           *rl.gelu_mlp_bwd(M, C, Hd, l, layer_scale=ls),
           *rl.layer_norm_bwd(M, C, F32, P, residual=True, has_ds=True, layer_scale=ls,
                              dy_e=l, dx_e=l, x_e=l),
           *rl.eager_linear_bwd(M, C, C, l, "proj_linear"),
           *rl.attention_bwd(B, N, H, D, l),
           dataclasses.replace(layer_norm_fwd(M, C, l), name="layer_norm1_rebuild_amp"),
           *rl.eager_linear_bwd(M, 3 * C, C, l, "qkv_linear"),
           *rl.layer_norm_bwd(M, C, F32, P, has_ds=ln1_adds, dy_e=l)]
    if not ln1_adds:
        bwd.append(rl.elementwise("add_grad_x", MC, F32, 2))
    bwd += weight_casts(C, Hd, l, grads=True)
    return fwd + bwd


def eager_ops(B, N, C, H, l, *, backward, layer_scale=False, mlp_ratio=4.0):
    M, D, Hd, MC, ls = B * N, C // H, int(C * mlp_ratio), B * N * C, layer_scale
    branch = F32 if ls else l  # LayerScale's output: l branch · fp32 gamma promotes to fp32

    def ls_fwd(name):
        return [Op(f"mul_{name}", MC * l + C * F32, MC * F32, MC)] if ls else []

    def ls_bwd(name):  # d branch = g·gamma (fp32, then cast to l); d gamma = Σ g·branch
        if not ls:
            return [to_dtype(f"grad_{name}_branch_to_lp", MC, F32, l)]
        return [Op(f"mul_{name}_bwd_input", MC * F32 + C * F32, MC * F32, MC),
                to_dtype(f"grad_{name}_branch_to_lp", MC, F32, l),
                Op(f"mul_{name}_bwd_gamma", MC * F32 + MC * l, MC * F32, MC),
                Op(f"sum_{name}_bwd_gamma", MC * F32, C * F32, MC)]
    fwd = [*weight_casts(C, Hd, l, grads=False),
           rl.eager_layer_norm_fwd(M, C, F32, "layer_norm1"), to_dtype("ln1_out_to_lp", MC, F32, l),
           rl.eager_linear(M, 3 * C, C, l, "qkv_linear"), rl.flash_sdpa_fwd(B, N, H, D, l),
           rl.eager_linear(M, C, C, l, "proj_linear"),
           *ls_fwd("ls1"), Op("add_residual1", MC * (F32 + branch), MC * F32, MC),
           rl.eager_layer_norm_fwd(M, C, F32, "layer_norm2"), to_dtype("ln2_out_to_lp", MC, F32, l),
           rl.eager_linear(M, Hd, C, l, "fc1_linear"),
           rl.elementwise("gelu", M * Hd, l, 1, flops_per=20),
           rl.eager_linear(M, C, Hd, l, "fc2_linear"),
           *ls_fwd("ls2"), Op("add_residual2", MC * (F32 + branch), MC * F32, MC)]
    if not backward:
        return fwd
    bwd = [*ls_bwd("ls2"), *rl.eager_linear_bwd(M, C, Hd, l, "fc2_linear"),
           rl.elementwise("gelu_bwd", M * Hd, l, 2, flops_per=25),
           *rl.eager_linear_bwd(M, Hd, C, l, "fc1_linear"),
           to_dtype("grad_ln2_out_to_fp32", MC, l, F32),
           *rl.eager_layer_norm_bwd(M, C, F32, "layer_norm2"),
           rl.elementwise("add_grad_x1", MC, F32, 2),
           *ls_bwd("ls1"), *rl.eager_linear_bwd(M, C, C, l, "proj_linear"),
           *rl.flash_sdpa_bwd(B, N, H, D, l),
           rl.elementwise("stack_dqkv", 3 * MC, l, 1), rl.elementwise("clone_dqkv", 3 * MC, l, 1),
           *rl.eager_linear_bwd(M, 3 * C, C, l, "qkv_linear"),
           to_dtype("grad_ln1_out_to_fp32", MC, l, F32),
           *rl.eager_layer_norm_bwd(M, C, F32, "layer_norm1"),
           rl.elementwise("add_grad_x", MC, F32, 2),
           *weight_casts(C, Hd, l, grads=True)]
    return fwd + bwd


def block_ops(impl, B, N, C, H, l, *, backward, layer_scale=False, mlp_ratio=4.0):
    """The op sequence of one pre-norm ViT block under AMP (fp32 parameters and stream, autocast
    dtype of l bytes) for an impl of AMP_IMPLS; backward=True: training forward then backward."""
    if impl not in AMP_IMPLS:
        raise ValueError(f"impl must be one of {AMP_IMPLS} under AMP, got {impl!r}")
    build = vit_fast_ops if impl == "vit_fast" else eager_ops
    return build(B, N, C, H, l, backward=backward, layer_scale=layer_scale, mlp_ratio=mlp_ratio)
