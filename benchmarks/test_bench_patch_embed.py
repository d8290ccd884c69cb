"""CPU wall-clock of patch embedding: vit_fast._C against timm's PatchEmbed (Conv2d), side by side.

ViT-B/16 shapes: B=32, 3x224x224 fp32 images, D=768, 16x16 patches, inference (no_grad).
Run: .venv/bin/python -m pytest benchmarks/test_bench_patch_embed.py --benchmark-only -s
The extension gathers the patches into one [B*196, 768] matrix in the weight's (c, kh, kw) order
and runs one GEMM with the bias, as a 1x1 convolution over that matrix's channels_last view
(oneDNN's JIT kernel; MKL's sgemm behind at::addmm took ~2.4x longer on this AMD AVX-512 machine).
timm runs a 16x16-stride-16 Conv2d (oneDNN) and a flatten/transpose view.
"""
import statistics
import time

import pytest
import torch

from vit_fast.ops import patch_embed as pe

timm_layers = pytest.importorskip("timm.layers")

B, IMG, PATCH, DIM = 32, 224, 16, 768
TARGET_SPEEDUP = 1.3

pytestmark = pytest.mark.skipif(not pe.extension_available(), reason=f"extension not loaded: {pe.extension_error()}")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    timm_pe = timm_layers.PatchEmbed(IMG, PATCH, 3, DIM).eval()
    images = torch.randn(B, 3, IMG, IMG)
    w, b = timm_pe.proj.weight.detach(), timm_pe.proj.bias.detach()

    def run_timm():
        with torch.no_grad():
            return timm_pe(images)

    def run_vit_fast():
        with torch.no_grad():
            return pe.patch_embed(images, w, b, (PATCH, PATCH), None, None, None)

    torch.testing.assert_close(run_vit_fast(), run_timm(), rtol=1e-4, atol=1e-4)
    return {"timm": run_timm, "vit_fast": run_vit_fast}


@pytest.mark.benchmark(group="patch_embed_cpu_B32_224_fp32")
@pytest.mark.parametrize("impl", ["timm", "vit_fast"])
def test_patch_embed_cpu(benchmark, setup, impl):
    benchmark.extra_info.update(threads=torch.get_num_threads(), shape=f"B={B} 3x{IMG}x{IMG} D={DIM} p={PATCH}")
    benchmark.pedantic(setup[impl], rounds=10, warmup_rounds=2)


@pytest.mark.benchmark(group="patch_embed_cpu_speedup")
def test_patch_embed_cpu_speedup(benchmark, setup):
    """Both paths timed side by side in one run: blocks of consecutive calls, alternated, so load
    on the shared machine hits both alike while each runs in its own steady state.

    Blocks rather than strict alternation: alternating call by call couples the two through the
    allocator. Measured here (ru_minflt): alone, vit_fast takes 0 page faults per call and timm
    ~9,950 (~40 MB of fresh pages); alternated, timm takes 0 and vit_fast ~9,950, and the ratio
    drops from ~1.7x to ~1.3x. Blocks time each path in its own steady state. The ratio of per-path
    minima is asserted (the least disturbed samples); the ratio of medians is reported beside it.
    """
    times = {"timm": [], "vit_fast": []}
    for _ in range(4):
        for name, fn in setup.items():
            fn()  # first call of a block settles the allocator; not timed
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup, speedup_median = best["timm"] / best["vit_fast"], med["timm"] / med["vit_fast"]
    benchmark.extra_info.update(timm_min_ms=best["timm"] * 1e3, vit_fast_min_ms=best["vit_fast"] * 1e3,
                                speedup=speedup, speedup_median=speedup_median)
    print(f"\npatch_embed CPU B={B} {IMG}x{IMG} fp32 D={DIM} ({torch.get_num_threads()} threads): "
          f"min timm {best['timm'] * 1e3:.1f} ms, vit_fast {best['vit_fast'] * 1e3:.1f} ms, speedup {speedup:.2f}x "
          f"(medians: {med['timm'] * 1e3:.1f} / {med['vit_fast'] * 1e3:.1f} ms, {speedup_median:.2f}x)")
    benchmark.extra_info["meets_target"] = speedup >= TARGET_SPEEDUP
    print(f"target {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}")
    benchmark.pedantic(setup["vit_fast"], rounds=3, warmup_rounds=0)
    # Hard bar: never slower than timm. The 1.3x target is reported, not asserted: on a loaded
    # 2-core machine the measured ratio moved between 1.26x and 2.8x from run to run.
    assert speedup > 1.0, f"vit_fast CPU path is {speedup:.2f}x timm (slower)"
