"""Backend policy: env var, context manager, reasons, and the errors of a forced backend."""
import pytest
import torch

import vit_fast
from vit_fast.kernels import _device
from vit_fast import dispatch, support


def test_default_policy_is_auto_and_cpu_takes_reference(monkeypatch):
    monkeypatch.delenv("VIT_FAST_BACKEND", raising=False)
    dispatch.reload_env()
    assert dispatch.current_policy() == "auto"
    choice = dispatch.choose("fused_qkv_attention", [torch.randn(1, 2, 6)], head_dim=2)
    assert choice.backend == "reference"
    assert any("CPU" in r for r in choice.reasons)


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("VIT_FAST_BACKEND", "reference")
    dispatch.reload_env()  # read once, on first use: a change at run time asks for a re-read
    assert dispatch.current_policy() == "reference"
    with vit_fast.use_backend("triton"):
        assert dispatch.current_policy() == "triton"
        with vit_fast.use_backend("auto"):
            assert dispatch.current_policy() == "auto"
        assert dispatch.current_policy() == "triton"
    assert dispatch.current_policy() == "reference"
    monkeypatch.setenv("VIT_FAST_BACKEND", "fast")
    dispatch.reload_env()
    with pytest.raises(ValueError, match="VIT_FAST_BACKEND"):
        dispatch.current_policy()
    with pytest.raises(ValueError, match="backend"):
        with vit_fast.use_backend("cuda"):
            pass


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(_device, "_INTERPRET", False)  # as if unset at import
    with vit_fast.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        vit_fast.fused_qkv_attention(torch.randn(1, 4, 3 * 2 * 8), 2)


def test_unsupported_options_route_to_reference_with_reasons():
    qkv = torch.randn(1, 4, 48)
    reasons = dispatch.not_supported_reasons("fused_qkv_attention", [qkv], head_dim=512, dropout_p=0.1)
    assert any("head_dim 512" in r for r in reasons)
    # Attention dropout runs in the kernel (Philox mask regenerated in the backward).
    assert not dispatch.not_supported_reasons("fused_qkv_attention", [qkv], head_dim=8, dropout_p=0.1)
    reasons = dispatch.not_supported_reasons("residual_layer_norm", [qkv.double()], dim=9000)
    assert any("float64" in r for r in reasons) and any("9000" in r for r in reasons)
    for op in ("gelu_mlp", "patch_embed"):
        mixed = dispatch.not_supported_reasons(op, [qkv, qkv.half()])
        assert any("mixed" in r for r in mixed), op
    assert not dispatch.not_supported_reasons("patch_embed", [qkv.to(torch.uint8), qkv.half()])
    # Forced triton + an unsupported option: the reference answers, never a wrong result.
    with vit_fast.use_backend("triton"):
        choice = dispatch.choose("fused_qkv_attention", [qkv], head_dim=512)
    assert choice.backend == "reference" and choice.reasons


def test_reference_policy_matches_reference_module():
    qkv = torch.randn(2, 9, 3 * 3 * 8)
    with vit_fast.use_backend("reference"):
        out = vit_fast.fused_qkv_attention(qkv, 3)
    torch.testing.assert_close(out, vit_fast.reference.fused_qkv_attention(qkv, 3))


def test_policy_is_per_thread():
    import threading
    seen = []
    with vit_fast.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(dispatch.current_policy()))
        t.start()
        t.join()
    assert seen == [dispatch.current_policy()]


def test_fp32_attention_on_cuda_goes_to_reference():
    qkv = torch.empty(1, 4, 48, device="meta")

    class FakeCuda:  # only .device.type, .dtype and is_floating_point() are read
        device = torch.device("cuda")
        dtype = torch.float32

        def is_floating_point(self):
            return True
    reasons = dispatch.not_supported_reasons("fused_qkv_attention", [FakeCuda()], head_dim=8)
    assert any("float32 attention on CUDA" in r for r in reasons)
    assert not dispatch.not_supported_reasons("fused_qkv_attention", [qkv.half()], head_dim=8)


# --- GPU gates (no GPU here: device properties are faked) -------------------------------------

class FakeCudaTensor:
    """What dispatch reads of a tensor: .device, .dtype, is_floating_point()."""

    def __init__(self, index=1, dtype=torch.float16):
        self.device = torch.device("cuda", index)
        self.dtype = dtype

    def is_floating_point(self):
        return True


