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
