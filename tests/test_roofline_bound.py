"""vit_fast/bench/roofline_bound.py: the bound analysis `bench roofline` prints (model)."""
import contextlib
import io

import pytest

from vit_fast.bench import roofline as rl
from vit_fast.bench import roofline_bound as rb

VIT_B = (64, 197, 768, 12, 2)  # B, N, C, H, bytes per element (bf16)


@pytest.mark.parametrize("hw", list(rl.HARDWARE))
def test_gemm_floor_is_the_blocks_linear_gemms_at_cublas_fraction(hw):
    B, N, C, H, e = VIT_B
    M = B * N
    a = rb.analyze(*VIT_B, hw=hw)
    # qkv (3C x C), proj (C x C), fc1 and fc2 (4C x C each): forward, dX and dW, 2 FLOPs a MAC
    assert a["gemm_floor_flops"] == 3 * 2 * M * (3 + 1 + 4 + 4) * C * C
    bw, peak = rl.HARDWARE[hw]
    eff = rl.EFFICIENCY[hw]
    gemms = [o for o in rl.block_ops("eager", *VIT_B, backward=True) if rb.is_gemm(o)]
    assert all(o.flops / (peak * eff["cublas_gemm"]) > o.bytes / (bw * eff["memory"])
               for o in gemms)  # compute-bound: the floor is FLOPs at cuBLAS's fraction
    assert a["gemm_floor_s"] == pytest.approx(a["gemm_floor_flops"] / (peak * eff["cublas_gemm"]))


@pytest.mark.parametrize("hw", list(rl.HARDWARE))
@pytest.mark.parametrize("layer_scale", [False, True])
def test_bounds_are_at_least_the_modelled_speedups(hw, layer_scale):
    a = rb.analyze(*VIT_B, hw=hw, layer_scale=layer_scale)
    for v, r in a["variants"].items():
        for ref in rb.TARGETS:
            assert r["speedup"][ref] == pytest.approx(a["times"][ref] / a["times"][v])
            assert r["bound"][ref] > r["bound_with_attention"][ref] >= r["speedup"][ref], (v, ref)
            # the GEMM-parity what-if lies between the modelled speedup and the bound
            parity = a["times"][ref] / r["gemm_parity_s"]
            assert r["speedup"][ref] <= parity <= r["bound_with_attention"][ref], (v, ref)


@pytest.mark.parametrize("hw", list(rl.HARDWARE))
def test_excess_by_class_partitions_each_variants_time(hw):
    """The variant's own GEMMs at cuBLAS's fraction + its excess per class = its time."""
    for v in rb.VARIANTS:
        ops = rl.block_ops(v, *VIT_B, backward=True)
        floor, _ = rb.gemm_floor(ops, hw)
        by_class = rb.excess_by_class(ops, hw)
        assert floor + sum(by_class.values()) == pytest.approx(rl.time_s(ops, hw))
        assert all(x >= 0 for x in by_class.values())
        if v == "vit_fast cublas":  # every GEMM of that variant already is cuBLAS
            assert by_class["GEMMs over cuBLAS's fraction"] == pytest.approx(0.0, abs=1e-12)


def test_blockers_are_the_fewest_largest_that_cover_the_gap():
    hw = "H100 SXM"
    ops = rl.block_ops("vit_fast", *VIT_B, backward=True)
    t = rl.time_s(ops, hw)
    for target in (0.75 * t, 0.9 * t, 0.99 * t):
        found = rb.blockers(ops, hw, target)
        ex = [x for _, x in found]
        assert ex == sorted(ex, reverse=True)
        assert sum(ex) >= t - target > sum(ex[:-1])
        largest = max(rb.excess_s(o, hw) for o in ops)
        assert ex[0] == pytest.approx(largest)
    assert rb.blockers(ops, hw, 1.01 * t) == []


def test_hopper_gemm_has_no_modelled_efficiency_and_the_report_says_so():
    assert all("hopper_gemm" not in row for row in rl.EFFICIENCY.values())
    assert "not modelled: unmeasured" in rb.report(*VIT_B)


def test_roofline_command_prints_the_bound_and_the_blockers():
    from vit_fast.bench import cli
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.roofline_main([]) == 0
    text = out.getvalue()
    a = rb.analyze(*VIT_B)
    us = 1e6
    assert f"GEMMs alone at cuBLAS's fraction (0.75): {a['gemm_floor_s'] * us:.1f} µs" in text
    for v, r in a["variants"].items():
        line = (f"  {v}: {a['times'][v] * us:.1f} µs = {r['speedup']['eager']:.3f}x eager, "
                f"{r['speedup']['torch.compile']:.3f}x torch.compile")
        assert line in text
        for ref, want in rb.TARGETS.items():
            if r["speedup"][ref] < want:
                assert f"short of {want:.2f}x {ref}" in text
                assert r["blockers"][ref][0][0] in text
    assert "hopper_gemm" in text
    # issue 26's host term: host µs per Block on a GPU server against the block's GPU time
    host = next(line for line in text.splitlines() if line.startswith("Host term (model"))
    assert host.count("µs host vs") == 3 and "bound" in host
