"""vit_fast.bench.sass_report: the counts it reads off SASS text, on hand-written snippets in the
format triton.tools.disasm.get_sass prints (control code, tab, instruction)."""
import pytest

from vit_fast.bench import sass_report as sr

# A prologue, a two-instruction-MMA loop with Philox-like integer work, a peeled tail with one more
# MMA, and an epilogue. 4 warps over a 32 x 16 tile: 4 scores per thread.
SNIPPET = """Function:toy_kernel
--:-:1:-:1\tLDC R1, c[0x0][0x28];
--:-:-:-:1\tIMAD R2, R3, R4, RZ;
--:-:-:-:5\t@P2 BRA LBB0;
LBB1:
--:-:-:-:1\tLDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64];
--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ, !UPT;
--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R56, gdesc[UR8], R56, gsb0;
--:-:-:-:1\tIMAD.WIDE.U32 R8, R9, 0x3, RZ;
--:-:-:-:1\tLOP3.LUT R10, R8, R9, R11, 0x96, !PT;
--:-:-:-:1\tUIADD3 UR4, UR4, 0x40, URZ;
--:-:-:-:1\tFFMA R12, R12, R13, -R14;
--:-:-:-:1\tFMUL R15, R15, R16;
--:-:2:-:1\tMUFU.EX2 R17, R12;
--:-:2:-:1\tMUFU.RCP R18, R12;
--:-:-:-:6\t@P2 BRA LBB1;
LBB0:
--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ, !UPT;
--:-:-:-:1\tFADD R19, R19, R20;
--:-:-:-:5\tEXIT;
LBB2:
--:-:-:Y:0\tBRA LBB2;
"""


def test_hot_loop_is_the_backward_branch_body_with_the_mmas():
    body = sr.hot_loop(SNIPPET)
    # The self-loop at LBB2 (no MMA) loses to LBB1; the peeled tail's HGMMA is outside.
    assert sr.count(body, "HGMMA") == 2
    assert sr.mnemonic(body[0]).startswith("LDGSTS") and sr.opcode(body[-1]) == "BRA"
    assert len(sr.loops(SNIPPET)) == 2


def test_figures_per_iteration_and_per_score():
    f = sr.figures(SNIPPET, num_warps=4, tile_elems=32 * 16)
    assert f["mma_per_iter"] == 2 and f["mma_kind"] == "HGMMA"
    # per score = count / (512 scores / 128 threads) = count / 4
    assert f["int_per_score"] == pytest.approx(2 / 4)      # IMAD.WIDE, LOP3; UIADD3 is uniform
    assert f["fp_per_score"] == pytest.approx(2 / 4)       # FFMA, FMUL (FADD is after the loop)
    assert f["ex2_per_score"] == pytest.approx(1 / 4)      # MUFU.RCP is not EX2
    assert f["cp_async"] and not f["tma"] and f["spill_ops"] == 0


def test_no_loop_means_the_whole_function_and_no_per_score():
    sass = "Function:k\n--:-:-:-:1\tHMMA.16816.F32.BF16 R0, R4, R8, R0;\n--:-:-:-:1\tSTL [R1], R2;\n--:-:-:-:5\tEXIT;\n"
    f = sr.figures(sass, num_warps=4, tile_elems=None)
    assert f["mma_per_iter"] == 1 and f["mma_kind"] == "HMMA"
    assert f["int_per_score"] is None and f["spill_ops"] == 1


def test_an_out_of_line_block_branching_back_is_not_the_hot_loop():
    # TMA builds place their mbarrier wait loops after EXIT; each returns with an unconditional
    # BRA to a label before the key loop, a "backward branch" whose range spans the key loop
    # and the epilogue. The hot loop is the predicated one.
    sass = """LBB5:
--:-:-:-:1\tUTMALDG.4D [UR8], [UR4];
--:-:-:-:5\t@!P0 BRA LBB2;
LBB3:
--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ, !UPT;
--:-:-:-:1\tFFMA R12, R12, R13, -R14;
--:-:-:-:5\t@!P0 BRA LBB3;
--:-:-:-:1\tHGMMA.64x64x16.F32.BF16 R56, gdesc[UR12], RZ, !UPT;
--:-:-:-:1\tSTG.E.128 desc[UR10][R26.64], R44;
--:-:-:-:5\tEXIT;
LBB2:
--:-:-:-:1\tSYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3;
--:-:-:-:5\t@!P0 BRA LBB2;
--:-:-:-:5\tBRA LBB5;
"""
    body = sr.hot_loop(sass)
    assert sr.count(body, "HGMMA") == 1 and sr.count(body, "FFMA") == 1 and len(body) == 3
    assert len(sr.loops(sass)) == 3  # still listed, just never the hot loop


