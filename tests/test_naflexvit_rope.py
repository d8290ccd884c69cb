"""timm's NaFlexViT with rotary embeddings (its blocks are timm's EvaBlock) converted: the blocks
become vit_fast.EvaBlock and get segment ids from patch_valid instead of timm's [B, 1, N, N]
padding mask, with timm's per-sample rope tensor ([B, 1, N', 2D] axial, [B, H, N', 2D] mixed).
Logits and every parameter gradient match timm's (the tolerance rule against float64), on the
reference backend and on the Triton kernels under the interpreter."""
import contextlib
import copy

import pytest
import torch
from timm.models.naflexvit import NaFlexVit

import vit_fast
from tolerance import assert_close_by_rule
from vit_fast import functional
from vit_fast.eva_block import EvaBlock
from vit_fast.naflexvit import FusedNaFlexVit

NF = 25  # patches per sample: sample 0 a 2x4 image and 17 padding, sample 1 a 5x5 image


def _model(rope_type):
    torch.manual_seed(0)
    return NaFlexVit(embed_dim=32, depth=1, num_heads=2, patch_size=4, num_classes=5,
                     pos_embed="none", rope_type=rope_type, attn_type="rope", class_token=True,
                     reg_tokens=1, global_pool="avg").train()


def _batch(dtype):
    g = torch.Generator().manual_seed(2)
    grid = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij"), -1)
    coord = grid.reshape(25, 2).expand(2, NF, 2).clone()
    coord[0] = 0
    coord[0, :8] = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(4), indexing="ij"),
                               -1).reshape(8, 2)
    valid = torch.ones(2, NF, dtype=torch.bool)
    valid[0, 8:] = False
    return torch.randn(2, NF, 48, generator=g).to(dtype), coord, valid


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rope_type", ["axial", "mixed"])
def test_naflexvit_rope_converts_to_segment_attention_and_matches(rope_type, backend,
                                                                   monkeypatch):
    model = _model(rope_type)
    converted = vit_fast.convert(copy.deepcopy(model))
    assert type(converted) is FusedNaFlexVit, str(converted.vit_fast_summary)
    assert all(type(b) is EvaBlock for b in converted.blocks)
    assert not vit_fast.convert.why_not_fused(converted.blocks)
    ids = []
    real = functional.fused_qkv_attention

    def seen(*a, segment_ids=None, **kw):
        ids.append(segment_ids)
        return real(*a, segment_ids=segment_ids, **kw)
    monkeypatch.setattr(functional, "fused_qkv_attention", seen)
    ref64 = copy.deepcopy(model).double()
    outs = {}
    for name, m, dtype in (("ours", converted, torch.float32), ("same", model, torch.float32),
                           ("ref64", ref64, torch.float64)):
        patches, coord, valid = _batch(dtype)
        with vit_fast.use_backend(backend) if m is converted else contextlib.nullcontext():
            out = m(patches, patch_coord=coord, patch_valid=valid)
        out.square().sum().backward()
        outs[name] = out
    assert len(ids) == 1 and ids[0] is not None and ids[0][0, -1] == -1  # ids, not a mask
    assert_close_by_rule(outs["ours"], outs["same"], outs["ref64"], "logits")
    for (name, p), q, r in zip(model.named_parameters(), converted.parameters(),
                               ref64.parameters()):
        assert q.grad is not None and p.grad is not None, name
        assert_close_by_rule(q.grad, p.grad, r.grad, f"grad of {name}")
