"""timm's transformer blocks other than vision_transformer.Block: converters, or why they stay.

convert() swaps timm's ``vision_transformer.Block`` itself (vit_fast/convert.py). Every other
transformer block timm builds -- EVA02 / DINOv3 / RoPE-ViT / PE-core's ``EvaBlock``, BEiT's
``Block``, CaiT's ``LayerScaleBlock``, Swin's, ... -- comes here: a converter registered for its
class replaces it, or convert leaves it as timm's and the summary says why, in the words of what
the block computes that vit_fast does not fuse yet.

The extension point is :func:`register_block_converter`: a converter for a block class takes
(block, model) and returns the replacement module, or a string saying why this block stays (its
configuration is one the converter does not handle). The EvaBlock / BEiT converters being built
with the RoPE and attention-bias kernels plug in there.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["register_block_converter", "is_transformer_block", "convert_or_reason"]

_CONVERTERS = {}  # "timm.models.eva.EvaBlock" -> converter(block, model) -> module | str


def _key(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def register_block_converter(block_class, converter):
    """Have convert() call ``converter(block, model)`` for every block of exactly ``block_class``
    (a class, or its "module.QualName"): it returns the module that replaces the block, or a str
    saying why this block is left as it is."""
    key = block_class if isinstance(block_class, str) else _key(block_class)
    _CONVERTERS[key] = converter


_QKV = {"qkv", "q_proj", "to_qkv", "qkv_proj", "kv"}


def _is_attention(m):
    """An attention module: named so, or holding q/k/v projections. (Channel attention in
    convolutional blocks -- SE, ECA, timm's ``attn`` slot in ByobNet -- holds neither.)"""
    children = set(m._modules)
    return ("attention" in type(m).__name__.lower() or bool(children & _QKV)
            or {"q", "k"} <= children)


def is_transformer_block(module) -> bool:
    """A timm module that is a transformer block: a ``...Block`` / ``...Layer`` class with an
    attention inside, or any block of vision_transformer.py (ParallelScalingBlock computes its
    attention inline)."""
    kind = type(module)
    name = kind.__name__
    if not kind.__module__.startswith("timm.") or not ("Block" in name or name.endswith("Layer")):
        return False
    if kind.__module__ == "timm.models.vision_transformer" and name.endswith("Block"):
        return True
    return any(_is_attention(sub) for sub in module.modules() if sub is not module)


# --- why a block stays timm's ---------------------------------------------------------------

def _mlp_words(mlp):
    kind = type(mlp).__name__
    words = []
    if kind in ("SwiGLU", "GluMlp", "SwiGLUPacked"):
        words.append(f"a gated MLP ({kind}: SiLU gate · value)")
    elif kind != "Mlp":
        words.append(f"its MLP is {kind}")
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        words.append("a LayerNorm inside the MLP")
    return words


def _eva_words(block, model):
    attn = block.attn
    words = []
    rope = getattr(model, "rope", None)
    if rope is not None:
        words.append(f"rotary position embeddings ({type(rope).__name__}) applied to q and k")
    if getattr(attn, "qkv", None) is None:
        words.append("separate q/k/v projections")
    if getattr(attn, "gate", None) is not None:
        words.append("a gated attention output")
    norm = getattr(attn, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        words.append("a LayerNorm on the attention output (scale_attn_inner)")
    if getattr(attn, "num_kv_heads", getattr(attn, "num_heads", None)) != attn.num_heads:
        words.append("grouped-query attention")
    return words + _mlp_words(block.mlp)


def _beit_words(block, model):
    attn = block.attn
    words = []
    if getattr(attn, "relative_position_bias_table", None) is not None:
        words.append("a learned relative position bias [H, N, N] added to the attention scores")
    if getattr(model, "rel_pos_bias", None) is not None:
        words.append("a relative position bias shared by all blocks, added to the attention scores")
    return words + _mlp_words(block.mlp)


def _generic_words(block):
    """What a block timm builds elsewhere visibly does that one fused attention does not."""
    words = []
    subs = list(block.modules())
    if any(getattr(m, "window_size", None) is not None for m in subs):
        words.append("windowed attention")
    if any(getattr(m, "relative_position_bias_table", None) is not None for m in subs):
        words.append("a relative position bias on the scores")
    return words


_KNOWN = {
    # class key: (what it is, words(block, model) -> the features vit_fast does not fuse yet)
    "timm.models.eva.EvaBlock": (
        "timm's EvaBlock (EVA02, DINOv3, RoPE-ViT, PE-core, NaFlexViT with RoPE)", _eva_words),
    "timm.models.eva.EvaBlockPostNorm": ("timm's EvaBlockPostNorm (post-norm EVA)",
                                         lambda b, m: ["norms after the branches (post-norm)"]
                                         + _eva_words(b, m)),
    "timm.models.beit.Block": ("BEiT's Block", _beit_words),
    "timm.models.cait.LayerScaleBlock": (
        "CaiT's LayerScaleBlock",
        lambda b, m: ["talking-heads attention (proj_l mixes the heads' scores before the "
                      "softmax, proj_w after it), which one fused softmax(q kᵀ)·v cannot do"]),
    "timm.models.cait.LayerScaleBlockClassAttn": (
        "CaiT's class-attention block",
        lambda b, m: ["class attention (only the class token queries the patch tokens: "
                      "cross-attention, not self-attention)"]),
}


def leave_reason(block, model) -> str:
    """Why ``block`` stays timm's, in words a user can act on."""
    kind = type(block)
    what, words = _KNOWN.get(_key(kind), (None, None))
    if what is None:
        if kind.__module__ == "timm.models.vision_transformer":
            return f"timm's {kind.__name__} is not the Block vit_fast fuses; left as it is"
        seen = _generic_words(block)
        return (f"timm's {kind.__name__} ({kind.__module__}) is not a block vit_fast converts"
                + (f" ({'; '.join(seen)})" if seen else "")
                + "; it runs as timm's (vit_fast fuses timm's vision_transformer.Block)")
    found = words(block, model)
    if not found:
        return f"{what}: no converter for it yet; it runs as timm's"
    return f"{what}: not fused yet: {'; '.join(found)}. It runs as timm's"


def convert_or_reason(block, model):
    """(replacement module, '') from a registered converter, or (None, why it stays timm's)."""
    converter = _CONVERTERS.get(_key(type(block)))
    if converter is not None:
        out = converter(block, model)
        if isinstance(out, nn.Module):
            return out, ""
        return None, str(out)
    return None, leave_reason(block, model)
