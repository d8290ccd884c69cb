"""The rotary-embedding kernels compile ahead of time for sm_80 and sm_90 with 0 spills.

`python -m vit_fast.bench compile-check --match rope` builds all of kernels/rope_aot.py's specs;
this test builds the covering subset of tests/aot_builds.py (every variant at its heaviest on
both architectures, every bucket, tile height and dtype once), and checks that the specs are
what the launchers pick on a GPU.
"""
import dataclasses

from aot_builds import covering_jobs, parametrize_jobs
from vit_fast.kernels import rope, rope_aot

SPECS = rope_aot.aot_specs()
JOBS = covering_jobs(SPECS)
AOT_JOBS = ("rope_aot", JOBS)  # conftest.py starts them at collection


def test_specs_cover_every_bucket_dtype_layout_and_variant_the_launchers_pick():
    buckets = {rope.block_d(d) for d in range(2, rope.MAX_HEAD_DIM + 1, 2)}
    for io in ("fp16", "bf16", "fp32"):
        for layout in ("interleaved", "half"):
            for tag in ("rope_fwd[", "rope_bwd["):
                for variant in ((None,) if tag == "rope_fwd[" else ("", ",grad", ",grad_from_output")):
                    built = {s.constants["BLOCK_D"] for s in SPECS if s.name.startswith(f"{tag}{io},{layout},")
                             and (variant is None or s.name.endswith(f"{variant}]"))
                             and (variant != "" or "grad" not in s.name)}
                    assert built == buckets, (tag, io, layout, variant)
    for s in SPECS:  # the launchers' GPU tile heights and warps
        bd, backward = s.constants["BLOCK_D"], s.name.startswith("rope_bwd")
        assert s.constants["BLOCK_M"] == rope.gpu_block_m(bd, backward), s.name
        assert s.num_warps == rope.NUM_WARPS and s.signature["SIN"] == "*fp32", s.name


@parametrize_jobs(JOBS)
def test_compiles_without_spills(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch}: {r}"
    assert r.ok, dataclasses.asdict(r)


def test_rope_launches_on_a_gpu_are_compiled(monkeypatch):
    """The launchers under the interpreter with an H100's and an A100's configs: every launch
    they make (the rope kernels and the gradient's reduce) is one of the AOT specs."""
    import torch
    from test_aot_coverage import _mismatches, launches_on
    from vit_fast.kernels import layer_norm_aot
    from vit_fast.kernels._device import Target
    specs = SPECS + layer_norm_aot.aot_specs()
    monkeypatch.setattr(rope, "interpreting", lambda: False)
    for target in (Target(132, 90), Target(108, 80)):
        monkeypatch.setattr(rope, "gpu_target", lambda device, t=target: t)
        with launches_on(monkeypatch, target) as seen:
            for dtype, half, lead in ((torch.float16, False, ()), (torch.bfloat16, True, (2, 1)),
                                      (torch.float32, True, (2,))):
                qkv = torch.randn(2, 9, 3 * 2 * 40).to(dtype)
                sin, cos = torch.randn(*lead, 8, 40), torch.randn(*lead, 8, 40)
                out = rope.rope_fwd(qkv, 2, sin, cos, num_prefix_tokens=1, half=half)
                rope.rope_bwd(out, 2, sin, cos, num_prefix_tokens=1, half=half)
                rope.rope_bwd(out, 2, sin, cos, num_prefix_tokens=1, half=half,
                              sin_cos_grad=True, qkv=qkv)
                rope.rope_bwd(out, 2, sin, cos, num_prefix_tokens=1, half=half,
                              sin_cos_grad=True, out=out)
        assert {s["kernel"] for s in seen} == {"rope_fwd_kernel", "rope_bwd_kernel",
                                               "layer_norm_param_grad_reduce_kernel"}
        for launch in seen:
            candidates = [s for s in specs if s.kernel.fn.__name__ == launch["kernel"]]
            assert any(not _mismatches(launch, s) for s in candidates), launch["kernel"]
