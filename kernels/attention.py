"""Fused multi-head attention over timm's packed qkv, forward and backward (FlashAttention-2).

Math, per batch b and head h, with q, k, v the [N, D] slices of qkv and s = scale:
    P = softmax(q kᵀ·s)          (row-wise)      out = P v          lse_i = log Σ_j exp(s·q_i·k_j)
    Δ_i = Σ_d dO_id·out_id       dP = dO vᵀ      dS = P ∘ (dP − Δ)
    dq = s·dS k                  dk = s·dSᵀ q    dv = Pᵀ dO
With dropout (HAS_DROPOUT, probability p) the product with V uses Z = P ∘ M/(1 − p), M the 0/1
keep mask, so out = Z v, dv = Zᵀ dO and dP = M/(1 − p) ∘ (dO vᵀ); Δ_i = Σ_d dO_id·out_id still
equals Σ_j dP_ij·P_ij, so dS = P ∘ (dP − Δ) keeps its form, and lse stays that of the undropped
P. M is never stored: entry (b, h, i, j) is kept when its 16 bits of Philox4x32-10 (keyed by
the 64-bit per-call seed; one call serves eight entries, see _dropout_keep), read as u ∈ [0, 1),
are ≥ p rounded up to a multiple of 2^-16. The bits depend on nothing else (not the tile
shapes), so the backward regenerates the forward's mask.
With segment ids (HAS_SEGMENTS; packed batches, kernels/attention_segments.py) the logits of
pairs in different segments are -inf before the softmax (fp32), so P_ij = 0 there in every
formula above; a padding query (negative id) meets no key, its out row is 0 and its lse +inf,
which keeps its backward terms 0. Each program visits only the tiles of the other side that
share a segment id range with its own (the span the launcher computes).
With a bias (HAS_BIAS; BEiT's relative position bias) the logits are q kᵀ·s + bias_ij, in fp32,
before the softmax: P, lse and every formula above take them as they are. The bias's gradient is
the logits' gradient dS summed over the batch rows the bias is shared by, which
attention_bwd_dbias_kernel rebuilds per tile (S and dP again: two products) and sums in fixed
batch order into per-group fp32 partials, reduced in a fixed order: no atomics, no N×N saved.

P is never stored: the forward streams K/V tiles past a query tile with an online softmax
(running max m and sum l, in base 2 so that exp2 can be used: s·log2(e) is folded into the
logits), and the backward rebuilds P tile by tile from the saved lse.

Layouts (row-major, last dim stride 1; B and N dims may have any stride):
    qkv  [B, N, 3·H·D]   last dim ordered (3, H, D) like timm's qkv Linear output
    out  [B, N, H·D]     last dim ordered (H, D): heads concatenated, ready for the proj Linear
    lse  [B, H, N]       fp32, natural-log logsumexp of each row of q kᵀ·s (contiguous)
    dout [B, N, H·D]     same layout as out
    dqkv [B, N, 3·H·D]   same layout as qkv (contiguous)
    seed [1]             int64, on qkv's device: the Philox key of one call's dropout mask
    seg  [B, N]          int32 segment ids (contiguous), spans: see attention_segments.py
    bias [B or 1, H, N, N] fp32, unit key stride, any other strides (batch stride 0: shared)
Head dims that are not powers of two are padded with masked loads to BLOCK_D = next power of
two (at least 16, what tl.dot needs). All accumulation is fp32. The backward has no atomics:
dk/dv are owned by one program per key block, and dq either by one program per query block (long
sequences) or by per-key-block fp32 partials summed in a fixed order (bwd_plan), so two runs are
bitwise equal.
"""
import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, next_power_of_2, on_tensor_device
from ._device import interpreting as _interpreting
from .direct_launch import kept
from .attention_bwd import (_bias_head, attention_bwd_dbias_kernel, attention_bwd_delta_kernel,
                            attention_bwd_dkdv_kernel, attention_bwd_dq_kernel,
                            attention_bwd_dq_reduce_kernel)