def test_predicated_and_tma_instructions_are_read():
    sass = "LBB3:\n--:-:-:-:1\t@!P1 UTMALDG.2D [UR8], [UR4];\n--:-:-:-:1\t@P0 ISETP.GE.U32.AND P1, PT, R2, R3, PT;\n--:-:-:-:1\t@P0 BRA LBB3;\n"
    f = sr.figures(sass, num_warps=1, tile_elems=32)
    assert f["tma"] and f["int_per_score"] == pytest.approx(1.0)


@pytest.mark.parametrize("regs,shared,warps,arch,expected", [
    (128, 65536, 4, 90, 3),    # regs: 65536 // 4096 = 16 warps -> 4 CTAs; shared: 233472 // 66560 = 3
    (234, 65536, 4, 90, 2),    # 234 regs -> 7680 per warp -> 8 warps -> 2 CTAs
    (138, 57856, 8, 90, 1),    # 138 -> 4608 per warp -> 14 warps -> 1 CTA of 8
    (32, 0, 1, 80, 32),        # the CTA limit
    (32, 0, 4, 80, 16),        # the warp limit: 64 // 4
])
def test_ctas_per_sm(regs, shared, warps, arch, expected):
    assert sr.ctas_per_sm(regs, shared, warps, arch) == expected


# --- the ViT-B attention figures these kernels are held to (bf16, head dim 64, sm_90) -------------
# Before (commit 70a7732), from `python -m vit_fast.bench compile-check --sass --arch 90
# --match "bfloat16,D=64,"`: (kernel, dropout, short N) -> (CTAs/SM, INT/score, FFMA+FMUL+FADD/score).
BEFORE = {
    ("fwd", False, False): (2, 1.08, 4.19), ("fwd", False, True): (4, 2.19, 4.19),
    ("fwd", True, False): (2, 43.06, 5.19), ("fwd", True, True): (3, 43.56, 5.19),
    ("dkdv", False, False): (1, 1.50, 3.50), ("dkdv", False, True): (3, 2.25, 3.50),
    ("dkdv", True, False): (1, 48.12, 5.50), ("dkdv", True, True): (2, 48.62, 5.50),
    ("dq", False, False): (3, 1.22, 3.00), ("dq", False, True): (5, 2.25, 3.00),
    ("dq", True, False): (1, 43.31, 5.00), ("dq", True, True): (3, 43.75, 5.00),
}


# The integer work the dropout builds are held to: a third of BEFORE's, all four Philox words used
# in 16-bit halves. Triton 3.6 (make compat's floor) builds the long dK/dV pass with more of it:
# 16.44 INT/score where triton 3.8 gives 13.62 (`python -m vit_fast.bench compile-check --sass
# --arch 90 --match "attention_dkdv[bfloat16,D=64,BM=32,BN=128,w=8,s=3,dropout]"`, 180 registers
# and 0 spills on both), 2.9 times below BEFORE's 48.12 rather than 3 times.
DROPOUT_INT_CUT = 3.0
DROPOUT_INT_CUT_BY_TRITON = {("dkdv", True, False): {(3, 6): 2.9}}


def dropout_int_cut(key, triton_version):
    """How many times less integer work per score than BEFORE ``key``'s build must do."""
    major_minor = tuple(int(v) for v in triton_version.split(".")[:2])
    return DROPOUT_INT_CUT_BY_TRITON.get(key, {}).get(major_minor, DROPOUT_INT_CUT)


def test_the_dropout_integer_cut_per_triton_version():
    assert dropout_int_cut(("dkdv", True, False), "3.6.0") == 2.9
    assert dropout_int_cut(("dkdv", True, False), "3.8.0") == 3.0
    assert dropout_int_cut(("dkdv", True, True), "3.6.0") == 3.0
    assert 16.44 * 2.9 <= BEFORE[("dkdv", True, False)][1] < 16.44 * 3  # the 3.6 figure


def _spec_name(key):
    """The AOT spec the launcher runs for ``key`` on a GPU (the CUDA config table)."""
    from vit_fast.kernels import attention
    kernel, dropout, short = key
    with pytest.MonkeyPatch.context() as mp:
        from vit_fast.kernels import _device
        mp.setattr(_device, "_INTERPRET", False)  # the CUDA table, not the interpreter's tiles
        bm, bn, warps, stages = attention._config(kernel, 32 if short else 197, 64, None, dropout)
    return (f"attention_{kernel}[bfloat16,D=64,BM={bm},BN={bn},w={warps},s={stages}"
            f"{',dropout' if dropout else ''}]")


