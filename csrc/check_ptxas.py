"""Check the vit_fast._C CUDA build log (nvcc `-Xptxas -v`) for register spills.

Usage: python csrc/check_ptxas.py [build/vit_fast_C.log]

Prints one line per (kernel, arch): registers, spill stores/loads, stack frame. Exits 0 only when
the log has kernels compiled for every arch in REQUIRED_ARCHS and none of them spills; 1 otherwise
(2 when the log is missing). setup.py writes the log while building the extension.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

REQUIRED_ARCHS = ("sm_80", "sm_90")
DEFAULT_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "vit_fast_C.log")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse(text: str) -> list[dict]:
    """One dict per compiled kernel: name, arch, registers, stack, spill_stores, spill_loads.

    ptxas prints, per kernel: the entry line, then its stack/spill line, then its register line.
    """
    entries: list[dict] = []
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entries.append({"name": m.group(1), "arch": m.group(2), "registers": None, "stack": None,
                            "spill_stores": None, "spill_loads": None})
        elif entries and (m := _PROPS.search(line)) and entries[-1]["stack"] is None:
            entries[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif entries and (m := _REGS.search(line)) and entries[-1]["registers"] is None:
            entries[-1]["registers"] = int(m.group(1))
    return entries


def problems(entries: list[dict]) -> list[str]:
    """Everything that fails the bar; empty when the build is clean."""
    out = [f"no kernel compiled for {arch} in the log" for arch in REQUIRED_ARCHS
           if not any(e["arch"] == arch for e in entries)]
    for e in entries:
        if e["spill_stores"] is None:
            out.append(f"{e['arch']} {e['name']}: no spill information")
        elif e["spill_stores"] or e["spill_loads"]:
            out.append(f"{e['arch']} {e['name']}: {e['spill_stores']} B spill stores, {e['spill_loads']} B spill loads")
    return out


def _demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = res.stdout.splitlines()
    return lines if res.returncode == 0 and len(lines) == len(names) else names


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else DEFAULT_LOG
    if not os.path.exists(path):
        print(f"check_ptxas: {path} not found (build the CUDA extension: pip install --no-build-isolation -e .)")
        return 2
    with open(path, errors="replace") as f:
        entries = parse(f.read())
    names = _demangle([e["name"] for e in entries])
    print(f"{'arch':6} {'regs':>4} {'stack':>5} {'spill st/ld':>11}  kernel")
    for e, name in zip(entries, names):
        name = re.sub(r"\(anonymous namespace\)::|vit_fast::", "", name)
        print(f"{e['arch']:6} {e['registers'] or 0:4d} {e['stack'] or 0:5d} "
              f"{e['spill_stores'] or 0:5d}/{e['spill_loads'] or 0:<5d}  {name}")
    bad = problems(entries)
    for p in bad:
        print("FAIL:", p)
    if not bad:
        print(f"OK: {len(entries)} kernels, 0 spill bytes on {', '.join(REQUIRED_ARCHS)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
