"""PyTorch's flash SDPA as a second implementation of vit_fast::fused_qkv_attention/_backward
(issue 17), chosen by measurement beside the Triton kernel (vit_fast/tuning.py).

Same contract as kernels/attention.attention_fwd/_bwd: qkv [B, N, 3·H·D] in, out [B, N, H·D] and
the fp32 natural-log lse [B, H, N] out, dqkv [B, N, 3·H·D] back. q, k and v are strided views of
the packed qkv (no copies); flash writes out as [B, N, H, D] in memory, so out is a view too, and
its logsumexp is the kernel's lse. The op's autograd saves qkv, out and lse whichever runs, so
forward and backward are chosen independently and the memory figures hold. (SDPA's own autograd
would save the same q/k/v views, out and lse, plus its RNG state: tests/test_attention_sdpa.py
counts it on fake CUDA tensors.) The backward stacks dq, dk, dv into dqkv: one copy the kernel
does not make, part of what the timing weighs.

Eligible only under the ``auto`` policy, without dropout and without any other kernel argument
(segment ids): SDPA draws its dropout mask from the CUDA generator's Philox offset, while the
kernel's mask is a pure function of the int64 seed the op saves, which is what lets the backward
and activation-checkpoint recomputation regenerate it. Letting a measurement pick between the two
would make the mask, and the RNG stream later draws (drop-path) see, depend on the GPU's timings;
so with dropout_p > 0 the kernel always runs. On CUDA only fp16/bf16 are offered (flash's dtypes);
a call flash rejects (head dim, GPU) raises and the tuner skips it. On CPU the same math runs as
PyTorch's CPU flash kernel (tests).

The forward has a second kernel candidate on sm_90 where the installed triton has tensor
descriptors (kernels/attention_fwd_tma.tma_alternative: plain calls, TMA-aligned qkv): the same
kernel's math with its loads through TMA, timed beside the pointer kernel.

The backward has a third candidate where the GPU's plan is the fused dK/dV/dQ pass with dq
partials (kernels/attention.two_pass_alternative): the kernel's two passes, same mask and
determinism, timed beside it, with dropout and segment ids too.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vit_fast import dispatch, tuning
from vit_fast.kernels.attention import attention_bwd, attention_fwd, two_pass_alternative
from vit_fast.kernels.attention_fwd_tma import attention_fwd_tma, tma_offered


def _heads(qkv, num_heads):
    """q, k, v as [B, H, N, D] strided views of qkv [B, N, 3·H·D]."""
    D = qkv.shape[-1] // (3 * num_heads)
    q, k, v = qkv.unflatten(-1, (3, num_heads, D)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _as_heads(t, num_heads):
    """out / dout [B, N, H·D] as [B, H, N, D] (a view)."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _rows(out, qkv):
    """SDPA's out [B, H, N, D] as [B, N, H·D] (a view where SDPA wrote it as [B, N, H, D])."""
    B, N = qkv.shape[:2]
    return out.transpose(1, 2).reshape(B, N, -1)


def _packed(dq, dk, dv):
    """dq, dk, dv [B, H, N, D] as dqkv [B, N, 3·H·D], qkv's packing."""
    return torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2).flatten(2)


