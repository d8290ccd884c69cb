"""The Triton GEMM's fp32 input precision follows torch's matmul setting, set by either of its APIs.

torch >= 2.9 has two: the legacy ``torch.backends.cuda.matmul.allow_tf32`` (and
``torch.set_float32_matmul_precision``) and the documented ``fp32_precision`` attributes. Once a user
sets the new one, reading the legacy flag raises RuntimeError ("mix of the legacy and new APIs"):
``input_precision`` must read the setting in a way both APIs leave readable.
"""
import pytest
import torch

from vit_fast.kernels import _device
from vit_fast.kernels import matmul as matmul_mod


@pytest.fixture
def torch_precision():
    """Restores torch's fp32 matmul settings (global and CUDA matmul) after the test."""
    saved = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.backends.fp32_precision = saved[0]
    torch.backends.cuda.matmul.fp32_precision = saved[1]


@pytest.fixture
def compiled(monkeypatch):
    """input_precision as on a GPU: the interpreter always computes in IEEE fp32."""
    monkeypatch.setattr(_device, "_INTERPRET", False)


SETTINGS = {  # how a user asks for tf32 (or not), and what the GEMM must then use for fp32
    "default": ("", "ieee"),
    "new API tf32": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", "tf32"),
    "new API ieee": ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", "ieee"),
    "new API global tf32": ("torch.backends.fp32_precision = 'tf32'", "tf32"),
    "new API global tf32, matmul ieee": (
        "torch.backends.fp32_precision = 'tf32'; torch.backends.cuda.matmul.fp32_precision = 'ieee'",
        "ieee"),
    "legacy allow_tf32": ("torch.backends.cuda.matmul.allow_tf32 = True", "tf32"),
    "legacy high": ("torch.set_float32_matmul_precision('high')", "tf32"),
    "legacy highest": ("torch.set_float32_matmul_precision('highest')", "ieee"),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fp32_input_precision_follows_torch(setting, torch_precision, compiled):
    statement, want = SETTINGS[setting]
    exec(statement, {"torch": torch})
    assert matmul_mod.input_precision(torch.float32) == want
    # half-precision inputs go to the tensor cores as they are
    assert matmul_mod.input_precision(torch.bfloat16) == "ieee"
    assert matmul_mod.input_precision(torch.float16) == "ieee"


def test_interpreter_computes_fp32_in_ieee(torch_precision, monkeypatch):
    monkeypatch.setattr(_device, "_INTERPRET", True)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    assert matmul_mod.input_precision(torch.float32) == "ieee"


def test_fp32_gemm_runs_after_the_new_api_is_set(torch_precision):
    """The crash as a user met it: an fp32 Triton GEMM after ``fp32_precision = "tf32"``."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(17, 40, generator=g), torch.randn(40, 24, generator=g)
    got, _, _ = matmul_mod.matmul(a, b, torch.float32)
    torch.testing.assert_close(got, a @ b, rtol=1e-4, atol=1e-4)
