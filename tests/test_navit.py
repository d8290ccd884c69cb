"""vit_fast.convert on packed variable-resolution models: vit-pytorch's NaViT and timm's NaFlexVit.

Converted, both pass per-token segment ids to the fused attention instead of a dense [B, 1, N, N]
mask. Checked here: same logits and parameter gradients as the originals (docs/design.md's
tolerance rule against the original in float64), packed images that cannot see each other, no
[.., N, N] tensor built or saved on the converted path (the originals build one: the check can
fail), and which attention path the Triton backend took.
"""
import copy
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vit_fast
from tests.tolerance import assert_close_by_rule
from vit_fast import dispatch
from vit_fast.bench.memory import count_saved

vit_pytorch = pytest.importorskip("vit_pytorch", reason="vit-pytorch is not installed "
                                  "(pip install -r requirements-dev.txt)")
from timm.models.naflexvit import NaFlexVit  # noqa: E402
from vit_pytorch.na_vit import NaViT  # noqa: E402

from vit_fast.naflexvit import FusedNaFlexVit, NaFlexBlock  # noqa: E402
from vit_fast.convert import why_not_fused  # noqa: E402
from vit_fast.navit import FusedNaViT  # noqa: E402

# dim_head 8, patch 4: the packed rows are 26 and 9 tokens, so N = 26 is no other dim's size.
NAVIT = dict(image_size=24, patch_size=4, num_classes=5, dim=24, depth=2, heads=3, dim_head=8,
             mlp_dim=40)
SIZES = [[(8, 12), (16, 20)], [(12, 12)]]   # row 0: 6 + 20 = 26 tokens; row 1: 9 (+17 padding)
N = 26


def _navit(**changes):
    torch.manual_seed(0)
    return NaViT(**{**NAVIT, **changes})


def _images(sizes=SIZES, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, h, w, generator=g).to(dtype) for h, w in row] for row in sizes]


def _grads(model):
    return [p.grad for p in model.parameters()]


def _check_against_original(model, converted, run):
    """run(model, dtype) -> output; outputs and every parameter gradient by the tolerance rule."""
    ref64 = copy.deepcopy(model).double()
    outs = {}
    for name, m, dtype in (("ours", converted, torch.float32), ("same", model, torch.float32),
                           ("ref64", ref64, torch.float64)):
        out = run(m, dtype)
        out.square().sum().backward()
        outs[name] = out
    assert_close_by_rule(outs["ours"], outs["same"], outs["ref64"], "logits")
    for (name, p), q, r in zip(model.named_parameters(), _grads(converted), _grads(ref64)):
        assert q is not None and p.grad is not None, name
        assert_close_by_rule(q, p.grad, r, f"grad of {name}")


class CreatedShapes(TorchDispatchMode):
    """Shapes of every tensor an aten op returns, except while ``paused``."""

    def __init__(self):
        super().__init__()
        self.shapes, self.paused = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    self.shapes.append((str(func), tuple(t.shape)))
        return out


def _square(shapes, n):
    return [s for s in shapes if len(s[1]) >= 2 and s[1][-2:] == (n, n)]


# --- NaViT -------------------------------------------------------------------------------------

def test_navit_convert_keeps_parameters_and_says_what_is_fused():
    model = _navit()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert vit_fast.convert(model) is model
    assert isinstance(model, FusedNaViT) and isinstance(model, NaViT)
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    s = model.vit_fast_summary
    assert s.swapped == ["transformer"]
    assert s.fused and "segment attention" in s.fused[0][1] and "RMS q/k norm" in s.fused[0][1]
    assert "attn_pool" in dict(s.left) and "stays eager" in str(s)
    assert vit_fast.convert(model).vit_fast_summary.already == ["transformer"]


def test_navit_matches_vit_pytorch_outputs_and_gradients():
    model = _navit().train()  # no dropout configured: training is deterministic
    converted = vit_fast.convert(copy.deepcopy(model))
    _check_against_original(model, converted, lambda m, dtype: m(_images(dtype=dtype)))


