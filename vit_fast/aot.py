"""Ahead-of-time compilation of Triton kernels for sm_80/sm_90, on a machine with no GPU.

A module ``vit_fast.kernels.<op>_aot`` lists what its launchers ship as ``aot_specs() ->
list[AotSpec]``, generated from the launchers' own config functions;
``compile_spec`` builds one for one architecture and reads registers, spills, shared memory and
tensor-core use off the cubin. Tests and ``python -m vit_fast.bench compile-check`` use this.
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

# Dynamic shared memory a block may use, in bytes (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
# A PTX tensor-core instruction: mma.sync (HMMA in the SASS), wgmma.mma_async (HGMMA), wmma.
_MMA_PTX = re.compile(r"\b(?:mma|wmma|wgmma)\.")


@dataclasses.dataclass
class AotSpec:
    """One kernel × config to compile: what the JIT would see at a real launch.

    signature: argument name -> "*fp16" / "*bf16" / "*fp32" / "i32" / "fp32" / "constexpr".
    constants: values of the constexpr arguments.
    divisible: names of the pointer/integer arguments that are multiples of 16 at launch (the JIT
      marks them with tt.divisibility; without it the build is not the one that runs).
    """
    name: str
    kernel: object
    signature: dict
    constants: dict
    divisible: tuple = ()
    num_warps: int = 4
    # None: triton's default, what a launch that passes no num_stages compiles with
    num_stages: int | None = None
    uses_dot: bool = False
    # The architectures a launcher can pick this build on (None: every one compiled for).
    archs: tuple | None = None

    def for_arch(self, arch: int) -> bool:
        return self.archs is None or arch in self.archs


@dataclasses.dataclass
class AotResult:
    name: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    tensor_core_ops: str  # "HGMMA" (wgmma, sm_90), "HMMA" (mma.sync) or "" in the SASS
    uses_dot: bool

    @property
    def ok(self) -> bool:
        return (self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]
                and (bool(self.tensor_core_ops) or not self.uses_dot))


def nvidia_backend_missing_reason():
    """None when triton can compile for NVIDIA here, else why not (for pytest.skip)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton's NVIDIA backend is not importable: {exc}"
    if not _cuobjdump().exists():
        return "triton's bundled cuobjdump is missing, so resource usage cannot be read"
    return None


def _cuobjdump() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.tools.disasm import get_sass

    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
    src = ASTSource(spec.kernel, dict(spec.signature), dict(spec.constants), attrs)
    options = {"num_warps": spec.num_warps}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    # LOCAL is per-thread local memory: with STACK:0 it is spill space.
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    # The SASS answers two questions: which tensor-core instructions (none where the PTX has no
    # mma/wgmma) and whether anything is stored to local memory (nothing can be where the build
    # has none: LOCAL and STACK 0). Disassembling takes longer than a cached compile, so a build
    # where neither can be in it (most non-GEMM, non-attention builds) skips it: same figures.
    needs_sass = local or stack or _MMA_PTX.search(compiled.asm["ptx"])
    sass = get_sass(cubin) if needs_sass else ""
    spills = local + (1 if re.search(r"\bSTL\b", sass) else 0)
    tc = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "")
    return AotResult(spec.name, arch, regs, spills, compiled.metadata.shared, tc, spec.uses_dot)


def _compile_job(job):
    module, index, arch = job
    import importlib
    spec = importlib.import_module(f"vit_fast.kernels.{module}").aot_specs()[index]
    try:
        return (spec.name, arch), compile_spec(spec, arch)
    except Exception as exc:  # one failed build is a result to report, not a crash
        return (spec.name, arch), f"{type(exc).__name__}: {exc}"[:2000]


def compile_module(module: str, archs=(80, 90), workers: int = 2, names=None) -> dict:
    """{(spec name, arch): AotResult, or the error text} for every ``aot_specs()`` entry of
    ``vit_fast.kernels.<module>`` (only those in ``names`` when given), built in fresh worker
    processes.

    Workers, not this process: with TRITON_INTERPRET=1 set before triton was imported (as the
    tests do), triton.language's own jit helpers are interpreter objects for the life of the
    process and triton.compile cannot use them. The builds are independent and single-threaded.
    """
    import concurrent.futures
    import importlib
    import multiprocessing
    import os

    specs = importlib.import_module(f"vit_fast.kernels.{module}").aot_specs()
    jobs = [(module, i, arch) for i, spec in enumerate(specs) for arch in archs
            if (names is None or spec.name in names) and spec.for_arch(arch)]
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # what the spawned workers inherit
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            return dict(pool.map(_compile_job, jobs))
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
