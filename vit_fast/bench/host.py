"""``python -m vit_fast.bench host``: the CPU cost of one Block on the path a GPU takes.

On a GPU a ViT-B Block runs in about 1.2 ms at batch 64 (H100), and the host must issue its
launches faster than that or the GPU waits. This measures what the host pays per Block, on any
machine, with or without a GPU:

- CPU tensors stand in for the GPU's (kernels/_device.simulate_gpu): every decision the launchers,
  the tuner and dispatch make is the one they make for ``--target`` (sm_80: 108 SMs, sm_90: 132);
- every Triton launch is replaced by a counting no-op at ``kernel[grid]``, so what is measured is
  vit_fast's own Python and the aten ops around the kernels (cuBLAS GEMMs, allocations,
  autograd); Triton's Python from the subscript to the driver call is measured apart, per launch;
- widths are scaled down (head_dim 1, a few tokens) so that both sides pay mostly what a GPU host
  pays: dispatch, allocation and autograd per op. The op sequence and every decision depend on
  the configuration (heads, qkv bias, LayerScale, precision), not on the widths. The CPU still
  computes what a GPU would run as kernels -- its bf16 GEMMs are scalar dot loops and its flash
  attention sets up per-call buffers, over a third of eager's instructions under AMP -- so the
  callgrind count also reports each side without those functions (:data:`CPU_COMPUTE`), and
  the thread times include them. Measured against timm's eager Block in the same process, interleaved round by
  round, in thread CPU time (the autograd engine runs CPU graphs on the calling thread);
- optionally the instructions executed per step under callgrind (deterministic: a change can be
  gated on it where wall time is noisy), and Triton's own Python launch cost per launch
  (``kernel[grid](...)``: the subscript's proxy, ``JITFunction.run`` up to the driver call,
  which this path skips by replacing the launch);
- ``--depth K``: a stack of K Blocks per call, as a model runs them. One Block alone cannot show
  what the Blocks' per-call state does to each other (a warm-up hook of one Block once moved a
  counter in every other Block's plan key, and a stack never reached its one-node steps).
- ``--layers transformers``: the same for Hugging Face transformers' ViTLayer (Dinov2Layer for a
  LayerScale shape) against its copy converted by ``vit_fast.convert``; ``--layers vit-pytorch``
  for vit-pytorch's Transformer (its final LayerNorm included).

All figures are "CPU" figures of this machine's host; the GPU kit (``gpu-check``) measures the
host time per training step on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

TARGETS = {"sm_80": (108, 80), "sm_90": (132, 90)}
MODES = ("forward", "fwd+bwd", "inference")
# Calls before measuring: the first runs the general path, the step is made after it, and the
# step's bodies are recorded on its third call (vit_fast/step_program.py): all past.
WARMUP_CALLS = 6
PRECISIONS = ("fp32", "bf16", "amp")


@dataclass(frozen=True)
class Shape:
    """A Block configuration at host-benchmark widths. head_dim 1: at head_dim 8 the CPU's fp32
    GEMMs (MKL sgemm) were over a third of the instructions counted -- compute, which a GPU host
    does not pay; at 1 an fp32 GEMM costs little more than its dispatch (bf16 GEMMs still
    compute in scalar loops: see CPU_COMPUTE). The heads, the MLP ratio, the biases and
    LayerScale are the model's: they decide the launches and the launch configs."""
    name: str
    heads: int
    head_dim: int = 1
    qkv_bias: bool = True
    init_values: float = None  # LayerScale (DeiT-3, DINOv2) when set
    batch: int = 2
    tokens: int = 8

    @property
    def dim(self):
        return self.heads * self.head_dim


SHAPES = {
    "vit_s": Shape("vit_s", heads=6),   # ViT-S/16's block: 6 heads, qkv bias, MLP ratio 4
    "vit_b": Shape("vit_b", heads=12),  # ViT-B/16's block: 12 heads
    "deit3_b": Shape("deit3_b", heads=12, init_values=1e-5),  # ViT-B + LayerScale
}


