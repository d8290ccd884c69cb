"""AMP training runs vit_fast.Block's kernel path (issue 16): fp32 residual stream inside the kernels.

Under torch.autocast (CPU here, triton backend forced, kernels under the Triton interpreter) the
Block runs vit_fast::layer_norm_linear and vit_fast::residual_layer_norm_mlp with fp32 x and
LayerNorm parameters and the GEMM weights cast once to the autocast dtype. Checked against timm's
Block under the same autocast by the FlashAttention rule (fp32 -> float64 reference), what is
saved, the weight cast cache, and the ViT-B/16 AMP memory ratio.
bf16 and fp16 are both held to the rule: the interpreter's fp32->bf16 casts round to nearest even
as compiled kernels do (tests/interpreter_rounding.py, applied by tests/conftest.py).
"""
import copy
import gc
import os
import weakref

import pytest
import timm.models.vision_transformer as tvit
import torch

import vit_fast
from vit_fast import fused_block_ops
from vit_fast.bench.memory import measure
from vit_fast.modules import Block

from tolerance import FLOOR

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="TRITON_INTERPRET=1 is not set (tests/conftest.py sets it "
                                       "before triton is imported)")


def _run(block, x, gy, backend, amp):
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(3)  # the same drop-path draws in every run
    with vit_fast.use_backend(backend), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = block(x)
    out.float().backward(gy.to(out.dtype) if out.dtype != torch.float32 else gy)
    return out.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def _close(ours, timm_amp, ref, name):
    ours, timm_amp, ref = ours.double(), timm_amp.double(), ref.double()
    scale = max(ref.abs().max().item(), 1.0)
    bound = 2 * (timm_amp - ref).abs().max().item() + FLOOR[torch.float16] * scale
    err = (ours - ref).abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(qkv_bias=True), dict(init_values=0.5, mlp_ratio=2.5),
                                dict(init_values=0.5, drop_path=0.5)])
def test_amp_block_matches_timm_amp(amp, kw):
    torch.manual_seed(0)
    B, N, C = 2, 9, 32
    ours = Block(C, 2, **kw).train()
    with torch.no_grad():
        for n in (ours.norm1, ours.norm2):
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.5, 0.5)
    theirs = tvit.Block(C, 2, **kw).train()
    theirs.load_state_dict(ours.state_dict())
    x, gy = torch.randn(B, N, C), torch.randn(B, N, C)
    with vit_fast.use_backend("triton"), torch.autocast("cpu", dtype=amp):
        assert ours._rebuilds_ln_outputs(x), ours.why_not_fused()
    got = _run(ours, x, gy, "triton", amp)
    assert got[0].dtype == torch.float32  # the stream stays fp32
    timm_amp = _run(theirs, x, gy, "reference", amp)
    ref = _run(copy.deepcopy(theirs).double(), x.double(), gy.double(), "reference", None)
    _close(got[0], timm_amp[0], ref[0], "out")
    _close(got[1], timm_amp[1], ref[1], "dx")
    for name, g in ref[2].items():
        assert got[2][name] is not None and got[2][name].dtype == torch.float32, name
        _close(got[2][name], timm_amp[2][name], g, f"d{name}")


def test_amp_weight_cast_once_per_version():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fused_block_ops.amp_weight(w, torch.bfloat16)
        assert a.dtype == torch.bfloat16 and fused_block_ops.amp_weight(w, torch.bfloat16) is a
        assert fused_block_ops.amp_weight(w, torch.float16) is not a  # not autocast's dtype
        with torch.no_grad():
            w.add_(1.0)  # an optimizer step: the cast must follow it
        b = fused_block_ops.amp_weight(w, torch.bfloat16)
        assert torch.equal(b, w.detach().to(torch.bfloat16))


@pytest.fixture(params=["extension", "python"])
def amp_cast_path(request, monkeypatch):
    """AmpWeights' casts through vit_fast._C (csrc/amp_casts.cpp) where it loaded, and the Python
    path it replaces (the probe matmul, a .to() per weight)."""
    from vit_fast import amp_weights
    if request.param == "extension" and amp_weights._CAST_ALL is None:
        pytest.skip("vit_fast._C not loaded: the Python path only")
    if request.param == "python":
        monkeypatch.setattr(amp_weights, "_CACHED_CAST", None)
        monkeypatch.setattr(amp_weights, "_CAST_ALL", None)
    return request.param


