"""What the cuda tests share: ViT shapes, and one op run three ways (the kernels, the reference in
the same dtype, the reference in float64) compared output by output and gradient by gradient with
tests/tolerance.py's rule."""
import contextlib

import torch

import vit_fast
from vit_fast import dispatch

import sync_check
from tolerance import assert_close_by_rule

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
TOKENS = (197, 257, 577, 1025)  # 224/16 and 224/14, 384/16, 448/14 with the class token
VIT = {"S": (384, 6), "B": (768, 12), "L": (1024, 16)}  # width, heads: head_dim 64
# (heads, head_dim) for attention: the three ViTs, ViT-H/14's 80 and a 128-wide head
HEADS = {"S": (6, 64), "B": (12, 64), "L": (16, 64), "H/14": (16, 80), "D128": (8, 128)}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


# (ViT, N, dtype, with the Block's residual + LayerScale + drop-path epilogue) for the LayerNorm and
# MLP ops: every width × token count × dtype in the Block's form, the plain op at N = 197.
RESIDUAL_CASES = [(s, n, d, full) for s in VIT for n in TOKENS for d in DTYPES for full in (False, True)
                  if full or n == 197]
RESIDUAL_IDS = [f"{s}-N{n}-{dtype_id(d)}-{'residual' if f else 'plain'}"
                for s, n, d, f in RESIDUAL_CASES]


def assert_kernel_chosen(op, tensors, **options):
    """The triton policy really picks the kernel for these tensors (not a silent fallback)."""
    with vit_fast.use_backend("triton"):
        choice = dispatch.choose(op, tensors, **options)
    assert choice.backend == dispatch.KERNEL_BACKEND[op], (
        f"{op} went to {choice.backend}: {choice.reasons}")


def run(fn, inputs, grad_names, backend, out_grads=None, *, upcast=False, autocast=None):
    """Outputs and the gradients of ``grad_names`` of fn(**inputs) under ``backend``.

    out_grads: one fp32 tensor per output (drawn here when None, and returned for the next runs).
    upcast: run on float64 copies of the inputs (the ground truth). autocast: a dtype to run
    under torch.autocast (the inputs then stay fp32, as under AMP). Any backend but the reference
    is a kernel step: checked for host syncs after a warm-up under VIT_FAST_SYNC_CHECK=1."""
    def step():
        return _run(fn, inputs, grad_names, backend, out_grads, upcast, autocast)
    if backend == "reference":
        return step()
    return sync_check.kernel_step(step, next(iter(inputs.values())).device)


def _run(fn, inputs, grad_names, backend, out_grads, upcast, autocast):
    t = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().double() if upcast else v.detach()
            v = v.requires_grad_(k in grad_names)
        t[k] = v
    ctx = (torch.autocast(next(iter(inputs.values())).device.type, dtype=autocast)
           if autocast is not None else contextlib.nullcontext())
    with vit_fast.use_backend(backend), ctx:
        out = fn(**t)
    outs = list(out) if isinstance(out, tuple) else [out]
    if out_grads is None:
        out_grads = [torch.randn(o.shape, device=o.device) for o in outs]
    grads = torch.autograd.grad(outs, [t[n] for n in grad_names],
                                [g.to(o.dtype) for g, o in zip(out_grads, outs)])
    return [o.detach() for o in outs], dict(zip(grad_names, grads)), out_grads


def check(fn, inputs, grad_names, *, autocast=None):
    """The kernels (triton policy) against the reference by the tolerance rule; returns ours."""
    outs, grads, og = run(fn, inputs, grad_names, "triton", autocast=autocast)
    same, same_grads, _ = run(fn, inputs, grad_names, "reference", og, autocast=autocast)
    ref64, ref_grads, _ = run(fn, inputs, grad_names, "reference", og, upcast=True)
    for i, (o, s, r) in enumerate(zip(outs, same, ref64)):
        assert o.dtype == s.dtype, f"output {i}: dtype {o.dtype}, the reference gives {s.dtype}"
        assert_close_by_rule(o, s, r, f"output {i}")
    for name in grad_names:
        assert grads[name].dtype == same_grads[name].dtype, name
        assert_close_by_rule(grads[name], same_grads[name], ref_grads[name], f"d{name}")
    return outs, grads


def assert_backward_deterministic(fn, inputs, grad_names, runs=10):
    """``runs`` forward+backward passes of the kernels give bitwise-equal outputs and gradients."""
    first, first_grads, og = run(fn, inputs, grad_names, "triton")
    for i in range(1, runs):
        outs, grads, _ = run(fn, inputs, grad_names, "triton", og)
        for a, b in zip(first, outs):
            assert torch.equal(a, b), f"run {i}: output differs from run 0"
        for name in grad_names:
            assert torch.equal(first_grads[name], grads[name]), f"run {i}: d{name} differs from run 0"
