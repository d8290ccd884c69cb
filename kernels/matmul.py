"""Tiled GEMM with fused epilogues (bias, GELU, dGELU, SiLU-gated GLU and its backward, LayerScale +
drop-path + residual), and a deterministic column sum. Used by the GELU-MLP and the GLU-MLP
forward and backward (``gelu_mlp.py``, ``glu_mlp.py``).

One kernel, constexpr flags per epilogue: every variant is the same tile loop, so the compiler
drops what a launch does not use.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, on_tensor_device
from .direct_launch import kept
from .gemm_epilogue import _gelu_cdf, epilogue_store, grouped_tile  # noqa: F401  (_gelu_cdf: gelu_elementwise)
from .tma_rules import gemm_operand_reasons

EPILOGUE = {"none": 0, "gelu": 1, "dgelu": 2, "glu": 3, "dglu": 4, "dident": 5}
# Output columns of C per GEMM column N: the GLU forward writes one per gate/value pair, its
# backward a gate and a value gradient per hidden unit.
_C_COLUMNS = {"glu": (1, 2), "dglu": (2, 1)}  # (numerator, denominator)


@triton.jit
def matmul_kernel(
    A, B, C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT,
    M, N, K, rows_per_sample,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_pm, stride_rm, stride_rn,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    """acc = A @ B in fp32 (A [M, K], B [K, N], any strides), then by EPILOGUE:

    0 none:  out = acc (+ bias[n]); with HAS_RESIDUAL out = res + out·ls[n]·ss[m // rows_per_sample]
             (ls, ss each optional).                                              C <- out
    1 gelu:  pre = acc (+ bias[n]); C <- gelu(pre); PRE <- pre when STORE_PRE (what backward keeps).
    2 dgelu: pre read from PRE; d_act = acc (·ss[m // rows_per_sample]);  C <- d_act·gelu'(pre);
             ACT <- gelu(pre)(·ss[...]) when STORE_ACT (recomputed for fc2's weight gradient);
             ROWDOT[pid_n, m] <- Σ_n∈tile acc·gelu(pre) when ROW_DOT (for the sample_scale grad).
    3 glu:   B's columns interleave gate and value (column 2j the gate of hidden unit j, 2j+1 its
             value; N = 2H, bias interleaved alike): C [M, H] <- silu(gate)·value;
             PRE [M, 2H] <- gate | value (the halves side by side) when STORE_PRE.
    4 dglu:  N = H; gate | value read from PRE [M, 2H]; d_act = acc (·ss[...]);
             C [M, 2H] <- d_act·value·silu'(gate) | d_act·silu(gate);
             ACT [M, H] (contiguous) <- silu(gate)·value(·ss[...]) when STORE_ACT;
             ROWDOT as dgelu's with silu(gate)·value.
    5 dident: dgelu with the identity as activation: C <- acc(·ss[...]), ACT <- PRE(·ss[...]),
             ROWDOT[pid_n, m] <- Σ_n∈tile acc·PRE.

    Layouts: C [M, N] (strides stride_cm/cn, its dtype is the output dtype); BIAS, LSCALE [N];
    SSCALE [M // rows_per_sample]; PRE and ACT [M, N] with row stride stride_pm, unit column stride;
    RES [M, N] (stride_rm/rn); ROWDOT fp32 [cdiv(N, BLOCK_N), M]. Unused pointers are never read.

    SPLIT_K > 1 (epilogue "none" with no bias or residual only): program (pid, s) sums the s-th of
    SPLIT_K equal runs of K-tiles into C + s·M·N, an fp32 partial; the launcher adds the partials
    in a fixed order (deterministic, no atomics). For GEMMs whose tiles leave SMs idle.
    """
    # Grouped ordering: GROUP_M row-tiles share each B column-tile while it is still in L2.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row offsets: row · row-stride passes 2^31 once M·max(K, N) does (ViT-B's hidden 3072
    # at ~700k rows). Column offsets stay 32-bit: a tile spans at most BLOCK columns.
    rows64 = offs_m.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    k_lo = 0
    k_hi = tl.cdiv(K, BLOCK_K)
    if SPLIT_K > 1:
        per_split = tl.cdiv(k_hi, SPLIT_K)
        k_lo = tl.program_id(1) * per_split
        k_hi = tl.minimum(k_lo + per_split, k_hi)
        # int64: a split-K GEMM reduces over a long K (weight gradients over all tokens), where
        # k_lo·BLOCK_K·stride passes 2^31
        a_ptrs += k_lo.to(tl.int64) * BLOCK_K * stride_ak
        b_ptrs += k_lo.to(tl.int64) * BLOCK_K * stride_bk
        C += tl.program_id(1).to(tl.int64) * M * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_FP32:
            # The interpreter computes 16-bit dots wrongly; compiled kernels keep tensor-core dots.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    epilogue_store(acc, offs_m, offs_n, M, N, rows_per_sample,
                   C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT, pid_n,
                   stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
                   HAS_BIAS, EPILOGUE, APPROX_TANH, STORE_PRE, STORE_ACT, ROW_DOT,
                   HAS_RESIDUAL, HAS_LAYER_SCALE, HAS_SAMPLE_SCALE)


@triton.jit
def colsum_kernel(X, SSCALE, OUT, M, N, rows_per_chunk, rows_per_sample, stride_xm, stride_xn,
                  HAS_SAMPLE_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[chunk, n] = Σ_{m in chunk} X[m, n]·ss[m // rows_per_sample] (ss optional), in fp32.

    X [M, N] any strides; SSCALE [M // rows_per_sample]; OUT fp32 [cdiv(M, rows_per_chunk), N].
    Row chunks give the GPU enough programs; summing the chunks afterwards in a fixed order keeps
    the bias gradient deterministic without atomics. rows_per_chunk is a multiple of BLOCK_M.
    """
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_end = tl.minimum(M, (chunk + 1) * rows_per_chunk)
    for m0 in range(chunk * rows_per_chunk, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row_end
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + offs_n[None, :] * stride_xn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        if HAS_SAMPLE_SCALE:
            x = x * tl.load(SSCALE + offs_m // rows_per_sample, mask=mask_m, other=0.0).to(tl.float32)[:, None]
        acc += x
    tl.store(OUT + chunk.to(tl.int64) * N + offs_n, tl.sum(acc, axis=0), mask=mask_n)


# ---------------------------------------------------------------------------------------------
# Configs: pure functions of (shape, dtype, epilogue, target). The launcher calls them, and
# kernels/gelu_mlp_aot.py calls the same functions to list what it compiles ahead of time.

class GemmConfig(NamedTuple):
    """One GEMM launch config: the output tile, its K step, the tile rows of the grouped launch
    order and the launch options; one definition for both GEMM kernels (matmul_hopper.HopperConfig
    is this with the Hopper kernel's names). split_k is matmul_kernel's alone, epilogue_subtiles
    the Hopper kernel's: each kernel's constexprs function rejects the other's."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # > 1: fp32 partials over K-runs, summed by the launcher in a fixed order
    epilogue_subtiles: int = 1  # Hopper only: the epilogue stores the tile in this many slices

    @property
    def name(self) -> str:
        split = f"k{self.split_k}" if self.split_k > 1 else ""
        return (f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"
                + split)

    def tile_constexprs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
                    GROUP_M=self.group_m)


# Every config a CUDA launch can use; each passes AOT with 0 spills for the epilogues it is
# offered to (gemm_candidates). Under the interpreter every program instance costs Python time:
# few, large tiles (INTERPRET_CONFIG).
LARGE_16 = GemmConfig(128, 128, 64, 8, 8, 3)
WIDE_16 = GemmConfig(128, 256, 64, 8, 8, 3)     # plain GEMMs only: epilogues spill at 128x256
NARROW_16 = GemmConfig(128, 64, 64, 8, 8, 3)    # dGELU holds pre, act and the gradient at once
SMALL_16 = GemmConfig(64, 64, 64, 8, 4, 4)
HALF_16 = GemmConfig(64, 128, 64, 8, 4, 4)      # fwd epilogues fit; dGELU spills at 64x128
LARGE_TF32 = GemmConfig(128, 64, 32, 8, 8, 3)
SMALL_TF32 = GemmConfig(64, 64, 32, 8, 4, 3)
EXACT_FP32 = GemmConfig(128, 64, 16, 8, 8, 3)   # FMA dots hold operands in registers: BLOCK_K 16
SPLIT_K_16 = tuple(LARGE_16._replace(split_k=k) for k in (2, 4))  # plain GEMMs, few tiles
INTERPRET_CONFIG = GemmConfig(128, 128, 128, 8, 4, 1)
COLSUM_BLOCK = (32, 128)  # (BLOCK_M, BLOCK_N) of colsum_kernel on CUDA
INTERPRET_COLSUM_BLOCK = (256, 256)


class Epilogue(NamedTuple):
    """What matmul_kernel does after its mainloop: one field per constexpr flag (see its doc)."""
    kind: str = "none"          # "none" | "gelu" | "dgelu" | "glu" | "dglu" | "dident"
    approximate: str = "none"   # GELU form: "none" (erf) or "tanh"
    bias: bool = False
    store_pre: bool = False
    store_act: bool = False
    row_dot: bool = False
    residual: bool = False
    layer_scale: bool = False
    sample_scale: bool = False

    @property
    def plain(self) -> bool:
        """Nothing after the mainloop but the store: the widest tiles fit in registers."""
        return self.kind == "none" and not (self.bias or self.residual or self.sample_scale)

    @property
    def reads_pre(self) -> bool:
        """Whether the epilogue reads PRE (the backward kinds)."""
        return self.kind in ("dgelu", "dglu", "dident")


def _idle_sms(tiles, sms) -> bool:
    """Whether the last wave of ``tiles`` CTAs (one per SM) leaves over a quarter of it idle."""
    waves = cdiv(tiles, sms)
    return tiles < 0.75 * waves * sms


class GemmKey(NamedTuple):
    """What a GEMM launch's tile choice depends on (vit_fast.tuning's key for it; matmul builds
    it as a plain tuple of these fields): the problem, the operands' dtypes and layout, the
    epilogue, the dot precision, whether the Hopper GEMM's TMA loads can read the operands (its
    candidates are offered only then) and the device."""
    M: int
    N: int
    K: int
    a: torch.dtype
    b: torch.dtype
    out: torch.dtype
    layout: tuple
    epilogue: Epilogue
    precision: str
    tma: bool
    device: torch.device


_CANDIDATES = {}  # gemm_candidates' answers: a pure function, asked on every launch


def gemm_candidates(M, N, dtype, epilogue: Epilogue, precision="ieee", target=None, K=0):
    """Memoized :func:`gemm_configs` (the configs a launch may use, fixed choice first)."""
    key = (M, N, dtype, epilogue, precision, target, K)
    hit = _CANDIDATES.get(key)
    if hit is None:
        if len(_CANDIDATES) > 4096:
            _CANDIDATES.clear()
        hit = _CANDIDATES[key] = gemm_configs(M, N, dtype, epilogue, precision, target, K)
    return hit


def gemm_configs(M, N, dtype, epilogue: Epilogue, precision="ieee", target=None, K=0):
    """The configs a launch may use, the fixed table's choice first; (INTERPRET_CONFIG,) for the
    interpreter (target None). The fixed choice: large tiles once they fill the GPU, else small
    ones for more programs. Tuning (vit_fast.tuning) may time the others on the user's GPU; each
    tile shape is a fixed summation order, so a choice, once made, gives reproducible results.
    A plain GEMM whose 128x128 tiles leave SMs idle and whose K is long (the weight gradients:
    K = tokens) also gets split-K candidates."""
    if target is None:
        return (INTERPRET_CONFIG,)
    if dtype == torch.float32 and precision == "ieee":
        return (EXACT_FP32,)
    if dtype == torch.float32:
        large, small, others = LARGE_TF32, SMALL_TF32, ()
    elif epilogue.reads_pre:
        # The backward epilogues (dgelu, dglu, dident): dident's 128x128 and 64x128 tiles took
        # 232-255 registers (triton 3.6-3.8), too close to spilling.
        large, small, others = NARROW_16, SMALL_16, ()
    else:
        large, small = LARGE_16, SMALL_16
        others = (HALF_16, WIDE_16) if epilogue.plain else (HALF_16,)
        tiles = cdiv(M, LARGE_16.block_m) * cdiv(N, LARGE_16.block_n)
        if epilogue.plain and _idle_sms(tiles, target.sms) and K >= 4096:
            others += SPLIT_K_16
    fills = cdiv(M, large.block_m) * cdiv(N, large.block_n) >= target.sms
    first, second = (large, small) if fills else (small, large)
    return (first, second, *others)


def matmul_constexprs(epilogue: Epilogue, config: GemmConfig, precision="ieee", dot_fp32=False):
    """matmul_kernel's constexpr arguments for one launch (the AOT specs use the same)."""
    if config.epilogue_subtiles != 1:
        raise ValueError(f"config: matmul_kernel stores its tile whole, not in "
                         f"{config.epilogue_subtiles} slices")
    return dict(**epilogue_constexprs(epilogue), DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
                **config.tile_constexprs(), SPLIT_K=config.split_k)


def epilogue_constexprs(epilogue: Epilogue) -> dict:
    """The epilogue's constexpr flags, the same in matmul_kernel and the Hopper kernel."""
    return dict(
        HAS_BIAS=epilogue.bias, EPILOGUE=EPILOGUE[epilogue.kind],
        APPROX_TANH=epilogue.approximate == "tanh", STORE_PRE=epilogue.store_pre,
        STORE_ACT=epilogue.store_act, ROW_DOT=epilogue.row_dot,
        HAS_RESIDUAL=epilogue.residual, HAS_LAYER_SCALE=epilogue.layer_scale,
        HAS_SAMPLE_SCALE=epilogue.sample_scale)


def colsum_block(target=None):
    return INTERPRET_COLSUM_BLOCK if target is None else COLSUM_BLOCK


def input_precision(dtype) -> str:
    """The tl.dot input precision for a GEMM on ``dtype`` inputs: "tf32" for fp32 when the user
    allowed tf32 for CUDA matmuls, as torch's own matmul then does, else "ieee". A pure read of
    torch's setting (no side effect, no device query): callers may decide once per configuration.

    torch.backends.cuda.matmul.fp32_precision is read, not allow_tf32: it reflects both of torch's
    APIs (allow_tf32 / set_float32_matmul_precision write it; a "none" there is resolved from
    torch.backends.fp32_precision), while reading allow_tf32 raises RuntimeError once a user has
    set the new API (torch >= 2.9). The interpreter computes fp32 dots in IEEE whatever is asked.
    """
    if dtype != torch.float32 or interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def _precision(dtype) -> str:
    """input_precision, read only where it matters (fp32 operands: the user may switch TF32)."""
    return input_precision(dtype) if dtype == torch.float32 else "ieee"


def _unit(t):
    """The epilogue indexes [N] / [B] vectors as PTR + i: unit stride needed, and a zero-stride
    ``expand`` would otherwise be read past its one element."""
    return t if t is None or t.stride(0) == 1 or t.numel() <= 1 else t.contiguous()


@on_tensor_device
def matmul(a, b, out_dtype, *, bias=None, epilogue="none", approximate="none", pre=None,
           store_pre=False, store_act=False, row_dot=False, residual=None, layer_scale=None,
           sample_scale=None, rows_per_sample=1, config=None, choose=None):
    """C = epilogue(a @ b) for a [M, K], b [K, N] (any strides); see matmul_kernel.

    Returns (C [M, N] contiguous out_dtype, aux, rowdot): aux is the pre-activation written by
    epilogue "gelu" with store_pre, or gelu(pre)(·ss) written by "dgelu" with store_act (a's
    dtype), else None; rowdot is fp32 [N-tiles, M] when row_dot, else None.
    The GLU kinds: "glu" returns C [M, N/2] (N even) and, with store_pre, aux = PRE [M, N];
    "dglu" reads pre [M, 2N] and returns C [M, 2N] and, with store_act, aux [M, N].

    config: a GemmConfig to launch with; default the first of gemm_candidates. choose: called as
    choose(a, key, {config name: launch}) when there are several candidates, returns the chosen
    launch's result (vit_fast.tuning.choose_gemm_config: timed on CUDA); ``choose.lookup(key)``
    answers a key seen before without building the candidates.
    """
    M, K = a.shape
    N = b.shape[1]
    plan, precision = launch_plan(a, b, epilogue, approximate, bias, store_pre, store_act,
                                  row_dot, residual, layer_scale, sample_scale)
    if config is None:
        cands = plan.candidates
        if choose is not None and len(cands) > 1 and M and N:
            key = launch_key(a, b, out_dtype, plan, precision)
            config = _chosen(choose, key)
            if config is None:  # first call of the key: the chooser times or picks, and launches
                # The Hopper kernel, whose configs vit_fast.tuning adds to launches of `matmul`
                # (matmul_hopper.hopper_launches), allocates C as [M, N]: the GLU kinds' C is
                # [M, N/2] or [M, 2N], so their launches go through _matmul_kernel_only, which
                # it does not extend (tests/test_glu_mlp.py checks).
                fn = _matmul_kernel_only if epilogue in _C_COLUMNS else matmul
                launch = functools.partial(
                    fn, a, b, out_dtype, bias=bias, epilogue=epilogue, approximate=approximate,
                    pre=pre, store_pre=store_pre, store_act=store_act, row_dot=row_dot,
                    residual=residual, layer_scale=layer_scale, sample_scale=sample_scale,
                    rows_per_sample=rows_per_sample)
                return choose(a, key, {c.name: functools.partial(launch, config=c) for c in cands})
            if type(config) is not GemmConfig:  # another kernel won the key (the Hopper GEMM)
                return config(a, b, out_dtype, bias=bias, epilogue=epilogue,
                              approximate=approximate, pre=pre, store_pre=store_pre,
                              store_act=store_act, row_dot=row_dot, residual=residual,
                              layer_scale=layer_scale, sample_scale=sample_scale,
                              rows_per_sample=rows_per_sample)
        else:
            config = cands[0]
    ep = plan.epilogue
    if config.split_k > 1:
        if not ep.plain or store_pre or store_act or row_dot:
            raise ValueError(f"matmul: split-K config {config.name} takes no epilogue")
        return _split_k_matmul(a, b, out_dtype, config), None, None
    dev = a.device
    # The epilogue indexes [N] / [B] vectors as PTR + i: unit stride needed, and a zero-stride
    # ``expand`` would otherwise be read past its one element.
    if bias is not None and bias.stride(0) != 1 and bias.numel() > 1:
        bias = bias.contiguous()
    if layer_scale is not None and layer_scale.stride(0) != 1 and layer_scale.numel() > 1:
        layer_scale = layer_scale.contiguous()
    if sample_scale is not None and sample_scale.stride(0) != 1 and sample_scale.numel() > 1:
        sample_scale = sample_scale.contiguous()
    if pre is not None and pre.stride(1) != 1 and N > 1:
        pre = pre.contiguous()
    num, den = _C_COLUMNS.get(ep.kind, (1, 1))
    if den > 1 and N % den:
        raise ValueError(f"matmul: epilogue {ep.kind!r} needs an even N (gate/value pairs), "
                         f"got {N}")
    c = torch.empty((M, N * num // den), device=dev, dtype=out_dtype)
    aux = torch.empty((M, N), device=dev, dtype=a.dtype) if (store_pre or store_act) else None
    rowdot = (torch.empty((cdiv(N, config.block_n), M), device=dev, dtype=torch.float32)
              if row_dot else None)
    if M == 0 or N == 0:
        if rowdot is not None:
            rowdot.zero_()
        return c, aux, rowdot
    if K == 0:  # an empty reduction is still a well-defined (bias-only) epilogue: use zeros
        a = a.new_zeros((M, 1))
        b = b.new_zeros((1, N))
        K = 1
    # PRE and ACT share one row stride in the kernel (stride_pm); dglu's ACT is contiguous.
    if (aux is not None and pre is not None and ep.kind != "dglu"
            and aux.stride(0) != pre.stride(0)):
        pre = pre.contiguous()
    pre_t = pre if pre is not None else (aux if store_pre else None)
    stride_pm = pre_t.stride(0) if pre_t is not None else (aux.stride(0) if aux is not None else 0)
    grid, consts = plan.launch(config)
    rs = residual.stride() if residual is not None else (0, 1)
    # Absent tensors go in as None: Triton specializes them away (the flags say so too).
    kept(matmul_kernel, grid, consts)(
        a, b, c, bias, pre_t, aux if store_act else None, residual,
        layer_scale if ep.layer_scale else None, sample_scale, rowdot,
        M, N, K, rows_per_sample,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), 1,
        stride_pm, rs[0], rs[1])
    return c, aux, rowdot


class _Plan:
    """What a GEMM launch of one configuration (problem, dtypes, epilogue, precision, target)
    decides before its tensors are seen: the epilogue, the candidate configs (fixed choice
    first), whether the Hopper GEMM could read such operands at all, and per config the grid
    and constexprs (made on first use). Kept: all of it is a pure function of the key."""
    __slots__ = ("epilogue", "candidates", "tma", "_launches", "M", "N", "precision")

    def __init__(self, M, N, K, dtype, flags, precision, target):
        self.M, self.N, self.precision = M, N, precision
        self.epilogue = Epilogue(*flags)
        self.candidates = gemm_candidates(M, N, dtype, self.epilogue, precision, target, K)
        self.tma = target is not None and target.arch == 90 and dtype in (torch.float16,
                                                                           torch.bfloat16)
        self._launches = {}

    def launch(self, config):
        hit = self._launches.get(config)
        if hit is None:
            consts = matmul_constexprs(self.epilogue, config, self.precision,
                                       dot_fp32=interpreting())
            hit = self._launches[config] = (
                (cdiv(self.M, config.block_m) * cdiv(self.N, config.block_n),),
                dict(consts, num_warps=config.num_warps, num_stages=config.num_stages))
        return hit


_PLANS = {}


def _plan(M, N, K, dtype, flags, precision, target):
    key = (M, N, K, dtype, flags, precision, target, interpreting())
    hit = _PLANS.get(key)
    if hit is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        hit = _PLANS[key] = _Plan(M, N, K, dtype, flags, precision, target)
    return hit


def launch_plan(a, b, epilogue, approximate, bias, store_pre, store_act, row_dot, residual,
                layer_scale, sample_scale):
    """(the _Plan, the dot precision) of a launch of matmul's arguments (kernels/matmul_bound.py
    binds with the same)."""
    flags = (epilogue, approximate, bias is not None, store_pre, store_act, row_dot,
             residual is not None, residual is not None and layer_scale is not None,
             sample_scale is not None)
    precision = "ieee" if a.dtype != torch.float32 else input_precision(a.dtype)
    return (_plan(a.shape[0], b.shape[1], a.shape[1], a.dtype, flags, precision,
                  gpu_target(a.device)), precision)


def launch_key(a, b, out_dtype, plan, precision):
    """The chooser's key of a launch (a GemmKey's fields as a plain tuple)."""
    return (a.shape[0], b.shape[1], a.shape[1], a.dtype, b.dtype, out_dtype,
            (a.stride(1) == 1, b.stride(1) == 1), plan.epilogue, precision,
            plan.tma and _tma_readable(a, b), a.device)


def _tma_readable(a, b) -> bool:
    """Whether the Hopper GEMM's TMA loads could read a and b (asked on sm_90, 16-bit only): the
    common case (one unit stride, 16-byte rows and bases) inline, the rest as tma_rules says."""
    sa, sb = a.stride(), b.stride()
    if (sa[1] == 1 and sb[1] == 1 and not (sa[0] * 2) % 16 and not (sb[0] * 2) % 16
            and not a.data_ptr() % 16 and not b.data_ptr() % 16 and a.numel() and b.numel()):
        return True  # 16-bit: 2 bytes per element
    return not gemm_operand_reasons(("a", a), ("b", b))


def _chosen(choose, key):
    """What the chooser picked before for ``key``: one of this kernel's GemmConfigs, or another
    launcher taking matmul's arguments (the Hopper GEMM with its config); None when the key is
    new, or while a profiler records (the chooser's own run then labels the launch)."""
    lookup = getattr(choose, "lookup", None)
    if lookup is None or torch.autograd.profiler._is_profiler_enabled:
        return None
    return lookup(key)


def _matmul_kernel_only(a, b, out_dtype, **kwargs):
    """matmul itself, for candidate launches that must stay on matmul_kernel (see matmul)."""
    return matmul(a, b, out_dtype, **kwargs)


@on_tensor_device
def _split_k_matmul(a, b, out_dtype, config):
    """a @ b as config.split_k fp32 partials over runs of K, added in a fixed order."""
    M, K = a.shape
    N = b.shape[1]
    part = torch.empty((config.split_k, M, N), device=a.device, dtype=torch.float32)
    if M and N:
        if K == 0:
            part.zero_()
        else:
            grid = (cdiv(M, config.block_m) * cdiv(N, config.block_n), config.split_k)
            matmul_kernel[grid](
                a, b, part, None, None, None, None, None, None, None, M, N, K, 1,
                a.stride(0), a.stride(1), b.stride(0), b.stride(1), N, 1, 0, 0, 1,
                **matmul_constexprs(Epilogue(), config, input_precision(a.dtype),
                                    dot_fp32=interpreting()),
                num_warps=config.num_warps, num_stages=config.num_stages)
    out = part[0]
    for s in range(1, config.split_k):  # fixed order: run-to-run identical bits
        out = out + part[s]
    return out.to(out_dtype)


@on_tensor_device
def colsum(x, sample_scale=None, rows_per_sample=1):
    """Σ_m x[m, :]·ss[m // rows_per_sample] in fp32 [N], deterministic (fixed chunks, fixed order)."""
    M, N = x.shape
    if M == 0 or N == 0:
        return torch.zeros(N, device=x.device, dtype=torch.float32)
    sample_scale = _unit(sample_scale)
    grid, rows_per_chunk, consts = colsum_launch(M, N, gpu_target(x.device),
                                                 sample_scale is not None)
    part = torch.empty((grid[1], N), device=x.device, dtype=torch.float32)
    kept(colsum_kernel, grid, consts)(x, sample_scale, part, M, N, rows_per_chunk,
                                      rows_per_sample, x.stride(0), x.stride(1))
    # torch's reduction over a fixed shape is deterministic; the partials are few rows.
    return part.sum(0)


_COLSUM_LAUNCHES = {}  # colsum's per-configuration launches (pure, so kept)


def colsum_launch(M, N, target, has_sample_scale):
    """colsum's (grid, rows per chunk, constexprs) for x [M, N]: fixed chunks of whole BLOCK_M
    tiles, at most ~64 of them (their partials are summed in a fixed order). Made once per
    configuration (the constexprs' dict is the same each call: kernels/direct_launch.kept)."""
    key = (M, N, target, has_sample_scale)
    hit = _COLSUM_LAUNCHES.get(key)
    if hit is None:
        BLOCK_M, BLOCK_N = colsum_block(target)
        rows_per_chunk = BLOCK_M * max(1, cdiv(cdiv(M, BLOCK_M), 64))
        grid = (cdiv(N, BLOCK_N), cdiv(M, rows_per_chunk))
        hit = _COLSUM_LAUNCHES[key] = (grid, rows_per_chunk, dict(
            HAS_SAMPLE_SCALE=has_sample_scale, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4))
    return hit

