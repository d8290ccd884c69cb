"""The GLU MLP's builds (kernels/glu_mlp_aot.py) compile for sm_80 and sm_90 with no spills and
with tensor cores where they dot, and every launch glu_mlp_fwd / glu_mlp_bwd make on a CUDA
target is a compiled build (theirs, or the GELU MLP's and the LayerNorm's they share).

`python -m vit_fast.bench compile-check --match glu` builds every spec; this builds the covering
subset of tests/aot_builds.py."""
import random

import pytest
import torch

from aot_builds import ARCHS, archs_of, covering_jobs, family, parametrize_jobs
from test_aot_coverage import _mismatches, launches_on
from vit_fast.kernels import (gelu_mlp_aot, glu_elementwise, glu_mlp, glu_mlp_aot, layer_norm_aot,
                              matmul)
from vit_fast.kernels._device import Target

SPECS = {s.name: s for s in glu_mlp_aot.aot_specs()}
JOBS = covering_jobs(list(SPECS.values()))
AOT_JOBS = ("glu_mlp_aot", JOBS)  # conftest.py starts them at collection
# What the GLU launchers may launch: their own builds and the shared GEMM / LayerNorm ones.
ALL_SPECS = list(SPECS.values()) + gelu_mlp_aot.aot_specs() + layer_norm_aot.aot_specs()


@parametrize_jobs(JOBS)
def test_compiles_without_spills_and_with_tensor_cores(compiled, name, arch):
    r = compiled[(name, arch)]
    assert not isinstance(r, str), f"{name} sm_{arch}: {r}"
    want_tc = {90: "HGMMA", 80: "HMMA"}[arch] if SPECS[name].uses_dot else ""
    assert r.ok and not r.spill_bytes and r.tensor_core_ops == want_tc, (
        f"{name} sm_{arch}: regs={r.registers} spills={r.spill_bytes} shared={r.shared_bytes} "
        f"tensor-core={r.tensor_core_ops!r} (want {want_tc!r})")


def test_the_covering_builds_reach_every_family_and_value():
    """tests/aot_builds.covering_jobs over this list (as tests/test_aot_specs.py checks the
    other modules'): every family on both archs, every constexpr value and pointer dtype."""
    jobs = covering_jobs(list(SPECS.values()))
    assert len(set(jobs)) == len(jobs) < len(SPECS) * len(ARCHS)
    built = [SPECS[name] for name, _ in jobs]
    families = {(family(SPECS[n]), a) for n, a in jobs}
    for spec in SPECS.values():
        assert {(family(spec), a) for a in archs_of(spec)} <= families, spec.name
        for name, value in spec.constants.items():
            assert any(b.kernel is spec.kernel and b.constants.get(name, ...) == value
                       for b in built), (spec.name, name, value)
        for name, dtype in spec.signature.items():
            assert any(b.kernel is spec.kernel and b.signature.get(name) == dtype
                       for b in built), (spec.name, name, dtype)


def assert_covered(launches):
    assert launches
    for launch in launches:
        candidates = [s for s in ALL_SPECS if s.kernel.fn.__name__ == launch["kernel"]]
        reasons = [(s.name, _mismatches(launch, s)) for s in candidates]
        if not any(not why for _, why in reasons):
            closest = sorted(reasons, key=lambda r: len(r[1]))[:3]
            pytest.fail(f"no AOT spec covers {launch['kernel']} "
                        f"{ {k: v for k, v in launch['args'].items() if not torch.is_tensor(v)} }"
                        f" warps={launch['num_warps']} stages={launch.get('num_stages')}; "
                        f"closest: {closest}")


def _inputs(dtype, stream, layout):
    g = torch.Generator().manual_seed(0)
    B, N, C, H = 2, 5, 24, 40

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)
    fc1 = (r(H, C) * 0.2, r(H, C) * 0.2) if layout == "pair" else r(2 * H, C) * 0.2
    b1 = (r(H), r(H)) if layout == "pair" else r(2 * H)
    return dict(x=r(B, N, C), fc1=fc1, b1=b1, w2=r(C, H) * 0.2, b2=r(C), res=r(B, N, C, dt=stream),
                ls=r(C, dt=stream), ss=torch.tensor([1.25, 0.0]).to(stream),
                nw=r(H, dt=stream), nb=r(H, dt=stream))


