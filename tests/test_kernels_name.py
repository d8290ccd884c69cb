"""The checkout's top-level kernels/ folder must not shadow an installed package named `kernels`.

transformers >= 5 imports the PyPI package `kernels` (Hugging Face hub kernels) when it is
installed. Anything run from the repository root (python -m ..., pytest, a notebook) has the root
on sys.path ahead of site-packages; while kernels/ was a regular package (an __init__.py) it won,
and transformers failed: "cannot import name 'CUDAProperties' from 'kernels' (.../kernels/
__init__.py)". kernels/ is a namespace folder now (no __init__.py), which a regular package
anywhere on the path beats; vit_fast.kernels still maps to it (the vit_fast/kernels link in the
checkout, package-dir in the wheel: tests/test_packaging.py).

Each check runs a fresh interpreter from the repository root with the installed package on
PYTHONPATH, which puts it behind the root, as site-packages is: a stand-in package always, the
real one from PyPI when pip can fetch it (the range transformers accepts).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_from_root(code, site, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    return subprocess.run([sys.executable, *(["-c", code] if code else []), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _stand_in(site: Path, version="0.18.3"):
    """An installed regular package `kernels` (with its dist-info, as pip leaves it)."""
    pkg = site / "kernels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"__version__ = {version!r}\nINSTALLED = True\n\n\nclass CUDAProperties:\n    pass\n")
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return site


def test_an_installed_kernels_package_wins_over_the_checkout(tmp_path):
    site = _stand_in(tmp_path / "site")
    code = (
        "import importlib.metadata, importlib.util, sys\n"
        "assert sys.path[0] in ('', '.'), sys.path[:2]  # the repository root comes first\n"
        f"assert importlib.util.find_spec('kernels').origin.startswith({str(site)!r})\n"
        "import kernels\n"
        "from kernels import CUDAProperties\n"
        f"assert kernels.__file__.startswith({str(site)!r}), kernels.__file__\n"
        "import vit_fast, vit_fast.kernels.attention, vit_fast.kernels.matmul\n"
        "assert vit_fast.kernels.attention.attention_fwd_kernel is not None\n"
        "print('ok')\n")
    proc = _run_from_root(code, site)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]


def test_without_an_installed_kernels_package_transformers_sees_none(tmp_path):
    """kernels/ alone is a namespace folder: transformers' availability check says no, as it
    does for any PEP 420 folder shadowing nothing."""
    code = ("from transformers.utils import is_kernels_available\n"
            "assert not is_kernels_available()\n"
            "import vit_fast.kernels.attention\n"
            "print('ok')\n")
    proc = _run_from_root(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]


@pytest.fixture(scope="module")
def hub_kernels(tmp_path_factory):
    """The real PyPI `kernels`, in the version range this transformers imports, in a --target
    folder (never into the environment the tests run in)."""
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    low = getattr(import_utils, "KERNELS_MIN_VERSION", None)
    high = getattr(import_utils, "KERNELS_MAX_VERSION", None)
    if low is None:
        pytest.skip("this transformers has no hub-kernels integration")
    spec = f"kernels>={low}" + (f",<{high}" if high else "")
    target = tmp_path_factory.mktemp("hub_kernels")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), spec], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_CONSTRAINT=os.devnull))
    if proc.returncode != 0:
        pytest.skip(f"pip could not fetch {spec} (no package index here?): {proc.stderr[-300:]}; "
                    "the stand-in test above covers the shadowing")
    return target


def test_transformers_with_hub_kernels_from_the_repository_root(hub_kernels):
    code = ("import transformers, vit_fast, kernels\n"
            f"assert kernels.__file__.startswith({str(hub_kernels)!r}), kernels.__file__\n"
            "from transformers import ViTConfig, ViTModel\n"
            "from transformers.utils import is_kernels_available\n"
            "assert is_kernels_available()\n"
            "model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=64, image_size=16, patch_size=8))\n"
            "model = vit_fast.convert(model)\n"
            "assert len(model.vit_fast_summary.swapped) == 1, model.vit_fast_summary\n"
            "print('ok')\n")
    proc = _run_from_root(code, hub_kernels)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]


def test_pytest_from_the_repository_root_with_hub_kernels(hub_kernels):
    proc = _run_from_root(None, hub_kernels, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_transformers.py::test_copy_and_pickle_keep_the_fused_layers")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