from .attention_config import (_CUDA_CONFIGS, _DELTA_BLOCK_M, _FUSED_ARCHS, _MAX_DQ_PARTIALS,
                               _REDUCE_BLOCK_M, _SHORT_N, _block_d, dbias_config, dbias_groups,
                               fwd_config, shipped_config)
from .attention_dropout import _dropout_keep, _keep_threshold
from .attention_segments import _int32_ids, _segment_mask, _segment_rows, _segment_tile, segment_args
from .attention_tiles import (_LN2, LOG2E, _bias_tile, _load_rows, _operand, _store_rows,
                              _tile_of_head)
from .layer_norm import layer_norm_param_grad_reduce_kernel, reduce_config


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_m, start_n, N, bh, stride_n, qk_scale, seed,
              keep_from, seg_row, q_ids, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
              DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
              bias_base=None, stride_bias_m=0, HAS_BIAS: tl.constexpr = False):
    """One step of the online softmax: the keys start_n.. loaded and folded into (acc, l_i, m_i)."""
    k = _load_rows(k_base, start_n, N, stride_n, HEAD_DIM, BLOCK_N, BLOCK_D)
    v = _load_rows(v_base, start_n, N, stride_n, HEAD_DIM, BLOCK_N, BLOCK_D)
    bias = None
    if HAS_BIAS:
        bias = _bias_tile(bias_base, start_m, start_n, N, stride_bias_m, BLOCK_M, BLOCK_N)
    return _fwd_fold(acc, l_i, m_i, q, k, v, start_m, start_n, N, bh, qk_scale, seed, keep_from,
                     seg_row, q_ids, BLOCK_M, BLOCK_N, HAS_DROPOUT, HAS_SEGMENTS, DOT_FP32,
                     DOT_PRECISION, bias, HAS_BIAS)


