"""The kernels of one whole-model step (AMP inference, or AMP training: forward, backward, SGD
step) for each way of running a timm ViT: the op lists the performance model times
(vit_fast/bench/predict.py). Same conventions as vit_fast/bench/roofline.py (compulsory HBM
traffic, 2·M·N·K FLOPs per GEMM); a model, not a measurement.

Implementations (IMPLS):
- ``eager``: timm as it runs under ``torch.autocast`` (roofline_amp.eager_ops): fp32 LayerNorm
  output cast for each Linear, the fp32 residual stream, flash SDPA (``attention="flash"``) or,
  for torch < 2.0 where timm had no SDPA path, the softmax attention with its N×N tensors
  (``attention="math"``: :func:`math_attention_fwd`/``_bwd``).
- ``compile``: timm under ``torch.compile`` (Inductor, default mode): GEMMs stay cuBLAS calls and
  attention the flash kernel; every chain of pointwise ops and row reductions between them is one
  generated kernel (:func:`compiled_block_ops`).
- ``vit_fast``: ``vit_fast.convert`` of the model, Triton kernels (roofline_amp.vit_fast_ops).
- ``vit_fast_cublas``: the same with the MLP's GEMMs on cuBLAS and its GELU and residual
  epilogues as separate Triton passes (``VIT_FAST_BACKEND=cublas``; :func:`vit_fast_cublas_ops`).

A step is a list of :class:`Segment` (stem, each block's forward, head, loss, each block's
backward, optimizer): the host model (predict_host.py) spreads each segment's host cost over its
kernels.
"""
from __future__ import annotations

import dataclasses

from . import roofline as rl
from . import roofline_amp as ra
from .roofline import F32, Op

IMPLS = ("eager", "compile", "vit_fast", "vit_fast_cublas")
MODES = ("infer", "train")
ATTENTION = ("flash", "math")