def test_amp_weight_casts_are_freed_when_the_autocast_region_exits(amp_cast_path):
    """Like autocast's weight cache: one cast per parameter for the region, shared by every call
    in it, gone once the region exits and the graph that saved it is freed (no later call or
    clear needed)."""
    torch.manual_seed(0)
    blk = Block(32, 2, qkv_bias=True).train()
    weights = [blk.attn.qkv.weight, blk.attn.qkv.bias, blk.mlp.fc1.weight, blk.mlp.fc1.bias,
               blk.mlp.fc2.weight, blk.mlp.fc2.bias]
    x = torch.randn(2, 5, 32)
    with vit_fast.use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        assert blk._rebuilds_ln_outputs(x), blk.why_not_fused()
        out = blk(x)
        casts = [fused_block_ops.amp_weight(w, torch.bfloat16) for w in weights]
        blk(x).sum().backward()  # a second call in the region takes the same casts
        assert all(fused_block_ops.amp_weight(w, torch.bfloat16) is c
                   for w, c in zip(weights, casts))
        refs = [weakref.ref(c) for c in casts]
        del casts
    # out's graph still holds the weight matrices (its dx needs them)
    assert all(refs[i]() is not None for i in (0, 2, 4))
    out.sum().backward()
    del out
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert fused_block_ops._casts() == {}  # the weak entries went with them
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a new region casts afresh
        c = fused_block_ops.amp_weight(weights[0], torch.bfloat16)
        assert c is not None and fused_block_ops.amp_weight(weights[0], torch.bfloat16) is c
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another region: another cast
        assert fused_block_ops.amp_weight(weights[0], torch.bfloat16) is not c


def test_vit_b16_block_amp_memory_ratio():
    # batch 64 as the issue counts it (fake tensors: no memory is used); the weight casts autograd
    # saves (as eager's) weigh more at smaller batches.
    rows, notes = measure("vit_base_patch16_224", batch=64, what=("block",), amp=True)
    by_impl = {r["impl"]: r for r in rows}
    assert "vit_fast" in by_impl, notes
    assert by_impl["vit_fast"]["ratio"] <= 0.68, by_impl["vit_fast"]


@pytest.mark.parametrize("which", ["layer_norm_linear", "residual_layer_norm_mlp"])
def test_amp_opcheck(which):
    """The mixed-dtype contract's fake shapes/dtypes, schema and autograd registration."""
    from vit_fast.ops import layer_norm_linear as lnl, residual_layer_norm_mlp as rlm
    B, N, C, H, lp = 2, 5, 16, 24, torch.bfloat16

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)
    if which == "layer_norm_linear":
        op, args = lnl.layer_norm_linear_op, (t(B, N, C), t(C), t(C), 1e-6, t(3 * C, C, dtype=lp),
                                              t(3 * C, dtype=lp))
    else:
        op, args = rlm.residual_layer_norm_mlp_op, (
            t(B, N, C, dtype=lp), t(B, N, C), t(C), torch.tensor([2.0, 0.0]), t(C), t(C), 1e-6,
            t(H, C, dtype=lp), t(H, dtype=lp), t(C, H, dtype=lp), t(C, dtype=lp), "none", t(C),
            None, True)
    out = op(*args)
    assert out[0].dtype == (lp if which == "layer_norm_linear" else torch.float32)
    torch.library.opcheck(op, args)


def test_amp_rejects_mixed_dtypes_outside_the_contract():
    from vit_fast.ops import residual_layer_norm_mlp as rlm
    B, N, C, H = 1, 3, 8, 8
    x, res = torch.randn(B, N, C), torch.randn(B, N, C, dtype=torch.bfloat16)  # stream not fp32
    w1, w2 = torch.randn(H, C), torch.randn(C, H)
    with pytest.raises((ValueError, TypeError), match="residual"):
        rlm.residual_layer_norm_mlp_op(x, res, None, None, None, None, 1e-6, w1, None, w2, None,
                                       "none", None, None, False)


