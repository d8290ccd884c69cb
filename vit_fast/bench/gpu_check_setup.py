"""gpu-check steps 1-3: the environment, the install of vit_fast and its extension on the machine's
own torch/timm, and the `cuda`-marked tests. Everything that can hang or take minutes (pip, the
extension build, pytest) runs as a subprocess with a timeout; its output goes to DIR/logs/."""
from __future__ import annotations

import collections
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PINNED_WHEEL_HINT = ("bring the pinned wheel: on a networked machine `pip download timm=={pin} --no-deps "
                     "-d wheels/` (also huggingface_hub, safetensors, pyyaml if the GPU machine lacks "
                     "them), carry wheels/ with the repository, then on the GPU machine `python3 -m pip "
                     "install --no-deps wheels/timm-{pin}-py3-none-any.whl`")


def version_of(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_tuple(v):
    return tuple(int(p) for p in re.findall(r"\d+", v.split("+")[0])[:3])


def run_logged(cmd, log_path, timeout_s, env=None, cwd=ROOT):
    """Runs ``cmd``, its stdout+stderr into ``log_path``; (returncode or None on timeout, seconds).

    On timeout it first sends SIGINT (pytest then still writes its junit report and summary),
    then kills after 10 s."""
    import time
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(map(str, cmd))}\n")
        log.flush()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def log_tail(path, lines=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- 1. environment ----------------------------------------------------------------------------

def _nvidia_smi():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,clocks.max.sm,power.limit,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = [f.strip() for f in out.splitlines()[0].split(",")] if out.strip() else []
    keys = ("driver", "max_sm_clock", "power_limit", "memory_total")
    return dict(zip(keys, fields))


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    exe = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc")
                                   if os.path.exists(os.path.join(cuda_home, "bin", "nvcc")) else None)
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1:]


def supported_timm():
    """(the declared minimum timm, requirements-dev.txt's pin), read from pyproject.toml (or
    setup.py) and requirements-dev.txt."""
    setup = "".join((ROOT / f).read_text() for f in ("pyproject.toml", "setup.py") if (ROOT / f).exists())
    reqs_path = ROOT / "requirements-dev.txt"
    reqs = reqs_path.read_text() if reqs_path.exists() else ""
    low = re.search(r"[\"']timm>=([\d.]+)", setup)
    pin = re.search(r"^timm==([\d.]+)", reqs, re.M)
    return (low.group(1) if low else None), (pin.group(1) if pin else None)


def timm_status(installed):
    """A sentence on the machine's timm against what vit_fast supports, with the way to fix it."""
    low, pin = supported_timm()
    hint = PINNED_WHEEL_HINT.format(pin=pin or "<pinned version>")
    if installed is None:
        return False, f"timm is not installed (vit_fast needs timm>={low}); {hint}"
    if low and _version_tuple(installed) < _version_tuple(low):
        return False, f"timm {installed} is older than vit_fast's declared minimum {low}; {hint}"
    note = "" if installed == pin else f" (the tests were written against the pinned {pin})"
    return True, f"timm {installed} is supported (>= {low}){note}"