def sdpa_attention_fwd(qkv: Tensor, num_heads: int, scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, N, H·D], lse [B, H, N] fp32) from flash SDPA, no dropout."""
    q, k, v = _heads(qkv, num_heads)
    if qkv.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale)
    return _rows(out, qkv), lse.float().contiguous()


def sdpa_attention_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                       scale: float) -> Tensor:
    """dqkv [B, N, 3·H·D] from flash SDPA's backward given the forward's out and lse."""
    q, k, v = _heads(qkv, num_heads)
    g, o = _as_heads(dout, num_heads), _as_heads(out, num_heads)
    N = qkv.shape[1]
    if qkv.is_cuda:
        # Dense inputs: no cumulative sequence lengths; the Philox state is unread at p = 0.
        seed = torch.zeros(2, dtype=torch.uint64, device=qkv.device)
        offset = torch.zeros((), dtype=torch.uint64, device=qkv.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            g, q, k, v, o, lse, None, None, N, N, 0.0, False, seed, offset, scale=scale)
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, o, lse, 0.0, False, scale=scale)
    return _packed(dq, dk, dv)


# -- the reference's SDPA as an explicit forward/backward pair ---------------------------------
#
# Where dispatch sends the attention to the reference (fp32 on a GPU), the reference runs
# F.scaled_dot_product_attention on q/k/v views of qkv, and SDPA calls one fused kernel and,
# through its autograd, that kernel's backward. The Block's step calls that same pair itself
# (block_step's bodies call reference_fwd/_bwd): same ops, same arguments, so the same bits, without
# recording a graph per call -- which lets its body be replayed (vit_fast/step_program.py).
# Only where SDPA's own choice for the problem is one of these two kernels.

def reference_pair(qkv_shape, dtype, device, num_heads):
    """'efficient' (CUDA's memory-efficient kernel) or 'cpu_flash' (the CPU's flash kernel) where
    F.scaled_dot_product_attention picks it for q/k/v views of a qkv like this one that require
    grad, without mask or dropout; else None."""
    from torch.nn.attention import SDPBackend
    qkv = torch.empty(qkv_shape, dtype=dtype, device=device, requires_grad=True)
    q, k, v = _heads(qkv, num_heads)
    with torch.enable_grad():
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, False)
    if device.type == "cuda" and choice == SDPBackend.EFFICIENT_ATTENTION.value:
        return "efficient"
    if device.type == "cpu" and choice == SDPBackend.FLASH_ATTENTION.value:
        return "cpu_flash"
    return None


def reference_fwd(pair, qkv, num_heads, scale):
    """(out [B, N, H·D], lse, philox seed, philox offset) as SDPA's forward computes them for
    the reference (seed and offset: None for the CPU kernel)."""
    q, k, v = _heads(qkv, num_heads)
    if pair == "efficient":
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale)
    else:
        (out, lse), seed, offset = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, scale=scale), None, None
    return _rows(out, qkv), lse, seed, offset


def reference_bwd(pair, dout, qkv, out, lse, seed, offset, num_heads, scale):
    """dqkv [B, N, 3·H·D] as SDPA's autograd computes it from reference_fwd's outputs."""
    q, k, v = _heads(qkv, num_heads)
    g, o = _as_heads(dout, num_heads), _as_heads(out, num_heads)
    if pair == "efficient":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            g, q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False], False,
            scale=scale)[:3]
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, o, lse, 0.0, False, scale=scale)
    return _packed(dq, dk, dv)


def sdpa_eligible(qkv, dropout_p, segmented, policy=None) -> bool:
    """Whether PyTorch's flash SDPA may answer this call: under 'auto' only, without dropout
    and without kernel-only arguments (segment ids), in flash's dtypes on CUDA."""
    if (policy or dispatch.current_policy()) != "auto" or dropout_p != 0.0 or segmented:
        return False
    return not qkv.is_cuda or qkv.dtype in (torch.float16, torch.bfloat16)


def _kernel_fwd(qkv, num_heads, scale, dropout_p, seed, segment_ids):
    return attention_fwd(qkv, num_heads, scale, dropout_p=dropout_p, seed=seed,
                         segment_ids=segment_ids)


def _tma_fwd(qkv, num_heads, scale, dropout_p, seed, segment_ids):
    return attention_fwd_tma(qkv, num_heads, scale)


def _sdpa_fwd(qkv, num_heads, scale, dropout_p, seed, segment_ids):
    return sdpa_attention_fwd(qkv, num_heads, scale)


def _kernel_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids):
    return attention_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p=dropout_p, seed=seed,
                         segment_ids=segment_ids)


def _two_pass_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids):
    config = two_pass_alternative(qkv, num_heads, dropout_p != 0.0, segment_ids is not None)
    return attention_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p=dropout_p, seed=seed,
                         segment_ids=segment_ids, config=config)


def _sdpa_bwd(dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids):
    return sdpa_attention_bwd(dout, qkv, out, lse, num_heads, scale)


_FWD_SETS = {}  # (tma, sdpa) -> the forward's candidates
_BWD_SETS = {}  # (two_pass, sdpa) -> the backward's candidates


def _candidates(sets, names, offered):
    hit = sets.get(offered)
    if hit is None:
        hit = sets[offered] = {n: fn for (n, fn), ok in zip(names, (True, *offered)) if ok}
    return hit


def _fwd_key(qkv, num_heads, scale, dropout_p, segmented, policy):
    """What the forward's choice depends on: the candidate set (TMA's alignment, SDPA's
    eligibility under the policy) and the problem. One tuple: a repeat call costs its hash."""
    eligible = sdpa_eligible(qkv, dropout_p, segmented, policy)
    tma = tma_offered(qkv, num_heads, scale, dropout_p != 0.0, segmented)
    return ("attention_fwd", qkv.shape, qkv.dtype, qkv.device, num_heads, scale, dropout_p != 0.0,
            segmented, tma, eligible), tma, eligible


