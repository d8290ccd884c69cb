"""The sm_90 TMA forward (kernels/attention_fwd_tma.py): the pointer kernel's results under the
interpreter over its grid (dtypes, padded and unpadded head dims, N not a multiple of the tile,
several batches with NaN between them in memory, so a row read across the sequence boundary
shows), its gates (triton without descriptors, not sm_90, dtypes, TMA alignment, shapes it has
no build for, dropout and segments), its AOT specs, and its place in the measured selection."""
import pytest
import torch

import vit_fast
from test_tuning import FakeTimer
from vit_fast import tuning
from vit_fast.kernels import _device, attention_aot, attention_fwd_tma as tma
from vit_fast.kernels.attention import attention_fwd
from vit_fast.ops import attention, attention_sdpa

H100, A100 = _device.Target(132, 90), _device.Target(108, 80)


def _strided_qkv(B, N, H, D, dtype, gap=8):
    """qkv [B, N, 3·H·D] inside a buffer with ``gap`` NaN rows after each batch's N rows and
    NaN everywhere else: any load past a sequence's end reads NaN."""
    torch.manual_seed(0)
    buf = torch.full((B, N + gap, 3 * H * D), float("nan"), dtype=dtype)
    buf[:, :N] = torch.randn(B, N, 3 * H * D).to(dtype)
    return buf[:, :N]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,D", [(37, 16), (20, 24), (33, 64)])
def test_matches_the_pointer_kernel(dtype, N, D):
    # D = 24 pads to BLOCK_D = 32: the next head's columns must read as 0, not as its values.
    H = 2
    qkv = _strided_qkv(2, N, H, D, dtype)
    assert qkv.stride(0) != N * qkv.shape[-1]
    out, lse = tma.attention_fwd_tma(qkv, H, D ** -0.5, config=(16, 16, 4, 1))
    ref_out, ref_lse = attention_fwd(qkv, H, D ** -0.5, config=(16, 16, 4, 1))
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_default_interpreter_tiles_and_reference_math():
    B, N, H, D = 2, 19, 3, 8
    qkv = _strided_qkv(B, N, H, D, torch.float32)
    out, lse = tma.attention_fwd_tma(qkv, H, 0.3)
    q, k, v = qkv.double().unflatten(-1, (3, H, D)).unbind(2)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * 0.3
    ref = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).flatten(2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), rtol=1e-5, atol=1e-6)


def test_gates():
    assert tma.not_supported_reasons(torch.bfloat16, H100) == []
    assert "tensor_descriptor" in tma.not_supported_reasons(torch.bfloat16, H100,
                                                            triton_has_descriptors=False)[0]
    assert "sm_90 only (device is sm_80)" in tma.not_supported_reasons(torch.float16, A100)[0]
    assert "fp16/bf16" in tma.not_supported_reasons(torch.float32, H100)[0]
    ok = torch.empty(2, 5, 3 * 2 * 64, dtype=torch.bfloat16)
    assert tma.tensor_reasons(ok, 2) == []
    odd = torch.empty(2, 5, 3 * 2 * 33, dtype=torch.bfloat16)  # head dim 33: 66-byte rows
    assert "16-byte" in tma.tensor_reasons(odd, 2)[0]
    columns = torch.empty(2, 3 * 2 * 64, 5, dtype=torch.bfloat16).transpose(1, 2)
    assert "not contiguous" in tma.tensor_reasons(columns, 2)[0]
    shifted = torch.empty(2, 6, 400, dtype=torch.bfloat16)[:, :, 4:388]  # base 8 bytes off
    assert "16-byte" in tma.tensor_reasons(shifted, 2)[0]
    assert "not [B, N" in tma.tensor_reasons(ok, 5)[0]
    with pytest.raises(ValueError, match="scale must be > 0"):
        tma.attention_fwd_tma(torch.randn(1, 4, 3 * 16), 1, -1.0)
    with pytest.raises(ValueError, match="16-byte"):
        tma.attention_fwd_tma(torch.randn(1, 4, 3 * 2 * 33, dtype=torch.float16), 2, 0.1)


def test_offered_configs(monkeypatch):
    monkeypatch.setattr(tma, "interpreting", lambda: False)  # the CUDA table
    assert tma.tma_config(64, 197) == (128, 64, 4, 3) and tma.tma_config(48, 1025) == (128, 64, 4, 3)
    assert tma.tma_config(128, 577) == (128, 128, 8, 2) and tma.tma_config(80, 257) == (128, 128, 8, 2)
    assert tma.tma_config(64, 64) is None      # one key tile: the pointer kernel
    assert tma.tma_config(256, 197) is None    # no study, no build
    qkv = torch.empty(2, 197, 3 * 12 * 64, dtype=torch.bfloat16)
    monkeypatch.setattr(tma, "gpu_target", lambda device: H100)
    assert tma.tma_alternative(qkv, 12, 0.125, False, False) is not None
    assert tma.tma_alternative(qkv, 12, 0.125, True, False) is None   # dropout: pointer kernel
    assert tma.tma_alternative(qkv, 12, 0.125, False, True) is None   # segments: pointer kernel
    assert tma.tma_alternative(qkv[:, :64], 12, 0.125, False, False) is None
    monkeypatch.setattr(tma, "TensorDescriptor", None)                # an older triton
    assert tma.tma_alternative(qkv, 12, 0.125, False, False) is None
    monkeypatch.undo()
    monkeypatch.setattr(tma, "gpu_target", lambda device: A100)
    assert tma.tma_alternative(qkv, 12, 0.125, False, False) is None