def environment(dry_run):
    import platform

    import torch
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "executable": sys.executable, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "nvcc": _nvcc(), "dry_run": dry_run}
    for pkg in ("triton", "timm", "numpy", "matplotlib", "pytest"):
        env[pkg] = version_of(pkg)
    env["timm_ok"], env["timm_status"] = timm_status(env["timm"])
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    if torch.cuda.is_available() and not dry_run:
        p = torch.cuda.get_device_properties(0)
        env.update({"device": p.name, "sm_count": p.multi_processor_count,
                    "capability": f"{p.major}.{p.minor}", "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                    "device_count": torch.cuda.device_count(), **_nvidia_smi()})
    else:
        env.update({"device": f"CPU ({platform.processor() or platform.machine()}), dry run",
                    "sm_count": None, "capability": None})
    return env


# --- 2. install ------------------------------------------------------------------------------

IMPORT_PROBE = r"""
import json
out = {}
import vit_fast
out["vit_fast"] = vit_fast.__file__
try:
    import vit_fast.kernels.attention
    out["kernels"] = "ok"
except Exception as exc:
    out["kernels"] = f"{type(exc).__name__}: {exc}"
from vit_fast.ops import patch_embed as pe
out["extension"] = pe.extension_available()
out["extension_cuda"] = pe.extension_has_cuda()
out["extension_error"] = pe.extension_error()
if pe.extension_available():
    from vit_fast import _C
    out["extension_file"] = _C.__file__
print("PROBE" + json.dumps(out))
"""


def _probe(out_dir, name, env):
    rc, _ = run_logged([sys.executable, "-c", IMPORT_PROBE], out_dir / "logs" / f"{name}.log", 120, env)
    for line in (out_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    tail = log_tail(out_dir / "logs" / f"{name}.log", 5)
    return {"error": f"import of vit_fast failed (rc={rc}): {tail}"}


def _archs_in(so_path):
    """The sm_XX the built library carries machine code for (cuobjdump), or None if unknown."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    exe = shutil.which("cuobjdump") or os.path.join(cuda_home, "bin", "cuobjdump")
    if not so_path or not os.path.exists(exe):
        return None
    try:
        out = subprocess.run([exe, "--list-elf", so_path], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted(set(re.findall(r"sm_(\d+a?)", out)))


def install(out_dir, env_info, dry_run, timeout_s):
    """pip install --no-deps --no-build-isolation -e . (the extension built for this GPU), then an
    import probe in a fresh interpreter: vit_fast, vit_fast.kernels, vit_fast._C with CUDA."""
    import time
    t0 = time.monotonic()
    res = {"actions": [], "torch": env_info["torch"], "timm": env_info["timm"],
           "timm_status": env_info["timm_status"]}
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)]
    env = dict(os.environ)
    cap = env_info.get("capability")
    if cap:
        env["TORCH_CUDA_ARCH_LIST"] = cap  # setup.py's explicit -gencode list wins; checked below
        res["arch_wanted"] = "sm_" + cap.replace(".", "")
    env["MAX_JOBS"] = str(os.cpu_count() or 2)
    if "CUDA_HOME" not in env and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    res["command"] = " ".join(cmd)
    if dry_run:
        res["actions"].append(f"--dry-run: not run: `{res['command']}` (would build vit_fast._C with "
                              f"TORCH_CUDA_ARCH_LIST from the GPU's capability)")
    else:
        rc, sec = run_logged(cmd, out_dir / "logs" / "install.log", timeout_s - 30, env)
        res["pip_rc"], res["pip_s"] = rc, round(sec, 1)
        res["actions"].append(f"pip install: {'timed out' if rc is None else f'rc={rc}'} in {sec:.0f} s "
                              "(log: logs/install.log)")
        if rc is not None and rc != 0:
            # pip refused (externally managed Python, no setuptools backend...): build in place so
            # the checks can still run from the source tree.
            left = timeout_s - (time.monotonic() - t0) - 20
            rc2, sec2 = run_logged([sys.executable, "setup.py", "build_ext", "--inplace"],
                                   out_dir / "logs" / "build_ext.log", left, env)
            res["actions"].append(f"fallback `setup.py build_ext --inplace`: "
                                  f"{'timed out' if rc2 is None else f'rc={rc2}'} in {sec2:.0f} s "
                                  "(log: logs/build_ext.log)")
    probe = _probe(out_dir, "import_probe", env)
    if not dry_run and probe.get("kernels", "ok") != "ok" and not (ROOT / "vit_fast" / "kernels").exists():
        # A source tree without the editable finder (pip failed): link kernels/ where the package
        # expects it, as the development tree does.
        (ROOT / "vit_fast" / "kernels").symlink_to(Path("..") / "kernels")
        res["actions"].append("vit_fast.kernels was not importable: linked vit_fast/kernels -> ../kernels")
        probe = _probe(out_dir, "import_probe2", env)
    res["probe"] = probe
    res["archs_built"] = _archs_in(probe.get("extension_file"))
    res["archs_how"] = "cuobjdump --list-elf of the built library"
    if res["archs_built"] is None:  # no cuobjdump: the build record setup.py writes beside _C
        record = ROOT / "vit_fast" / "_C_build.json"
        info = json.loads(record.read_text()) if record.exists() else {}
        res["archs_built"] = [str(a) for a in info.get("sass", [])] or None
        res["archs_how"] = "vit_fast/_C_build.json (no cuobjdump to read the library)"
    wanted = res.get("arch_wanted", "").replace("sm_", "")
    if res["archs_built"] is not None and wanted:
        res["arch_ok"] = wanted in res["archs_built"]
    problems = []
    if "error" in probe:
        problems.append(probe["error"])
    else:
        if probe.get("kernels") != "ok":
            problems.append(f"vit_fast.kernels not importable: {probe['kernels']}")
        if not probe.get("extension"):
            problems.append(f"vit_fast._C not loaded: {probe.get('extension_error')}")
        elif not dry_run and not probe.get("extension_cuda"):
            problems.append("vit_fast._C has no CUDA kernels (built without nvcc?)")
        if res.get("arch_ok") is False:
            problems.append(f"vit_fast._C carries {res['archs_built']}, not {res['arch_wanted']} "
                            "(set TORCH_CUDA_ARCH_LIST to rebuild): its CUDA kernels cannot run on this GPU")
    if not env_info.get("timm_ok"):
        problems.append(env_info["timm_status"])
    res["problems"] = problems
    res["ok"] = not problems
    return res


# --- 3. the cuda tests -----------------------------------------------------------------------

QUICK_DESELECT = "not N257 and not N577 and not N1025 and not p14 and not 384px"
# Set for the cuda tests: each test's kernel step runs once to warm up, then again under
# torch.cuda.set_sync_debug_mode("error") (tests/cuda/sync_check.py, which names the same
# variable, the junit property of a checked test and the message of a sync).
SYNC_CHECK_ENV = "VIT_FAST_SYNC_CHECK"
SYNC_CHECK_PROPERTY = "sync_checked"
SYNC_MESSAGE = "host sync after warm-up"


def _xdist_workers(dry_run):
    """pytest-xdist processes for the GPU run (the lent machines have it and 16 cores), or 0."""
    import importlib.util
    if dry_run or importlib.util.find_spec("xdist") is None:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def run_tests(out_dir, dry_run, quick, timeout_s):
    junit = out_dir / "pytest-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "-rfE", "--durations=10", f"--junitxml={junit}"]
    if quick or dry_run:  # a dry run only shows that they skip, and why: a subset is enough
        cmd += ["-k", QUICK_DESELECT]
    workers = _xdist_workers(dry_run)
    if workers:  # most of the step is Triton compiling kernels: one CPU core per process
        cmd += ["-n", str(workers)]
    # The cuda tests check the compiled kernels; in a dry run there is no GPU: they skip, and the
    # interpreter flag keeps tests/conftest.py's default.
    env = dict(os.environ, TRITON_INTERPRET="1" if dry_run else "0", **{SYNC_CHECK_ENV: "1"})
    rc, sec = run_logged(cmd, out_dir / "logs" / "pytest.log", timeout_s, env)
    res = {"command": (f"{SYNC_CHECK_ENV}=1 TRITON_INTERPRET={env['TRITON_INTERPRET']} "
                       + " ".join(map(str, cmd[1:]))),
           "rc": rc, "seconds": round(sec, 1), "timed_out": rc is None, "quick_filter": quick,
           "xdist_workers": workers}
    res.update(parse_junit(junit))
    if rc is None:
        res["note"] = (f"stopped at the {timeout_s:.0f} s budget (SIGINT): the counts are the "
                       "tests run by then")
    res["tail"] = log_tail(out_dir / "logs" / "pytest.log", 25)
    return res


def parse_junit(path):
    """Counts per outcome and per file, failures with their first message line, skip reasons,
    and the host syncs: how many tests ran a kernel step under sync-debug mode (their junit
    property) and the failures that are a sync there."""
    if not Path(path).exists():
        return {"junit": None}
    root = ET.parse(path).getroot()
    per_file = collections.defaultdict(collections.Counter)
    failures, skips = [], collections.Counter()
    syncs = {"checked": 0, "syncs": []}
    for case in root.iter("testcase"):
        if case.get("name") is None:  # the empty entry an interrupted (SIGINT) run leaves
            continue
        file = case.get("classname", "?").split(".")[-1]
        test = f"{file}::{case.get('name')}"
        syncs["checked"] += any(p.get("name") == SYNC_CHECK_PROPERTY
                                for p in case.iter("property"))
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                failures.append({"test": test, "kind": outcome,
                                 "message": (msg[0] if msg else "")[:300]})
                if msg and SYNC_MESSAGE in msg[0]:
                    syncs["syncs"].append({"test": test, "message": msg[0][:300]})
            elif child.tag == "skipped":
                outcome = "skipped"
                skips[(child.get("message") or "").replace("\n", " ")[:200]] += 1
        per_file[file][outcome] += 1
    total = collections.Counter()
    for c in per_file.values():
        total.update(c)
    return {"junit": str(Path(path).name), "counts": dict(total),
            "per_file": {f: dict(c) for f, c in sorted(per_file.items())},
            "failures": failures, "skip_reasons": dict(skips), "host_syncs": syncs}
