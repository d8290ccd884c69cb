"""What kernel and host work would take vit_fast to >= 1.3x timm eager and >= 1.1x torch.compile
(issue 29, point 3), by the calibrated model (predict.py): cumulative what-if steps applied to
vit_fast's AMP training step, each printed with its modelled img/s and what backs its efficiency.

Every step changes bytes, launches or host time only; its kernels keep the fitted efficiencies of
their class (cuBLAS GEMM, FA2-class attention, memory-bound), except ``gemm_parity``, which is
the one step no SASS figure or library backs and is printed as a requirement (the Triton GEMM
fraction of cuBLAS it would need), not as a prediction.

Steps (each on top of the previous):
- ``today``: vit_fast as it is (Triton GEMMs at the unbacked 0.7 of cuBLAS; host per Block from
  the host benchmark; LayerNorm 1's backward already adds the fp32 stream's gradient).
- ``host_half``: issue 26's goal, the host path per Block at 0.5x timm eager's (Triton's Python
  launch path included), no other change.
- ``cublas``: every GEMM on cuBLAS (VIT_FAST_BACKEND=cublas: the MLP's GELU and residual
  epilogues as Triton passes); the library backs the GEMMs.
- ``amp_casts``: the AMP backward's activation-sized cast still in the op list (one, the
  stream gradient's to l for the MLP backward: the LayerNorm rebuilds already write the
  autocast dtype, the LayerNorm backwards already read the GEMMs' l gradient and LN2's writes
  the branch's in l) folded into the kernel before it (each LayerNorm backward writes the stream
  gradient in fp32 and its l copy for the next GEMM). Not built: that kernel is the next
  Block's LayerNorm 1 backward, another autograd node, which hands on one gradient tensor.
- ``bias_grads``: the bias column sums (fc2, qkv, proj) as per-program partials of the kernel
  that writes each gradient (LayerNorm backwards), not passes of their own; fc1's already is
  (the dGELU pass writes its partials: the sum left reads those, not d_pre). Not built: the
  step gives the general path's bits, where qkv's and proj's bias gradients are aten sums in
  other autograd nodes (the linear layers') and fc2's reads the incoming gradient, which no
  kernel of the MLP writes.
- ``graphs``: the forward and backward replayed as CUDA graphs (issue 26, point 3): no host
  work per kernel (the graph launch and the optimizer's few kernels remain).
- ``gemm_parity``: (requirement) the MLP's GELU / dGELU / residual epilogues fused into the GEMMs
  as vit_fast's Triton GEMM does, with that GEMM at cuBLAS's fraction. cuBLASLt's GELU epilogues
  compute the tanh approximation: they serve tanh-GELU models, not timm's default erf GELU.
"""
from __future__ import annotations

import dataclasses

from . import gpu_peaks, predict, predict_host, predict_ops
from . import roofline_amp as ra
from .roofline import F32

STEPS = ("today", "host_half", "cublas", "amp_casts", "bias_grads", "graphs", "gemm_parity")
BACKING = {
    "today": "Triton GEMMs at 0.7 of cuBLAS: NOT backed (issue 17's estimate)",
    "host_half": "host work (issue 26), no kernel efficiency involved",
    "cublas": "cuBLAS GEMMs (library); epilogue passes at the fitted DRAM fraction",
    "amp_casts": "memory-bound Triton kernels at the fitted DRAM fraction (LayerNorm builds: "
                 "<= 128 registers, 0 spills, compile-check)",
    "bias_grads": "as amp_casts (per-program partials, reduced in a fixed order: deterministic)",
    "graphs": "host work (issue 26 point 3: the step replayed as a CUDA graph), no kernel change",
    "gemm_parity": "NOT backed: a GEMM with erf-GELU epilogues at cuBLAS speed (no library has "
                   "one; the Triton/Hopper GEMM is unmeasured): a requirement, not a prediction",
}
_CASTS = {"rebuilt_h1_to_lp", "rebuilt_h2_to_lp", "grad_out_to_lp"}


def _fold_amp_casts(ops, M, C, l):
    """Drop the casts still in the op list (_CASTS: the step's LayerNorm backwards already read
    their dh and write the branch's gradient in l, roofline_amp.vit_fast_ops); the rebuilds write
    l; each LayerNorm backward writes the stream gradient's l copy beside the fp32 one (for the
    next block's MLP backward, instead of grad_out_to_lp)."""
    MC, out = M * C, []
    for op in ops:
        if op.name in _CASTS:
            continue
        if op.name.endswith("_rebuild_fp32"):
            op = dataclasses.replace(ra.layer_norm_fwd(M, C, l), name=op.name[:-5] + "_lp")
        elif op.name == "layer_norm_bwd":
            op = dataclasses.replace(op, write=op.write + MC * l)
        out.append(op)
    return out


def _fold_bias_grads(ops):
    return [op for op in ops if op.name not in
            ("mlp_db1_colsum", "mlp_db2_colsum", "qkv_linear_db", "proj_linear_db")]


def _gemm_parity(B, N, C, H, l, ls):
    """vit_fast's fused (Triton-GEMM) MLP in place of the cuBLAS one, with amp_casts and
    bias_grads applied to it too (its GEMMs are costed at cuBLAS's fraction by the caller)."""
    M = B * N
    fused = ra.vit_fast_ops(B, N, C, H, l, backward=True, layer_scale=ls)
    fused = _fold_bias_grads(_fold_amp_casts(fused, M, C, l))
    return [dataclasses.replace(op, kind="cublas_gemm") if op.kind == "triton_gemm" else op
            for op in fused]


