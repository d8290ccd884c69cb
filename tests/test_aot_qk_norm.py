"""The q/k norm kernels compile ahead of time for sm_80 and sm_90 with 0 spills.

`python -m vit_fast.bench compile-check --match qk_norm` builds all of kernels/qk_norm_aot.py's
specs (200 builds); this test builds a covering subset to keep the suite short on two cores:
every BLOCK_D bucket of both kernels with fp32 LayerNorm (the most live fp32 values), every
(qkv, parameter) dtype pair at head dim 128, and RMSNorm there in fp32.
"""
import dataclasses

import pytest

from vit_fast import support
from vit_fast.aot import compile_module, nvidia_backend_missing_reason
from vit_fast.kernels import qk_norm

SPECS = qk_norm.aot_specs()


def _subset():
    return [s for s in SPECS if "[fp32,layer," in s.name or ",layer,D=128," in s.name
            or "[fp32,rms,D=128," in s.name]


def test_specs_cover_every_bucket_dtype_and_kind_the_launchers_pick():
    assert qk_norm.MAX_HEAD_DIM == support.MAX_HEAD_DIM
    buckets = {qk_norm.block_d(d) for d in range(1, qk_norm.MAX_HEAD_DIM + 1)}
    for kernel in ("qk_norm_fwd", "qk_norm_bwd"):
        for pair in ("fp16", "bf16", "fp32", "fp16,fp32", "bf16,fp32"):
            for kind in ("layer", "rms"):
                built = {s.constants["BLOCK_D"] for s in SPECS
                         if s.name.startswith(f"{kernel}[{pair},{kind},")}
                assert built == buckets, (kernel, pair, kind)
    for s in SPECS:  # the launchers' GPU tile heights
        want = (qk_norm.gpu_fwd_block_m if s.name.startswith("qk_norm_fwd")
                else qk_norm.gpu_bwd_block_m)(s.constants["BLOCK_D"])
        assert s.constants["BLOCK_M"] == want and s.num_warps == qk_norm.NUM_WARPS, s.name


def test_subset_compiles_without_spills():
    reason = nvidia_backend_missing_reason()
    if reason:
        pytest.skip(reason)
    out = compile_module("qk_norm", (80, 90), names={s.name for s in _subset()})
    assert len(out) == 2 * len(_subset())
    failed = {k: r for k, r in out.items() if isinstance(r, str)}
    assert not failed, failed
    bad = {k: dataclasses.asdict(r) for k, r in out.items() if not r.ok}
    assert not bad, bad