# timm model name -> (embed dim C, heads H, depth, LayerScale); patch 16, 1000 classes, one class
# token (deit3 adds its position embedding before the class token: the same 197 tokens at 224 px).
MODELS = {
    "vit_tiny_patch16_224": (192, 3, 12, False),
    "vit_small_patch16_224": (384, 6, 12, False),
    "vit_base_patch16_224": (768, 12, 12, False),
    "vit_large_patch16_224": (1024, 16, 24, False),
    "deit3_small_patch16_224": (384, 6, 12, True),
    "deit3_base_patch16_224": (768, 12, 12, True),
    "deit3_large_patch16_224": (1024, 16, 24, True),
}
PATCH, CLASSES, MLP_RATIO = 16, 1000, 4


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str
    C: int
    H: int
    depth: int
    layer_scale: bool
    img: int

    @property
    def patches(self) -> int:
        return (self.img // PATCH) ** 2

    @property
    def N(self) -> int:
        return self.patches + 1

    @property
    def params(self) -> int:
        """Parameter count (timm's, for these models)."""
        C, Hd = self.C, MLP_RATIO * self.C
        block = 3 * C * C + 3 * C + C * C + C + Hd * C + Hd + C * Hd + C + 4 * C
        block += 2 * C if self.layer_scale else 0
        stem = 3 * PATCH * PATCH * C + C + C + self.patches * C + (0 if self.layer_scale else C)
        return self.depth * block + stem + 2 * C + C * CLASSES + CLASSES


def shape(model: str, img_size: int = 224) -> Shape:
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if img_size % PATCH or img_size <= 0:
        raise ValueError(f"img_size must be a positive multiple of {PATCH}, got {img_size}")
    C, H, depth, ls = MODELS[model]
    return Shape(model, C, H, depth, ls, img_size)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Kernels launched together, with the host work that launches them: ``part`` is 'block_fwd',
    'block_bwd' (host cost from the host benchmark, per Block) or 'other' (host cost per op)."""
    name: str
    part: str
    ops: tuple


# ------------------------------------------------------------------------------------------------
# Attention as timm ran it before SDPA (torch < 2.0): q·kᵀ, softmax, ·v with the N×N tensors in
# memory, under autocast (softmax is on autocast's fp32 list: a cast in, fp32 out, a cast back for
# the second matmul). torch.matmul copies q, kᵀ, v (views of qkv whose batch and head dims do not
# merge) into contiguous [B·H, N, D] operands, and the output's transpose(1, 2).reshape is a copy.

def math_attention_fwd(B, N, H, D, l) -> list:
    MC, S = B * N * H * D, B * H * N * N
    bmm = 2 * B * H * N * N * D
    return [rl.elementwise("q_copy", MC, l, 1), rl.elementwise("kT_copy", MC, l, 1),
            Op("bmm_qk", 2 * MC * l, S * l, bmm, "cublas_gemm"),
            rl.elementwise("mul_scale", S, l, 1),
            ra.to_dtype("scores_to_fp32", S, l, F32),
            Op("softmax", S * F32, S * F32, 5 * S),
            ra.to_dtype("probs_to_lp", S, F32, l),
            rl.elementwise("v_copy", MC, l, 1),
            Op("bmm_pv", S * l + MC * l, MC * l, bmm, "cublas_gemm"),
            rl.elementwise("out_transpose_copy", MC, l, 1)]


def math_attention_bwd(B, N, H, D, l) -> list:
    MC, S = B * N * H * D, B * H * N * N
    bmm = 2 * B * H * N * N * D
    return [rl.elementwise("grad_out_copy", MC, l, 1),
            Op("bmm_dprobs", 2 * MC * l, S * l, bmm, "cublas_gemm"),
            Op("bmm_dv", S * l + MC * l, MC * l, bmm, "cublas_gemm"),
            ra.to_dtype("dprobs_to_fp32", S, l, F32),
            Op("softmax_bwd", 2 * S * F32, S * F32, 3 * S),
            ra.to_dtype("dscores_to_lp", S, F32, l),
            rl.elementwise("mul_scale_bwd", S, l, 1),
            Op("bmm_dq", S * l + MC * l, MC * l, bmm, "cublas_gemm"),
            Op("bmm_dk", S * l + MC * l, MC * l, bmm, "cublas_gemm")]


def eager_block_ops(B, N, C, H, l, *, backward, layer_scale, attention="flash") -> list:
    """roofline_amp.eager_ops, with the flash kernels swapped for the softmax attention when
    ``attention == 'math'``."""
    ops = ra.eager_ops(B, N, C, H, l, backward=backward, layer_scale=layer_scale)
    if attention == "flash":
        return ops
    if attention != "math":
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    D = C // H
    out = []
    for op in ops:
        if op.name == "sdpa_flash_fwd":
            out += math_attention_fwd(B, N, H, D, l)
        elif op.name == "sdpa_flash_bwd_delta":
            out += math_attention_bwd(B, N, H, D, l)
        elif not op.name.startswith("sdpa_flash_bwd"):
            out.append(op)
    return out


# ------------------------------------------------------------------------------------------------
# torch.compile (Inductor, default mode) of timm's Block under autocast.

def compiled_block_ops(B, N, C, H, l, *, backward, layer_scale) -> list:
    """GEMMs as cuBLAS calls, attention the flash kernel; fused memory-bound kernels:
    - the previous block's residual add (+ LayerScale) with this block's LayerNorm 1 and the cast
      of its output: read the fp32 stream and the branch, write the stream and h (l);
    - residual add (+ LayerScale) + LayerNorm 2 + cast, likewise;
    - fc1's bias + GELU (one pass over the hidden activation; Inductor does not fuse into the
      cuBLAS call itself);
    backward: each LayerNorm's dx kernel also adds the stream's gradient and writes its cast for
    the branch; the LayerNorm weight/bias and bias gradients are column reductions of their own;
    dq, dk, dv are written into qkv's layout by one copy. What the partitioner saves or
    recomputes is taken as what eager saves (the GEMM inputs and outputs it needs)."""
    M, D, Hd = B * N, C // H, MLP_RATIO * C
    MC, MH, ls = M * C, M * Hd, int(layer_scale)
    branch = l  # the branch enters the fused kernel in l; LayerScale's fp32 gamma is read there

    def fused_ln(name):
        return Op(name, MC * (F32 + branch) + (2 + ls) * C * F32, MC * (F32 + l) + 2 * M * F32,
                  12 * MC)

    fwd = [*ra.weight_casts(C, Hd, l, grads=False),
           fused_ln("fused_residual2_ln1_cast"), rl.eager_linear(M, 3 * C, C, l, "qkv_linear"),
           rl.flash_sdpa_fwd(B, N, H, D, l), rl.eager_linear(M, C, C, l, "proj_linear"),
           fused_ln("fused_residual1_ln2_cast"),
           rl.matmul(M, Hd, C, l, name="fc1_mm", kind="cublas_gemm"),
           Op("fused_bias_gelu", MH * l + Hd * l, MH * l, 20 * MH),
           rl.eager_linear(M, C, Hd, l, "fc2_linear")]
    if not backward:
        return fwd

    def ln_bwd(name):
        # dx: reads dh (l), x (fp32), the statistics and the stream's gradient (fp32); writes the
        # new stream gradient (fp32) and its cast for the branch (l). weight/bias grads: one
        # column reduction over dh and x.
        return [Op(f"fused_{name}_bwd_dx", MC * (l + 2 * F32) + 2 * M * F32 + C * F32,
                   MC * (F32 + l), 16 * MC),
                Op(f"{name}_bwd_dwdb", MC * (l + F32) + 2 * M * F32, 2 * C * F32, 4 * MC)]

    def ls_bwd(name):  # d gamma = Σ g·branch (column reduction); d branch is fused into the cast
        return [Op(f"{name}_bwd_gamma", MC * (F32 + l), C * F32, 2 * MC)] if ls else []

    def bias_grad(name, n):
        return Op(f"{name}_db", M * n * l, n * F32, M * n)
    bwd = [*ls_bwd("ls2"),
           rl.matmul(M, Hd, C, l, name="fc2_linear_dX", kind="cublas_gemm"),
           rl.matmul(C, Hd, M, l, name="fc2_linear_dW", kind="cublas_gemm"), bias_grad("fc2", C),
           Op("fused_gelu_bwd", 2 * MH * l + Hd * l, MH * l, 25 * MH),
           rl.matmul(M, C, Hd, l, name="fc1_linear_dX", kind="cublas_gemm"),
           rl.matmul(Hd, C, M, l, name="fc1_linear_dW", kind="cublas_gemm"), bias_grad("fc1", Hd),
           *ln_bwd("layer_norm2"), *ls_bwd("ls1"),
           rl.matmul(M, C, C, l, name="proj_linear_dX", kind="cublas_gemm"),
           rl.matmul(C, C, M, l, name="proj_linear_dW", kind="cublas_gemm"), bias_grad("proj", C),
           *rl.flash_sdpa_bwd(B, N, H, D, l),
           rl.elementwise("stack_dqkv", 3 * MC, l, 1),
           rl.matmul(M, C, 3 * C, l, name="qkv_linear_dX", kind="cublas_gemm"),
           rl.matmul(3 * C, C, M, l, name="qkv_linear_dW", kind="cublas_gemm"),
           bias_grad("qkv", 3 * C), *ln_bwd("layer_norm1"),
           *ra.weight_casts(C, Hd, l, grads=True)]
    return fwd + bwd


# ------------------------------------------------------------------------------------------------
# vit_fast with cuBLAS GEMMs in the MLP (kernels/gelu_elementwise.py) under AMP.

def vit_fast_cublas_ops(B, N, C, H, l, *, backward, layer_scale) -> list:
    """roofline_amp.vit_fast_ops with the MLP as kernels/gelu_elementwise runs it: fc1 addmm, the
    GELU pass (pre kept for the backward when training), fc2 mm, the residual epilogue adding the
    l branch into the fp32 stream; backward as roofline.gelu_mlp_cublas_bwd in l."""
    M, Hd, MC, MH = B * N, MLP_RATIO * C, B * N * C, B * N * MLP_RATIO * C
    ls = layer_scale
    out = []
    for op in ra.vit_fast_ops(B, N, C, H, l, backward=backward, layer_scale=ls):
        if op.name == "mlp_fc1_gelu":
            out += [rl.eager_linear(M, Hd, C, l, "mlp_fc1_addmm"),
                    Op("gelu_fwd_kernel", MH * l, MH * l, 20 * MH)]
        elif op.name == "mlp_fc2_residual_amp":
            out += [rl.eager_linear(M, C, Hd, l, "mlp_fc2_mm", bias=False),
                    Op("residual_epilogue_kernel", MC * (l + F32) + C * l + C * F32 * int(ls),
                       MC * F32, 3 * MC)]
        elif op.name in _TRITON_MLP_BWD:
            continue
        else:
            out.append(op)
            if op.name == "grad_out_to_lp":
                out += [o for o in rl.gelu_mlp_cublas_bwd(M, C, Hd, l, layer_scale=ls)
                        if not o.name.startswith("torch_")]
    return out


_TRITON_MLP_BWD = {"mlp_dgelu", "mlp_dW2", "mlp_db2_colsum", "mlp_dx", "mlp_dW1", "mlp_db1_colsum"}


PRECISIONS = ("amp", "bf16", "fp16")
_PURE_IMPL = {"eager": "eager", "compile": "torch.compile", "vit_fast": "vit_fast",
              "vit_fast_cublas": "vit_fast cublas"}


def block_ops(impl, B, N, C, H, l, *, backward, layer_scale, attention="flash",
              precision="amp") -> list:
    """One block's kernels; ``precision`` 'amp' (fp32 weights and stream, autocast to l) or
    'bf16'/'fp16' (the whole model in l: roofline.block_ops)."""
    if precision != "amp":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if impl not in _PURE_IMPL or attention != "flash":
            raise ValueError(f"impl must be one of {IMPLS} with flash attention, got {impl!r}")
        return rl.block_ops(_PURE_IMPL[impl], B, N, C, H, l, backward=backward,
                            layer_scale=layer_scale)
    if impl == "eager":
        return eager_block_ops(B, N, C, H, l, backward=backward, layer_scale=layer_scale,
                               attention=attention)
    if impl == "compile":
        return compiled_block_ops(B, N, C, H, l, backward=backward, layer_scale=layer_scale)
    if impl == "vit_fast":
        return ra.vit_fast_ops(B, N, C, H, l, backward=backward, layer_scale=layer_scale)
    if impl == "vit_fast_cublas":
        return vit_fast_cublas_ops(B, N, C, H, l, backward=backward, layer_scale=layer_scale)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def split_fwd_bwd(ops, fwd_len) -> tuple:
    return tuple(ops[:fwd_len]), tuple(ops[fwd_len:])


# ------------------------------------------------------------------------------------------------
# Stem (patch embedding, class token, position embedding), head (final LayerNorm, token pooling,
# classifier), loss and optimizer: the same kernels for every impl up to fusion.

def stem_ops(s: Shape, B, l, impl, st=F32) -> list:
    """``st``: bytes of the residual stream's elements (fp32 under AMP, l in pure l)."""
    P, C, N = s.patches, s.C, s.N
    img = 3 * s.img * s.img
    ops = [ra.to_dtype("images_to_lp", B * img, F32, l)] if st == F32 else []
    ops += [ra.to_dtype("patch_weight_to_lp", 3 * PATCH * PATCH * C, F32, l)] if st == F32 else []
    ops.append(rl.matmul(B * P, C, 3 * PATCH * PATCH, l, name="patch_embed_conv", bias=True,
                         kind="cublas_gemm"))
    if impl == "compile":  # class-token concat and position add: one kernel
        return ops + [Op("fused_cat_pos_embed", B * P * C * l + N * C * st, B * N * C * st,
                         B * N * C)]
    return ops + [Op("cat_cls_token", B * P * C * l, B * N * C * st, 0),
                  Op("add_pos_embed", B * N * C * st + N * C * st, B * N * C * st, B * N * C)]