def test_navit_token_dropout_and_grouping_draw_as_vit_pytorch():
    # Token dropout draws one torch.randn per image, in NaViT's order; group_images packs a flat
    # list by NaViT's own grouping. Same seed, same kept tokens, same logits.
    model = _navit(token_dropout_prob=0.25).train()
    converted = vit_fast.convert(copy.deepcopy(model))
    flat = [image for row in _images() for image in row]
    outs = []
    for m in (model, converted):
        torch.manual_seed(3)
        outs.append(m(flat, group_images=True, group_max_seq_len=30))
    assert outs[0].shape == (3, NAVIT["num_classes"])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_navit_packed_images_do_not_see_each_other():
    model = vit_fast.convert(_navit().eval())
    images = _images()
    with torch.no_grad():
        before = model(images)
        images[0][1] = torch.randn_like(images[0][1]) * 3  # the second image of row 0 only
        after = model(images)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=1e-6)
    assert (after[1] - before[1]).abs().max() > 1e-3  # the changed image's logits did change


def test_navit_hooked_layer_runs_eager_with_the_same_result():
    model = vit_fast.convert(_navit().eval())
    with torch.no_grad():
        fused = model(_images())
    model.transformer.layers[0][0].to_q.register_forward_hook(lambda *a: None)
    assert model.transformer.why_not_fused()
    assert "transformer" in why_not_fused(model)
    with torch.no_grad():
        eager = model(_images())
    torch.testing.assert_close(eager, fused, rtol=1e-5, atol=1e-5)
    # An adapter swapped in after convert (a Linear subclass with its own forward) is called too.
    calls = []

    class Adapter(torch.nn.Linear):
        def forward(self, x):
            calls.append(1)
            return super().forward(x)
    model = vit_fast.convert(_navit().eval())
    old = model.transformer.layers[1][0].to_kv
    adapter = Adapter(old.in_features, old.out_features, bias=False)
    adapter.weight = old.weight
    model.transformer.layers[1][0].to_kv = adapter
    with torch.no_grad():
        torch.testing.assert_close(model(_images()), fused, rtol=1e-5, atol=1e-5)
    assert calls == [1]


