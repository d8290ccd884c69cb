"""`make compat`: the tests and the AOT compile-check on side stacks, as a table.

For each stack: a venv under .compat/<name> (kept between runs), torch from PyTorch's CPU index
(the tests run the Triton kernels under the interpreter and the compile-check needs no GPU, so
the CUDA wheels, several GB each, are not needed), triton and the test requirements from PyPI, a
copy of the tracked source tree with vit_fast._C built in place against that torch, then

    TRITON_INTERPRET=1 python -m pytest tests -q      and      python -m vit_fast.bench compile-check --summary

Stacks (COMPAT_STACKS picks some by name, comma separated; default torch-2.11,pinned):
- torch-2.11: torch 2.11 + triton 3.6, the oldest torch vit_fast declares (pyproject.toml) and the
  stack of this project's GPU machines. numpy < 2.4: triton 3.6's interpreter breaks on 2.4.
- pinned: requirements-dev.txt's torch 2.14.1 + triton 3.8.0, what CI runs (the baseline row).

Usage: python tools/compat.py [--keep-going]; exits 1 when a stack fails.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".compat"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TEST_REQUIREMENTS = ["timm>=1.0", "pytest", "ninja", "setuptools", "wheel", "einops", "tqdm",
                     "vit-pytorch", "pytest-benchmark"]

STACKS = {
    "torch-2.11": {"torch": ["torch==2.11.*", "torchvision==0.26.*"], "index": CPU_INDEX,
                   "triton": "triton==3.6.*", "extra": ["numpy<2.4"]},
    "pinned": {"torch": ["torch==2.14.1", "torchvision==0.29.1"], "index": CPU_INDEX,
               "triton": "triton==3.8.0", "extra": ["numpy"]},
}
DEFAULT_STACKS = "torch-2.11,pinned"


def _run(cmd, log, cwd=None, env=None, check=True):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if check and proc.returncode:
        raise RuntimeError(f"{cmd[0]} ... exited {proc.returncode}; see {log}")
    return proc.returncode


def _tracked_tree(dst: Path):
    """The tracked files as they are in the working tree (uncommitted edits included)."""
    if dst.exists():
        shutil.rmtree(dst)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    (dst / "vit_fast" / "kernels").symlink_to("../kernels")


def _versions(python):
    out = subprocess.run([python, "-c", "import torch, triton, numpy; print(torch.__version__, "
                          "triton.__version__, numpy.__version__)"], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else ["?", "?", "?"]


def run_stack(name, spec, pytest_args=(), compile_check=True):
    env_dir = WORK / name
    log = WORK / f"{name}.log"
    log.write_text("")
    python = env_dir / "venv" / "bin" / "python"
    row = {"stack": name}
    t0 = time.time()
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(env_dir / "venv")], log)
    pip = [str(python), "-m", "pip", "install", "-q"]
    index = ["--index-url", spec["index"]] if spec["index"] else []
    _run(pip + index + spec["torch"], log)
    _run(pip + [spec["triton"]] + spec["extra"] + TEST_REQUIREMENTS, log)
    src = env_dir / "src"
    _tracked_tree(src)
    env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}",
               VIT_FAST_REQUIRE_EXT="1")
    env.pop("PYTHONPATH", None)
    _run([str(python), "setup.py", "-q", "build_ext", "--inplace"], log, cwd=src, env=env)
    row["torch"], row["triton"], row["numpy"] = _versions(str(python))
    row["setup s"] = round(time.time() - t0)

    t0 = time.time()
    code = _run([str(python), "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *pytest_args],
                log, cwd=src, env=dict(env, TRITON_INTERPRET="1"), check=False)
    summary = [line for line in log.read_text().splitlines()
               if re.search(r"\d+ (passed|failed|errors?)\b", line)]
    row["tests"] = (summary[-1].strip("= ") if summary else f"exit {code}")
    row["tests s"] = round(time.time() - t0)
    row["tests ok"] = code == 0

    if not compile_check:
        row["compile-check"], row["compile ok"] = "not run", True
        return row
    t0 = time.time()
    code = _run([str(python), "-m", "vit_fast.bench", "compile-check", "--summary"], log, cwd=src,
                env=env, check=False)
    builds = re.findall(r"(\d+)/(\d+) builds ok", log.read_text())
    row["compile-check"] = f"{builds[-1][0]}/{builds[-1][1]} ok" if builds else f"exit {code}"
    row["compile s"] = round(time.time() - t0)
    row["compile ok"] = code == 0
    return row


def table(rows):
    cols = ["stack", "torch", "triton", "numpy", "tests", "tests s", "compile-check", "compile s",
            "setup s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-going", action="store_true", help="run every stack even after a failure")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments (one string)")
    parser.add_argument("--skip-compile-check", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in os.environ.get("COMPAT_STACKS", DEFAULT_STACKS).split(",") if n]
    unknown = set(names) - set(STACKS)
    if unknown:
        raise SystemExit(f"COMPAT_STACKS: unknown stack(s) {sorted(unknown)}; known: {sorted(STACKS)}")
    WORK.mkdir(exist_ok=True)
    rows, ok = [], True
    for name in names:
        try:
            row = run_stack(name, STACKS[name], args.pytest_args.split(), not args.skip_compile_check)
        except RuntimeError as exc:
            row = {"stack": name, "tests": f"setup failed: {exc}"}
        good = row.get("tests ok") and row.get("compile ok")
        ok = ok and bool(good)
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not good and not args.keep_going:
            break
    print(table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
