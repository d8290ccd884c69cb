"""The HBM-traffic formulas of vit_fast/bench/roofline.py against what the kernels really touch.

The Triton interpreter's builder is wrapped so that every masked load/store records the addresses
of its unmasked elements; per kernel launch the unique bytes loaded and stored must equal the
formula (the model counts each tensor once: compulsory traffic). Launch lists must match too, so a
kernel added to a launcher without a formula fails here.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import numpy as np
import pytest
import torch

from vit_fast.bench import roofline


def _kernels_or_skip(name):
    try:
        return importlib.import_module(f"vit_fast.kernels.{name}")
    except Exception as exc:  # the kernel module is missing or broken: say which and why
        pytest.skip(f"vit_fast.kernels.{name} is not importable ({type(exc).__name__}: {exc})")


@contextlib.contextmanager
def count_traffic():
    """Yields a list filled with one dict per kernel launch: name, grid, unique load/store bytes."""
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    launches = []
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_run = interp.InterpretedFunction.run

    def record(kind, ptrs, mask):
        itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
        addrs = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        m = np.broadcast_to(mask.data, addrs.shape).astype(bool)
        launches[-1][kind].setdefault(itemsize, []).append(addrs[m].astype(np.uint64).ravel())

    def load(ptrs, mask, *args, **kwargs):
        record("load", ptrs, mask)
        return orig_load(ptrs, mask, *args, **kwargs)

    def store(ptrs, value, mask, *args, **kwargs):
        record("store", ptrs, mask)
        return orig_store(ptrs, value, mask, *args, **kwargs)

    def run(self, *args, grid, **kwargs):
        # Addresses grouped by element size, so unique bytes = unique addresses · size.
        launches.append({"name": self.fn.__name__, "grid": grid, "load": {}, "store": {}})
        return orig_run(self, *args, grid=grid, **kwargs)

    builder.create_masked_load, builder.create_masked_store = load, store
    interp.InterpretedFunction.run = run
    try:
        yield launches
    finally:
        del builder.create_masked_load, builder.create_masked_store  # back to the class methods
        interp.InterpretedFunction.run = orig_run
        for rec in launches:
            for kind in ("load", "store"):
                rec[kind + "_unique"] = sum(
                    np.unique(np.concatenate(parts)).size * size
                    for size, parts in rec[kind].items())


def _check(launches, ops, names):
    got = [(r["name"], r["load_unique"], r["store_unique"]) for r in launches]
    want = [(n, op.read, op.write) for n, op in zip(names, ops)]
    assert len(launches) == len(ops), f"launches {[r['name'] for r in launches]} vs model {[o.name for o in ops]}"
    assert got == want


E = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


@pytest.mark.parametrize("B,N,H,D,dtype", [(2, 17, 2, 40, torch.float32), (1, 37, 3, 16, torch.bfloat16)])
def test_attention_traffic_matches_model(B, N, H, D, dtype):
    att = _kernels_or_skip("attention")
    qkv = torch.randn(B, N, 3 * H * D, dtype=dtype)
    with count_traffic() as launches:
        out, lse = att.attention_fwd(qkv, H, D ** -0.5)
    _check(launches, [roofline.attention_fwd(B, N, H, D, E[dtype])], ["attention_fwd_kernel"])
    with count_traffic() as launches:
        att.attention_bwd(torch.randn_like(out), qkv, out, lse, H, D ** -0.5)
    _check(launches, roofline.attention_bwd(B, N, H, D, E[dtype]),
           ["attention_bwd_delta_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel"])


@pytest.mark.parametrize("residual,layer_scale,sample_scale", [(False, False, False), (True, True, True),
                                                               (True, False, False)])
def test_layer_norm_traffic_matches_model(residual, layer_scale, sample_scale):
    ln = _kernels_or_skip("layer_norm")
    B, N, C, dtype = 3, 7, 40, torch.float32
    M, e = B * N, E[dtype]
    x = torch.randn(B, N, C, dtype=dtype)
    w, b = torch.randn(C), torch.randn(C)
    res = torch.randn_like(x) if residual else None
    ls = torch.randn(C) if layer_scale else None
    ss = torch.rand(B) if sample_scale else None
    with count_traffic() as launches:
        y, s, mean, rstd = ln.residual_layer_norm_fwd(x, w, b, 1e-6, res, ls, ss)
    _check(launches, [roofline.layer_norm_fwd(M, C, e, residual=residual, layer_scale=layer_scale,
                                              samples=B if sample_scale else 0)],
           ["residual_layer_norm_fwd_kernel"])
    dy = torch.randn_like(x)
    ds = torch.randn_like(x) if residual else None
    with count_traffic() as launches:
        ln.residual_layer_norm_bwd(dy, ds, s if residual else x, mean, rstd, w, has_residual=residual,
                                   need_bias_grad=True, x=x, layer_scale=ls, sample_scale=ss)
    programs = launches[0]["grid"][0]  # the launcher's choice; the model takes it as a parameter
    ops = roofline.layer_norm_bwd(M, C, e, programs, residual=residual, has_ds=residual,
                                  layer_scale=layer_scale, samples=B if sample_scale else 0)
    _check(launches, ops, ["residual_layer_norm_bwd_kernel", "layer_norm_param_grad_reduce_kernel"])


@pytest.mark.parametrize("layer_scale,sample_scale", [(False, False), (True, True)])
def test_gelu_mlp_traffic_matches_model(layer_scale, sample_scale):
    mlp = _kernels_or_skip("gelu_mlp")
    mm = _kernels_or_skip("matmul")
    B, N, C, Hd, dtype = 2, 9, 24, 40, torch.float32
    M, e = B * N, E[dtype]
    x, res = torch.randn(B, N, C), torch.randn(B, N, C)
    w1, b1, w2, b2 = torch.randn(Hd, C), torch.randn(Hd), torch.randn(C, Hd), torch.randn(C)
    ls = torch.randn(C) if layer_scale else None
    ss = torch.rand(B) if sample_scale else None
    samples = B if sample_scale else 0
    with count_traffic() as launches:
        out, pre = mlp.gelu_mlp_fwd(x, w1, b1, w2, b2, "none", res, ls, ss, True)
    _check(launches, roofline.gelu_mlp_fwd(M, C, Hd, e, train=True, layer_scale=layer_scale,
                                           samples=samples), ["matmul_kernel"] * 2)
    with count_traffic() as launches:
        mlp.gelu_mlp_bwd(torch.randn(B, N, C), x, w1, w2, b2, pre, ls, ss, "none", True, True, True,
                         layer_scale, sample_scale)
    block_n = mm.INTERPRET_CONFIG[1]

    def chunks(rows):  # the interpreter's colsum tiling (256-row blocks)
        per = 256 * max(1, math.ceil(math.ceil(rows / 256) / 64))
        return math.ceil(rows / per)

    ops = [o for o in roofline.gelu_mlp_bwd(M, C, Hd, e, layer_scale=layer_scale, samples=samples,
                                            colsum_chunks=chunks, rowdot_tiles=math.ceil(Hd / block_n))
           if not o.name.startswith("torch_")]  # weight-sized torch ops are not Triton launches
    names = ["matmul_kernel", "matmul_kernel", "colsum_kernel", "matmul_kernel", "matmul_kernel",
             "colsum_kernel"]
    _check(launches, ops, names)


def test_block_model_orders_and_ratios():
    """Sanity of the block-level sums: fusion never adds traffic, FLOPs agree within the
    attention recompute, and a forward-only sequence is a prefix of the training one's length."""
    B, N, C, H, e = 64, 197, 768, 12, 2
    for ls in (False, True):
        fused = roofline.total(roofline.block_ops("vit_fast", B, N, C, H, e, backward=True, layer_scale=ls))
        eager = roofline.total(roofline.block_ops("eager", B, N, C, H, e, backward=True, layer_scale=ls))
        assert fused.bytes < eager.bytes
        assert abs(fused.flops - eager.flops) / eager.flops < 0.05
    seg_f = roofline.total(roofline.residual_layer_norm_ops("vit_fast", B * N, C, e, layer_scale=True))
    seg_e = roofline.total(roofline.residual_layer_norm_ops("eager", B * N, C, e, layer_scale=True))
    assert seg_f.bytes < 0.7 * seg_e.bytes
    with pytest.raises(ValueError, match="impl"):
        roofline.block_ops("cudnn", B, N, C, H, e, backward=False)