@pytest.fixture
def gpu(monkeypatch):
    """Fake torch.cuda.get_device_properties; set ``gpu["props"]`` per test. Caches cleared."""
    from types import SimpleNamespace
    state = {"props": None, "queries": 0}

    def props(index):
        state["queries"] += 1
        return SimpleNamespace(**state["props"])

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device, "_INTERPRET", False)  # as if unset at import
    monkeypatch.setattr(support, "_TRITON_DEVICE", {})
    monkeypatch.setattr(support, "_EXTENSION_DEVICE", {})
    monkeypatch.setattr(dispatch, "triton_missing_reason", lambda: None)
    monkeypatch.setattr(dispatch, "extension_missing_reason", lambda kind: None)
    return state


T4 = dict(major=7, minor=5, name="Tesla T4", shared_memory_per_block_optin=65536)
A100 = dict(major=8, minor=0, name="A100", shared_memory_per_block_optin=166912)


def test_triton_gate_by_capability_and_shared_memory():
    assert "sm_75" in support.triton_reason_for((7, 5))
    assert "sm_70" in support.triton_reason_for((7, 0))
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert support.triton_reason_for(cap) is None, cap
    assert support.triton_reason_for((8, 9), shared_optin=101376) is None  # RTX 4090: 99 KB
    assert "shared memory" in support.triton_reason_for((8, 7), shared_optin=49152)


def test_rocm_is_not_supported(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert "ROCm" in support.triton_reason_for((9, 4))
    assert "ROCm" in support.extension_reason_for((9, 4), {"sass": [90], "ptx": [90]})


def test_extension_gate_by_built_architectures():
    built = {"sass": [80, 90], "ptx": [90]}
    assert support.extension_reason_for((8, 0), built) is None
    assert support.extension_reason_for((8, 6), built) is None  # sm_80 SASS runs on sm_86
    assert support.extension_reason_for((9, 0), built) is None
    assert support.extension_reason_for((12, 0), built) is None  # via the compute_90 PTX
    reason = support.extension_reason_for((7, 5), built)
    assert "sm_75" in reason and 'TORCH_CUDA_ARCH_LIST="7.5"' in reason
    sass_only = {"sass": [80, 90], "ptx": []}
    assert "sm_100" in support.extension_reason_for((10, 0), sass_only)
    assert support.extension_reason_for((10, 0), None) is None  # unknown build: runtime fallback


def test_choose_on_an_old_gpu_gives_reasons_and_caches_per_device(gpu):
    gpu["props"] = T4
    t = FakeCudaTensor(index=1)
    choice = dispatch.choose("gelu_mlp", [t])
    assert choice.backend == "reference"
    assert any("cuda:1 (Tesla T4) is sm_75" in r for r in choice.reasons)
    dispatch.choose("fused_qkv_attention", [t], head_dim=64)
    assert gpu["queries"] == 1  # one query per device
    with vit_fast.use_backend("triton"), pytest.raises(RuntimeError, match="sm_75"):
        dispatch.choose("residual_layer_norm", [t], dim=64)
    gpu["props"] = A100
    assert dispatch.choose("gelu_mlp", [FakeCudaTensor(index=0)]).backend == "triton"
    assert gpu["queries"] == 2


def test_choose_extension_only_where_it_was_built_for(gpu, monkeypatch):
    monkeypatch.setattr(support, "extension_build_info", lambda: {"sass": [80, 90], "ptx": []})
    gpu["props"] = dict(major=12, minor=0, name="RTX 5090", shared_memory_per_block_optin=101376)
    choice = dispatch.choose("patch_embed", [FakeCudaTensor(index=0)])
    assert choice.backend == "reference" and "sm_120" in choice.reasons[0]
    assert dispatch.choose("gelu_mlp", [FakeCudaTensor(index=0)]).backend == "triton"


def test_limits_match_the_kernels():
    from vit_fast.kernels import attention, layer_norm
    assert support.MAX_LAYER_NORM_DIM == layer_norm.MAX_C
    assert support.MAX_HEAD_DIM == max(bucket for _, bucket, _ in attention._CUDA_CONFIGS)


def test_use_backend_traces_in_a_full_graph():
    def f(x, w, b):
        with vit_fast.use_backend("reference"):
            return vit_fast.residual_layer_norm(x, w, b, 1e-6)[0]

    x, w, b = torch.randn(2, 8), torch.randn(8), torch.randn(8)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))


def test_fake_cuda_without_a_gpu_is_not_gated(monkeypatch):
    """FakeTensorMode CUDA tensors (the memory model) on a machine without a GPU: no device to
    query and nothing launches, so the gate stays out of the way."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_device, "_INTERPRET", False)  # as if unset at import
    assert support.triton_device_reason(0) is None and support.extension_device_reason(0) is None
    assert dispatch.choose("gelu_mlp", [FakeCudaTensor(index=0)]).backend == "triton"
