"""Bytes saved for backward (activation memory of training), counted, not modelled.

Every tensor autograd saves goes through ``torch.autograd.graph.saved_tensors_hooks``; the count is
the sum of the *unique storages* they live in (a view saved twice, or q/k/v slices of one qkv
buffer, count once), parameters excluded (they are resident anyway).

Two ways to run it:
- ``fake-cuda`` (default): the model runs on fake CUDA tensors (FakeTensorMode, no GPU, no data)
  with the ``triton`` backend forced. The custom ops' ``register_fake`` gives the exact shapes and
  dtypes their CUDA kernels save, so this counts what the kernel path saves at full size. timm's
  eager attention is counted as PyTorch's flash SDPA (what it picks on sm80+ in fp16/bf16), which
  saves q, k, v, out and the fp32 logsumexp.
- ``cpu``: real tensors on this CPU with the backend policy in force (``auto`` = reference ops).

``amp=True`` counts mixed-precision training as timm's train.py --amp runs it: fp32 parameters and
input, the forward under ``torch.autocast(dtype)``; units stay B·N·C·(autocast dtype's size).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("fake-cuda", "cpu")


@dataclasses.dataclass
class Saved:
    bytes: int          # unique storages, parameters excluded
    tensors: int        # saved tensors (before de-duplication), parameters excluded
    shapes: list        # (shape, dtype) of each unique storage's first saved tensor


@contextlib.contextmanager
def count_saved(params=()):
    """Collects what autograd saves inside the block; the result is filled in on exit."""
    param_storages = {p.untyped_storage()._cdata for p in params}
    held = []  # keeps saved tensors alive so storage ids are not reused while counting
    result = Saved(0, 0, [])

    def pack(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in param_storages:
            held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    seen = set()
    for t in held:
        st = t.untyped_storage()
        key = st._cdata
        result.tensors += 1
        if key not in seen:
            seen.add(key)
            result.bytes += st.nbytes()
            result.shapes.append((tuple(t.shape), str(t.dtype).replace("torch.", "")))


@contextlib.contextmanager
def flash_sdpa():
    """F.scaled_dot_product_attention as the flash kernel for fake CUDA fp16/bf16 tensors.

    Without a GPU, SDPA's backend choice falls back to the math path (which saves the N×N
    probabilities); on a real sm80+ GPU it runs flash attention. This picks flash explicitly so
    eager timm is counted as it runs on the GPU.
    """
    orig = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and attn_mask is None
                and dropout_p == 0.0 and not kw):
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, is_causal, False, scale=scale)[0]
        return orig(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


@contextlib.contextmanager
def _autocast(device, dtype, amp):
    """Autocast to ``dtype`` on ``device`` when counting AMP, else nothing.

    Set through autocast's state functions, not torch.autocast, which disables itself for "cuda"
    when no GPU is present -- the fake CUDA tensors need CUDA's autocast rules all the same.
    """
    if not amp:
        yield
        return
    enabled, old = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, old)


def _run_fake(module, x_shape, dtype, amp=False, backend="triton"):
    """Forward of ``module`` on fake CUDA params/input (training mode); what autograd saves.
    With ``amp`` the params and input are fp32 and the forward runs under autocast(dtype).
    ``backend``: the kernel policy forced ('triton', or 'cublas' for the cuBLAS-GEMM MLP)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.func import functional_call

    import vit_fast

    store = torch.float32 if amp else dtype
    with FakeTensorMode(), vit_fast.use_backend(backend), flash_sdpa():
        params = {k: torch.empty(v.shape, device="cuda", dtype=store).requires_grad_(v.requires_grad)
                  for k, v in module.named_parameters()}
        # float buffers (EVA/BEiT's k_bias, a rope table) in the parameters' dtype, as .to() casts them
        buffers = {k: torch.empty(v.shape, device="cuda",
                                  dtype=store if v.is_floating_point() else v.dtype)
                   for k, v in module.named_buffers()}
        x = torch.empty(x_shape, device="cuda", dtype=store, requires_grad=True)
        with count_saved(params.values()) as saved, _autocast("cuda", dtype, amp):
            functional_call(module, {**params, **buffers}, (x,))
    return saved


def _run_cpu(module, x_shape, dtype, amp=False, backend=None):
    store = torch.float32 if amp else dtype
    module = module.to(store)
    x = torch.randn(x_shape, dtype=store, requires_grad=True)
    with count_saved(list(module.parameters())) as saved, _autocast("cpu", dtype, amp):
        module(x)
    return saved


class BlockWithRope(nn.Module):
    """A rotary-embedding block (timm's EvaBlock: EVA02, DINOv3, RoPE-ViT, PE-core) called as its
    model calls it: with the model's rope tensor (cat([sin, cos], -1), a buffer here: counted as
    the model's rope module makes it, not as block input)."""

    def __init__(self, block, rope):
        super().__init__()
        self.block = block
        self.register_buffer("rope", rope)

    def forward(self, x):
        return self.block(x, rope=self.rope)


def _first_block(model):
    """The model's first block as a module of x alone (with its rope, for EvaBlock models)."""
    block = copy.deepcopy(model.blocks[0])
    rope = getattr(model, "rope", None)
    if rope is None:
        return nn.Sequential(block)
    embed = rope.get_embed(shape=model.patch_embed.grid_size).detach()
    if embed.dim() == 4 and embed.shape[0] == len(model.blocks):  # mixed: one table per block
        embed = embed[0]
    return BlockWithRope(block, embed)


def measure(model_name="vit_base_patch16_224", batch=64, dtype=torch.bfloat16, method="fake-cuda",
            what=("block", "model"), amp=False, backend="triton"):
    """Rows of {scope, impl, bytes, tensors, units, ratio, method, amp} for the block and model.

    units: bytes / (B·N·C·element size), docs/design.md's unit of one activation.
    """
    import timm

    import vit_fast

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    run = _run_fake if method == "fake-cuda" else _run_cpu
    rows, notes = [], []
    e = torch.finfo(dtype).bits // 8
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False)
    C = model.embed_dim
    N = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
    img = model.patch_embed.img_size
    for scope in what:
        if scope == "block":  # the model's first block, on its own: input [B, N, C]
            timm_mod, shape = _first_block(model), (batch, N, C)
        elif scope == "model":
            timm_mod, shape = model, (batch, 3, img[0], img[1])
        else:
            raise ValueError(f"scope must be 'block' or 'model', got {scope!r}")
        timm_mod.train()
        patch = True
        if scope == "model" and method == "fake-cuda":
            from vit_fast import dispatch
            why = dispatch.extension_missing_reason("cuda")
            if why:
                patch = False
                notes.append(f"model: patch embed left as timm's Conv2d under fake CUDA ({why}); "
                             "both save the images and the weight")
        fast_mod = vit_fast.convert(copy.deepcopy(timm_mod), patch_embed=patch)
        unit = batch * N * C * e
        base = None
        for impl, mod in (("timm eager", timm_mod), ("vit_fast", fast_mod)):
            try:
                saved = run(mod, shape, dtype, amp, backend)
            except Exception as exc:  # a kernel op missing or broken: say so, keep the other rows
                notes.append(f"{scope}/{impl}: not counted ({type(exc).__name__}: {exc})")
                continue
            base = saved.bytes if impl == "timm eager" else base
            rows.append({"scope": scope, "impl": impl, "bytes": saved.bytes, "tensors": saved.tensors,
                         "units": saved.bytes / unit,
                         "ratio": (saved.bytes / base) if base else float("nan"),
                         "method": method, "amp": amp, "shapes": saved.shapes})
    return rows, notes
