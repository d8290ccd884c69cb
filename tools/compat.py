"""`make compat`: the tests and the AOT compile-check on side stacks, as one table.

For each stack: a venv under $VIT_FAST_COMPAT_DIR/<name> (default ~/.cache/vit_fast-compat, outside
the repo; kept between runs, pip's cache keeps the wheels), torch/torchvision/triton/numpy pinned
as below and the rest of requirements-dev.txt (timm, transformers, ... at the repo's pins) from the
package index pip is set up for, a copy of the tracked source tree with vit_fast._C built in place
against that torch (CUDA when this nvcc can build for torch's CUDA version, else CPU-only; the
table says which), then

    TRITON_INTERPRET=1 python -m pytest tests -q -p no:cacheprovider   and   python -m vit_fast.bench compile-check --summary

The tests are the whole suite, as `make test` runs it (tests/cuda skip without a GPU and are
counted as skipped); --pytest-args narrows it (`-k attention`), and the row then says "subset".

Stacks (COMPAT_STACKS picks some by name, comma separated; default: floor,newest):
- floor: torch 2.11 + triton 3.6, the oldest torch vit_fast declares (pyproject.toml: torch>=2.11)
  and the stack of this project's GPU machines. numpy < 2.4: triton 3.6's interpreter breaks on
  numpy >= 2.4 (its bug, fixed in later triton).
- newest: torch 2.15 + triton 3.9, the newest releases. No torchvision for torch 2.15 is out yet:
  torchvision 0.29.2 (built for 2.14) is installed without its torch pin; timm only needs its
  Python transforms.
- pinned: requirements-dev.txt's torch 2.14.1 + triton 3.8.0, what CI runs (`make test`).

Each stack pins its torch exactly, so a machine-wide pip constraints file (PIP_CONSTRAINT) is
lifted for these venvs. torch comes as the CUDA wheel from PyPI (about 2.5 GB with its CUDA
libraries on a first run); COMPAT_TORCH_INDEX=URL takes torch/torchvision from another index (a
CPU-only one is enough: the tests run under the interpreter and compile-check needs no GPU).

Usage: python tools/compat.py [--keep-going] [--pytest-args "..."] [--skip-compile-check];
exits 1 when a stack fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("VIT_FAST_COMPAT_DIR", Path.home() / ".cache" / "vit_fast-compat"))

STACKS = {
    "floor": {"torch": ["torch==2.11.0", "torchvision==0.26.0"], "triton": "triton==3.6.0",
              "extra": ["numpy<2.4"]},
    "newest": {"torch": ["torch==2.15.0"], "no_deps": ["torchvision==0.29.2"],
               "triton": "triton==3.9.0", "extra": []},
    "pinned": {"torch": ["torch==2.14.1", "torchvision==0.29.1"], "triton": "triton==3.8.0",
               "extra": []},
}
DEFAULT_STACKS = "floor,newest"
# requirements-dev.txt minus what each stack pins itself
OWN_PINS = re.compile(r"^(torch|torchvision|triton|numpy)\b")


def _run(cmd, log, cwd=None, env=None, check=True):
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if check and proc.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} ... exited "
                           f"{proc.returncode}; see {log}")
    return proc.returncode


def _tracked_tree(dst: Path):
    """The tracked files as they are in the working tree (uncommitted edits included); the
    previous copy's build/ is kept, so ninja recompiles only the extension sources that changed."""
    for old in dst.iterdir() if dst.exists() else ():
        if old.name != "build":
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src, target = ROOT / rel, dst / rel
        if src.is_symlink():  # vit_fast/kernels -> ../kernels stays a link
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.readlink(src))
        elif src.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _dev_requirements():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#") and not OWN_PINS.match(ln)]