def head_ops(s: Shape, B, l, *, backward, st=F32) -> tuple:
    """(forward ops, backward ops): the final LayerNorm over every token (timm normalizes all
    tokens, then pools the class token), the classifier on [B, C], the loss."""
    M, C = B * s.N, s.C
    fwd = [rl.eager_layer_norm_fwd(M, C, st, "final_norm"),
           *([ra.to_dtype("pooled_to_lp", B * C, F32, l)] if st == F32 else []),
           rl.eager_linear(B, CLASSES, C, l, "head_linear")]
    if not backward:
        return fwd, []
    fwd.append(Op("cross_entropy", B * CLASSES * l, B * F32, 5 * B * CLASSES))
    bwd = [Op("cross_entropy_bwd", B * CLASSES * l, B * CLASSES * l, 5 * B * CLASSES),
           *rl.eager_linear_bwd(B, CLASSES, C, l, "head_linear"),
           Op("scatter_pooled_grad", B * C * l, M * C * st, 0),  # zeros + the class-token row
           *rl.eager_layer_norm_bwd(M, C, st, "final_norm")]
    return fwd, bwd


def stem_bwd_ops(s: Shape, B, l, st=F32) -> list:
    """Position-embedding grad (sum over the batch), class-token grad, the patch GEMM's weight and
    bias grads (no input grad: the images need none)."""
    P, C, N = s.patches, s.C, s.N
    return [Op("pos_embed_grad", B * N * C * st, N * C * st, B * N * C),
            *([ra.to_dtype("patch_grad_to_lp", B * P * C, F32, l)] if st == F32 else []),
            rl.matmul(C, 3 * PATCH * PATCH, B * P, l, name="patch_embed_dW", kind="cublas_gemm"),
            Op("patch_embed_db", B * P * C * l, C * F32, B * P * C)]


