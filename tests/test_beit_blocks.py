"""BEiT's Block converted fused (vit_fast/beit_block.py): a tiny beit_base_patch16_224 matches
timm's outputs and gradients in fp32 -- the relative position bias table's included, through
the [H, N, N] bias the attention op differentiates -- on the reference backend and on the
Triton kernels under the interpreter, in train (dropout 0) and eval."""
import pytest
import torch

import vit_fast
from block_match import check, pair
from vit_fast.beit_block import BeitBlock


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_converted_beit_matches_timm(backend, train, monkeypatch):
    calls, ours = check("beit_base_patch16_224", backend, train, BeitBlock, monkeypatch,
                        init_values=0.1)
    assert "gelu_mlp" in calls


def test_the_bias_table_gets_its_gradient_and_keys_stay():
    theirs, ours, _ = pair("beit_base_patch16_224", init_values=0.1)
    assert "blocks.0.attn.relative_position_bias_table" in ours.state_dict()
    assert "blocks.0.gamma_1" in ours.state_dict()
    with vit_fast.use_backend("triton"):
        ours.forward_features(torch.randn(2, 3, 32, 32)).square().sum().backward()
    table = ours.blocks[0].attn.relative_position_bias_table
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_swiglu_beit_block_fuses_the_gated_mlp(monkeypatch):
    calls, _ = check("beit_base_patch16_224", "triton", True, BeitBlock, monkeypatch,
                     init_values=0.1, swiglu_mlp=True, scale_mlp=True)
    assert "glu_mlp" in calls


def test_autocast_bf16_within_the_tolerance_rule():
    from block_match import check_amp
    check_amp("beit_base_patch16_224", init_values=0.1)


@pytest.mark.parametrize("own_table", [False, True])
def test_the_models_shared_relative_position_bias(own_table, monkeypatch):
    """BEiT's use_shared_rel_pos_bias: the model's bias, alone or added to each block's own."""
    check("beit_base_patch16_224", "triton", True, BeitBlock, monkeypatch, init_values=0.1,
          use_shared_rel_pos_bias=True, use_rel_pos_bias=own_table)
