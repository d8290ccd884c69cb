"""Backend policy: env var, context manager, reasons, and the errors of a forced backend."""
import pytest
import torch

import vit_fast
from vit_fast import dispatch


def test_default_policy_is_auto_and_cpu_takes_reference(monkeypatch):
    monkeypatch.delenv("VIT_FAST_BACKEND", raising=False)
    assert dispatch.current_policy() == "auto"
    choice = dispatch.choose("fused_qkv_attention", [torch.randn(1, 2, 6)], head_dim=2)
    assert choice.backend == "reference"
    assert any("CPU" in r for r in choice.reasons)


def test_env_var_and_context_manager(monkeypatch):
    monkeypatch.setenv("VIT_FAST_BACKEND", "reference")
    assert dispatch.current_policy() == "reference"
    with vit_fast.use_backend("triton"):
        assert dispatch.current_policy() == "triton"
        with vit_fast.use_backend("auto"):
            assert dispatch.current_policy() == "auto"
        assert dispatch.current_policy() == "triton"
    assert dispatch.current_policy() == "reference"
    monkeypatch.setenv("VIT_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="VIT_FAST_BACKEND"):
        dispatch.current_policy()
    with pytest.raises(ValueError, match="backend"):
        with vit_fast.use_backend("cuda"):
            pass


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
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