class _Compiled:
    """A compiled kernel as Triton's cache would hold it for the direct launch
    (kernels/direct_launch.py): its launcher counts and does nothing."""
    function, packed_metadata = 0, None

    def __init__(self, count):
        def launcher(*args):
            count[0] += 1
            count[1] += 1
        self.launcher = self._run = launcher

    @property
    def run(self):
        return self._run


@contextlib.contextmanager
def counting_launches():
    """Every Triton kernel launch (compiled or interpreted) becomes a no-op that counts itself.
    Yields the counter: [launches, of them made directly (kernels/direct_launch.py)].

    ``kernel[grid]`` returns the counter itself: Triton's own launch path starts at that
    subscript (the proxy it returns, its keyword packing, ``run``), and all of it is what
    :func:`triton_launch_us` measures per launch -- counted once, there, not also in the
    vit_fast column. What the caller does to build the launch's arguments stays in the column,
    and so does all of a direct launch but the compiled kernel's launcher (which the model charges
    per kernel): its ``warmup`` finds a stand-in compiled kernel whose launcher counts, and the
    one launch a direct launch records is passed to it as Triton passes it (every parameter in
    order), with a stand-in device and stream."""
    from triton.runtime import interpreter, jit

    from vit_fast.kernels import direct_launch
    count = [0, 0]
    compiled = {}

    def launched(*args, **kwargs):
        count[0] += 1

    def recorded(kernel, grid):
        def launch(*args, **kwargs):  # Triton's call into the launcher, for the recording
            values = list(args) + [kwargs[p.name] if p.name in kwargs else p.default
                                   for p in kernel.params[len(args):]]
            grid3 = tuple(grid) + (1,) * (3 - len(grid))
            compiled[kernel].run(*grid3, 0, 0, None, None, None, None, *values)
        return launch

    def subscript(self, grid):
        stand_in = compiled.get(self)
        if stand_in is not None and stand_in._run is not stand_in.launcher:
            return recorded(self, grid)
        return launched

    def launch(self, *args, warmup=False, **kwargs):  # a direct ``run`` (no subscript)
        if warmup:
            return compiled.setdefault(self, _Compiled(count))
        count[0] += 1
    patched = [(jit.KernelInterface, "__getitem__", subscript), (jit.JITFunction, "run", launch),
               (interpreter.InterpretedFunction, "run", launch)]
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in patched if name in cls.__dict__]
    for cls, name, fn in patched:
        if name in cls.__dict__:
            setattr(cls, name, fn)
    saved_driver = direct_launch._driver
    direct_launch._driver = lambda: ((lambda: 0), (lambda device: 0))
    # The general launchers' kept direct launches outlive a call: none made outside may launch
    # in here, and none made in here (on the stand-in launcher) may count into a later counter.
    direct_launch.forget_kept()
    try:
        yield count
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
        direct_launch._driver = saved_driver
        direct_launch.forget_kept()


@contextlib.contextmanager
def gpu_path(target="sm_90"):
    """CPU tensors take the path of a ``target`` GPU; Triton launches count and do nothing;
    the tuner takes its fixed table (nothing to time)."""
    from vit_fast.kernels._device import Target, simulate_gpu
    sms, arch = TARGETS[target]
    with simulate_gpu(Target(sms, arch)), counting_launches() as count:
        yield count