def sgd_ops(s: Shape, foreach: bool) -> list:
    """timm's benchmark optimizer: SGD, momentum 0.9, weight decay 1e-4, fp32 parameters. torch
    >= 2.0 runs it as a few multi-tensor kernels (weight decay into the grad, momentum buffer
    update, parameter update: 44 bytes per parameter); torch 1.12 as three ops per parameter
    tensor plus zeroing the grads (set_to_none was False) and accumulating into them."""
    p = s.params
    if foreach:
        return [Op("sgd_foreach_weight_decay", 8 * p, 4 * p, p),
                Op("sgd_foreach_momentum", 8 * p, 4 * p, 2 * p),
                Op("sgd_foreach_update", 8 * p, 4 * p, p)]
    per_tensor = 12 * s.depth + 8  # parameter tensors (weights, biases, norms, embeddings)
    share = p // per_tensor
    return [Op("zero_grad", 0, 4 * p, 0), Op("accumulate_grad", 8 * p, 4 * p, p)] + [
        Op("sgd_weight_decay", 8 * share, 4 * share, share) for _ in range(per_tensor)] + [
        Op("sgd_momentum", 8 * share, 4 * share, 2 * share) for _ in range(per_tensor)] + [
        Op("sgd_update", 8 * share, 4 * share, share) for _ in range(per_tensor)]


