"""Hopper (sm_90) GEMM: persistent, A and B through TMA tensor descriptors, epilogue in subtiles.

The same math and epilogues as kernels/matmul.py (bias, GELU with erf or tanh, dGELU, LayerScale
+ drop-path + residual, any output dtype; see matmul_kernel's docstring), for 16-bit operands.
Differences, and why:
- persistent: one program per SM walks the output tiles in grouped order (stride = programs), so
  there is no tail wave of CTA launches and the next tile's loads overlap this tile's epilogue;
- A and B are read by TMA (UTMALDG) from host-built descriptors: no address arithmetic or masks
  in the mainloop; out-of-bounds rows, columns and the K tail are zero-filled by the descriptor;
- the epilogue runs on EPILOGUE_SUBTILES column slices of the accumulator, so a 128x256 tile's
  epilogue holds half the fp32 values live at a time.

It is a candidate of the measured selection (vit_fast.tuning.choose_gemm_config) only on sm_90
and only where the installed triton has tensor descriptors (:func:`not_supported_reasons`); it is
never the fixed table's choice. Under the interpreter the descriptors run too (tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import cdiv, gpu_target, interpreting, on_tensor_device
from .gemm_epilogue import epilogue_store, grouped_tile
from .matmul import Epilogue, GemmConfig, _unit, epilogue_constexprs
from .tma_rules import gemm_operand_reasons

try:  # triton >= 3.4 (host-side descriptors, launched as kernel arguments)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None


@triton.jit
def hopper_matmul_kernel(
    a_desc, b_desc, C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT,
    M, N, K, rows_per_sample, stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
    A_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, APPROX_TANH: tl.constexpr,
    STORE_PRE: tl.constexpr, STORE_ACT: tl.constexpr, ROW_DOT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, HAS_SAMPLE_SCALE: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr,
):
    """acc = A @ B in fp32 for A [M, K], B [K, N], then matmul_kernel's epilogue.

    a_desc describes A [M, K] with block [BLOCK_M, BLOCK_K], or Aᵀ [K, M] with block
    [BLOCK_K, BLOCK_M] when A_TRANSPOSED (A's unit stride runs along M: the weight gradient's Xᵀ);
    b_desc describes B [K, N] with block [BLOCK_K, BLOCK_N], or Bᵀ [N, K] with block
    [BLOCK_N, BLOCK_K] when B_TRANSPOSED (a torch weight W [N, K] used as Wᵀ). The other tensors
    are laid out as in matmul_kernel, but ROWDOT is fp32 [cdiv(N, BLOCK_N)·EPILOGUE_SUBTILES, M]:
    one row of partial sums per epilogue subtile.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    SUB_N: tl.constexpr = BLOCK_N // EPILOGUE_SUBTILES
    # Program p computes tiles p, p + programs, p + 2·programs, ... (the grid is at most one
    # program per SM, so every program stays resident).
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            if A_TRANSPOSED:
                a = a_desc.load([off_k, off_m]).T
            else:
                a = a_desc.load([off_m, off_k])
            if B_TRANSPOSED:
                b = b_desc.load([off_n, off_k]).T
            else:
                b = b_desc.load([off_k, off_n])
            if DOT_FP32:
                # The interpreter computes 16-bit dots wrongly; compiled kernels keep wgmma.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        if EPILOGUE_SUBTILES == 2:
            # [BM, BN] -> [BM, 2, BN/2] -> [BM, BN/2, 2] -> two [BM, BN/2] column halves.
            parts = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, SUB_N)), (0, 2, 1)))
        else:
            parts = (acc,)
        for s in tl.static_range(EPILOGUE_SUBTILES):
            epilogue_store(
                parts[s], offs_m, off_n + s * SUB_N + tl.arange(0, SUB_N), M, N, rows_per_sample,
                C, BIAS, PRE, ACT, RES, LSCALE, SSCALE, ROWDOT, pid_n * EPILOGUE_SUBTILES + s,
                stride_cm, stride_cn, stride_pm, stride_rm, stride_rn,
                HAS_BIAS, EPILOGUE, APPROX_TANH, STORE_PRE, STORE_ACT, ROW_DOT,
                HAS_RESIDUAL, HAS_LAYER_SCALE, HAS_SAMPLE_SCALE)