def _all_candidates(results):
    """A ``choose`` that runs every candidate config and keeps the outputs for comparison."""
    def choose(a, fields, candidates):
        outs = {name: fn() for name, fn in candidates.items()}
        results.append(outs)
        return next(iter(outs.values()))
    return choose


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("target", [Target(132, 90), Target(108, 80)], ids=["h100", "a100"])
@pytest.mark.parametrize("dtype,stream,layout", [
    (torch.bfloat16, torch.bfloat16, "pair"), (torch.float16, torch.float32, "pair"),
    (torch.float32, torch.float32, "packed")], ids=["bf16", "fp16-amp", "fp32"])
def test_glu_mlp_launches_are_compiled(monkeypatch, target, dtype, stream, layout, norm):
    t = _inputs(dtype, stream, layout)
    results = []
    choose = _all_candidates(results)
    kw = dict(norm_weight=t["nw"], norm_bias=t["nb"], norm_eps=1e-6) if norm else {}
    with launches_on(monkeypatch, target) as seen:
        monkeypatch.setattr(glu_elementwise, "gpu_target", lambda device: target)
        out, pre = glu_mlp.glu_mlp_fwd(t["x"], t["fc1"], t["b1"], t["w2"], t["b2"], t["res"],
                                       t["ls"], t["ss"], True, out_dtype=stream, choose=choose,
                                       **kw)
        glu_mlp.glu_mlp_bwd(torch.randn_like(out).to(dtype), t["x"], t["fc1"], t["w2"], t["b2"],
                            pre, t["ls"].to(dtype), t["ss"].to(dtype), has_residual=True,
                            choose=choose, **kw)
    assert_covered(seen)
    launched = {launch["kernel"] for launch in seen}
    assert "matmul_kernel" in launched
    if norm:
        assert {"glu_fwd_kernel", "glu_bwd_kernel", "residual_layer_norm_fwd_kernel",
                "residual_layer_norm_bwd_kernel"} <= launched
    for outs in results:  # every candidate computes the same GEMM (fp32 accumulation)
        first = next(iter(outs.values()))
        for name, out in outs.items():
            for a, b in zip(first, out):
                if a is not None:
                    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2,
                                               msg=name)


def test_config_functions_offer_only_compiled_configs():
    """Shapes and GPUs other than the AOT module's own sweep."""
    rng = random.Random(0)
    compiled = {}
    for s in SPECS.values():
        if s.kernel.fn.__name__ == "matmul_kernel":
            kind, dtype = s.name.split("[")[1].split("/")[:2]
            compiled.setdefault((kind, dtype, s.constants["INPUT_PRECISION"]), set()).add(
                matmul.GemmConfig(*(s.constants[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                               "GROUP_M")),
                                  s.num_warps, s.num_stages, s.constants["SPLIT_K"]))
    assert {k for k, _, _ in compiled} == set(glu_mlp_aot.KINDS)
    elementwise = {(s.kernel.fn.__name__, s.constants["BLOCK_M"], s.constants["BLOCK_H"])
                   for s in SPECS.values() if s.kernel.fn.__name__.startswith("glu_")}
    for _ in range(300):
        target = Target(rng.choice([1, 46, 80, 108, 114, 132, 144, 1000]),
                        rng.choice([80, 86, 89, 90]))
        M, N, K = rng.randint(1, 1 << 17), 2 * rng.randint(1, 1 << 13), rng.randint(1, 1 << 17)
        for (kind, dtype, precision), configs in compiled.items():
            epilogue = glu_mlp_aot.KINDS[kind][0]
            for cfg in matmul.gemm_candidates(M, N, gelu_mlp_aot._DT[dtype], epilogue,
                                              precision, target, K):
                assert cfg in configs, (kind, dtype, precision, M, N, target, cfg)
        blocks = glu_elementwise.glu_blocks(target)
        assert ("glu_fwd_kernel", *blocks.fwd) in elementwise
        assert ("glu_bwd_kernel", *blocks.bwd) in elementwise
