"""C++/CUDA backend of ``patch_embed``: ops vit_fast::patch_embed_* from the extension vit_fast._C.

The schemas and the CPU/CUDA kernels are C++ (csrc/); this file adds what torch.compile and
autograd need: ``register_fake`` for every op and ``register_autograd`` for the forward.
Backward: d images = scatter(grad @ weight2d) (float images only), d weight = gradᵀ @ gather(images),
d bias = Σ_{b,p} grad, d pos_embed = Σ_b grad. A backward that must be differentiable itself
(create_graph=True) and learnable mean/std (uint8 input) take autograd of the reference instead,
so second-order gradients and the mean/std gradients are the reference's.

If the extension is missing or fails to load, importing this module still works: it warns once,
``extension_available()`` is False, ``extension_error()`` says why, and
``vit_fast.functional`` takes the reference path.
"""
from __future__ import annotations

import warnings

import torch

from . import checks

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
    if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device == device \
            and v.shape == (channels,):
        return v  # already what the op takes (vit_fast.functional made it, once)
    t = torch.as_tensor(v, dtype=torch.float32, device=device)
    return t.expand(channels).contiguous() if t.dim() == 0 else t.reshape(channels)


def patch_embed(images, weight, bias, patch_size, pos_embed, mean, std) -> torch.Tensor:
    """[B, C, H, W] float (or uint8 [B, H, W, C] with mean/std) -> [B, Np, D]; see docs/design.md.

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


def _check_args(images, weight, bias, patch_size, pos_embed, mean, std, op="patch_embed_fwd"):
    """The C++ op's checks, for its fake: a fake that skipped them would hand torch.compile (or a
    call mixing CPU and meta tensors, which dispatches to the fake) a result for bad input."""
    checks.tensor(op, "weight", weight, ndim=4)
    torch._check_type(isinstance(images, torch.Tensor) and images.dtype in (torch.uint8, weight.dtype),
                      lambda: f"vit_fast::{op}: images must be uint8 or have weight's dtype")
    checks.tensor(op, "images", images, like=weight, ndim=4, dtype=images.dtype)
    checks.value(op, len(patch_size) == 2 and all(p > 0 for p in patch_size),
                 f"patch_size must be two positive ints, got {list(patch_size)}")
    u8 = images.dtype == torch.uint8
    D, C = weight.shape[:2]
    checks.tensor(op, "weight", weight, shape=(D, C, *patch_size))
    checks.value(op, images.shape[3 if u8 else 1] == C,
                 f"images {tuple(images.shape)} must have weight's {C} channels")
    B, Hp, Wp = _geometry(images, patch_size)
    checks.value(op, Hp > 0 and Wp > 0, "images are smaller than one patch")
    checks.tensor(op, "bias", bias, like=weight, shape=(D,), optional=True)
    checks.tensor(op, "pos_embed", pos_embed, like=weight, shape=(1, Hp * Wp, D), optional=True)
    checks.value(op, (mean is not None) == u8 and (std is not None) == u8,
                 "mean and std are required with uint8 images and only with them")
    for name, t in (("mean", mean), ("std", std)):
        checks.tensor(op, name, t, like=weight, shape=(C,), dtype=torch.float32, optional=True)


def _geometry(images, patch_size):
    u8 = images.dtype == torch.uint8
    B, H, W = images.shape[0], images.shape[1 if u8 else 2], images.shape[2 if u8 else 3]
    return B, H // patch_size[0], W // patch_size[1]


def _check_grad_args(grad_out, images, weight, patch_size, mean, std, op):
    if op == "patch_embed_bwd_images":
        checks.value(op, images.dtype != torch.uint8, "uint8 images have no gradient")
    _check_args(images, weight, None, patch_size, None, mean, std, op=op)
    B, Hp, Wp = _geometry(images, patch_size)
    checks.tensor(op, "grad_out", grad_out, like=weight, shape=(B, Hp * Wp, weight.shape[0]))


if extension_available():

    @torch.library.register_fake("vit_fast::patch_embed_fwd")
    def _patch_embed_fwd_fake(images, weight, bias, patch_size, pos_embed, mean, std):
        _check_args(images, weight, bias, patch_size, pos_embed, mean, std)
        B, Hp, Wp = _geometry(images, patch_size)
        return images.new_empty((B, Hp * Wp, weight.shape[0]), dtype=weight.dtype)

    @torch.library.register_fake("vit_fast::patch_embed_bwd_images")
    def _patch_embed_bwd_images_fake(grad_out, images, weight, patch_size):
        _check_grad_args(grad_out, images, weight, patch_size, None, None, "patch_embed_bwd_images")
        return torch.empty(images.shape, dtype=images.dtype, device=images.device)

    @torch.library.register_fake("vit_fast::patch_embed_bwd_weight")
    def _patch_embed_bwd_weight_fake(grad_out, images, weight, patch_size, mean, std):
        _check_grad_args(grad_out, images, weight, patch_size, mean, std, "patch_embed_bwd_weight")
        return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)

    def _setup_context(ctx, inputs, output):
        images, weight, bias, patch_size, pos_embed, mean, std = inputs
        ctx.patch_size = list(patch_size)
        need = ctx.needs_input_grad
        # images are needed for the weight gradient and (shape only) for the images gradient;
        # both, and mean/std, for the mean/std gradients.
        keep = need[0] or need[1] or need[5] or need[6]
        ctx.save_for_backward(images if keep else None, weight if keep else None, mean, std)

    def _grads_through_reference(ctx, grad, images, weight, mean, std):
        """(d images, d weight, d mean, d std) as autograd differentiates the reference: used
        for a backward that must itself be differentiable (create_graph=True, for second-order
        gradients) and for learnable mean/std, neither of which the C++ backward ops cover."""
        need = ctx.needs_input_grad
        wanted = [(i, t) for i, t in ((0, images), (1, weight), (5, mean), (6, std))
                  if need[i] and not (i == 0 and images.dtype == torch.uint8)]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            from vit_fast import reference
            out = reference.patch_embed(images, weight, None, patch_size=tuple(ctx.patch_size),
                                        mean=mean, std=std)
            got = torch.autograd.grad(out, [t for _, t in wanted], grad, create_graph=create_graph,
                                      allow_unused=True)
        grads = dict(zip((i for i, _ in wanted), got))
        return tuple(grads.get(i) for i in (0, 1, 5, 6))

    def _backward(ctx, grad):
        images, weight, mean, std = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_images = d_weight = d_bias = d_pos = d_mean = d_std = None
        if torch.is_grad_enabled() or need[5] or need[6]:
            d_images, d_weight, d_mean, d_std = _grads_through_reference(ctx, grad, images, weight,
                                                                         mean, std)
        else:
            if need[0] and images.is_floating_point():
                d_images = torch.ops.vit_fast.patch_embed_bwd_images(grad, images, weight,
                                                                     ctx.patch_size)
            if need[1]:
                d_weight = torch.ops.vit_fast.patch_embed_bwd_weight(grad, images, weight,
                                                                     ctx.patch_size, mean, std)
        if need[2]:
            d_bias = grad.sum((0, 1))
        if need[4]:
            d_pos = grad.sum(0, keepdim=True)
        return d_images, d_weight, d_bias, None, d_pos, d_mean, d_std

    torch.library.register_autograd("vit_fast::patch_embed_fwd", _backward, setup_context=_setup_context)