@triton.jit
def _fwd_fold(acc, l_i, m_i, q, k, v, start_m, start_n, N, bh, qk_scale, seed, keep_from, seg_row,
              q_ids, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
              bias=None, HAS_BIAS: tl.constexpr = False):
    """The keys start_n.. (k, v: [BLOCK_N, BLOCK_D] tiles in the I/O dtype, keys past N and the
    head-dim padding read as 0, however they were loaded) folded into (acc, l_i, m_i).

    qk_scale > 0 here, so the row max of the scaled logits is qk_scale times that of the raw
    ones, and each probability is exp2(qk·qk_scale − m): one FFMA per score for scale and shift.
    With HAS_BIAS, bias is the tile's [BLOCK_M, BLOCK_N] additive bias already times log2(e)
    (_bias_tile): the logits are scaled and biased first, and the rest runs at scale 1.
    """
    io_dtype = v.dtype
    k = _operand(k, DOT_FP32)
    v = _operand(v, DOT_FP32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    scale = qk_scale
    if HAS_BIAS:
        qk = qk * qk_scale + bias
        scale = 1.0
    if HAS_SEGMENTS:
        # Keys of other segments, padding and keys past N (read as id -1) all get -inf.
        k_ids = _segment_rows(seg_row, start_n, N, BLOCK_N)
        qk = tl.where(_segment_mask(q_ids, k_ids), qk, float("-inf"))
    elif start_n + BLOCK_N > N:
        # Keys past N get zero probability. Only the last tile has any (a branch the whole CTA
        # takes or skips together); it always holds a real key, so m_new is finite and
        # exp2(-inf) = 0 keeps the recurrence clean.
        qk = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < N, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    m_shift = m_new
    if HAS_SEGMENTS:
        # A row that has met no key of its segment yet (or never will: padding) has m = -inf;
        # shifting by 0 there makes exp2 give 0 instead of exp2(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    elif HAS_BIAS:  # the same for a bias that is -inf over a row's first key tiles (a mask)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(qk * scale - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        # The normalizer above takes every key; only the product with V is dropped, and its
        # 1/(1 - p) is applied once to the finished row rather than per entry.
        p = tl.where(_dropout_keep(seed, start_m, start_n, bh, keep_from, BLOCK_M, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + tl.dot(_operand(p.to(io_dtype), DOT_FP32), v,
                                        input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attention_fwd_kernel(
    QKV,    # [B, N, 3*H*D] input dtype
    O,      # [B, N, H*D] input dtype
    LSE,    # [B, H, N] fp32, contiguous
    SEED,   # [1] int64 dropout key; None without dropout
    N, H,
    stride_qkv_b, stride_qkv_n, stride_o_b, stride_o_n,
    qk_scale,  # scale * log2(e), > 0 (attention_fwd rewrites q for a scale <= 0)
    dropout_p,
    SEG,    # [B, N] int32 segment ids, contiguous; None without (then SPANS is None too)
    SPANS,  # [B, cdiv(N, BLOCK_M), 2] int32: the keys each query tile visits (attention_segments)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BIAS=None,  # [B or 1, H, N, N] fp32 additive bias, unit key stride; None without
    stride_bias_b=0, stride_bias_h=0, stride_bias_m=0,  # stride_bias_b 0: shared over the batch
    HAS_BIAS: tl.constexpr = False,
):
    """One program = one BLOCK_M tile of queries of one (b, h); K/V of that head stream past it
    (_fwd_tile), the key mask applied on the last tile only. With segments, only the key tiles
    of the tile's span, each masked to the query's segment. With a bias, each score tile gets
    its tile of the bias before the softmax."""
    b, h, bh, start_m = _tile_of_head(N, H, BLOCK_M)
    bias_base = _bias_head(BIAS, b, h, stride_bias_b, stride_bias_h, HAS_BIAS)
    q_base = QKV + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    k_base = q_base + H * HEAD_DIM
    v_base = q_base + 2 * H * HEAD_DIM

    q = _operand(_load_rows(q_base, start_m, N, stride_qkv_n, HEAD_DIM, BLOCK_M, BLOCK_D), DOT_FP32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        keep_from = _keep_threshold(dropout_p)
    else:
        seed = 0
        keep_from = 0
    lo, hi, seg_row, q_ids = 0, N, SEG, 0
    if HAS_SEGMENTS:
        seg_row, q_ids, lo, hi = _segment_tile(SEG, SPANS, b, start_m, N, BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_m, start_n, N, bh,
                                  stride_qkv_n, qk_scale, seed, keep_from, seg_row, q_ids,
                                  HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, HAS_DROPOUT,
                                  HAS_SEGMENTS, DOT_FP32, DOT_PRECISION, bias_base, stride_bias_m,
                                  HAS_BIAS)
    _fwd_finish(acc, l_i, m_i, O, LSE, b, h, bh, start_m, N, stride_o_b, stride_o_n, dropout_p,
                HEAD_DIM, BLOCK_D, BLOCK_M, HAS_DROPOUT, HAS_SEGMENTS)


@triton.jit
def _fwd_finish(acc, l_i, m_i, O, LSE, b, h, bh, start_m, N, stride_o_b, stride_o_n, dropout_p,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """The query tile's out rows (acc normalized by the row sums l_i) and lse rows stored."""
    if HAS_SEGMENTS:
        # Padding queries meet no key: l = 0 and acc = 0, so out = 0 (l taken as 1); their lse
        # is +inf, which makes every backward probability exp2(s - lse) of the row 0.
        no_key = l_i == 0.0
        l_i = tl.where(no_key, 1.0, l_i)
    if HAS_DROPOUT:
        acc = acc * ((1.0 / (1.0 - dropout_p)) / l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    o_base = O + b.to(tl.int64) * stride_o_b + h * HEAD_DIM
    _store_rows(o_base, start_m, N, stride_o_n, acc.to(O.dtype.element_ty), HEAD_DIM, BLOCK_M, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK_M)
    # One expression, address first: the unsegmented build stays exactly the one before segments.
    tl.store(LSE + bh.to(tl.int64) * N + rows,
             (m_i + tl.math.log2(l_i) if not HAS_SEGMENTS
              else tl.where(no_key, float("inf"), m_i + tl.math.log2(l_i))) * _LN2, mask=rows < N)


_SHARED_LIMITS = {}  # CUDA device index -> shared memory a block may opt in to, in bytes


def _shared_limit(device: torch.device):
    """What the forward's tile must fit on this device (cached; None off CUDA or unknown)."""
    if device.type != "cuda":
        return None
    hit = _SHARED_LIMITS.get(device.index)
    if hit is not None:
        return hit
    if not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_LIMITS:
        props = torch.cuda.get_device_properties(index)
        _SHARED_LIMITS[index] = getattr(props, "shared_memory_per_block_optin", None)
    return _SHARED_LIMITS[index]


def _config(kernel: str, n: int, head_dim: int, dtype: torch.dtype, dropout: bool = False,
            segments: bool = False, shared_limit=None, bias: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one launch; a forward's fits shared_limit."""
    if _interpreting():
        # Interpreter cost is mostly per tile op, so few large tiles win; but a product of more
        # than 2^18 multiply-adds makes numpy's OpenBLAS go multi-threaded, which on a busy CPU
        # is up to 10x slower than one thread (measured), so tiles stop below that.
        t = min(128, max(16, next_power_of_2(n)))
        while t * t * _block_d(head_dim) > 2 ** 18 and t > 16:
            t //= 2
        return t, t, 4, 1
    key = (kernel, max(64, _block_d(head_dim)), n <= _SHORT_N)
    if kernel == "fwd":
        return fwd_config(key, dropout, segments, shared_limit, bias)
    return shipped_config(key, dropout, segments, bias)


def bwd_plan(n: int, head_dim: int, dtype: torch.dtype, dropout: bool = False,
             segments: bool = False, arch=None, fused: bool = True, bias: bool = False):
    """The backward's launch structure on a GPU of compute capability arch (e.g. 90; None:
    the interpreter's tiles): ("fused", dkdv_dq config, n_key_blocks) when the dK/dV pass also
    writes dq (directly when n_key_blocks == 1, else as partials for the reduce), or ("split",
    dkdv config, dq config) for the two-pass path (long sequences, other GPUs, fused=False)."""
    def config(kernel):
        if arch is None:
            return _config(kernel, n, head_dim, dtype, dropout, segments, bias=bias)
        return shipped_config((kernel, max(64, _block_d(head_dim)), n <= _SHORT_N), dropout,
                              segments, bias)
    if fused and (arch is None or (arch in _FUSED_ARCHS and ("dkdv_dq", max(64, _block_d(head_dim)),
                                                             n <= _SHORT_N) in _CUDA_CONFIGS)):
        fused = config("dkdv_dq")
        key_blocks = cdiv(n, fused[1]) if fused else _MAX_DQ_PARTIALS + 1
        if key_blocks <= _MAX_DQ_PARTIALS:
            return "fused", fused, key_blocks
    return "split", config("dkdv"), config("dq")


_TWO_PASS = {}  # (N, 3·H·D, H, dtype, dropout, segments, bias, target) -> its answer


def two_pass_alternative(qkv: torch.Tensor, num_heads: int, dropout: bool, segments: bool,
                         bias: bool = False):
    """attention_bwd's config for the two passes where this GPU's plan is the fused pass with
    dq partials, else None. The model (bench roofline) and the SASS disagree on which is faster
    at ViT lengths (the partials' traffic against two products and the repeated per-score work
    saved), so measured selection times both (ops/attention_sdpa.attention_backward).
    Memoized: a pure function of the shape, the options and the device."""
    target = gpu_target(qkv.device)
    if target is None or qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        return None
    key = (qkv.shape[1], qkv.shape[-1], num_heads, qkv.dtype, dropout, segments, bias, target)
    if key not in _TWO_PASS:
        n, head_dim = qkv.shape[1], qkv.shape[-1] // (3 * num_heads)
        plan = bwd_plan(n, head_dim, qkv.dtype, dropout, segments, target.arch, bias=bias)
        _TWO_PASS[key] = (None if plan[0] != "fused" or plan[2] == 1  # one key tile: no partials
                          else bwd_plan(n, head_dim, qkv.dtype, dropout, segments, target.arch,
                                        fused=False, bias=bias)[1:])
    return _TWO_PASS[key]


def _dot_args(dtype: torch.dtype):
    """DOT_FP32 / DOT_PRECISION: the interpreter gets fp32 operands (its bf16 dot is wrong) and
    IEEE products; fp32 I/O stays IEEE too (tf32 would lose to torch's fp32 matmul under the
    tolerance rule)."""
    interp = _interpreting()
    return {"DOT_FP32": interp,
            "DOT_PRECISION": "ieee" if (interp or dtype == torch.float32) else "tf32"}


def _not_shipped(qkv: torch.Tensor):
    # IEEE-fp32 dots spilled at every tile shape tried (32x32 to 128x64, sm_80 and sm_90) and
    # tf32 would fail the accuracy rule, so no fp32 build ships; the dispatcher sends fp32 CUDA
    # calls to the reference. fp32 runs under the interpreter, where nothing spills.
    raise NotImplementedError("vit_fast attention kernels ship fp16/bf16 builds for CUDA only; "
                              "fp32 on CUDA goes to the reference backend")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dropout_args(qkv: torch.Tensor, dropout_p: float, seed):
    """(SEED, dropout_p, HAS_DROPOUT) kernel arguments; seed: int64 [1] on qkv's device."""
    if dropout_p == 0.0:
        return None, 0.0, False
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != qkv.device:
        raise ValueError("dropout needs seed: a 1-element int64 tensor on qkv's device")
    return seed, float(dropout_p), True


_NO_BIAS = dict(BIAS=None, stride_bias_b=0, stride_bias_h=0, stride_bias_m=0, HAS_BIAS=False)
_MAX_BIAS_N = 46340  # the kernels index within one head's [N, N] bias in int32


def _bias_args(bias, qkv: torch.Tensor, num_heads: int) -> dict:
    """The kernels' bias arguments: bias [H, N, N] (shared by the batch) or [1 or B, H, N, N],
    any float dtype, read as fp32 with unit key stride (a copy only when it is not that)."""
    if bias is None:
        return _NO_BIAS
    B, N = qkv.shape[0], qkv.shape[1]
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {type(bias).__name__}"
                        + (f" of {bias.dtype}" if isinstance(bias, torch.Tensor) else ""))
    if bias.device != qkv.device:
        raise ValueError(f"bias is on {bias.device}, qkv on {qkv.device}")
    shape = tuple(bias.shape)
    if not (shape == (num_heads, N, N) or (len(shape) == 4 and shape[0] in (1, B)
                                           and shape[1:] == (num_heads, N, N))):
        raise ValueError(f"bias must be [H, N, N] = [{num_heads}, {N}, {N}] or [1 or B, H, N, N] "
                         f"(B = {B}), got {list(shape)}")
    if N > _MAX_BIAS_N:
        raise ValueError(f"bias: sequences up to {_MAX_BIAS_N} tokens, got {N}")
    b32 = bias.float()
    if b32.stride(-1) != 1:
        b32 = b32.contiguous()
    shared = b32.dim() == 3 or shape[0] == 1
    return dict(BIAS=b32, stride_bias_b=0 if shared else b32.stride(0),
                stride_bias_h=b32.stride(-3), stride_bias_m=b32.stride(-2), HAS_BIAS=True)


@on_tensor_device
def attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float, *, dropout_p: float = 0.0,
                  seed=None, segment_ids=None, config=None, bias=None):
    """out [B, N, H·D] (qkv's dtype) and lse [B, H, N] fp32 from packed qkv [B, N, 3·H·D].

    dropout_p > 0 drops attention probabilities with the mask that seed (int64 [1], qkv's
    device) determines; the backward, given the same seed, regenerates it. lse is undropped.
    segment_ids (int [B, N], qkv's device) keeps each query to its own segment's keys
    (attention_segments.py); padding rows (negative id) get out 0 and lse +inf.
    bias ([H, N, N] shared by the batch, or [1 or B, H, N, N]; any float dtype, read as fp32)
    is added to the scaled logits before the softmax, as BEiT's relative position bias (lse
    includes it); the backward takes the same bias.

    config: (BLOCK_M, BLOCK_N, num_warps, num_stages) to override the table (tests use it to
    exercise tile shapes the default would not).
    """
    if qkv.dtype == torch.float32 and qkv.is_cuda and not _interpreting():
        _not_shipped(qkv)
    seed, dropout_p, has_dropout = _dropout_args(qkv, dropout_p, seed)
    qkv = _last_dim_contiguous(qkv)
    bias_args = _bias_args(bias, qkv, num_heads)
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    if scale <= 0:
        # The kernel folds the scale into the row max (max(c·s) = c·max(s) needs c >= 0) and
        # masks padded keys with -inf before scaling (c = 0 would make that NaN). Since
        # softmax(q kᵀ·c) = softmax((−q) kᵀ·(−c)) and q kᵀ·0 = 0 kᵀ·1, a scale <= 0 (never a
        # ViT's) runs on a copy with q negated or zeroed, not costing every call a sign flip.
        qkv = qkv.clone()
        if scale < 0:
            qkv[..., :num_heads * head_dim].neg_()
        else:
            qkv[..., :num_heads * head_dim].zero_()
        scale = -scale if scale < 0 else 1.0
    out = torch.empty(B, N, num_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(B, num_heads, N, device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    if config is None:  # the configuration's kept constexprs: a kept direct launch
        grid, consts = _fwd_launch(B, N, num_heads, head_dim, qkv.dtype, has_dropout,
                                   segment_ids is not None, bias is not None, qkv.device)
        launch = kept(attention_fwd_kernel, grid, consts)
    else:  # a config under trial (the tuner): through Triton's launch path
        grid, consts = _fwd_consts(B, N, num_heads, head_dim, qkv.dtype, has_dropout, config)
        launch = attention_fwd_kernel[grid]
    launch(
        qkv, out, lse, seed, N, num_heads, qkv.stride(0), qkv.stride(1), out.stride(0),
        out.stride(1), float(scale) * LOG2E, dropout_p,
        **(_NO_SEGMENTS if segment_ids is None else segment_args(segment_ids, consts["BLOCK_M"],
                                                                  consts["BLOCK_N"])),
        **({} if config is None else consts), **bias_args)
    return out, lse


_NO_SEGMENTS = dict(SEG=None, SPANS=None, HAS_SEGMENTS=False)
_LAUNCHES = {}  # the forward's per-configuration grid and constexprs (pure, so kept)


def _fwd_consts(B, N, H, head_dim, dtype, dropout, config):
    block_m, block_n, warps, stages = config
    return (cdiv(N, block_m) * B * H,), dict(
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_DROPOUT=dropout, num_warps=warps, num_stages=stages, **_dot_args(dtype))


def _fwd_launch(B, N, H, head_dim, dtype, dropout, segmented, biased, device):
    """(grid, constexprs) of attention_fwd_kernel for this configuration, made once."""
    limit = _shared_limit(device)
    key = (B, N, H, head_dim, dtype, dropout, segmented, biased, limit, _interpreting())
    hit = _LAUNCHES.get(key)
    if hit is None:
        config = _config("fwd", N, head_dim, dtype, dropout, segmented, limit, bias=biased)
        hit = _LAUNCHES[key] = _fwd_consts(B, N, H, head_dim, dtype, dropout, config)
    return hit


def _bwd_launch(B, N, H, head_dim, dtype, dropout, segmented, biased, target, config):
    """(plan, delta grid, delta constexprs, shared constexprs) of the backward for this
    configuration (bwd_plan, or the structure ``config`` forces), made once."""
    key = ("bwd", B, N, H, head_dim, dtype, dropout, segmented, biased, target, config,
           _interpreting())
    hit = _LAUNCHES.get(key)
    if hit is None:
        if config is None:
            plan = bwd_plan(N, head_dim, dtype, dropout, segmented,
                            target.arch if target else None, bias=biased)
        elif config[1] is None:
            plan = ("fused", config[0], cdiv(N, config[0][1]))
        else:
            plan = ("split", *config)
        block_d = _block_d(head_dim)
        dm = min(_DELTA_BLOCK_M, max(16, next_power_of_2(N))) if _interpreting() else _DELTA_BLOCK_M
        hit = _LAUNCHES[key] = (
            plan, (cdiv(N, dm) * B * H,), dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=dm),
            dict(_dot_args(dtype), HAS_DROPOUT=dropout, HEAD_DIM=head_dim, BLOCK_D=block_d))
    return hit


def _dq_partials(key_blocks: int, B: int, N: int, C: int, device) -> torch.Tensor:
    """The fused pass's dq partials [key_blocks, B, N, C] fp32, uninitialised: each entry the
    reduce reads was written (tests fill it with NaN to hold them to that)."""
    return torch.empty(key_blocks, B, N, C, device=device, dtype=torch.float32)


@on_tensor_device
def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  num_heads: int, scale: float, *, dropout_p: float = 0.0, seed=None,
                  segment_ids=None, config=None, bias=None, bias_grad: bool = False):
    """dqkv [B, N, 3·H·D] (qkv's dtype, contiguous) from dout [B, N, H·D] and the forward's
    qkv, out, lse, dropout_p, seed, segment_ids and bias. config overrides bwd_plan as in
    attention_fwd: (dkdv config, dq config) runs the two passes, (dkdv config, None) the fused
    pass with that config.

    With bias_grad (needs bias) it returns (dqkv, dbias): dbias the gradient of the bias, in
    its shape and dtype, Σ_b dS (attention_bwd_dbias_kernel; no atomics, bitwise reproducible).
    Nothing N×N is saved for it; while it runs it takes fp32 partials of G·H·N² (bias_grad_groups).
    """
    if qkv.dtype == torch.float32 and qkv.is_cuda and not _interpreting():
        _not_shipped(qkv)
    seed, dropout_p, has_dropout = _dropout_args(qkv, dropout_p, seed)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    lse = lse.contiguous()
    bias_args = _bias_args(bias, qkv, num_heads)
    if bias_grad and bias is None:
        raise ValueError("bias_grad needs the forward's bias")
    B, N, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    dqkv = torch.empty(B, N, three_c, device=qkv.device, dtype=qkv.dtype)
    if dqkv.numel() == 0:
        return (dqkv, torch.zeros_like(bias)) if bias_grad else dqkv
    block_d = _block_d(head_dim)
    delta = torch.empty_like(lse)
    plan, delta_grid, delta_consts, dot = _bwd_launch(B, N, num_heads, head_dim, qkv.dtype,
                                                      has_dropout, segment_ids is not None,
                                                      bias is not None, gpu_target(qkv.device),
                                                      config)
    kept(attention_bwd_delta_kernel, delta_grid, delta_consts)(
        out, dout, delta, N, num_heads, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1))
    # The segment ids as the kernels read them, once per backward (the spans depend on tiles).
    seg = None if segment_ids is None else _int32_ids(segment_ids)
    args = (qkv, dout, lse, delta, dqkv, seed, N, num_heads, qkv.stride(0), qkv.stride(1),
            dout.stride(0), dout.stride(1), dqkv.stride(0), dqkv.stride(1),
            float(scale), float(scale) * LOG2E, dropout_p)
    block_m, block_n, warps, stages = plan[1]
    kv_segments = _NO_SEGMENTS if seg is None else segment_args(seg, block_n, block_m)
    if plan[0] == "split":
        dq_out = dict(DQ=None, stride_dq_kb=0, stride_dq_b=0, stride_dq_n=0, WRITE_DQ=False)
    elif plan[2] == 1:  # one key tile: its share of dq is all of it
        if seg is not None:  # query tiles of padding only are outside the tile's span: dq = 0
            dqkv[..., :three_c // 3].zero_()
        dq_out = dict(DQ=dqkv, stride_dq_kb=0, stride_dq_b=dqkv.stride(0),
                      stride_dq_n=dqkv.stride(1), WRITE_DQ=True)
    else:
        part = _dq_partials(plan[2], B, N, three_c // 3, qkv.device)
        dq_out = dict(DQ=part, stride_dq_kb=part.stride(0), stride_dq_b=part.stride(1),
                      stride_dq_n=part.stride(2), WRITE_DQ=True)
    attention_bwd_dkdv_kernel[(cdiv(N, block_n) * B * num_heads,)](
        *args, **kv_segments, **dq_out, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages, **dot, **bias_args)
    if plan[0] == "split":
        block_m, block_n, warps, stages = plan[2]
        attention_bwd_dq_kernel[(cdiv(N, block_m) * B * num_heads,)](
            *args, **(_NO_SEGMENTS if seg is None else segment_args(seg, block_m, block_n)),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **dot,
            **bias_args)
    elif plan[2] > 1:
        rm = min(_REDUCE_BLOCK_M, max(16, next_power_of_2(N))) if _interpreting() else _REDUCE_BLOCK_M
        attention_bwd_dq_reduce_kernel[(cdiv(N, rm) * B * num_heads,)](
            part, dqkv, N, num_heads, plan[2], part.stride(0), part.stride(1), part.stride(2),
            dqkv.stride(0), dqkv.stride(1), kv_segments["SPANS"], HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_M=rm, KEY_BLOCK=block_n, HAS_SEGMENTS=seg is not None)
    if bias_grad:
        return dqkv, _bias_grad(qkv, dout, lse, delta, seed, num_heads, scale, dropout_p, bias,
                                bias_args, seg, dot)
    return dqkv


def _shared_bias(bias: torch.Tensor) -> bool:
    return bias.dim() == 3 or bias.shape[0] == 1


def bias_grad_groups(qkv: torch.Tensor, num_heads: int, bias: torch.Tensor, config) -> int:
    """The bias gradient's batch groups G for this call (its fp32 partials: G·H·N² values)."""
    N = qkv.shape[1]
    target = gpu_target(qkv.device)
    tiles = cdiv(N, config[0]) * cdiv(N, config[1])
    return dbias_groups(qkv.shape[0], tiles, num_heads, _shared_bias(bias),
                        target.sms if target else None)


@on_tensor_device
def _bias_grad(qkv, dout, lse, delta, seed, num_heads, scale, dropout_p, bias, bias_args, seg, dot):
    """dbias (bias's shape and dtype) for attention_bwd: program (tile, h, group) sums dS over
    its batch group into fp32 partials [G, H, N, N], which a shared bias then sums over G in a
    fixed order (layer_norm's reduce kernel)."""
    B, N = qkv.shape[0], qkv.shape[1]
    H = num_heads
    head_dim = qkv.shape[-1] // (3 * H)
    cfg = (_config("dq", N, head_dim, qkv.dtype) if _interpreting()
           else dbias_config(head_dim, dot["HAS_DROPOUT"], seg is not None))
    block_m, block_n, warps, stages = cfg
    groups = bias_grad_groups(qkv, H, bias, cfg)
    part = torch.empty(groups, H, N, N, device=qkv.device, dtype=torch.float32)
    grid = (cdiv(N, block_m) * cdiv(N, block_n), H, groups)
    attention_bwd_dbias_kernel[grid](
        qkv, dout, lse, delta, bias_args["BIAS"], part, seed, N, H, B, cdiv(B, groups),
        qkv.stride(0), qkv.stride(1), dout.stride(0), dout.stride(1), bias_args["stride_bias_b"],
        bias_args["stride_bias_h"], bias_args["stride_bias_m"], float(scale) * LOG2E, dropout_p,
        1.0 / (1.0 - dropout_p), seg, BLOCK_M=block_m, BLOCK_N=block_n, HAS_SEGMENTS=seg is not None, num_warps=warps,
        num_stages=stages, **dot)
    if groups == 1 or not _shared_bias(bias):  # one partial per bias: nothing to sum
        return part.reshape(bias.shape).to(bias.dtype)
    out = torch.empty(bias.shape, device=bias.device, dtype=bias.dtype)
    C = H * N * N
    block_p, block_c = reduce_config(groups, C, gpu_target(qkv.device))
    layer_norm_param_grad_reduce_kernel[(cdiv(C, block_c), 1)](
        part, out, None, None, groups, C, HAS_OUT1=False, HAS_OUT2=False, BLOCK_P=block_p,
        BLOCK_N=block_c, num_warps=4)
    return out