def _versions(python):
    code = ("import importlib.metadata as m\n"
            "for p in ('torch', 'triton', 'numpy', 'timm', 'transformers'):\n"
            "    print(m.version(p))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else ["?"] * 5


def _extension_kind(src: Path):
    """'CUDA 13.0 (SASS sm_80,90; PTX 90)' or 'CPU-only', from the build record setup.py writes."""
    info_path = src / "vit_fast" / "_C_build.json"
    if not info_path.exists():
        return "none"
    info = json.loads(info_path.read_text())
    if not info.get("cuda"):
        return "CPU-only"
    return (f"CUDA {info['cuda']} (SASS sm_{','.join(map(str, info['sass']))}; "
            f"PTX {','.join(map(str, info['ptx'])) or '-'})")


def parse_pytest(text):
    """{'passed': n, 'failed': n, 'skipped': n, 'errors': n, ...} from pytest's last summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)\b", ln)]
    if not lines:
        return {}
    counts = {}
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", lines[-1]):
        counts["errors" if what.startswith("error") else what] = int(n)
    return counts


def parse_compile_check(text):
    """(builds ok, builds, max spill bytes, [families that spill]) from compile-check --summary."""
    builds = re.findall(r"(\d+)/(\d+) builds ok", text)
    header, spills = None, []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "max spill B" in cells:
            header = cells
        elif header and len(cells) == len(header) and cells[header.index("max spill B")].lstrip("-").isdigit():
            spill = int(cells[header.index("max spill B")])
            if spill:
                spills.append((f"{cells[0]}@{cells[1]}", spill))
    ok, total = map(int, builds[-1]) if builds else (0, 0)
    return ok, total, max([s for _, s in spills], default=0), [f for f, _ in spills]


def run_stack(name, spec, pytest_args=(), compile_check=True):
    env_dir = WORK / name
    env_dir.mkdir(parents=True, exist_ok=True)
    log = WORK / f"{name}.log"
    log.write_text("")
    python = env_dir / "venv" / "bin" / "python"
    row = {"stack": name}
    t0 = time.time()
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(env_dir / "venv")], log)
    pip_env = dict(os.environ, PIP_CONSTRAINT="/dev/null")
    pip = [str(python), "-m", "pip", "install", "-q"]
    index = os.environ.get("COMPAT_TORCH_INDEX")
    _run(pip + (["--extra-index-url", index] if index else []) + spec["torch"] + [spec["triton"]]
         + spec["extra"], log, env=pip_env)
    if spec.get("no_deps"):
        _run(pip + ["--no-deps"] + spec["no_deps"], log, env=pip_env)
    # the stack's own pins again, so nothing in requirements-dev.txt moves them
    _run(pip + _dev_requirements() + spec["torch"] + [spec["triton"]] + spec["extra"], log, env=pip_env)
    src = env_dir / "src"
    _tracked_tree(src)
    # The extension must build, CPU-only where this nvcc cannot build for that torch's CUDA
    # (setup.py says why in the log; the table says which was built).
    env = dict(os.environ, PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    env.pop("VIT_FAST_REQUIRE_EXT", None)
    _run([str(python), "setup.py", "-q", "build_ext", "--inplace"], log, cwd=src, env=env)
    if _extension_kind(src) == "none":
        raise RuntimeError(f"vit_fast._C was not built; see {log}")
    row["torch"], row["triton"], row["numpy"], row["timm"], row["transformers"] = _versions(str(python))
    row["_C"] = _extension_kind(src)
    row["setup s"] = round(time.time() - t0)

    t0 = time.time()
    start = len(log.read_text())
    # the whole suite as `make test` runs it: a stack passes on what CI checks, not a chosen part
    code = _run([str(python), "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", *pytest_args],
                log, cwd=src, env=dict(env, TRITON_INTERPRET="1"), check=False)
    row["suite"] = f"subset: {' '.join(pytest_args)}" if pytest_args else "whole"
    counts = parse_pytest(log.read_text()[start:])
    row["tests p/f/s"] = (f"{counts.get('passed', 0)}/{counts.get('failed', 0) + counts.get('errors', 0)}"
                          f"/{counts.get('skipped', 0)}" if counts else f"exit {code}")
    row["tests s"] = round(time.time() - t0)
    row["tests ok"] = code == 0

    if not compile_check:
        row["builds ok"], row["compile ok"] = "not run", True
        return row
    t0 = time.time()
    start = len(log.read_text())
    code = _run([str(python), "-m", "vit_fast.bench", "compile-check", "--summary", "--no-progress"],
                log, cwd=src, env=env, check=False)
    ok, total, spill, spilling = parse_compile_check(log.read_text()[start:])
    row["builds ok"] = f"{ok}/{total}" if total else f"exit {code}"
    row["max spill B"] = f"{spill}" + (f" ({', '.join(spilling)})" if spilling else "")
    row["compile s"] = round(time.time() - t0)
    row["compile ok"] = code == 0
    return row


COLUMNS = ["stack", "torch", "triton", "numpy", "timm", "transformers", "_C", "suite", "tests p/f/s",
           "tests s", "builds ok", "max spill B", "compile s", "setup s"]


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-going", action="store_true", help="run every stack even after a failure")
    parser.add_argument("--pytest-args", default="",
                        help="extra pytest arguments (one string); one that narrows the suite "
                             "marks the row 'subset'")
    parser.add_argument("--skip-compile-check", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in os.environ.get("COMPAT_STACKS", DEFAULT_STACKS).split(",") if n]
    unknown = set(names) - set(STACKS)
    if unknown:
        raise SystemExit(f"COMPAT_STACKS: unknown stack(s) {sorted(unknown)}; known: {sorted(STACKS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    rows, ok = [], True
    for name in names:
        try:
            row = run_stack(name, STACKS[name], shlex.split(args.pytest_args),
                            not args.skip_compile_check)
        except RuntimeError as exc:
            row = {"stack": name, "tests p/f/s": f"setup failed: {exc}"}
        good = row.get("tests ok") and row.get("compile ok")
        ok = ok and bool(good)
        rows.append(row)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        if not good and not args.keep_going:
            break
    print(table(rows))
    print(f"logs: {WORK}/<stack>.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
