"""The figures that decide a kernel's speed, read from its compiled SASS (no GPU needed).

``python -m vit_fast.bench compile-check --sass [--match attention_fwd[bfloat16,D=64] --arch 90]``
prints, per shipped config and architecture:

- registers and CTAs per SM: occupancy from registers, shared memory and warps per CTA, with the
  allocation rules of the CUDA occupancy calculator (registers are handed out per warp in units
  of 256, each CTA reserves 1 KB of shared memory);
- tensor-core instructions (HGMMA on sm_90, HMMA) per tile iteration;
- per score (per element of the BLOCK_M x BLOCK_N tile one loop iteration produces): MUFU.EX2,
  integer-ALU and FFMA+FMUL+FADD instructions;
- whether loads go through TMA (UTMALDG) or cp.async (LDGSTS).

Method. Every figure per iteration is a count of instructions in the *hot loop's body*: the
address range between a label and a backward branch to it (``LBB1: ... @P2 BRA LBB1;``), taking
the loop with the most tensor-core instructions (the tile loop; prologue and epilogue code and a
peeled last iteration run once per program and are left out). Triton does not unroll these loops,
so one pass through the body is one tile iteration. A SASS instruction is issued once per warp, so
a CTA executes count x num_warps x 32 thread-instructions per iteration, and per score that is
count x num_warps x 32 / (BLOCK_M x BLOCK_N), i.e. count / (scores each thread owns). Uniform
(U-prefixed, one per warp on the scalar datapath) instructions are not counted as integer work.
"""
from __future__ import annotations

import re

# Integer-ALU opcodes (the mnemonic before the first '.'): the work the Philox rounds and index
# math cost. Conversions (I2F/F2I) and moves are not in it.
INT_OPS = frozenset({"IMAD", "IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP",
                     "IMNMX", "VIMNMX", "IMUL", "LEA", "SEL", "PRMT", "SGXT", "BMSK", "IABS",
                     "POPC", "FLO", "BREV", "IDP", "ISCADD", "BFE", "BFI"})
FP_OPS = ("FFMA", "FMUL", "FADD")
MMA_OPS = ("HGMMA", "HMMA")

# Per-SM limits (CUDA programming guide, compute capability tables).
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256          # registers per warp are allocated in these units
MAX_WARPS_PER_SM = {80: 64, 86: 48, 89: 48, 90: 64}
MAX_CTAS_PER_SM = {80: 32, 86: 16, 89: 24, 90: 32}
SHARED_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_CTA = 1024

_LABEL = re.compile(r"^\s*(\.?L\w+):\s*$")
_BRANCH_TARGET = re.compile(r"\bBRA\s+(?:\S+\s+)?(\.?L\w+)")


def instructions(sass: str, keep_predicate: bool = False):
    """[(kind, text)]: kind "label" with the label name, or "op" with the instruction (control code
    and, unless keep_predicate, predicate stripped; trailing ';' removed). Lines that are neither
    are dropped."""
    out = []
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            out.append(("label", m.group(1)))
            continue
        text = line.split("\t")[-1] if "\t" in line else line
        text = re.sub(r"/\*[0-9a-fA-F]+\*/", "", text).strip().rstrip(";").strip()
        if not text or text.endswith(":") or text.startswith(("Function", ".", "//")):
            continue
        if not re.match(r"^(@!?U?P\w*\s+)?[A-Z][A-Z0-9_]*(\.|\s|$)", text):
            continue
        out.append(("op", text if keep_predicate else re.sub(r"^@!?U?P\w*\s+", "", text)))
    return out


def mnemonic(op: str) -> str:
    """'MUFU.EX2 R3, R4' -> 'MUFU.EX2'."""
    return op.split()[0].rstrip(";") if op.split() else ""


def opcode(op: str) -> str:
    """'IMAD.WIDE.U32 R2, ...' -> 'IMAD'."""
    return mnemonic(op).split(".")[0]


def _loop_bodies(sass: str):
    """[(body, conditional)]: the instructions from a label to a later branch back to it, and
    whether that branch is predicated."""
    items = instructions(sass, keep_predicate=True)
    label_at = {name: i for i, (kind, name) in enumerate(items) if kind == "label"}
    bodies = []
    for i, (kind, text) in enumerate(items):
        if kind != "op" or opcode(re.sub(r"^@!?U?P\w*\s+", "", text)) != "BRA":
            continue
        m = _BRANCH_TARGET.search(text)
        if m and m.group(1) in label_at and label_at[m.group(1)] < i:
            body = [re.sub(r"^@!?U?P\w*\s+", "", t) for k, t in items[label_at[m.group(1)]:i + 1]
                    if k == "op"]
            bodies.append((body, text.startswith("@")))
    return bodies


def loops(sass: str):
    """Bodies of the loops closed by a backward branch: [[instruction text]] in program order."""
    return [body for body, _ in _loop_bodies(sass)]