def build_blocks(shape: Shape, precision: str, seed: int = 0, depth: int = 1, layers="timm"):
    """(timm's Block, vit_fast.Block) with the same weights, in the precision's parameter dtype;
    for ``depth`` > 1, a stack (nn.Sequential) of that many of each, each pair its own weights:
    what a model runs, where the Blocks' per-call state must not disturb each other's. With
    ``layers="transformers"``: a stack of transformers' layers and its converted copy."""
    import timm.models.vision_transformer as tvit

    import vit_fast
    if layers == "transformers":
        return _transformers_layers(shape, precision, seed, depth)
    if layers == "vit-pytorch":
        return _vit_pytorch_layers(shape, precision, seed, depth)
    if depth > 1:
        pairs = [build_blocks(shape, precision, seed + i) for i in range(depth)]
        return tuple(torch.nn.Sequential(*side) for side in zip(*pairs))
    torch.manual_seed(seed)
    kw = dict(dim=shape.dim, num_heads=shape.heads, qkv_bias=shape.qkv_bias,
              init_values=shape.init_values)
    timm_block, ours = tvit.Block(**kw), vit_fast.Block(**kw)
    ours.load_state_dict(timm_block.state_dict())
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return timm_block.to(dtype), ours.to(dtype)


LAYERS = ("timm", "transformers", "vit-pytorch")


def _vit_pytorch_layers(shape: Shape, precision: str, seed: int, depth: int):
    """(vit-pytorch's Transformer of ``depth`` layers, vit_fast.convert's copy): its own final
    LayerNorm included, no qkv bias and no LayerScale (vit-pytorch's ViT has neither)."""
    import copy

    from vit_pytorch.vit import Transformer

    import vit_fast
    torch.manual_seed(seed)
    eager = Transformer(dim=shape.dim, depth=depth, heads=shape.heads, dim_head=shape.head_dim,
                        mlp_dim=4 * shape.dim)
    ours = vit_fast.convert(copy.deepcopy(eager))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return eager.to(dtype), ours.to(dtype)


def _transformers_layers(shape: Shape, precision: str, seed: int, depth: int):
    """(transformers' layers, vit_fast.convert's copy of them), ``depth`` of each in an
    nn.Sequential (called as transformers' encoders call them: hidden states only): ViTLayer, or
    Dinov2Layer where the shape has LayerScale; SDPA attention, dropout 0."""
    import copy

    import transformers as T

    import vit_fast
    torch.manual_seed(seed)
    common = dict(hidden_size=shape.dim, num_attention_heads=shape.heads, qkv_bias=shape.qkv_bias,
                  num_hidden_layers=depth)
    if shape.init_values:
        cfg = T.Dinov2Config(mlp_ratio=4, layerscale_value=shape.init_values, **common)
        cls = T.models.dinov2.modeling_dinov2.Dinov2Layer
    else:
        cfg = T.ViTConfig(intermediate_size=4 * shape.dim, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **common)
        cls = T.models.vit.modeling_vit.ViTLayer
    cfg._attn_implementation = "sdpa"
    eager = torch.nn.Sequential(*(cls(cfg) for _ in range(depth)))
    ours = vit_fast.convert(copy.deepcopy(eager))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return eager.to(dtype), ours.to(dtype)


def _fused(ours) -> bool:
    blocks = list(ours) if isinstance(ours, torch.nn.Sequential) else [ours]
    if not hasattr(blocks[0], "why_not_fused"):  # converted transformers layers
        return not ours.vit_fast_summary.left
    return not any(b.why_not_fused() for b in blocks)


