"""C++/CUDA backend of ``patch_embed``: ops vit_fast::patch_embed_* from the extension vit_fast._C.

The schemas and the CPU/CUDA kernels are C++ (csrc/); this file adds what torch.compile and
autograd need: ``register_fake`` for every op and ``register_autograd`` for the forward.
Backward: d images = scatter(grad @ weight2d) (float images only), d weight = gradᵀ @ gather(images),
d bias = Σ_{b,p} grad, d pos_embed = Σ_b grad. mean/std (uint8 input) get no gradient.

If the extension is missing or fails to load, importing this module still works: it warns once,
``extension_available()`` is False, ``extension_error()`` says why, and
``vit_fast.functional`` takes the reference path.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["patch_embed", "extension_available", "extension_has_cuda", "extension_error"]

try:
    from vit_fast import _C  # noqa: F401  (loading the library registers the ops)
    _IMPORT_ERROR: str | None = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _IMPORT_ERROR = f"vit_fast._C could not be loaded ({type(exc).__name__}: {exc})"
    warnings.warn(f"vit_fast: {_IMPORT_ERROR}; patch_embed uses the reference path", RuntimeWarning,
                  stacklevel=2)


def extension_available() -> bool:
    """True when vit_fast._C loaded (its CPU kernels are always there when it did)."""
    return _IMPORT_ERROR is None


def extension_has_cuda() -> bool:
    """True when vit_fast._C was built with its CUDA kernels (it says nothing about a GPU being present)."""
    return extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "vit_fast::patch_embed_fwd", "CUDA")


def extension_error() -> str | None:
    """Why vit_fast._C is unavailable, or None when it loaded."""
    return _IMPORT_ERROR


def _as_channel_vector(v, channels, device):
    """mean/std (sequence, scalar or tensor) as the fp32 [C] tensor on `device` the C++ op expects."""
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=device)
    return t.expand(channels).contiguous() if t.dim() == 0 else t.reshape(channels)


def patch_embed(images, weight, bias, patch_size, pos_embed, mean, std) -> torch.Tensor:
    """[B, C, H, W] float (or uint8 [B, H, W, C] with mean/std) -> [B, Np, D]; see DESIGN.md.

    Inputs are assumed validated by vit_fast.functional; the C++ op checks shapes again.
    """
    if not extension_available():
        raise RuntimeError(f"vit_fast: {_IMPORT_ERROR}")
    ph, pw = patch_size
    channels = weight.shape[1]
    if channels == 0:  # no pixels to gather: the output is the bias (+ pos_embed), as conv2d gives
        from vit_fast import reference
        return reference.patch_embed(images, weight, bias, patch_size=(ph, pw), pos_embed=pos_embed,
                                     mean=mean, std=std)
    mean = _as_channel_vector(mean, channels, images.device)
    std = _as_channel_vector(std, channels, images.device)
    return torch.ops.vit_fast.patch_embed_fwd(images, weight, bias, [ph, pw], pos_embed, mean, std)


def _geometry(images, patch_size):
    u8 = images.dtype == torch.uint8
    B, H, W = images.shape[0], images.shape[1 if u8 else 2], images.shape[2 if u8 else 3]
    return B, H // patch_size[0], W // patch_size[1]


if extension_available():

    @torch.library.register_fake("vit_fast::patch_embed_fwd")
    def _patch_embed_fwd_fake(images, weight, bias, patch_size, pos_embed, mean, std):
        B, Hp, Wp = _geometry(images, patch_size)
        return images.new_empty((B, Hp * Wp, weight.shape[0]), dtype=weight.dtype)

    @torch.library.register_fake("vit_fast::patch_embed_bwd_images")
    def _patch_embed_bwd_images_fake(grad_out, images, weight, patch_size):
        return torch.empty(images.shape, dtype=images.dtype, device=images.device)

    @torch.library.register_fake("vit_fast::patch_embed_bwd_weight")
    def _patch_embed_bwd_weight_fake(grad_out, images, weight, patch_size, mean, std):
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)

    def _setup_context(ctx, inputs, output):
        images, weight, bias, patch_size, pos_embed, mean, std = inputs
        ctx.patch_size = list(patch_size)
        need_images, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # images are needed for the weight gradient and (shape only) for the images gradient.
        ctx.save_for_backward(images if (need_images or need_weight) else None,
                              weight if (need_images or need_weight) else None, mean, std)

    def _backward(ctx, grad):
        images, weight, mean, std = ctx.saved_tensors
        d_images = d_weight = d_bias = d_pos = None
        if ctx.needs_input_grad[0] and images.is_floating_point():
            d_images = torch.ops.vit_fast.patch_embed_bwd_images(grad, images, weight, ctx.patch_size)
        if ctx.needs_input_grad[1]:
            d_weight = torch.ops.vit_fast.patch_embed_bwd_weight(grad, images, weight, ctx.patch_size, mean, std)
        if ctx.needs_input_grad[2]:
            d_bias = grad.sum((0, 1))
        if ctx.needs_input_grad[4]:
            d_pos = grad.sum(0, keepdim=True)
        return d_images, d_weight, d_bias, None, d_pos, None, None

    torch.library.register_autograd("vit_fast::patch_embed_fwd", _backward, setup_context=_setup_context)