@contextlib.contextmanager
def _launch_counter(monkeypatch):
    """Counts Triton attention_fwd launches (True: with segment ids), as the custom op calls it
    (through attention_sdpa, which picks between the kernel and SDPA)."""
    from vit_fast.ops import attention_sdpa as op
    calls = []
    real = op.attention_fwd

    def counted(*args, **kwargs):
        calls.append(kwargs.get("segment_ids") is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(op, "attention_fwd", counted)
    yield calls


def test_navit_triton_backend_matches_and_says_which_attention_ran(monkeypatch):
    model = _navit(depth=1).train()  # one layer: every kernel runs under the interpreter
    converted = vit_fast.convert(copy.deepcopy(model))
    qkv = torch.empty(1, N, 3 * NAVIT["heads"] * NAVIT["dim_head"])
    with vit_fast.use_backend("triton"):
        choice = dispatch.choose("fused_qkv_attention", [qkv], head_dim=NAVIT["dim_head"],
                                 dropout_p=0.0, segmented=True)
    with _launch_counter(monkeypatch) as launches:
        def run(m, dtype):
            if m is not converted:
                return m(_images(dtype=dtype))
            with vit_fast.use_backend("triton"):
                return m(_images(dtype=dtype))
        _check_against_original(model, converted, run)
    # The segment attention ran as the Triton kernel (under the interpreter), with the ids.
    assert choice.backend == "triton", choice.reasons
    assert launches == [True], launches


def _fake_cuda_forward(module, args_fn, dtype=torch.bfloat16):
    """Training forward of ``module`` on fake CUDA tensors with the Triton backend forced:
    (what autograd saved, the shapes every op created). The fake kernels' register_fake gives
    exactly what the CUDA kernels save (vit_fast/bench/memory.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call
    log = CreatedShapes()
    with FakeTensorMode(), vit_fast.use_backend("triton"):
        params = {k: torch.empty(v.shape, device="cuda", dtype=dtype).requires_grad_()
                  for k, v in module.named_parameters()}
        buffers = {k: torch.empty(v.shape, device="cuda", dtype=dtype)
                   for k, v in module.named_buffers()}
        args = args_fn(dtype)
        with count_saved(params.values()) as saved, log:
            functional_call(module, {**params, **buffers}, args)
    return saved, log.shapes


def test_navit_converted_path_builds_and_saves_no_n_by_n_tensor():
    # What the kernel path saves and creates, counted on fake CUDA tensors (the custom ops'
    # fake/autograd registrations say what the kernels save).
    model = vit_fast.convert(_navit().train())

    def images(dtype):
        return ([[torch.empty(3, h, w, device="cuda", dtype=dtype) for h, w in row]
                 for row in SIZES],)
    saved, created = _fake_cuda_forward(model, images)
    assert saved.bytes > 0 and any(s == (2, N) for s, _ in saved.shapes), saved.shapes  # the ids
    assert not [s for s, _ in saved.shapes if len(s) >= 2 and s[-2:] == (N, N)], saved.shapes
    assert not _square(created, N), _square(created, N)
    # vit-pytorch's own forward builds the [B, 1, N, N] mask: the check above can fail.
    log = CreatedShapes()
    with torch.no_grad(), log:
        _navit()(_images())
    assert (2, 1, N, N) in [s for _, s in _square(log.shapes, N)]


# --- NaFlexVit ---------------------------------------------------------------------------------

NAFLEX = {"map": dict(class_token=True, reg_tokens=1, global_pool="map"),
          "avg_key_only": dict(global_pool="avg", use_key_only_attn_mask=True),
          "qk_norm": dict(global_pool="avg", qk_norm=True)}  # timm LayerNorm q/k norms
NF = 21  # patches per sample; sample 1 has 8 valid, sample 2 all 21


def _naflex(kind, depth=2):
    torch.manual_seed(0)
    return NaFlexVit(embed_dim=24, depth=depth, num_heads=3, patch_size=4, num_classes=5,
                     pos_embed_grid_size=(5, 5), **NAFLEX[kind])


def _naflex_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    coord = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1)
    coord = coord.reshape(25, 2)[:NF].expand(2, NF, 2).clone()
    valid = torch.ones(2, NF, dtype=torch.bool)
    valid[0, 8:] = False
    return torch.randn(2, NF, 48, generator=g).to(dtype), coord, valid


@pytest.mark.parametrize("kind", list(NAFLEX))
def test_naflexvit_matches_timm_outputs_and_gradients(kind):
    model = _naflex(kind).train()
    converted = vit_fast.convert(copy.deepcopy(model))
    assert type(converted) is FusedNaFlexVit
    assert all(type(b) is NaFlexBlock for b in converted.blocks)
    assert "segment attention" in str(converted.vit_fast_summary)
    assert not why_not_fused(converted), why_not_fused(converted)  # every Block runs fused

    def run(m, dtype):
        patches, coord, valid = _naflex_batch(dtype)
        return m(patches, patch_coord=coord, patch_valid=valid)
    _check_against_original(model, converted, run)


def test_naflexvit_triton_backend_matches_with_the_segment_kernel(monkeypatch):
    model = _naflex("map", depth=1).train()  # one block: every kernel under the interpreter
    converted = vit_fast.convert(copy.deepcopy(model))

    def run(m, dtype):
        patches, coord, valid = _naflex_batch(dtype)
        with vit_fast.use_backend("triton") if m is converted else contextlib.nullcontext():
            return m(patches, patch_coord=coord, patch_valid=valid)
    with _launch_counter(monkeypatch) as launches:
        _check_against_original(model, converted, run)
    assert launches == [True], launches  # the block's attention: the Triton kernel, with ids


def test_naflexvit_valid_tokens_match_and_ignore_padding():
    model = _naflex("map").eval()
    converted = vit_fast.convert(copy.deepcopy(model))
    patches, coord, valid = _naflex_batch()
    with torch.no_grad():
        want = model.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]
        got = converted.forward_features(patches, patch_coord=coord, patch_valid=valid)["patches"]
        logits = converted(patches, patch_coord=coord, patch_valid=valid)
        patches[0, 8:] = torch.randn(NF - 8, 48) * 5  # padding content of sample 0 only
        again = converted(patches, patch_coord=coord, patch_valid=valid)
    keep = torch.cat((torch.ones(2, converted.num_prefix_tokens, dtype=torch.bool), valid), 1)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
    # timm's own forward_intermediates and gradient checkpointing run on the segment ids too.
    kw = dict(patch_coord=coord, patch_valid=valid, indices=2, output_fmt="NLC", output_dict=True)
    with torch.no_grad():
        inter = [m.forward_intermediates(patches, **kw)["image_intermediates"]
                 for m in (model, converted)]
    for a, b in zip(*inter):
        torch.testing.assert_close(b[valid], a[valid], rtol=1e-5, atol=1e-5)
    converted.set_grad_checkpointing(True)
    converted.train()(patches, patch_coord=coord, patch_valid=valid).sum().backward()
    assert all(p.grad is not None for p in converted.blocks.parameters())


def test_naflexvit_builds_no_n_by_n_mask_and_blocks_get_segment_ids(monkeypatch):
    # Real CPU tensors. The reference attention (what runs on CPU) builds its own mask inside the
    # op; outside it the converted model creates nothing [.., N, N] (timm builds the mask), and
    # the Blocks' attention receives segment ids.
    from vit_fast import reference
    model = _naflex("map").train()
    converted = vit_fast.convert(copy.deepcopy(model))
    patches, coord, valid = _naflex_batch()
    n = NF + converted.num_prefix_tokens
    log, ids = CreatedShapes(), []
    real = reference.fused_qkv_attention

    def inside_op(*args, segment_ids=None, **kwargs):
        ids.append(segment_ids)
        log.paused = True
        try:
            return real(*args, segment_ids=segment_ids, **kwargs)
        finally:
            log.paused = False
    monkeypatch.setattr(reference, "fused_qkv_attention", inside_op)
    with log:
        converted(patches, patch_coord=coord, patch_valid=valid).sum().backward()
    assert len(ids) == 2 and all(i is not None and tuple(i.shape) == (2, n) for i in ids)
    assert ids[0][0].tolist() == [0, 0] + [0] * 8 + [-1] * (NF - 8)
    assert not _square(log.shapes, n), _square(log.shapes, n)
    timm_log = CreatedShapes()
    with timm_log:
        model(patches, patch_coord=coord, patch_valid=valid)
    assert (2, 1, n, n) in [s for _, s in _square(timm_log.shapes, n)]


def test_naflex_block_segment_path_saves_no_n_by_n_tensor():
    from vit_fast.naflexvit import SegmentIds
    block = vit_fast.convert(_naflex("map")).blocks[0].train()
    n = NF + 2

    def args(dtype):
        ids = torch.zeros(2, n, dtype=torch.int32, device="cuda")
        return (torch.empty(2, n, 24, device="cuda", dtype=dtype, requires_grad=True),
                SegmentIds(ids))
    saved, created = _fake_cuda_forward(block, args)
    assert not [s for s, _ in saved.shapes if s[-2:] == (n, n)], saved.shapes
    assert not _square(created, n)


# --- vit_fast.Block with segment ids -------------------------------------------------------------

def test_block_segment_ids_fused_and_plain_paths_agree():
    block = vit_fast.Block(24, 3).eval()
    x = torch.randn(2, 11, 24)
    ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 6 + [-1] * 5])
    with torch.no_grad():
        fused = block.forward_segments(x, ids)
        block.attn.qkv.register_forward_hook(lambda *a: None)  # forces the plain path
        assert block.why_not_fused()
        plain = block.forward_segments(x, ids)
        alone = block.forward_segments(x[:1, 4:], ids[:1, 4:] * 0)  # image 1 of row 0 on its own
    real = ids >= 0
    torch.testing.assert_close(fused[real], plain[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids"):
        block.attn.attend(torch.randn(2, 11, 72), torch.ones(11, 11, dtype=torch.bool), False, ids)


# --- the benchmark -------------------------------------------------------------------------------

def test_bench_navit_counts_no_n_by_n_saved_and_less_than_eager():
    from vit_fast.bench import navit as bench
    layout = bench.packed_sizes(((16, 16), (24, 16), (32, 32)), 3)
    assert [len(r) for r in layout] == [3, 2, 1]
    eager, fast = bench.saved_rows(bench.TINY, layout)
    assert eager["impl"] == "vit-pytorch eager" and eager["n_by_n"] >= 1  # the mask as a bias
    assert fast["n_by_n"] == 0 and fast["bytes"] < eager["bytes"]


def test_bench_navit_cli_prints_labelled_cpu_and_counted_tables(capsys):
    from vit_fast.bench.cli import main
    assert main(["navit", "--tiny", "--rows", "2", "--iters", "1", "--warmup", "0",
                 "--modes", "infer"]) == 0
    out = capsys.readouterr().out
    assert "CPU measured" in out and "Counted (fake CUDA tensors" in out
    assert out.count("vit_fast") >= 2 and "gpu-check" in out


def test_gpu_kit_navit_rows_dry_run_and_report(tmp_path, monkeypatch):
    import sys

    from vit_fast.bench import gpu_check_report, navit
    from vit_fast.bench.gpu_check_bench import Recorder
    rec = Recorder(tmp_path / "models.json")
    # The reference ops: the kit's own dry run (test_gpu_check) runs these rows on the kernels.
    navit.add_gpu_kit_rows(rec, torch.device("cpu"), {"rounds": 2, "warmup": 0}, dry_run=True,
                           backend="reference")
    assert not rec.data["skipped"], rec.data["skipped"]
    assert [r["mode"] for r in rec.data["navit_rows"]] == ["train", "infer"]
    for r in rec.data["navit_rows"]:
        assert set(r["providers"]) == {"vit-pytorch eager", "vit_fast"}
        assert r["providers"]["vit_fast"]["max_abs_err"] < 0.05  # AMP bf16, both sides
    summary = "\n".join(gpu_check_report._models(rec.data))
    assert "NaViT (vit-pytorch)" in summary and "vs eager" in summary
    monkeypatch.setitem(sys.modules, "vit_pytorch", None)  # as if not installed
    navit.add_gpu_kit_rows(rec, torch.device("cpu"), {"rounds": 2, "warmup": 0}, dry_run=True)
    assert "vit-pytorch is not installed" in rec.data["skipped"][-1]


def test_naflexvit_rope_blocks_convert_and_take_segment_ids():
    """RoPE blocks (timm's EvaBlock) convert to vit_fast.EvaBlock, which takes the segment ids
    (tests/test_naflexvit_rope.py matches outputs and gradients); a configuration its converter
    does not handle (grouped-query attention) keeps the model's mask, named with the reason."""
    from timm.models.naflexvit import NaFlexVitCfg
    torch.manual_seed(0)
    model = NaFlexVit(NaFlexVitCfg(embed_dim=24, depth=2, num_heads=3, patch_size=4,
                                   rope_type="axial", global_pool="avg"), num_classes=5)
    summary = vit_fast.convert(model).vit_fast_summary
    assert not summary.left and type(model) is FusedNaFlexVit, str(summary)
    model = NaFlexVit(NaFlexVitCfg(embed_dim=24, depth=2, num_heads=3, patch_size=4,
                                   rope_type="axial", global_pool="avg", attn_type="rope",
                                   num_kv_heads=1, qkv_fused=False), num_classes=5)
    left = dict(vit_fast.convert(model).vit_fast_summary.left)
    assert "grouped-query" in left["blocks.0"] and "padding mask" in left["blocks"], left
    assert type(model) is NaFlexVit