def attention_forward(qkv, num_heads, scale, dropout_p=0.0, seed=None, segment_ids=None,
                      policy=None):
    """kernels/attention.attention_fwd's contract: the kernel, its TMA variant (sm_90, plain
    calls) or SDPA where eligible and chosen. policy: the one in force (default: read it)."""
    key, tma, eligible = _fwd_key(qkv, num_heads, scale, dropout_p, segment_ids is not None,
                                  policy)
    args = (qkv, num_heads, scale, dropout_p, seed, segment_ids)
    if not (tma or eligible):
        return _kernel_fwd(*args)
    cands = _candidates(_FWD_SETS, (("triton", _kernel_fwd), ("triton_tma", _tma_fwd),
                                    ("sdpa", _sdpa_fwd)), (tma, eligible))

    def describe():
        return tuning.make_key("attention_fwd", dict(qkv=qkv), num_heads=num_heads, scale=scale,
                               **({} if eligible else {"sdpa": False}),
                               **({"tma": True} if tma else {}))
    return tuning.select("attention_fwd", key, cands, qkv, args, describe)


def forward_choice(qkv, num_heads, scale, dropout_p, segmented, policy):
    """The implementation attention_forward runs for this configuration, once chosen:
    (name, fn(qkv, num_heads, scale, dropout_p, seed, segment_ids)), name "triton" for the
    kernel; None while the choice is open (what a caller holding one configuration,
    vit_fast/block_step.py, calls from then on)."""
    key, tma, eligible = _fwd_key(qkv, num_heads, scale, dropout_p, segmented, policy)
    if not (tma or eligible):
        return "triton", _kernel_fwd
    name = tuning.tuner().choice(key)
    fn = None if name is None else _candidates(
        _FWD_SETS, (("triton", _kernel_fwd), ("triton_tma", _tma_fwd), ("sdpa", _sdpa_fwd)),
        (tma, eligible)).get(name)
    return None if fn is None else (name, fn)


def backward_choice(qkv, num_heads, scale, dropout_p, segmented, policy):
    """As :func:`forward_choice`, for attention_backward: (name, fn(dout, qkv, out, lse,
    num_heads, scale, dropout_p, seed, segment_ids)), or None while the choice is open."""
    key, two_pass, eligible = _bwd_key(qkv, num_heads, scale, dropout_p, segmented, policy)
    if not (two_pass or eligible):
        return "triton", _kernel_bwd
    name = tuning.tuner().choice(key)
    fn = None if name is None else _candidates(
        _BWD_SETS, (("triton", _kernel_bwd), ("triton_two_pass", _two_pass_bwd),
                    ("sdpa", _sdpa_bwd)), (two_pass, eligible)).get(name)
    return None if fn is None else (name, fn)


def _bwd_key(qkv, num_heads, scale, dropout_p, segmented, policy):
    two_pass = two_pass_alternative(qkv, num_heads, dropout_p != 0.0, segmented) is not None
    eligible = sdpa_eligible(qkv, dropout_p, segmented, policy)
    return ("attention_bwd", qkv.shape, qkv.dtype, qkv.device, num_heads, scale,
            dropout_p != 0.0, segmented, two_pass, eligible), two_pass, eligible


def attention_backward(dout, qkv, out, lse, num_heads, scale, dropout_p=0.0, seed=None,
                       segment_ids=None, policy=None):
    """kernels/attention.attention_bwd's contract: the kernel, or SDPA's backward where eligible
    and chosen (independently of the forward: both read the same out and lse). policy: the
    forward's (SDPA may run only where the forward's policy allowed it)."""
    segmented = segment_ids is not None
    args = (dout, qkv, out, lse, num_heads, scale, dropout_p, seed, segment_ids)
    key, two_pass, eligible = _bwd_key(qkv, num_heads, scale, dropout_p, segmented, policy)
    if not (two_pass or eligible):
        return _kernel_bwd(*args)
    cands = _candidates(_BWD_SETS, (("triton", _kernel_bwd), ("triton_two_pass", _two_pass_bwd),
                                    ("sdpa", _sdpa_bwd)), (two_pass, eligible))

    def describe():
        return tuning.make_key("attention_bwd", dict(qkv=qkv), num_heads=num_heads, scale=scale,
                               dropout=dropout_p != 0.0, segments=segmented, sdpa=eligible)
    return tuning.select("attention_bwd", key, cands, qkv, args, describe)
