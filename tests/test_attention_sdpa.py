"""PyTorch's flash SDPA as a measured attention candidate (vit_fast/ops/attention_sdpa.py, issue 17):
chosen by an injected timer under the 'auto' policy, same results as the kernel and the reference
(CPU flash here), never offered with dropout or other kernel arguments, the kernel first with
tuning off, and what SDPA's own autograd saves against the op's (fake CUDA tensors)."""
import pytest
import torch

import vit_fast
from test_tuning import FakeTimer
from vit_fast import reference, tuning
from vit_fast.ops import attention, attention_sdpa

B, N, H, D = 2, 13, 2, 16


def _qkv(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.randn(B, N, 3 * H * D, dtype=dtype, requires_grad=True)


def _fwd_bwd(qkv, gy):
    out = attention.fused_qkv_attention_op(qkv, H, D ** -0.5)[0]
    (dqkv,) = torch.autograd.grad(out, qkv, gy)
    return out.detach(), dqkv


@pytest.mark.parametrize("winner", ["sdpa", "triton"])
def test_measured_choice_runs_forward_and_backward(monkeypatch, winner):
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    qkv, gy = _qkv(), torch.randn(B, N, H * D)
    times = {"sdpa": 1.0, "triton": 2.0} if winner == "sdpa" else {"sdpa": 2.0, "triton": 1.0}
    timer = FakeTimer(times)
    with vit_fast.use_backend("auto"), tuning.use_tuner(
            tuning.Tuner(None, timer, measure_anywhere=True)):
        out, dqkv = _fwd_bwd(qkv, gy)
        chosen = {r["op"]: r["choice"] for r in tuning.records()}
    assert chosen == {"attention_fwd": winner, "attention_bwd": winner}
    assert sorted(timer.timed) == ["sdpa", "sdpa", "triton", "triton"]
    ref_qkv = qkv.detach().double().requires_grad_()
    ref = reference.fused_qkv_attention(ref_qkv, H)
    (ref_d,) = torch.autograd.grad(ref, ref_qkv, gy.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref_d, rtol=1e-4, atol=1e-5)


def test_sdpa_launchers_keep_the_kernel_contract():
    """out [B, N, H·D] with heads concatenated, the natural-log lse [B, H, N] fp32, dqkv packed
    as qkv: interchangeable with the kernel's, so forward and backward can differ."""
    qkv, gy = _qkv().detach(), torch.randn(B, N, H * D)
    out, lse = attention_sdpa.sdpa_attention_fwd(qkv, H, D ** -0.5)
    with vit_fast.use_backend("triton"):
        k_out, k_lse = attention.fused_qkv_attention_op(qkv, H, D ** -0.5)
    assert out.shape == k_out.shape and lse.shape == k_lse.shape == (B, H, N)
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    torch.testing.assert_close(out, k_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, k_lse, rtol=1e-4, atol=1e-5)
    # SDPA's backward from the kernel's forward outputs, and the other way round
    d_sdpa = attention_sdpa.sdpa_attention_bwd(gy, qkv, k_out, k_lse, H, D ** -0.5)
    with vit_fast.use_backend("triton"):
        d_kernel = attention.fused_qkv_attention_backward_op(gy, qkv, out, lse, H, D ** -0.5)
    assert d_sdpa.shape == qkv.shape
    torch.testing.assert_close(d_sdpa, d_kernel, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy,dropout_p", [("auto", 0.1), ("triton", 0.0), ("cublas", 0.0)])
def test_sdpa_not_offered_with_dropout_or_a_forced_backend(monkeypatch, policy, dropout_p):
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    timer = FakeTimer({"sdpa": 0.1, "triton": 9.0})
    seed = torch.tensor([7]) if dropout_p else None
    with vit_fast.use_backend(policy), tuning.use_tuner(
            tuning.Tuner(None, timer, measure_anywhere=True)):
        attention.fused_qkv_attention_op(_qkv().detach(), H, 0.25, dropout_p, seed)
        assert tuning.records() == [] and timer.timed == []


def test_sdpa_not_offered_with_other_kernel_arguments(monkeypatch):
    """A kernel-only argument (segment ids) keeps the kernel: it is passed through untouched."""
    seen = {}

    def fake_kernel(qkv, num_heads, scale, **kw):
        seen.update(kw)
        return "kernel"
    monkeypatch.setattr(attention_sdpa, "attention_fwd", fake_kernel)
    timer = FakeTimer({"sdpa": 0.1, "triton": 9.0})
    with vit_fast.use_backend("auto"), tuning.use_tuner(
            tuning.Tuner(None, timer, measure_anywhere=True)):
        got = attention_sdpa.attention_forward(_qkv().detach(), H, 0.25,
                                               segment_ids=torch.zeros(B, N, dtype=torch.int32))
    assert got == "kernel" and "segment_ids" in seen and timer.timed == []


def test_fixed_table_runs_the_kernel_first(monkeypatch):
    monkeypatch.setenv("VIT_FAST_TUNE", "0")
    with vit_fast.use_backend("auto"), tuning.use_tuner(
            tuning.Tuner(None, FakeTimer({}), measure_anywhere=True)):
        attention.fused_qkv_attention_op(_qkv().detach(), H, 0.25)
        (rec,) = tuning.records()
    assert rec["choice"] == "triton" and rec["source"] == "fixed"


def test_sdpa_own_autograd_saves_the_same_tensors_as_the_op():
    """On fake CUDA bf16 tensors (ViT-B/16 head shapes): SDPA's autograd over strided views of
    qkv saves qkv's storage (no q/k/v copies), out and lse -- the op's tensors -- plus its RNG
    state (24 bytes), so it belongs to the default pool (no more saved than the kernel)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vit_fast.bench.memory import count_saved
    Bv, Nv, Hv, Dv = 4, 197, 12, 64
    with FakeTensorMode():
        qkv = torch.empty(Bv, Nv, 3 * Hv * Dv, device="cuda", dtype=torch.bfloat16,
                          requires_grad=True)
        with count_saved() as sdpa:
            q, k, v = attention_sdpa._heads(qkv, Hv)
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                               scale=Dv ** -0.5)
        with count_saved() as ours, vit_fast.use_backend("triton"):
            attention.fused_qkv_attention_op(qkv, Hv, Dv ** -0.5)
    qkv_bytes = Bv * Nv * 3 * Hv * Dv * 2
    out_bytes, lse_bytes = qkv_bytes // 3, Bv * Hv * Nv * 4
    assert ours.bytes == qkv_bytes + out_bytes + lse_bytes
    assert ours.bytes <= sdpa.bytes <= ours.bytes + 24, (sdpa.shapes, ours.shapes)


def test_fake_cuda_launchers_match_the_schemas():
    """The CUDA branch of both launchers against the aten ops' schemas and meta shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        qkv = torch.empty(B, N, 3 * H * 64, device="cuda", dtype=torch.bfloat16)
        out, lse = attention_sdpa.sdpa_attention_fwd(qkv, H, 0.125)
        assert out.shape == (B, N, H * 64) and out.is_contiguous() and lse.shape == (B, H, N)
        dqkv = attention_sdpa.sdpa_attention_bwd(torch.empty_like(out), qkv, out, lse, H, 0.125)
        assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype


def test_two_pass_backward_is_measured_against_the_fused_pass(monkeypatch):
    """Where the plan is the fused pass with dq partials, the two passes are a candidate too (the
    model and the SASS disagree on which wins): timed beside it, same gradient, with SDPA not
    eligible (a forced backend here)."""
    from vit_fast.kernels import attention as kernels

    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    monkeypatch.setattr(attention_sdpa, "two_pass_alternative", lambda qkv, h, dropout, segments:
                        kernels.bwd_plan(qkv.shape[1], D, qkv.dtype, dropout, segments,
                                         fused=False)[1:])
    qkv, gy = _qkv(), torch.randn(B, N, H * D)
    with vit_fast.use_backend("triton"):
        with tuning.use_tuner(tuning.Tuner(None, FakeTimer({}))):  # CPU, not timed: the plan's
            _, fused = _fwd_bwd(qkv, gy)
        timer = FakeTimer({"triton": 2.0, "triton_two_pass": 1.0})
        with tuning.use_tuner(tuning.Tuner(None, timer, measure_anywhere=True)):
            _, two_pass = _fwd_bwd(qkv, gy)
            chosen = {r["op"]: r["choice"] for r in tuning.records()}
    assert chosen["attention_bwd"] == "triton_two_pass"
    assert sorted(t for t in timer.timed if t.startswith("triton")) == ["triton", "triton_two_pass"]
    torch.testing.assert_close(two_pass, fused, rtol=1e-5, atol=1e-6)


def test_two_pass_alternative_only_where_the_plan_writes_partials(monkeypatch):
    from vit_fast.kernels import _device, attention as kernels

    bf16 = torch.bfloat16
    qkv = torch.empty(1, 197, 3 * 12 * 64, dtype=bf16)
    assert kernels.two_pass_alternative(qkv, 12, False, False) is None  # CPU: no GPU plan
    monkeypatch.setattr(kernels, "gpu_target", lambda device: _device.Target(132, 90))
    assert kernels.two_pass_alternative(qkv, 12, False, False) == \
        kernels.bwd_plan(197, 64, bf16, arch=90, fused=False)[1:]
    assert kernels.bwd_plan(197, 64, bf16, arch=90)[0::2] == ("fused", 2)
    short = torch.empty(1, 50, 3 * 12 * 64, dtype=bf16)  # one key tile: dq written directly
    assert kernels.two_pass_alternative(short, 12, False, False) is None
    monkeypatch.setattr(kernels, "gpu_target", lambda device: _device.Target(108, 80))
    assert kernels.two_pass_alternative(qkv, 12, False, False) is None  # sm_80: two passes already
