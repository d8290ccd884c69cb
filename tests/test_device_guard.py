"""Every Triton launch runs under its tensors' device guard (tensors on cuda:1, cuda:0 current).

No GPU here: a tensor subclass reports cuda:1 and torch.cuda.device is replaced by a recorder,
so the tests see which device each launcher enters and that its body runs inside the guard.
"""
import ast
import contextlib
import re
from pathlib import Path

import pytest
import torch

from vit_fast.kernels import _device

KERNEL_FILES = sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.py"))


class OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (all the guard reads is .device)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def entered(monkeypatch):
    """The device indices torch.cuda.device was entered with, and whether a guard is open."""
    log = {"entered": [], "open": 0}

    @contextlib.contextmanager
    def fake_device(index):
        log["entered"].append(index)
        log["open"] += 1
        try:
            yield
        finally:
            log["open"] -= 1

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    return log


def _launches(fn: ast.FunctionDef) -> bool:
    """Whether the function body launches a Triton kernel: ``some_kernel[grid](...)``, or its
    kept direct launch ``kept(some_kernel, grid, consts)(...)`` (kernels/direct_launch.py)."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
            if name.endswith("_kernel"):
                return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "kept" and node.args \
                and getattr(node.args[0], "id", "").endswith("_kernel"):
            return True
    return False


def _decorated(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "on_tensor_device" for d in fn.decorator_list)


def test_every_launcher_is_guarded():
    launchers = []
    for path in KERNEL_FILES:
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and _launches(fn):
                launchers.append(fn.name)
                assert _decorated(fn), f"{path.name}: {fn.name} launches a kernel without @on_tensor_device"
    # the launchers of attention, layer norm and the GEMMs were all found
    assert {"attention_fwd", "attention_bwd", "residual_layer_norm_fwd", "residual_layer_norm_bwd",
            "matmul", "colsum"} <= set(launchers)


def test_bound_launchers_run_only_inside_the_step_that_enters_the_device():
    """kernels/*_bound.py launch without the guard (their callables skip per-call work): only the
    Block's one-node step calls them, and its forward enters x's device (the backward runs on
    autograd's thread for that device, where it is current)."""
    root = Path(__file__).resolve().parent.parent
    users = set()
    for path in [*KERNEL_FILES, *sorted((root / "vit_fast").rglob("*.py"))]:
        text = path.read_text()
        if "_bound import" in text or "import layer_norm_bound" in text \
                or "import attention_bound" in text:
            users.add(path.name)
    # kernels/gelu_mlp.py's Gemms binds launches only when given a dict to keep them in
    assert users == {"block_step.py", "gelu_mlp.py"}, users
    makers = set()
    for path in [*KERNEL_FILES, *sorted((root / "vit_fast").rglob("*.py"))]:
        if re.search(r"Gemms\(.*\{\}", path.read_text()):
            makers.add(path.name)
    assert makers == {"block_step.py"}, makers
    step = (root / "vit_fast" / "block_step.py").read_text()
    assert "torch.cuda.device(index)" in step


def test_public_launchers_carry_the_guard():
    from vit_fast.kernels import attention, gelu_mlp, layer_norm, matmul
    for fn in (attention.attention_fwd, attention.attention_bwd, layer_norm.residual_layer_norm_fwd,
               layer_norm.residual_layer_norm_bwd, gelu_mlp.gelu_mlp_fwd, gelu_mlp.gelu_mlp_bwd,
               matmul.matmul, matmul.colsum):
        assert getattr(fn, "on_tensor_device", False), fn.__name__


def test_guard_enters_the_tensors_device(entered):
    seen = []

    def launcher(x, w=None):
        seen.append(entered["open"])
        return x

    guarded = _device.on_tensor_device(launcher)
    x = torch.zeros(3).as_subclass(OnCuda1)
    assert guarded(x) is x
    assert entered["entered"] == [1] and seen == [1]  # the body ran inside the cuda:1 guard
    guarded(x=x)  # keyword tensors count too
    assert entered["entered"] == [1, 1]
    assert entered["open"] == 0


def test_no_guard_for_cpu_tensors(entered):
    guarded = _device.on_tensor_device(lambda x: x * 2)
    torch.testing.assert_close(guarded(torch.ones(2)), torch.full((2,), 2.0))
    assert entered["entered"] == []


def test_real_launcher_enters_guard_before_touching_memory(entered, monkeypatch):
    """residual_layer_norm_fwd with a cuda:1 tensor: the guard is entered before the launcher
    allocates (which then fails here, having no GPU)."""
    from vit_fast.kernels import layer_norm
    x = torch.zeros(2, 8).as_subclass(OnCuda1)
    allocated_in_guard = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        allocated_in_guard.append(entered["open"])
        return real_empty(*args, **{k: v for k, v in kwargs.items() if k != "device"})

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(layer_norm, "residual_layer_norm_fwd_kernel", _Recorder(entered))
    layer_norm.residual_layer_norm_fwd(x, None, None, 1e-5)
    assert entered["entered"] == [1]
    assert allocated_in_guard and all(allocated_in_guard)
    assert layer_norm.residual_layer_norm_fwd_kernel.launched_in_guard == [1]


class _Recorder:
    """Stands in for a @triton.jit kernel: records whether ``kernel[grid](...)`` ran in a guard."""

    def __init__(self, log):
        self.log = log
        self.launched_in_guard = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched_in_guard.append(self.log["open"])