# ---------------------------------------------------------------------------------------------
# Configs: pure functions; kernels/matmul_hopper_aot.py compiles what hopper_candidates offers.

class HopperConfig(GemmConfig):
    """A GemmConfig of the Hopper kernel: it sets epilogue_subtiles and never splits K."""
    __slots__ = ()

    @property
    def name(self) -> str:
        return (f"tma{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}"
                f"s{self.num_stages}e{self.epilogue_subtiles}")


# 128x256: two warpgroups each own a 64x256 wgmma accumulator (128 fp32 registers a thread);
# 3 stages of A and B take 144 KiB of the 227 KiB. The epilogue runs on 128x128 halves.
WIDE = HopperConfig(128, 256, 64, 8, 8, 3, epilogue_subtiles=2)
# 128x128 for grids that 128x256 tiles would leave short of SMs; 4 stages.
LARGE = HopperConfig(128, 128, 64, 8, 8, 4, epilogue_subtiles=1)
# dGELU holds pre, act and the gradient at once: in 128x64 halves (the whole 128x128 tile at
# once spills on sm_90).
DGELU = HopperConfig(128, 128, 64, 8, 8, 4, epilogue_subtiles=2)
INTERPRET_CONFIG = HopperConfig(32, 32, 16, 2, 4, 1, epilogue_subtiles=2)  # small: several tiles per program

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def not_supported_reasons(dtype, target, *, triton_has_descriptors=None) -> list:
    """Why the Hopper GEMM is not offered for 16-bit operands of ``dtype`` on ``target``; empty
    when it is. Per-tensor limits (alignment) are in :func:`tensor_reasons`."""
    has = TensorDescriptor is not None if triton_has_descriptors is None else triton_has_descriptors
    reasons = []
    if not has:
        reasons.append(f"triton {triton.__version__} has no triton.tools.tensor_descriptor")
    if target is None or target.arch != 90:
        reasons.append("TMA descriptors and wgmma: sm_90 only"
                       + ("" if target is None else f" (device is sm_{target.arch})"))
    if dtype not in _SUPPORTED_DTYPES:
        reasons.append(f"operands are {dtype}; the Hopper GEMM takes fp16/bf16")
    return reasons


tensor_reasons = gemm_operand_reasons  # kernels/tma_rules.py


def hopper_candidates(dtype, epilogue: Epilogue, target):
    """The configs a launch may try (none where :func:`not_supported_reasons` says why); the
    interpreter's config where the target is None (tests)."""
    if target is None:
        return (INTERPRET_CONFIG,)
    if not_supported_reasons(dtype, target):
        return ()
    if epilogue.kind == "dgelu":
        return (DGELU,)
    # The GELU epilogue (pre and act stored) at 128x256 spills on triton 3.9 (sm_90, 255
    # registers; 0 on 3.6/3.8): fc1 takes the 128x128 tile only.
    return (LARGE,) if epilogue.kind == "gelu" else (WIDE, LARGE)


def hopper_constexprs(epilogue: Epilogue, config: HopperConfig, a_transposed, b_transposed,
                      dot_fp32=False):
    """hopper_matmul_kernel's constexpr arguments for one launch (the AOT specs use the same)."""
    if config.split_k != 1:
        raise ValueError(f"config: the Hopper kernel does not split K (split_k {config.split_k})")
    return dict(
        A_TRANSPOSED=a_transposed, B_TRANSPOSED=b_transposed, **epilogue_constexprs(epilogue),
        DOT_FP32=dot_fp32, **config.tile_constexprs(), EPILOGUE_SUBTILES=config.epilogue_subtiles)


def _descriptor(t, rows_block, cols_block):
    """(descriptor, transposed) of a 2-D operand: over t itself when its columns are unit-stride,
    else over tᵀ (its rows are), with the block shape transposed to match."""
    if t.stride(1) == 1:
        return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows_block, cols_block]), False
    tt = t.t()
    return TensorDescriptor(tt, list(tt.shape), [tt.stride(0), 1], [cols_block, rows_block]), True