def block_ops(step, B, N, C, H, l, ls):
    """Training block ops (forward + backward) and the impl whose host model applies."""
    i = STEPS.index(step)
    M = B * N
    if i < STEPS.index("cublas"):
        return ra.vit_fast_ops(B, N, C, H, l, backward=True, layer_scale=ls), "vit_fast"
    if i == STEPS.index("gemm_parity"):
        return _gemm_parity(B, N, C, H, l, ls), "vit_fast"
    ops = predict_ops.vit_fast_cublas_ops(B, N, C, H, l, backward=True, layer_scale=ls)
    if i >= STEPS.index("amp_casts"):
        ops = _fold_amp_casts(ops, M, C, l)
    if i >= STEPS.index("bias_grads"):
        ops = _fold_bias_grads(ops)
    return ops, "vit_fast_cublas"


def _host_half(costs):
    """Every (mode, precision): vit_fast's host per Block at half eager's, Triton's launch path
    included (its per-launch cost folded into the half)."""
    return {k: dataclasses.replace(c, vit_fast_us=0.5 * c.eager_host_us, vit_fast_host_share=1.0,
                                   host_instruction_ratio=None, triton_launch_us=0.0)
            for k, c in costs.items()}


def _host(step, costs, assume):
    """(host costs, assumptions) of a step: today's; half eager's per Block; none per kernel
    under CUDA graphs (one graph launch per step, charged as the synchronize's 10 µs)."""
    i = STEPS.index(step)
    if i == 0:
        return costs, assume
    if i < STEPS.index("graphs"):
        return _host_half(costs), assume
    return ({k: dataclasses.replace(c, vit_fast_us=0.0, triton_launch_us=0.0, eager_us=0.0)
             for k, c in costs.items()},
            dataclasses.replace(assume, host_speed=0.0, launch_us=0.0))


def run(gpu, model, batch, *, eff=None, assume=None, host_costs=None) -> dict:
    """{'eager': row, 'compile': row, 'steps': [row per STEPS]} for AMP training."""
    g = gpu_peaks.get(gpu) if isinstance(gpu, str) else gpu
    s = predict_ops.shape(model)
    eff = eff or predict._fitted_default()
    assume = assume or predict_host.HostAssumptions()
    costs = host_costs or predict_host.load()[0]
    base = {r["impl"]: r for r in predict.predict(g, model, batch, "train", ("eager", "compile"),
                                                  eff=eff, assume=assume, host_costs=costs)}
    out = {"eager": base["eager"], "compile": base["compile"], "steps": []}
    for step in STEPS:
        ops, impl = block_ops(step, batch, s.N, s.C, s.H, 2, s.layer_scale)
        fwd_len = len(predict_ops.block_ops(
            "vit_fast" if impl == "vit_fast" else "vit_fast_cublas", batch, s.N, s.C, s.H, 2,
            backward=False, layer_scale=s.layer_scale))
        segs = [seg if seg.part == "other" else dataclasses.replace(
                    seg, ops=tuple(ops[:fwd_len] if seg.part == "block_fwd" else ops[fwd_len:]))
                for seg in predict_ops.step_segments(impl, s, batch, "train")]
        step_costs, step_assume = _host(step, costs, assume)
        a = predict.step_arrays(impl, s, batch, "train", g, step_costs, step_assume, segments=segs)
        r = predict.simulate(a, g, eff, step_assume)
        ips = batch / r["step_s"]
        out["steps"].append({
            "step": step, "img_per_s": ips, "step_ms": r["step_s"] * 1e3,
            "gpu_busy_ms": r["gpu_busy_s"] * 1e3, "host_ms": r["host_s"] * 1e3,
            "host_bound": r["host_bound"], "vs_eager": ips / base["eager"]["img_per_s"],
            "vs_compile": ips / base["compile"]["img_per_s"], "backing": BACKING[step],
            "breakdown_ms": {k: v * 1e3 for k, v in predict.breakdown(a, g, eff).items()}})
    return out


def parity_needed(gpu, model, batch, target_vs_compile=1.1, *, eff=None, assume=None,
                  host_costs=None):
    """The fraction of cuBLAS a GEMM with fused GELU epilogues must reach for the gemm_parity
    step to meet ``target_vs_compile`` (None if even cuBLAS parity falls short), by bisection on
    Efficiency.triton_gemm with that step's kernels costed as a Triton GEMM."""
    g = gpu_peaks.get(gpu) if isinstance(gpu, str) else gpu
    s = predict_ops.shape(model)
    eff = eff or predict._fitted_default()
    assume = assume or predict_host.HostAssumptions()
    costs, step_assume = _host("gemm_parity", host_costs or predict_host.load()[0], assume)
    comp = predict.predict(g, model, batch, "train", ("compile",), eff=eff, assume=assume,
                           host_costs=host_costs)[0]["img_per_s"]
    ops = [dataclasses.replace(op, kind="triton_gemm")
           if op.kind == "cublas_gemm" and op.name.startswith("mlp_") else op
           for op in _gemm_parity(batch, s.N, s.C, s.H, 2, s.layer_scale)]
    fwd_len = len(predict_ops.block_ops("vit_fast", batch, s.N, s.C, s.H, 2, backward=False,
                                        layer_scale=s.layer_scale))
    segs = [seg if seg.part == "other" else dataclasses.replace(
                seg, ops=tuple(ops[:fwd_len] if seg.part == "block_fwd" else ops[fwd_len:]))
            for seg in predict_ops.step_segments("vit_fast", s, batch, "train")]
    a = predict.step_arrays("vit_fast", s, batch, "train", g, costs, step_assume, segments=segs)

    def ratio(frac):
        e = dataclasses.replace(eff, triton_gemm=frac)
        return batch / predict.simulate(a, g, e, step_assume)["step_s"] / comp
    if ratio(1.0) < target_vs_compile:
        return None
    lo, hi = 0.3, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ratio(mid) >= target_vs_compile else (mid, hi)
    return hi

