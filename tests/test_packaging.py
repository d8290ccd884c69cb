"""Packaging: arch flags (SASS + PTX, TORCH_CUDA_ARCH_LIST), one version source, an sdist with
every source the extension needs, VIT_FAST_REQUIRE_EXT, and PTX in the built library."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("vit_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself runs only as __main__
    return mod


def test_default_arch_flags_embed_sass_and_ptx(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags, info = _setup_module().cuda_arch_flags()
    assert info == {"sass": [80, 90], "ptx": [90]}
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90",
                     "arch=compute_90,code=compute_90"]


def test_torch_cuda_arch_list_is_honoured(monkeypatch):
    mod = _setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5 8.6;12.0+PTX")
    flags, info = mod.cuda_arch_flags()
    assert info == {"sass": [75, 86, 120], "ptx": [120]}
    assert "arch=compute_120,code=compute_120" in flags
    _, info = mod.cuda_arch_flags("9.0a")
    assert info["sass"] == [90]
    assert "arch=compute_90a,code=sm_90a" in mod.cuda_arch_flags("9.0a")[0]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        mod.cuda_arch_flags("Ampere")


def test_nvcc_must_not_be_older_than_torchs_cuda():
    """make compat, torch 2.15 (cu13.2) with nvcc 13.0: the CUDA build failed on the headers."""
    can = _setup_module().nvcc_can_build
    assert can((13, 0), "13.0") and can((13, 2), "13.0")
    assert not can((13, 0), "13.2") and not can((12, 8), "13.0") and not can(None, "13.0")


def test_one_version_source():
    import vit_fast
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"] and "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vit_fast.__version__"}
    assert not re.search(r"[(,]\s*version\s*=", (ROOT / "setup.py").read_text())  # no setup(version=)
    assert re.fullmatch(r"\d+\.\d+\.\d+", vit_fast.__version__)
    extras = project["project"]["optional-dependencies"]
    assert "matplotlib" in extras["bench"] and any("vit-pytorch" in d for d in extras["vit-pytorch"])


def test_require_ext_turns_fallbacks_into_errors(monkeypatch):
    mod = _setup_module()
    monkeypatch.delenv("VIT_FAST_REQUIRE_EXT", raising=False)
    with pytest.warns(UserWarning, match="falls back"):
        mod._give_up("vit_fast: falls back")
    monkeypatch.setenv("VIT_FAST_REQUIRE_EXT", "1")
    with pytest.raises(RuntimeError, match="VIT_FAST_REQUIRE_EXT"):
        mod._give_up("vit_fast: falls back")


def _copy_tree(dst):
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_C_build.json", "kernels")
    for name in ("csrc", "vit_fast", "kernels"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore, symlinks=True)


def test_failed_extension_build_fails_when_required(tmp_path):
    """A CPU build whose source does not compile, with VIT_FAST_REQUIRE_EXT=1: setup.py fails
    (without it, _give_up only warns: test_require_ext_turns_fallbacks_into_errors)."""
    _copy_tree(tmp_path)
    src = tmp_path / "csrc" / "patch_embed.cpp"
    # a missing header is fatal at once (an #error would still parse torch's headers)
    src.write_text('#include "injected_build_failure.h"\n' + src.read_text())
    env = dict(os.environ, CUDA_HOME=str(tmp_path / "no-cuda"), VIT_FAST_REQUIRE_EXT="1")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert "injected_build_failure.h" in (tmp_path / "build" / "vit_fast_C.log").read_text()
    assert proc.returncode != 0 and "VIT_FAST_REQUIRE_EXT=1: the extension is required" in log, log[-2000:]
    assert not list((tmp_path / "vit_fast").glob("_C*.so"))


def test_sdist_has_every_extension_source(tmp_path):
    """`python -m build --sdist` carries the headers the sources include, the kernels and the
    build files; nothing built."""
    # cwd elsewhere: the repository's build/ folder would pass for the `build` package
    has_build = subprocess.run([sys.executable, "-c", "import build.__main__"], cwd=tmp_path,
                               capture_output=True).returncode == 0
    if not has_build:
        pytest.skip("the `build` package (pip install build) makes the sdist")
    # From a clean copy: a stale *.egg-info/SOURCES.txt in the checkout would add files to the
    # sdist that MANIFEST.in does not.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", ".compat", ".venv", ".git", "*.so", "__pycache__"))
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                           str(out), str(src)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (tarball,) = out.glob("vit_fast-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu", ".h")]
    for source in sources:
        rel = source.relative_to(ROOT).as_posix()
        assert rel in names, rel
        for inc in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
            included = os.path.normpath(Path(rel).parent / inc)
            assert included in names or f"csrc/{inc}" in names, (rel, inc)
    assert {"pyproject.toml", "setup.py", "kernels/attention.py", "kernels/_device.py",
            "vit_fast/__init__.py"} <= names
    assert "kernels/__init__.py" not in names
    assert not any(n.endswith((".so", "_C_build.json")) for n in names)


def test_the_wheel_ships_kernels_as_vit_fast_kernels(tmp_path):
    """What a wheel gets from package-dir (setup.py build_py, no compiler): every kernels/*.py
    under vit_fast/kernels/ as files, no top-level `kernels` (the PyPI package's name,
    tests/test_kernels_name.py), and vit_fast.kernels imports from there."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_C_build.json")
    for name in ("csrc", "vit_fast", "kernels"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
                          cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    shipped = lib / "vit_fast" / "kernels"
    assert shipped.is_dir() and not shipped.is_symlink()
    assert {p.name for p in shipped.glob("*.py")} == {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert not (lib / "kernels").exists()
    code = "import vit_fast.kernels.attention as a, vit_fast.kernels.matmul; print(a.__file__)"
    env = dict(os.environ, PYTHONPATH=str(lib))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(shipped / "attention.py")


def test_the_checkout_maps_vit_fast_kernels_by_a_link():
    """kernels/ has no __init__.py (it must not shadow PyPI's `kernels`); setuptools' editable
    finder maps no package without one, so the checkout links vit_fast/kernels -> ../kernels."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "vit_fast" / "kernels"
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "kernels")
    import vit_fast.kernels.attention as a
    assert Path(a.__file__).resolve() == (ROOT / "kernels" / "attention.py").resolve()


def _built_library():
    libs = sorted((ROOT / "vit_fast").glob("_C*.so"))
    info_path = ROOT / "vit_fast" / "_C_build.json"
    if not libs or not info_path.exists():
        pytest.skip("no vit_fast._C with a build record here (build it with setup.py build_ext)")
    info = json.loads(info_path.read_text())
    if not info.get("cuda"):
        pytest.skip("vit_fast._C here was built without CUDA: no GPU code to inspect")
    return libs[0], info


def _cuobjdump():
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                       "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c):
            return c
    pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled copy)")


def test_built_extension_embeds_ptx_and_the_recorded_sass():
    lib, info = _built_library()
    tool = _cuobjdump()
    ptx = subprocess.run([tool, "-lptx", str(lib)], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([tool, "-lelf", str(lib)], capture_output=True, text=True, check=True).stdout
    assert info["ptx"], "the default build embeds PTX"
    for arch in info["ptx"]:
        assert re.search(rf"sm_{arch}\b", ptx), ptx
    for arch in info["sass"]:
        assert re.search(rf"sm_{arch}\b", elf), elf