def make_step(block, shape: Shape, precision: str, mode: str):
    """One call of ``mode`` on ``block`` as a closure: forward (recording a graph: a training
    step's forward, once :func:`warm_up` has run the configuration's backward), fwd+bwd (forward +
    backward of x and every parameter, grads returned, not accumulated) or inference (eval,
    inference_mode)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=dtype,
                    requires_grad=mode != "inference")
    block.train(mode != "inference")
    amp = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "amp"
           else contextlib.nullcontext())
    params = [p for p in block.parameters() if p.requires_grad]
    grad_out = torch.ones_like(x)

    def forward():
        with amp:
            return block(x)

    if mode == "inference":
        def step():
            with torch.inference_mode():
                return forward()
    elif mode == "forward":
        step = forward
    else:
        def step():
            y = forward()
            return torch.autograd.grad(y, [x, *params], grad_out.to(y.dtype))
    return step


def warm_up(block, shape: Shape, precision: str, mode: str):
    """Before measuring ``mode``: the forward mode is a training step's forward, which runs the
    one-node step once the configuration has run forward and backward (a forward never followed
    by a backward would take the general path every call): warm it up with forward+backward."""
    if mode == "forward":
        step = make_step(block, shape, precision, "fwd+bwd")
        for _ in range(WARMUP_CALLS):
            step()


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: a GPU host issues ops from one thread, and OpenMP workers waiting
    for a busy core would be counted as the caller's spinning time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def count_aten_ops(step) -> int:
    """aten ops one call of step dispatches (views and autograd's own ops included: each costs
    the host a dispatch, most of them a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "aten":
                Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        step()
    return Count.n


def _median_spread(values):
    """(median, relative spread): the interquartile range over the median."""
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    med = statistics.median(values)
    return med, (q[2] - q[0]) / med if med else 0.0


def time_interleaved(steps: dict, rounds=15, inner=10, warmup=5) -> dict:
    """{name: [µs per call, one per round]}, the steps run in turn within each round so a load
    change of the machine hits all of them alike; thread CPU time, gc paused while timed. A
    round's figure is its fastest of ``inner`` calls: what a call costs when nothing else on the
    machine evicted its caches meanwhile (on a shared machine the others only ever add)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    out = {name: [] for name in steps}
    clock = time.thread_time_ns
    for _ in range(rounds):
        gc.collect()
        gc.disable()
        try:
            for name, step in steps.items():
                best = None
                for _ in range(inner):
                    t0 = clock()
                    step()
                    t = clock() - t0
                    best = t if best is None or t < best else best
                out[name].append(best / 1e3)
        finally:
            gc.enable()
    return out


def measure(shape: Shape, precision: str, target: str = "sm_90", modes=MODES, rounds=15,
            inner=10, depth=1, layers="timm") -> list:
    """Rows of {shape, precision, target, mode, depth, layers, timm_us, vit_fast_us, ratio,
    spreads, counts}: triton_launches per call, direct_launches of them made past Triton's
    launch path; per call of one Block, or of a stack of ``depth`` Blocks (``layers``: timm's
    Blocks against vit_fast.Block, or transformers' layers against their converted copy, whose
    figures then stand in the timm columns)."""
    rows = []
    timm_block, ours = build_blocks(shape, precision, depth=depth, layers=layers)
    with one_thread(), gpu_path(target) as launches:
        for mode in modes:
            for block in (timm_block, ours):
                warm_up(block, shape, precision, mode)
            steps = {"timm": make_step(timm_block, shape, precision, mode),
                     "vit_fast": make_step(ours, shape, precision, mode)}
            times = time_interleaved(steps, rounds=rounds, inner=inner)
            launches[:] = [0, 0]
            steps["vit_fast"]()
            triton, direct = launches
            (t_med, t_spread), (v_med, v_spread) = (_median_spread(times[n]) for n in steps)
            rows.append(dict(
                shape=shape.name, precision=precision, target=target, mode=mode, depth=depth,
                layers=layers, timm_us=t_med, vit_fast_us=v_med, ratio=v_med / t_med,
                timm_spread=t_spread, vit_fast_spread=v_spread, triton_launches=triton,
                direct_launches=direct,
                aten_ops_timm=count_aten_ops(steps["timm"]),
                aten_ops_vit_fast=count_aten_ops(steps["vit_fast"]),
                fused=_fused(ours)))
    return rows


# --- instruction counts (callgrind) ----------------------------------------------------------

_CALLGRIND_C = r"""
#include <valgrind/callgrind.h>
void vf_collect_on(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS;
                           CALLGRIND_TOGGLE_COLLECT; }
void vf_collect_off(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def _callgrind_helper():
    """Path of a tiny shared library whose two functions switch callgrind's instrumentation and
    collection on and off (the client-request macros are no-ops outside valgrind), or None
    without gcc/valgrind headers. Uninstrumented, the start-up (imports) runs several times
    faster under valgrind."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not os.path.exists("/usr/include/valgrind/callgrind.h"):
        return None
    out = os.path.join(tempfile.gettempdir(), f"vit_fast_callgrind3_{os.getuid()}.so")
    if not os.path.exists(out):
        src = out[:-3] + ".c"
        with open(src, "w") as f:
            f.write(_CALLGRIND_C)
        if subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", out, src],
                          capture_output=True).returncode != 0:
            return None
    return out


def callgrind_available() -> bool:
    return (shutil.which("valgrind") is not None and shutil.which("callgrind_annotate") is not None
            and _callgrind_helper() is not None)


def _instructions_child(impl, shape_name, precision, target, mode, steps, depth=1,  # noqa: PLR0913
                        layers="timm"):
    """Run under valgrind: warm up, then collect ``steps`` calls of impl's step."""
    import ctypes
    lib = ctypes.CDLL(_callgrind_helper())
    timm_block, ours = build_blocks(SHAPES[shape_name], precision, depth=depth, layers=layers)
    block = ours if impl == "vit_fast" else timm_block
    with one_thread(), gpu_path(target):
        warm_up(block, SHAPES[shape_name], precision, mode)
        step = make_step(block, SHAPES[shape_name], precision, mode)
        for _ in range(WARMUP_CALLS):
            step()
        gc.collect()
        gc.disable()
        lib.vf_collect_on()
        for _ in range(steps):
            step()
        lib.vf_collect_off()


# The native CPU functions whose body a GPU runs as a kernel: the GEMMs' BLAS call (every
# mm/addmm/linear reaches it) and the CPU's flash attention (SDPA, forward and backward). Their
# instructions are compute -- at these widths mostly bf16 dot loops and the attention's per-call
# buffers -- which a GPU host does not execute (it launches cuBLAS / SDPA's kernel instead). They
# are counted apart so the host figure can leave them out; none calls another, so their inclusive
# counts add up without overlap. What a GPU host pays inside cuBLAS's or SDPA's host code is left
# out with them, on both sides (eager calls them more often, so this favours eager).
CPU_COMPUTE = ("at::native::addmm_impl_cpu_(",
               "at::native::_scaled_dot_product_flash_attention_cpu(",
               "at::native::_scaled_dot_product_flash_attention_cpu_backward(")


@dataclass(frozen=True)
class Instructions:
    """Instructions per step under callgrind: all of them, and those inside CPU_COMPUTE."""
    total: float
    cpu_compute: float

    @property
    def host(self) -> float:
        """What a GPU host executes of it: the total less the CPU's compute."""
        return self.total - self.cpu_compute


def cpu_compute_instructions(annotated: str) -> int:
    """Inclusive instructions of the CPU_COMPUTE functions in ``callgrind_annotate
    --inclusive=yes`` output (recursion entries, named ``f'2``, are inside ``f`` already)."""
    total = 0
    for line in annotated.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\S*?:(.*)$", line)
        if m is None or not m.group(2).startswith(CPU_COMPUTE):
            continue
        name = m.group(2).split(" [")[0]
        if re.search(r"'\d+$", name):
            continue
        total += int(m.group(1).replace(",", ""))
    return total


def instructions(impl, shape: Shape, precision, target="sm_90", mode="fwd+bwd", steps=5,
                 keep=None, depth=1, layers="timm"):
    """Instructions per call of impl's step (of one Block, or a stack of ``depth``), counted by
    callgrind (None if unavailable), with those of the CPU's compute (:data:`CPU_COMPUTE`);
    keep: a path to copy callgrind's output to (for callgrind_annotate)."""
    if not callgrind_available():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--instr-atstart=no",
               f"--callgrind-out-file={out}",
               sys.executable, "-m", "vit_fast.bench.host", "--_child", impl, shape.name, precision,
               target, mode, str(steps), str(depth), layers]
        env = dict(os.environ, PYTHONHASHSEED="0")
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"callgrind run failed: {res.stderr[-2000:]}")
        if keep:
            shutil.copy(out, keep)
        total = None
        with open(out) as f:
            for line in f:
                if line.startswith("summary:") or line.startswith("totals:"):
                    total = int(line.split()[1])
                    break
        if total is None:
            return None
        annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                                    out], capture_output=True, text=True, check=True).stdout
        return Instructions(total / steps, cpu_compute_instructions(annotated) / steps)