@on_tensor_device
def hopper_matmul(a, b, out_dtype, *, bias=None, epilogue="none", approximate="none", pre=None,
                  store_pre=False, store_act=False, row_dot=False, residual=None,
                  layer_scale=None, sample_scale=None, rows_per_sample=1, config=None):
    """kernels/matmul.matmul's contract (returns (C, aux, rowdot)) on the Hopper kernel; rowdot
    has one row per epilogue subtile (its callers sum the rows). Raises ValueError listing the
    reasons where it cannot run."""
    M, K = a.shape
    N = b.shape[1]
    target = gpu_target(a.device)
    reasons = ([] if target is None else not_supported_reasons(a.dtype, target)) + tensor_reasons(
        ("a", a), ("b", b))
    if a.dtype not in _SUPPORTED_DTYPES or b.dtype != a.dtype:
        reasons.append(f"operands are {a.dtype} and {b.dtype}; the Hopper GEMM takes one of "
                       "fp16/bf16")
    if reasons:
        raise ValueError("hopper_matmul: " + "; ".join(reasons))
    ep = Epilogue(epilogue, approximate, bias is not None, store_pre, store_act, row_dot,
                  residual is not None, residual is not None and layer_scale is not None,
                  sample_scale is not None)
    config = config or hopper_candidates(a.dtype, ep, target)[0]
    bias, layer_scale, sample_scale = map(_unit, (bias, layer_scale, sample_scale))
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    aux = torch.empty((M, N), device=a.device, dtype=a.dtype) if (store_pre or store_act) else None
    if pre is not None and (pre.stride(1) != 1 or (aux is not None
                                                   and aux.stride(0) != pre.stride(0))):
        pre = pre.contiguous()  # PRE and ACT share one row stride, unit columns
    pre_t = pre if pre is not None else (aux if store_pre else None)
    stride_pm = next((t.stride(0) for t in (pre_t, aux) if t is not None), 0)
    rowdot = (torch.empty((cdiv(N, config.block_n) * config.epilogue_subtiles, M),
                          device=a.device,
                          dtype=torch.float32) if row_dot else None)
    a_desc, a_t = _descriptor(a, config.block_m, config.block_k)
    b_desc, b_t = _descriptor(b, config.block_k, config.block_n)
    tiles = cdiv(M, config.block_m) * cdiv(N, config.block_n)
    programs = min(tiles, target.sms if target is not None else 3)
    hopper_matmul_kernel[(programs,)](
        a_desc, b_desc, c, bias, pre_t, aux if store_act else None, residual,
        layer_scale if ep.layer_scale else None, sample_scale, rowdot,
        M, N, K, rows_per_sample, c.stride(0), c.stride(1), stride_pm,
        *(residual.stride() if residual is not None else (0, 1)),
        **hopper_constexprs(ep, config, a_t, b_t, dot_fp32=interpreting()),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return c, aux, rowdot


def config_named(name: str):
    """The Hopper config called ``name`` (a measured choice remembered by name), or None."""
    return next((c for c in (WIDE, LARGE, DGELU) if c.name == name), None)


def hopper_launches(key, launches: dict) -> dict:
    """{config name: launch} of the Hopper GEMM for the call whose kernels/matmul candidate
    launches are ``launches`` (partials of matmul.matmul with a ``config``; ``key``: the
    launch's key, matmul.GemmKey's fields as a tuple). Empty where the kernel is not offered
    (not sm_90, no descriptors, not 16-bit, operands TMA cannot read) -- the reasons are
    :func:`not_supported_reasons` and :func:`tensor_reasons` -- and on CPU/the interpreter."""
    from . import matmul as _matmul
    launch = next(iter(launches.values()), None)
    if getattr(launch, "func", None) is not _matmul.matmul or len(launch.args) != 3:
        return {}
    a, b, out_dtype = launch.args
    target = gpu_target(a.device)
    if target is None or b.dtype != a.dtype or tensor_reasons(("a", a), ("b", b)):
        return {}
    kw = {k: v for k, v in launch.keywords.items() if k != "config"}
    return {c.name: functools.partial(hopper_matmul, a, b, out_dtype, **kw, config=c)
            for c in hopper_candidates(a.dtype, Epilogue(*key[7]), target)}