@pytest.fixture(scope="module")
def vit_b_rows(aot_builds):
    # Only the builds BEFORE names (a name ends in "]": the match is exact), in the session's
    # compile workers (tests/aot_builds.py).
    names = {_spec_name(key) for key in BEFORE}
    with pytest.MonkeyPatch.context() as mp:  # and the backward builds ViT-B launches now
        names |= {_bwd_name(launch, dropout) for dropout in (False, True) for short in (False, True)
                  for launch in _bwd_launches(dropout, short, mp)}
    names |= {_tma_names()[d][i] for d in (64, 128) for i in (0, 1)}
    names = sorted(names)
    rows = aot_builds.call("vit_fast.bench.sass_report:report_rows", [((90,), n) for n in names])
    return {r["kernel"]: r for per_name in rows for r in per_name}


@pytest.mark.parametrize("key", sorted(BEFORE),
                         ids=lambda k: f"{k[0]}-{'dropout' if k[1] else 'plain'}-{'short' if k[2] else 'long'}")
def test_vit_b_attention_figures_against_before(vit_b_rows, key):
    kernel, dropout, short = key
    name = _spec_name(key)
    row = vit_b_rows[name]
    ctas, ints, fp = BEFORE[key]
    assert row["spill_bytes"] == 0 and row["mma_kind"] == "HGMMA", row
    assert row["ctas_per_sm"] >= ctas, row
    if dropout:
        import triton
        assert row["int_per_score"] * dropout_int_cut(key, triton.__version__) <= ints, row
    if kernel == "fwd":
        assert row["fp_per_score"] < fp, row               # scale folded into the max-subtract


# --- the ViT-B attention backward as launched: 5 products per tile pair, not 7 ------------------
# Tensor-core instructions per 128 x 128 block of scores, summed over the backward kernels the
# shape launches: a warpgroup issues each HGMMA once, so per score that is MMA/iter x
# (num_warps / 4) / (BLOCK_M x BLOCK_N). Before (commit 2ed5237, the dK/dV and dQ passes), from
# `python -m vit_fast.bench compile-check --sass --arch 90 --match "bfloat16,D=64,"`:
#   long:  dkdv BM=32,BN=128,w=8: 12 HGMMA -> 96; dq BM=128,BN=32,w=4: 20 -> 80 (dropout: w=8, 10 -> 80)
#   short: dkdv BM=32,BN=64,w=4: 12 -> 96;   dq BM=64,BN=32,w=4: 10 -> 80
# and the dropout integer work per score of the two passes, summed (table BEFORE above).
BWD_MMA_BEFORE = {(False, False): 176, (False, True): 176, (True, False): 176, (True, True): 176}


def _bwd_launches(dropout, short, monkeypatch):
    """[(kernel name prefix, BLOCK_M, BLOCK_N, warps, stages, dq target)] of ViT-B's backward."""
    from vit_fast.kernels import attention
    monkeypatch.setattr(attention, "_interpreting", lambda: False)  # the CUDA table
    n = 32 if short else 197
    plan = attention.bwd_plan(n, 64, None, dropout, arch=90)
    if plan[0] == "split":
        return [("attention_dkdv", *plan[1], None), ("attention_dq", *plan[2], None)]
    return [("attention_dkdv_dq", *plan[1], "bf16" if plan[2] == 1 else "fp32")]


def _bwd_name(launch, dropout):
    kernel, bm, bn, warps, stages, dq = launch
    return (f"{kernel}[bfloat16,D=64,BM={bm},BN={bn},w={warps},s={stages}"
            f"{',dropout' if dropout else ''}{'' if dq is None else ',dq=' + dq}]")


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
def test_vit_b_attention_backward_tensor_core_work_per_tile_pair(vit_b_rows, monkeypatch, dropout, short):
    launches = _bwd_launches(dropout, short, monkeypatch)
    assert [k for k, *_ in launches] == ["attention_dkdv_dq"]  # ViT-B takes the fused pass
    mma = ints = 0.0
    for launch in launches:
        _, bm, bn, warps, _, _ = launch
        row = vit_b_rows[_bwd_name(launch, dropout)]
        assert row["spill_bytes"] == 0 and row["mma_kind"] == "HGMMA", row
        # Occupancy: the long shape's pass keeps the 1 CTA/SM of the dK/dV pass it replaces;
        # the short one runs 64 x 64 tiles (2 CTAs/SM) where the dK/dV pass ran 32 x 64 (3).
        assert row["ctas_per_sm"] >= (2 if short else 1), row
        mma += row["mma_per_iter"] * (warps / 4) * 128 * 128 / (bm * bn)
        ints += row["int_per_score"]
    assert mma <= 0.75 * BWD_MMA_BEFORE[(dropout, short)], mma
    if dropout:
        before = BEFORE[("dkdv", True, short)][1] + BEFORE[("dq", True, short)][1]
        assert ints * 3 <= before, ints