def step_segments(impl, s: Shape, B, mode, *, l=2, attention="flash", foreach=True,
                  precision="amp") -> list:
    """The step as segments, in launch order."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if attention == "math" and impl != "eager":
        raise ValueError("attention='math' is timm's pre-SDPA path: impl must be 'eager'")
    train = mode == "train"
    N, C, H = s.N, s.C, s.H
    st = F32 if precision == "amp" else l
    fwd_only = block_ops(impl, B, N, C, H, l, backward=False, layer_scale=s.layer_scale,
                         attention=attention, precision=precision)
    if train:
        # A training forward can differ from inference (vit_fast stores fc1's pre-activation).
        both = block_ops(impl, B, N, C, H, l, backward=True, layer_scale=s.layer_scale,
                         attention=attention, precision=precision)
        blk_fwd, blk_bwd = split_fwd_bwd(both, len(fwd_only))
    else:
        blk_fwd, blk_bwd = tuple(fwd_only), ()
    head_f, head_b = head_ops(s, B, l, backward=train, st=st)
    segs = [Segment("stem", "other", tuple(stem_ops(s, B, l, impl, st)))]
    segs += [Segment(f"block{i}_fwd", "block_fwd", blk_fwd) for i in range(s.depth)]
    segs.append(Segment("head_fwd", "other", tuple(head_f)))
    if train:
        segs.append(Segment("head_bwd", "other", tuple(head_b)))
        segs += [Segment(f"block{i}_bwd", "block_bwd", blk_bwd) for i in reversed(range(s.depth))]
        segs.append(Segment("stem_bwd", "other", tuple(stem_bwd_ops(s, B, l, st))))
        segs.append(Segment("optimizer", "other", tuple(sgd_ops(s, foreach))))
    return segs
