"""Build of vit_fast's C++/CUDA extension vit_fast._C. Metadata, dependencies and the version
source (vit_fast.__version__) are in pyproject.toml.

vit_fast._C (csrc/) is built as a CUDAExtension when nvcc and a CUDA build of torch with the same
CUDA major version are found, as a CppExtension otherwise. GPU code: SASS for each architecture
of TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX") and PTX for those marked +PTX, so GPUs newer than
the list JIT-compile the PTX instead of failing with "no kernel image". What was built is
recorded in vit_fast/_C_build.json (vit_fast.support gates the extension by it).

A failed extension build does not fail the install -- the CUDA build falls back to the CPU-only
one, and if that fails too the package installs without _C and runs the reference path -- unless
VIT_FAST_REQUIRE_EXT=1 (CI sets it), which makes any of those fallbacks an error. The compiler
output, including `ptxas -v`'s register/spill lines, is kept in build/vit_fast_C.log
(csrc/check_ptxas.py reads it). Parallel jobs: MAX_JOBS as the builder sets it (torch's default:
all cores); ninja is used when it is on PATH.
"""
import glob
import json
import os
import re
import subprocess
import sys
import warnings

from setuptools import setup
from setuptools.command.develop import develop as _develop

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_LOG = os.path.join(ROOT, "build", "vit_fast_C.log")
BUILD_TEMP = os.path.join(ROOT, "build", "vit_fast_C")  # kept between installs: ninja rebuilds only what changed
BUILD_INFO = "_C_build.json"  # written next to the built library
CPP_SOURCES = ["csrc/patch_embed.cpp", "csrc/amp_casts.cpp", "csrc/empties.cpp",
               "csrc/step_program.cpp", "csrc/module.cpp"]
CUDA_SOURCES = ["csrc/cuda/patch_embed.cu"]
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# torch finds CUDA_HOME from `which nvcc` when unset; a /usr/local/bin/nvcc wrapper then gives
# /usr/local, where libcudart is not. Prefer the toolkit's own folder (read by cpp_extension at import).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _give_up(message):
    """A fallback is about to be taken: an error under VIT_FAST_REQUIRE_EXT=1, else a warning."""
    if os.environ.get("VIT_FAST_REQUIRE_EXT", "0") == "1":
        raise RuntimeError(f"{message} (VIT_FAST_REQUIRE_EXT=1: the extension is required)")
    warnings.warn(message)


def cuda_arch_flags(arch_list=None):
    """(nvcc -gencode flags, {"sass": [..], "ptx": [..]}) for TORCH_CUDA_ARCH_LIST syntax:
    "8.0;9.0+PTX", also space/comma separated; "9.0a" keeps the arch-specific suffix."""
    arch_list = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    flags, info = [], {"sass": [], "ptx": []}
    for entry in filter(None, re.split(r"[;,\s]+", arch_list.strip())):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not m:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} in {arch_list!r} "
                             "(expected entries like 8.0, 8.6, 9.0+PTX)")
        num = f"{m.group(1)}{m.group(2)}"
        arch = num + m.group(3)
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        info["sass"].append(int(num))
        if m.group(4):
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
            info["ptx"].append(int(num))
    return flags, info


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_can_build(nvcc_version, torch_cuda: str) -> bool:
    """Whether nvcc (major, minor) can build against a torch built with CUDA ``torch_cuda``: the
    same major (torch refuses others), and not an older minor, which fails where torch puts its
    CUDA wheel's newer headers first (torch 2.15, cu13.2, with nvcc 13.0: "CUDA compiler and CUDA
    toolkit headers are incompatible")."""
    wanted = tuple(int(v) for v in torch_cuda.split(".")[:2])
    return nvcc_version is not None and nvcc_version[0] == wanted[0] and nvcc_version >= wanted


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
        _give_up(f"vit_fast: torch not importable ({exc}); installing without the C++ extension")
        return [], {}

    cxx = ["-O3", "-fopenmp"]
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = torch.version.cuda is not None and cuda_home is not None and os.path.exists(
        os.path.join(cuda_home, "bin", "nvcc"))
    if with_cuda:
        # torch refuses to build across CUDA major versions, but only inside build_extensions,
        # past the fallback below: decide here instead.
        if not nvcc_can_build(_nvcc_version(cuda_home), torch.version.cuda):
            _give_up(f"vit_fast: nvcc at {cuda_home} is CUDA {_nvcc_version(cuda_home)} but torch "
                     f"was built with CUDA {torch.version.cuda} (nvcc of that major version and at "
                     "least that minor needed); building vit_fast._C CPU-only")
            with_cuda = False
    build_info = {"cuda": None, "sass": [], "ptx": [], "torch": torch.__version__}
    if with_cuda:
        gencode, archs = cuda_arch_flags()
        build_info.update(archs, cuda=torch.version.cuda)
        # explicit -gencode also stops torch from adding its own arch list
        nvcc = ["-O3", "-Xptxas", "-v", "--expt-relaxed-constexpr"] + gencode
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
                self._write_build_info(ext, build_info)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler/linker failure
                failure = exc
            if any(s.endswith(".cu") for s in ext.sources):
                _give_up(f"vit_fast: CUDA build of vit_fast._C failed ({failure}); retrying CPU-only. "
                         f"Log: {BUILD_LOG}")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                try:
                    self._build_logged(ext, append=True)  # keep the CUDA error in the log
                    self._write_build_info(ext, dict(build_info, cuda=None, sass=[], ptx=[]))
                    return
                except Exception as exc:  # noqa: BLE001
                    failure = exc
            _give_up(f"vit_fast: building vit_fast._C failed ({failure}); installing without it, the "
                     f"reference path will be used. Log: {BUILD_LOG}")
            # Later steps (copy in place, editable wheel outputs) must not look for the missing library.
            self.extensions.remove(ext)

        def _write_build_info(self, ext, info):
            """_C_build.json next to the library; with --inplace / editable installs (inplace is
            off while building, on afterwards) next to its copy in the source tree too."""
            targets = {os.path.dirname(self.get_ext_fullpath(ext.name))}
            if getattr(self, "editable_mode", False) or self._inplace_requested:
                targets.add(os.path.join(ROOT, "vit_fast"))
            for folder in targets:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(info, f, indent=1)

        def run(self):
            self._inplace_requested = bool(self.inplace)
            super().run()

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


if __name__ == "__main__":  # how pip's build backend and `python setup.py` run it; tests import it
    ext_modules, cmdclass = _extension()
    # Everything else (name, version, dependencies, packages) is in pyproject.toml.
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