# --- the sm_90 TMA forward (kernels/attention_fwd_tma.py), a measured-selection candidate --------
# Against the pointer kernel's build that the same call launches (the table's long-sequence entry),
# from `python -m vit_fast.bench.attention_fwd_study` (README: attention forward on sm_90):
#   D=64:  pointer 128x64 w4 s3: 224 regs, 64 KB, 2 CTAs/SM, INT 1.14/score, FP 3.25/score;
#          TMA, same tile:       190 regs, 48 KB, 2 CTAs/SM, INT 0.78,       FP 3.25.
#   D=128: pointer 128x64 w8 s3: 48 HGMMA per 128x128 scores, FP 4.25, INT 2.25, 1 CTA/SM;
#          TMA 128x128 w8 s2:    32 HGMMA,                     FP 3.12, INT 1.30, 1 CTA/SM.
# Those are triton 3.8's (3.6 also keeps the 0.75 bound below). Triton 3.9 gives the TMA builds
# INT 1.09 (D=64, pointer 1.16) and 1.73 (D=128, pointer 2.25) from the same TTGIR: its ptxas
# serializes the key loop's HGMMAs (C7513, "non wgmma instructions defining input registers": a
# wait after each of the 16 where 3.8 has one) because Q, loaded once by TMA and reshaped, is the
# Q·Kᵀ product's A operand in registers, and it copies Q's fragment into one register quad before
# each (IMAD.MOV: 25 per iteration where 4 at D=64, 30 where 3 at D=128). The pointer build
# reads Q from shared memory.
# So on 3.9 the bound is only "below the pointer build"; 0.75 of it holds before 3.9.

def _tma_names():
    """{head dim: (pointer build the table launches at N = 197, TMA build offered there)}."""
    from vit_fast.kernels import attention_config, attention_fwd_tma
    names = {}
    for d in (64, 128):
        bm, bn, w, s = attention_config.shipped_config(("fwd", d, False))
        tbm, tbn, tw, ts = attention_fwd_tma._TMA_CONFIGS[d]
        names[d] = (f"attention_fwd[bfloat16,D={d},BM={bm},BN={bn},w={w},s={s}]",
                    f"attention_fwd_tma[bfloat16,D={d},BM={tbm},BN={tbn},w={tw},s={ts}]")
    return names


def _per_128x128(row, name):
    c = dict(kv.split("=") for kv in name[name.index(",") + 1:-1].split(","))
    return row["mma_per_iter"] * int(c["w"]) / 4 * 128 * 128 / (int(c["BM"]) * int(c["BN"]))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tma_forward_figures_against_the_pointer_build(vit_b_rows, head_dim):
    ptr_name, tma_name = _tma_names()[head_dim]
    ptr, tma = vit_b_rows[ptr_name], vit_b_rows[tma_name]
    assert tma["spill_bytes"] == 0 and tma["tma"] and not tma["cp_async"], tma
    assert tma["mma_kind"] == "HGMMA" and tma["ctas_per_sm"] >= ptr["ctas_per_sm"], (tma, ptr)
    import triton
    assert tma["int_per_score"] < ptr["int_per_score"], (tma, ptr)  # no address math
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9):  # 3.9: see above
        assert tma["int_per_score"] <= 0.75 * ptr["int_per_score"], (tma, ptr)
    assert tma["fp_per_score"] <= ptr["fp_per_score"], (tma, ptr)
    if head_dim == 64:  # the same tile: fewer registers, less shared memory
        assert tma["registers"] < ptr["registers"] and tma["shared_bytes"] < ptr["shared_bytes"]
    else:  # 128 x 128 over 8 warps: a third fewer (wider) HGMMA per score
        assert _per_128x128(tma, tma_name) <= 2 / 3 * _per_128x128(ptr, ptr_name), (tma, ptr)
        assert tma["fp_per_score"] <= 0.75 * ptr["fp_per_score"], (tma, ptr)