def test_aot_specs_are_generated_from_the_table():
    specs = {s.name: s for s in attention_aot.aot_specs() if s.kernel is tma.attention_fwd_tma_kernel}
    expected = {f"attention_fwd_tma[{dt},D={d},BM={c[0]},BN={c[1]},w={c[2]},s={c[3]}]"
                for dt in ("float16", "bfloat16") for bucket, c in tma._TMA_CONFIGS.items()
                for d in attention_aot._AOT_HEAD_DIMS[bucket]}
    assert set(specs) == expected
    for s in specs.values():
        bd, bm, bn = s.constants["BLOCK_D"], s.constants["BLOCK_M"], s.constants["BLOCK_N"]
        assert s.archs == (90,) and s.signature["q_desc"].endswith(f"[1, {bm}, 1, {bd}]>")
        assert s.signature["kv_desc"].endswith(f"[1, {bn}, 1, {bd}]>")


def test_every_offered_config_is_compiled(monkeypatch):
    # The sweep of tests/test_attention_triton.py's table check, for the TMA forward: every
    # (N, head dim) it is offered at (head dims TMA can read: multiples of 8) has a build of
    # that tile in its head-dim bucket.
    monkeypatch.setattr(tma, "interpreting", lambda: False)
    compiled = {(s.constants["BLOCK_M"], s.constants["BLOCK_N"], s.num_warps, s.num_stages,
                 max(64, s.constants["BLOCK_D"])) for s in attention_aot.aot_specs()
                if s.kernel is tma.attention_fwd_tma_kernel}
    offered = 0
    for head_dim in range(8, 257, 8):
        for n in (1, 64, 65, 197, 257, 577, 1025):
            cfg = tma.tma_config(head_dim, n)
            if cfg is not None:
                offered += 1
                assert (*cfg, max(64, tma._block_d(head_dim))) in compiled, (head_dim, n, cfg)
    assert offered == 16 * 5  # head dims 8..128, the five lengths over 64


def test_measured_selection_times_the_tma_forward(monkeypatch):
    B, N, H, D = 2, 13, 2, 16
    monkeypatch.setenv("VIT_FAST_TUNE", "1")
    monkeypatch.setattr(attention_sdpa, "tma_offered",
                        lambda qkv, h, scale, dropout, segments: not (dropout or segments))
    qkv = _strided_qkv(B, N, H, D, torch.float32).contiguous()
    timer = FakeTimer({"triton": 2.0, "triton_tma": 1.0})
    with vit_fast.use_backend("triton"), tuning.use_tuner(
            tuning.Tuner(None, timer, measure_anywhere=True)):
        out = attention.fused_qkv_attention_op(qkv, H, D ** -0.5)[0]
        chosen = {r["op"]: r["choice"] for r in tuning.records()}
    assert chosen["attention_fwd"] == "triton_tma" and sorted(timer.timed) == ["triton", "triton_tma"]
    torch.testing.assert_close(out, attention_fwd(qkv, H, D ** -0.5)[0], rtol=1e-6, atol=1e-6)


def test_study_lists_todays_tiles_the_larger_ones_and_tma():
    from vit_fast.bench import attention_fwd_study as study
    from vit_fast.kernels import attention_config
    rows = study.study_specs(torch.bfloat16)
    names = [spec.name for _, _, spec in rows]
    assert len(names) == len(set(names)) == 2 * (1 + 3) + 2 * (1 + 2)
    for d in (64, 128):
        bm, bn, w, s = attention_config.shipped_config(("fwd", d, False))
        assert f"attention_fwd[bfloat16,D={d},BM={bm},BN={bn},w={w},s={s}]" in names
        assert f"attention_fwd_tma[bfloat16,D={d},BM={bm},BN={bn},w={w},s={s}]" in names
    for variant, config, spec in rows:  # each spec is the config it is listed with
        assert (spec.constants["BLOCK_M"], spec.constants["BLOCK_N"], spec.num_warps,
                spec.num_stages) == config
        assert (spec.kernel is tma.attention_fwd_tma_kernel) == (variant == "tma")
    # ViT-B/16, B = 64: Q and O once, K and V once for each of the two 128-query tiles, lse.
    assert study.traffic_mb((128, 64), 64) == pytest.approx(64 * 12 * (197 * 64 * 2 * 6 + 4 * 197) / 1e6)
    assert study.traffic_mb((64, 64), 64) > study.traffic_mb((128, 128), 64)