# --- Triton's own launch cost ----------------------------------------------------------------

def triton_launch_us(reps=2000):
    """µs of Python that ``kernel[grid](...)`` costs per launch in Triton's JITFunction.run for a
    launch with a Block kernel's argument count (binder, specialization, cache key, launch
    metadata), measured with a stand-in driver (no GPU: the compiled kernel's C launcher, which
    a GPU adds, is not called), or None where the installed triton differs from what this stubs."""
    try:
        return _triton_launch_us(reps)
    except Exception:  # noqa: BLE001 - a figure, not a feature: depends on triton's internals
        return None


def _triton_launch_us(reps):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver as driver_mod

    @triton.jit
    def probe_kernel(X, Y, Z, W, B, M, N, K, s0, s1, s2, s3, s4, s5, eps,
                     HAS_B: tl.constexpr, A: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < M), mask=offs < M)

    class StandIn:
        """The parts of triton's CUDA driver JITFunction.run reads before launching."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    class Compiled:
        """What run() finds in its cache after the first compile: launching does nothing."""
        function = packed_metadata = None

        def launch_metadata(self, *args):
            return None

        def run(self, *args):
            return None

    xs = [torch.empty(256) for _ in range(5)]
    saved = driver_mod._active  # triton's own, or None (no GPU: none can be made here)
    driver_mod.set_active(StandIn())
    try:
        def call():
            probe_kernel[(4,)](*xs, 256, 64, 64, 1, 64, 64, 1, 64, 1, 1e-6, HAS_B=True, A=1,
                               BLOCK=64)
        with contextlib.suppress(Exception):
            call()  # fills device_caches (the compile itself fails or not: no GPU)
        caches = probe_kernel.device_caches[0]
        caches[0].clear()
        _orig_compile = probe_kernel._do_compile

        def fake_compile(key, *args, **kwargs):
            caches[0][key] = Compiled()
            return caches[0][key]
        probe_kernel._do_compile = fake_compile
        call()
        probe_kernel._do_compile = _orig_compile
        # The fastest of five batches: this shared machine's stalls only ever add time (the step
        # timings take each round's fastest call for the same reason).
        batch = max(1, reps // 5)
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time_ns()
            for _ in range(batch):
                call()
            best = min(best, (time.thread_time_ns() - t0) / batch / 1e3)
        return best
    finally:
        driver_mod._active = saved


# --- command ----------------------------------------------------------------------------------

def format_rows(rows, instr=None):
    from .tables import fmt_table
    instr = instr or {}

    def noise(r):
        worst = max(r["timm_spread"], r["vit_fast_spread"])
        return "" if abs(r["ratio"] - 1) > worst else " (within noise)"
    cols = [("shape", lambda r: r["shape"] + (f" x{r['depth']}" if r.get("depth", 1) > 1 else "")),
            ("precision", "precision"), ("mode", "mode"),
            ("timm eager µs", lambda r: f"{r['timm_us']:.0f} ±{100 * r['timm_spread']:.0f}%"),
            ("vit_fast µs", lambda r: f"{r['vit_fast_us']:.0f} ±{100 * r['vit_fast_spread']:.0f}%"),
            ("vit_fast / eager", lambda r: f"{r['ratio']:.2f}x{noise(r)}"),
            ("Triton launches",
             lambda r: f"{r['triton_launches']} ({r['direct_launches']} direct)"),
            ("aten ops eager / vit_fast", lambda r: f"{r['aten_ops_timm']} / {r['aten_ops_vit_fast']}")]
    if instr:
        def counted(attr):
            def cell(r):
                pair = instr.get((r["shape"], r["precision"], r["mode"]))
                if pair is None:
                    return "-"
                e, v = (getattr(c, attr) for c in pair)
                return f"{e / 1e6:.2f} M / {v / 1e6:.2f} M ({v / e:.2f}x)"
            return cell
        cols += [("instructions eager / vit_fast (callgrind)", counted("total")),
                 ("less the CPU's compute", counted("host"))]
    return fmt_table(rows, cols)


def count_instructions(shapes, precisions, modes, target, workers=2, depth=1,
                       layers="timm") -> dict:
    """{(shape, precision, mode): (timm's Instructions, vit_fast's)}, each a callgrind run of
    its own (single-threaded under valgrind: ``workers`` of them at a time)."""
    from concurrent.futures import ThreadPoolExecutor
    keys = [(shape, precision, mode) for shape in shapes for precision in precisions
            for mode in modes]
    with ThreadPoolExecutor(workers) as pool:
        runs = {(k, impl): pool.submit(instructions, impl, k[0], k[1], target, k[2], depth=depth,
                                       layers=layers)
                for k in keys for impl in ("timm", "vit_fast")}
        counts = {k: (runs[k, "timm"].result(), runs[k, "vit_fast"].result()) for k in keys}
    return {(s.name, p, m): pair for (s, p, m), pair in counts.items() if None not in pair}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--_child":
        _instructions_child(argv[1], argv[2], argv[3], argv[4], argv[5], int(argv[6]),
                            int(argv[7]), argv[8])
        return 0
    p = argparse.ArgumentParser(prog="python -m vit_fast.bench host", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--target", default="sm_90", choices=sorted(TARGETS))
    p.add_argument("--precision", default="amp,bf16,fp32", help="comma-separated: " + ", ".join(PRECISIONS))
    p.add_argument("--amp", action="store_true", help="shorthand for --precision amp")
    p.add_argument("--shape", default="vit_s,vit_b", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--mode", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--depth", type=int, default=1,
                   help="time a stack of this many Blocks per call, as a model runs them (each "
                        "its own weights; figures per call of the stack)")
    p.add_argument("--layers", default="timm", choices=LAYERS,
                   help="timm: timm's Block against vit_fast.Block; transformers: transformers' "
                        "ViTLayer (Dinov2Layer for a LayerScale shape) against vit_fast.convert's "
                        "copy (the eager columns are then transformers'); vit-pytorch: its "
                        "Transformer of --depth layers (no qkv bias, its final LayerNorm) against "
                        "the converted copy")
    p.add_argument("--callgrind", action="store_true",
                   help="also count instructions per step under callgrind, every mode (slow: about "
                        "a minute a run, two runs at a time)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.add_argument("--save", action="store_true",
                   help=f"write the last --shape's rows to {os.path.relpath(RESULTS_JSON)} (the "
                        "performance model's host term: python -m vit_fast.bench predict)")
    args = p.parse_args(argv)
    precisions = ["amp"] if args.amp else [v for v in args.precision.split(",") if v]
    shapes = [SHAPES[s] for s in args.shape.split(",") if s]
    modes = [m for m in args.mode.split(",") if m]
    for v in precisions:
        if v not in PRECISIONS:
            p.error(f"--precision: {v!r} is not one of {PRECISIONS}")
    if args.depth < 1:
        p.error(f"--depth: {args.depth} is not a positive number of Blocks")
    if args.save and (args.depth != 1 or args.layers != "timm"):
        p.error("--save: the model's host term is per timm Block: with --depth 1 and --layers "
                "timm only")
    rows = []
    for shape in shapes:
        for precision in precisions:
            rows += measure(shape, precision, args.target, modes, args.rounds, args.inner,
                            args.depth, args.layers)
    instr = (count_instructions(shapes, precisions, modes, args.target, depth=args.depth,
                                layers=args.layers) if args.callgrind else {})
    launch = triton_launch_us()
    print(format_rows(rows, instr))
    unit = {"timm": "Block", "transformers": "transformers layer",
            "vit-pytorch": "vit-pytorch layer"}[args.layers]
    per = f"{unit} call" if args.depth == 1 else f"call of a stack of {args.depth} {unit}s"
    if args.layers != "timm":
        print(f"layers: {args.layers}'s own (the 'timm eager' columns) against vit_fast.convert's "
              "copy of them")
    print(f"CPU measured: thread CPU time per {per} on this machine, median over {args.rounds} "
          f"interleaved rounds of each round's fastest of {args.inner} calls (± the interquartile "
          f"range); path of {args.target} "
          "(Triton launches counted, not run); widths scaled down (head_dim 1, batch 2, 8 tokens)"
          + ("; callgrind: instructions per call, and the same less the CPU's own compute (its "
             "GEMMs' BLAS and flash-attention bodies, which a GPU runs as kernels; the times "
             "include it)." if instr else "."))
    if launch is not None:
        print(f"Triton's Python launch path (kernel[grid](...) to the driver call, stand-in driver): {launch:.1f} µs per "
              "launch on this CPU, on top of the vit_fast column for each Triton launch made "
              "through it; a direct launch (kernels/direct_launch.py) skips it: what it runs is "
              "in the column, but for the compiled kernel's launcher.")
    command = "python -m vit_fast.bench host " + " ".join(argv)
    out = results(rows, launch, instr, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.save:
        last = shapes[-1].name
        out = dict(out, rows=[r for r in out["rows"] if r["shape"] == last])
        RESULTS_JSON.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {RESULTS_JSON} ({last}'s rows)")
    return 0


RESULTS_JSON = (__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks" /
                "results" / "host-cpu.json")


def results(rows, launch_us, instr, command):
    """The rows in the schema vit_fast/bench/predict_host.py reads (benchmarks/results/README.md):
    per (mode, precision) eager_us, vit_fast_us, launches, Triton's per-launch µs and, where
    callgrind counted the row, each side's host share (its instructions less the CPU's compute,
    over all of them)."""
    def shares(r):
        pair = instr.get((r["shape"], r["precision"], r["mode"]))
        if pair is None:
            return {}
        return dict(eager_host_share=round(pair[0].host / pair[0].total, 3),
                    vit_fast_host_share=round(pair[1].host / pair[1].total, 3))
    return {"command": command, "machine": "CPU (thread time; see vit_fast/bench/host.py)",
            "instructions": {"/".join(k): {side: dict(total=round(c.total), cpu_compute=round(
                c.cpu_compute)) for side, c in zip(("eager", "vit_fast"), pair)}
                for k, pair in instr.items()},
            "rows": [dict(mode=r["mode"], precision=r["precision"], shape=r["shape"],
                          target=r["target"], eager_us=round(r["timm_us"], 1),
                          vit_fast_us=round(r["vit_fast_us"], 1),
                          triton_launches=r["triton_launches"],
                          direct_launches=r["direct_launches"],
                          aten_ops_eager=r["aten_ops_timm"],
                          aten_ops_vit_fast=r["aten_ops_vit_fast"],
                          triton_launch_us=round(launch_us, 1) if launch_us else 15.0,
                          eager_spread=round(r["timm_spread"], 3),
                          vit_fast_spread=round(r["vit_fast_spread"], 3), **shares(r))
                     for r in rows]}


if __name__ == "__main__":
    raise SystemExit(main())