def hot_loop(sass: str):
    """The loop body with the most tensor-core instructions (ties: the longest); the whole
    function when it has no loop. Only loops closed by a predicated branch count: an
    unconditional branch back is how an out-of-line block (the TMA builds' mbarrier wait loops,
    placed after EXIT) returns to the code it left, and the range from its target to it spans
    the key loop, the epilogue and more."""
    bodies = [body for body, conditional in _loop_bodies(sass) if conditional]
    if not bodies:
        return [t for k, t in instructions(sass) if k == "op"]
    return max(bodies, key=lambda b: (count(b, MMA_OPS), len(b)))


def count(ops, names) -> int:
    """Instructions whose opcode, or whose full mnemonic prefix ('MUFU.EX2'), is in names."""
    names = (names,) if isinstance(names, str) else tuple(names)
    n = 0
    for op in ops:
        mn = mnemonic(op)
        if any(mn.split(".")[0] == x or mn == x or mn.startswith(x + ".") for x in names):
            n += 1
    return n


def ctas_per_sm(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int:
    """CTAs that fit on one SM at once: the least of the register, shared-memory, warp and CTA
    limits."""
    per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps if per_warp else MAX_CTAS_PER_SM[arch]
    by_shared = SHARED_PER_SM[arch] // (shared_bytes + SHARED_RESERVED_PER_CTA)
    by_warps = MAX_WARPS_PER_SM[arch] // num_warps
    return max(0, min(by_regs, by_shared, by_warps, MAX_CTAS_PER_SM[arch]))


def figures(sass: str, *, num_warps: int, tile_elems: int | None):
    """Counts from the SASS: per tile iteration, and per score when tile_elems (BLOCK_M x
    BLOCK_N) is given."""
    body = hot_loop(sass)
    everything = [t for k, t in instructions(sass) if k == "op"]
    ints = sum(1 for op in body if opcode(op) in INT_OPS)
    fp = count(body, FP_OPS)
    ex2 = count(body, "MUFU.EX2")
    mma = count(body, MMA_OPS)
    per = (32 * num_warps / tile_elems) if tile_elems else None
    return {
        "loop_ops": len(body),
        "mma_per_iter": mma,
        "mma_kind": "HGMMA" if count(everything, "HGMMA") else ("HMMA" if count(everything, "HMMA") else "-"),
        "ex2_per_score": ex2 * per if per else None,
        "int_per_score": ints * per if per else None,
        "fp_per_score": fp * per if per else None,
        "tma": count(everything, "UTMALDG") > 0,
        "cp_async": count(everything, "LDGSTS") > 0,
        "spill_ops": count(everything, ("STL", "LDL")),
    }


def _sass_of(spec, arch: int) -> str:
    """The SASS of the build vit_fast.aot.compile_spec checked (same arguments, so triton's cache
    returns that build)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.disasm import get_sass

    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
    compiled = triton.compile(ASTSource(spec.kernel, dict(spec.signature), dict(spec.constants), attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    return get_sass(compiled.asm["cubin"])


def report_rows(archs=(90,), match=None, limit=None):
    """One row of figures per shipped spec (vit_fast.bench.compile_check.collect_specs) and arch."""
    from vit_fast.aot import compile_spec

    from .compile_check import collect_specs
    specs, _ = collect_specs(match=match)
    rows = []
    for _, spec in specs[:limit] if limit else specs:
        bm, bn = spec.constants.get("BLOCK_M"), spec.constants.get("BLOCK_N")
        for arch in filter(spec.for_arch, archs):
            res = compile_spec(spec, arch)
            row = figures(_sass_of(spec, arch), num_warps=spec.num_warps,
                          tile_elems=bm * bn if bm and bn else None)
            row.update(kernel=spec.name, arch=f"sm_{arch}", registers=res.registers,
                       spill_bytes=res.spill_bytes, shared_bytes=res.shared_bytes,
                       ctas_per_sm=ctas_per_sm(res.registers, res.shared_bytes, spec.num_warps, arch))
            rows.append(row)
    return rows


def main(archs, match=None, limit=None) -> int:
    from .tables import fmt_table

    def per(key):
        return lambda r: "-" if r[key] is None else f"{r[key]:.2f}"

    rows = report_rows(archs, match, limit)
    print(fmt_table(rows, [
        ("kernel", "kernel"), ("arch", "arch"), ("regs", "registers"), ("spill B", "spill_bytes"),
        ("shared B", "shared_bytes"), ("CTAs/SM", "ctas_per_sm"),
        ("MMA/iter", lambda r: f"{r['mma_per_iter']} {r['mma_kind']}"),
        ("EX2/score", per("ex2_per_score")), ("INT/score", per("int_per_score")),
        ("FFMA+FMUL+FADD/score", per("fp_per_score")),
        ("TMA", lambda r: "yes" if r["tma"] else "-"), ("cp.async", lambda r: "yes" if r["cp_async"] else "-")],
        title=f"SASS figures per config (hot loop body; per score = per BLOCK_M x BLOCK_N element): "
              f"{len(rows)} builds"))
    return 0 if rows and all(r["spill_bytes"] == 0 for r in rows) else 1
