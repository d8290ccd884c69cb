"""vit_fast: fused Triton kernels and a C++/CUDA patch-embed extension for Vision Transformers.

`kernels/` ships as `vit_fast.kernels` (package_dir): a top-level `kernels` module would shadow the
PyPI package of that name, which transformers imports.

The extension vit_fast._C (csrc/) is built as a CUDAExtension for sm_80 and sm_90 when nvcc and a
CUDA build of torch are found, as a CppExtension otherwise. A failed extension build never fails the
install: the CUDA build falls back to the CPU-only one, and if that fails too the package installs
without _C and runs the reference path (vit_fast.ops.patch_embed says why). The compiler output,
including `ptxas -v`'s register/spill lines, is kept in build/vit_fast_C.log (csrc/check_ptxas.py
reads it).
"""
import glob
import os
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.command.develop import develop as _develop

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_LOG = os.path.join(ROOT, "build", "vit_fast_C.log")
BUILD_TEMP = os.path.join(ROOT, "build", "vit_fast_C")  # kept between installs: ninja rebuilds only what changed
CPP_SOURCES = ["csrc/patch_embed.cpp"]
CUDA_SOURCES = ["csrc/cuda/patch_embed.cu"]
CUDA_ARCHS = ("80", "90")

# pip --no-build-isolation with an un-activated venv leaves the venv's ninja off PATH, and torch
# then falls back to a slow serial build.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # read by torch.utils.cpp_extension at import
os.environ.setdefault("MAX_JOBS", "2")


def _nvidia_wheel_includes():
    """Include dirs of the `nvidia` pip wheels (cusparse.h etc. are there, not in a minimal CUDA_HOME)."""
    dirs = []
    for site in sys.path:
        for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
            if inc not in dirs and (glob.glob(os.path.join(inc, "cusparse*.h")) or glob.glob(os.path.join(inc, "cublas*.h"))):
                dirs.append(inc)
    return dirs


def _extension():
    """(ext_modules, cmdclass) for vit_fast._C, or ([], {}) when torch's build helpers are missing."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # building an sdist or metadata without torch
        warnings.warn(f"vit_fast: torch not importable ({exc}); installing without the C++ extension")
        return [], {}

    cxx = ["-O3", "-fopenmp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if with_cuda:
        nvcc = ["-O3", "-Xptxas", "-v", "--expt-relaxed-constexpr"]
        for arch in CUDA_ARCHS:  # explicit -gencode also stops torch from adding its own arch list
            nvcc += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        ext = cpp_extension.CUDAExtension(
            "vit_fast._C", CPP_SOURCES + CUDA_SOURCES, include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "vit_fast._C", CPP_SOURCES, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja), with its output kept in BUILD_LOG and failures non-fatal."""

        def build_extension(self, ext):
            # PEP 660 editable builds use a fresh temp dir; a fixed one makes reinstalls incremental.
            self.build_temp = BUILD_TEMP
            os.makedirs(os.path.dirname(BUILD_LOG), exist_ok=True)
            try:
                self._build_logged(ext)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                failure = exc
            if any(s.endswith(".cu") for s in ext.sources):
                warnings.warn(f"vit_fast: CUDA build of vit_fast._C failed ({failure}); retrying CPU-only. "
                              f"Log: {BUILD_LOG}")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                try:
                    self._build_logged(ext, append=True)  # keep the CUDA error in the log
                    return
                except Exception as exc:  # noqa: BLE001
                    failure = exc
            warnings.warn(f"vit_fast: building vit_fast._C failed ({failure}); installing without it, the "
                          f"reference path will be used. Log: {BUILD_LOG}")
            # Later steps (copy in place, editable wheel outputs) must not look for the missing library.
            self.extensions.remove(ext)

        def _build_logged(self, ext, append=False):
            # ninja prints each compile's output (ptxas -v included) to fd 1 of this process: route
            # fds 1 and 2 into a file for the build, echo it to the real stdout, then keep it as
            # BUILD_LOG -- unless ninja recompiled no CUDA source, in which case the previous log
            # still describes the CUDA objects that were linked and is kept.
            new_log = BUILD_LOG + ".new"
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(1), os.dup(2)
            ok = False
            with open(new_log, "w") as log:
                log.write(f"# vit_fast._C build; sources: {ext.sources}\n")
                log.flush()
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                try:
                    super().build_extension(ext)
                    ok = True
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    for fd, copy in zip((1, 2), saved):
                        os.dup2(copy, fd)
                        os.close(copy)
                    with open(new_log) as f:
                        text = f.read()
                    sys.stdout.write(text)
                    cuda = any(s.endswith(".cu") for s in ext.sources)
                    if ok and cuda and "ptxas info" not in text and os.path.exists(BUILD_LOG):
                        text = "# later build: no CUDA source recompiled, the ptxas lines above are current\n"
                        append = True
                    with open(BUILD_LOG, "a" if append else "w") as f:
                        f.write(text)
                    os.remove(new_log)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True), "develop": Develop}


class Develop(_develop):
    """`pip install --no-build-isolation -e .` with pip < 25 runs `setup.py develop`, which in
    setuptools >= 80 re-invokes pip *with* build isolation, where torch is missing and the extension
    would silently not be built: re-invoke it without isolation instead."""

    def run(self):
        cmd = [sys.executable, "-m", "pip", "install", "-e", ROOT, "--use-pep517", "--no-build-isolation", "--no-deps"]
        cmd += ["--target", self.install_dir] * bool(self.install_dir)
        cmd += ["--user"] * bool(self.user) + ["--prefix", self.prefix] * bool(self.prefix)
        subprocess.check_call(cmd)


ext_modules, cmdclass = _extension()

setup(
    name="vit_fast",
    version="0.1.0",
    description="Fused kernels for Vision Transformers in PyTorch, drop-in for timm",
    python_requires=">=3.10",
    packages=["vit_fast", "vit_fast.ops", "vit_fast.bench", "vit_fast.kernels"],
    package_dir={"vit_fast": "vit_fast", "vit_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "timm>=1.0"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