def _train(model, amp, steps, init_scale):
    """Losses and skipped steps of SGD under autocast(amp) + GradScaler on a fixed batch stream."""
    torch.manual_seed(1)
    data = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    losses, scales = [], []
    with vit_fast.use_backend("triton"):
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            scales.append(scaler.get_scale())
    return losses, scales


def test_fp16_amp_grad_scaler_training_tracks_timm():
    from tiny_models import tiny_vit
    # LayerScale 0.1: fc2's backward must cast g·ls2 to fp16 as eager does, not g (which would
    # overflow at a 10x smaller scale and skip a step eager takes).
    timm_model = tiny_vit(depth=2, init_values=0.1).train()
    ours = vit_fast.convert(copy.deepcopy(timm_model)).train()
    assert not ours.blocks[0].why_not_fused()
    before = [p.detach().clone() for p in ours.parameters()]
    # 2^18 overflows fp16 in the first backwards: that step must be found (inf) and skipped.
    got_loss, got_scale = _train(ours, torch.float16, 4, init_scale=2.0 ** 18)
    want_loss, want_scale = _train(timm_model, torch.float16, 4, init_scale=2.0 ** 18)
    assert got_scale[0] < 2.0 ** 18 and got_scale == want_scale  # same steps skipped
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, ours.parameters()))
    for p in ours.parameters():
        assert torch.isfinite(p).all()
    assert max(abs(a - b) for a, b in zip(got_loss, want_loss)) < 2e-2, (got_loss, want_loss)
    assert got_loss[-1] < got_loss[0]


def test_amp_block_under_inference_mode():
    """Under torch.inference_mode autograd records nothing (so no cast can be read off a graph):
    the weights are cast per call there, and the output is the one outside inference mode."""
    torch.manual_seed(0)
    blk = Block(32, 2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 32)
    with vit_fast.use_backend("triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
            got = blk(x)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            want = blk(x)
    assert torch.equal(got, want)


def test_amp_cast_group_reuses_like_the_per_weight_cache(amp_cast_path):
    """AmpWeights.cast_group (the Block step's eight GEMM parameters as one entry): the casts of
    the region are reused while every parameter is the same at the same version and every cast
    is alive; a new region, an optimizer step, another tensor or a freed cast casts afresh; a
    tensor that is not an fp32 leaf is cast per call, as autocast does."""
    from vit_fast.amp_weights import AmpWeights
    cache, bf = AmpWeights(), torch.bfloat16
    holder = type("Holder", (), {"casts": None})()
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    with torch.autocast("cpu", dtype=bf):
        region = cache.region(w.device, bf)
        first = cache.cast_group((w, None, b), bf, region, holder)
        assert first[1] is None and first[0].dtype == bf and torch.equal(first[2], b.to(bf))
        again = cache.cast_group((w, None, b), bf, cache.region(w.device, bf), holder)
        assert again[0] is first[0] and again[2] is first[2]
        with torch.no_grad():
            w.add_(1.0)
        stepped = cache.cast_group((w, None, b), bf, region, holder)
        assert stepped[0] is not first[0] and torch.equal(stepped[0], w.detach().to(bf))
        other = torch.nn.Parameter(w.detach().clone())
        assert cache.cast_group((other, None, b), bf, region, holder)[0] is not stepped[0]
        kept = cache.cast_group((w, None, b), bf, region, holder)
        del first, again, stepped, kept
        gc.collect()
        fresh = cache.cast_group((w, None, b), bf, region, holder)  # the casts were freed
        assert torch.equal(fresh[0], w.detach().to(bf))
        derived = w * 1.0  # not a leaf: cast every call
        assert cache.cast_group((derived, None, b), bf, region, holder)[0] is not \
            cache.cast_group((derived, None, b), bf, region, holder)[0]
    with torch.autocast("cpu", dtype=bf):  # another region
        assert cache.cast_group((w, None, b), bf, cache.region(w.device, bf), holder)[0] \
            is not fresh[0]
