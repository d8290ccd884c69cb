"""A model with non-trivial LayerNorm parameters and its copy converted by vit_fast.convert."""
import copy

import torch

import vit_fast


def converted_copy(original):
    """(vit_fast.convert of a deep copy, original), the original's LayerNorms given weights in
    [0.5, 1.5] and biases in [-0.5, 0.5] first (identity LayerNorms hide mistakes)."""
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return vit_fast.convert(copy.deepcopy(original)), original
