"""The q/k norm kernels compile ahead of time for sm_80 and sm_90 with 0 spills.

`python -m vit_fast.bench compile-check --match qk_norm` builds all of kernels/qk_norm_aot.py's
specs (200 builds); this test builds the covering subset of tests/aot_builds.py: LayerNorm and
RMSNorm of both kernels at their heaviest (fp32, head dim 256) on both architectures, and every
BLOCK_D bucket, tile height and dtype once.
"""
import dataclasses

from aot_builds import covering_jobs, parametrize_jobs
from vit_fast import support
from vit_fast.kernels import qk_norm, qk_norm_aot

SPECS = qk_norm_aot.aot_specs()
JOBS = covering_jobs(SPECS)
AOT_JOBS = ("qk_norm_aot", JOBS)  # conftest.py starts them at collection


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
        bd = s.constants["BLOCK_D"]
        want = (qk_norm.gpu_fwd_block_m(bd) if s.name.startswith("qk_norm_fwd")
                else qk_norm.gpu_bwd_block_m(bd, s.signature["X"] == "*fp32"))
        assert s.constants["BLOCK_M"] == want and s.num_warps == qk_norm.NUM_WARPS, s.name


@parametrize_jobs(JOBS)
def test_compiles_without_spills(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch}: {r}"
    assert r.ok, dataclasses.asdict(r)
