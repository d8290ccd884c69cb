"""The C++/CUDA extension vit_fast._C (ops vit_fast::patch_embed_*), CPU path, against F.conv2d.

fp32 must match a float64 conv to 1e-5 relative; fp16/bf16 follow tests/tolerance.py's rule. Inputs
cover non-square images and patches, 1 and 4 channels, sliced / transposed / channels_last strides
and uint8 NHWC with mean/std. The CUDA build is checked from its ptxas log (no GPU here).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from tolerance import assert_close_by_rule
from vit_fast import reference
from vit_fast.ops import patch_embed as pe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import check_ptxas  # noqa: E402

needs_ext = pytest.mark.skipif(not pe.extension_available(), reason=f"extension not loaded: {pe.extension_error()}")

# (B, C, H, W, (ph, pw), D, bias, pos_embed, layout)
CASES = {
    "square": (2, 3, 32, 32, (16, 16), 40, True, True, "contiguous"),
    "64x96_patch16x8": (2, 3, 64, 96, (16, 8), 96, True, True, "contiguous"),
    "c1_sliced": (3, 1, 28, 28, (7, 7), 80, True, False, "sliced"),
    "c4_channels_last": (2, 4, 40, 24, (8, 8), 40, False, True, "channels_last"),
    "transposed_hw": (1, 3, 64, 96, (16, 8), 96, True, True, "transposed"),
}
MEAN, STD = (0.485, 0.456, 0.406, 0.5), (0.229, 0.224, 0.225, 0.25)


def make_images(B, C, H, W, layout, dtype):
    """A leaf of logical shape [B, C, H, W] with the requested strides."""
    if layout == "sliced":
        x = torch.randn(B, C, H + 2, W + 5)[:, :, 1:H + 1, 2:W + 2]
    elif layout == "transposed":
        x = torch.randn(B, C, W, H).transpose(2, 3)
    else:
        x = torch.randn(B, C, H, W)
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def make_params(C, patch, D, bias, pos, num_patches, dtype):
    w = (torch.randn(D, C, *patch) / (C * patch[0] * patch[1]) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(D).to(dtype).requires_grad_() if bias else None
    p = torch.randn(1, num_patches, D).to(dtype).requires_grad_() if pos else None
    return w, b, p


def conv_ref(images, weight, bias, patch, pos):
    out = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    return out + pos if pos is not None else out


def grads(out, inputs, grad_out):
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, leaves, grad_out))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def assert_rel(ours, ref, name, tol=1e-5):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * max(scale, 1e-30), f"{name}: max err {err:.3e} > {tol:g} x max|ref| {scale:.3e}"


@needs_ext
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_conv2d(case):
    B, C, H, W, patch, D, bias, pos, layout = CASES[case]
    x = make_images(B, C, H, W, layout, torch.float32)
    w, b, p = make_params(C, patch, D, bias, pos, (H // patch[0]) * (W // patch[1]), torch.float32)
    out = pe.patch_embed(x, w, b, patch, p, None, None)
    ref_in = [f64(t) for t in (x, w, b, p)]
    ref = conv_ref(*ref_in[:3], patch, ref_in[3])
    assert out.shape == (B, (H // patch[0]) * (W // patch[1]), D) and out.dtype == torch.float32
    assert_rel(out, ref, "output")
    g = torch.randn_like(out)
    for name, ours, theirs in zip(("images", "weight", "bias", "pos_embed"), grads(out, [x, w, b, p], g),
                                  grads(ref, ref_in, g.double())):
        if theirs is not None:
            assert ours.shape == theirs.shape and ours.dtype == torch.float32, name
            assert_rel(ours, theirs, f"grad {name}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["64x96_patch16x8", "c4_channels_last"])
def test_half_precision_by_rule(case, dtype):
    B, C, H, W, patch, D, bias, pos, layout = CASES[case]
    x = make_images(B, C, H, W, layout, dtype)
    w, b, p = make_params(C, patch, D, bias, pos, (H // patch[0]) * (W // patch[1]), dtype)
    inputs = [x, w, b, p]
    same_in = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref64_in = [f64(t) for t in inputs]
    out = pe.patch_embed(x, w, b, patch, p, None, None)
    same = reference.patch_embed(same_in[0], same_in[1], same_in[2], patch_size=patch, pos_embed=same_in[3])
    ref64 = reference.patch_embed(ref64_in[0], ref64_in[1], ref64_in[2], patch_size=patch, pos_embed=ref64_in[3])
    assert out.dtype == dtype
    assert_close_by_rule(out, same, ref64, "output")
    g = torch.randn_like(out)
    for name, ours, s, r in zip(("images", "weight", "bias", "pos_embed"), grads(out, inputs, g),
                                grads(same, same_in, g), grads(ref64, ref64_in, g.double())):
        if r is not None:
            assert ours.dtype == dtype, name
            assert_close_by_rule(ours, s, r, f"grad {name}")


@needs_ext
@pytest.mark.parametrize("dtype,B,C,H,W,patch,D", [
    (torch.float32, 2, 3, 32, 48, (16, 8), 40),
    (torch.bfloat16, 1, 4, 48, 40, (8, 8), 96),
], ids=["fp32_rgb", "bf16_c4"])
def test_uint8_nhwc_normalized(dtype, B, C, H, W, patch, D):
    u8 = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8)
    mean, std = MEAN[:C], STD[:C]
    Np = (H // patch[0]) * (W // patch[1])
    w, b, p = make_params(C, patch, D, True, True, Np, dtype)
    out = pe.patch_embed(u8, w, b, patch, p, mean, std)
    assert out.shape == (B, Np, D) and out.dtype == dtype
    g = torch.randn_like(out)
    ours_g = grads(out, [w, b, p], g)
    if dtype == torch.float32:
        # The contract's formula, written out: normalize in fp32, then a float64 conv.
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        imgs = (u8.permute(0, 3, 1, 2).float() / 255 - m) / s
        ref_in = [f64(t) for t in (w, b, p)]
        ref = conv_ref(imgs.double(), ref_in[0], ref_in[1], patch, ref_in[2])
        assert_rel(out, ref, "output")
        for name, ours, theirs in zip(("weight", "bias", "pos_embed"), ours_g, grads(ref, ref_in, g.double())):
            assert_rel(ours, theirs, f"grad {name}")
    else:
        same_in = [t.detach().clone().requires_grad_() for t in (w, b, p)]
        same = reference.patch_embed(u8, *same_in[:2], patch_size=patch, pos_embed=same_in[2], mean=mean, std=std)
        ref64 = reference.patch_embed(u8, *same_in[:2], patch_size=patch, pos_embed=same_in[2], mean=mean,
                                      std=std, upcast=True)
        assert_close_by_rule(out, same, ref64, "output")
        same_g = grads(same, same_in, g)
        ref64_in = [f64(t) for t in (w, b, p)]
        # ref64 with float64 leaves: the reference rounds the normalized images to bf16 like we do.
        imgs = ((u8.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, -1, 1, 1))
                / torch.tensor(std).view(1, -1, 1, 1)).to(dtype).double()
        ref64_g = grads(conv_ref(imgs, ref64_in[0], ref64_in[1], patch, ref64_in[2]), ref64_in, g.double())
        for name, ours, s, r in zip(("weight", "bias", "pos_embed"), ours_g, same_g, ref64_g):
            assert_close_by_rule(ours, s, r, f"grad {name}")


@needs_ext
def test_opcheck():
    ops = torch.ops.vit_fast
    x = torch.randn(2, 3, 32, 48, requires_grad=True)
    w = torch.randn(10, 3, 16, 8, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    pos = torch.randn(1, 12, 10, requires_grad=True)
    u8 = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    m, s = torch.tensor(MEAN[:3]), torch.tensor(STD[:3])
    go = torch.randn(2, 12, 10)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    for op, args in [
        (ops.patch_embed_fwd, (x, w, b, [16, 8], pos, None, None)),
        (ops.patch_embed_fwd, (cl, w, None, [16, 8], None, None, None)),
        (ops.patch_embed_fwd, (u8, w, b, [16, 8], pos, m, s)),
        (ops.patch_embed_bwd_images, (go, x.detach(), w.detach(), [16, 8])),
        (ops.patch_embed_bwd_weight, (go, x.detach(), w.detach(), [16, 8], None, None)),
        (ops.patch_embed_bwd_weight, (go, u8, w.detach(), [16, 8], m, s)),
    ]:
        torch.library.opcheck(op.default, args)


@needs_ext
def test_compile_fullgraph_forward_backward():
    x = torch.randn(2, 3, 32, 48, requires_grad=True)
    w, b, p = make_params(3, (16, 8), 24, True, True, 12, torch.float32)
    fn = torch.compile(lambda x, w, b, p: pe.patch_embed(x, w, b, (16, 8), p, None, None).square().sum(),
                       fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(fn(x, w, b, p), (x, w, b, p))
    ref_in = [f64(t) for t in (x, w, b, p)]
    want = torch.autograd.grad(conv_ref(*ref_in[:3], (16, 8), ref_in[3]).square().sum(), ref_in)
    for name, g1, g2 in zip(("images", "weight", "bias", "pos_embed"), got, want):
        assert_rel(g1, g2, f"grad {name}")


@needs_ext
def test_uncovered_border_is_dropped_like_conv2d():
    """The op itself takes sizes that are not multiples of the patch (functional.py rejects them)."""
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(16, 3, 8, 6, requires_grad=True)
    out = torch.ops.vit_fast.patch_embed_fwd(x, w, None, [8, 6], None, None, None)
    ref = conv_ref(x, w, None, (8, 6), None)
    assert_rel(out, ref, "output")
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (rx,) = torch.autograd.grad(ref, x, g)
    assert gx[:, :, 32:].abs().sum() == 0 and gx[:, :, :, 24:].abs().sum() == 0
    assert_rel(gx, rx, "grad images")


@needs_ext
def test_empty_batch():
    out = pe.patch_embed(torch.randn(0, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.randn(8), (8, 8), None,
                         None, None)
    assert out.shape == (0, 4, 8)


@needs_ext
@pytest.mark.parametrize("bad,match", [
    ({"weight": torch.randn(8, 3, 8, 4)}, "weight must be"),
    ({"images": torch.randn(2, 3, 16)}, "images must be 4-D"),
    ({"images": torch.randn(2, 3, 4, 16)}, "smaller than one patch"),
    ({"images": torch.randn(2, 3, 16, 16, dtype=torch.float64)}, "uint8 or have weight's dtype"),
    ({"bias": torch.randn(7)}, "bias must be"),
    ({"pos_embed": torch.randn(1, 3, 8)}, "pos_embed must be"),
    ({"patch_size": [8]}, "patch_size"),
    ({"images": torch.zeros(2, 16, 16, 3, dtype=torch.uint8)}, "mean and std are required"),
    ({"images": torch.zeros(2, 16, 16, 3, dtype=torch.uint8), "mean": torch.zeros(2), "std": torch.ones(2)},
     "mean/std must be"),
])
def test_cpp_checks_raise(bad, match):
    args = {"images": torch.randn(2, 3, 16, 16), "weight": torch.randn(8, 3, 8, 8), "bias": torch.randn(8),
            "patch_size": [8, 8], "pos_embed": None, "mean": None, "std": None}
    args.update(bad)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.vit_fast.patch_embed_fwd(*args.values())


@needs_ext
def test_coexists_with_python_custom_ops_in_namespace():
    @torch.library.custom_op("vit_fast::_test_probe_patch_embed_ext", mutates_args=())
    def probe(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    assert torch.equal(probe(torch.ones(3)), torch.full((3,), 2.0))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vit_fast::patch_embed_fwd", "CPU")


def test_missing_extension_imports_with_warning():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["vit_fast._C"] = None  # makes `from vit_fast import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from vit_fast.ops import patch_embed as pe
        assert not pe.extension_available() and not pe.extension_has_cuda()
        assert "vit_fast._C" in pe.extension_error(), pe.extension_error()
        assert any("reference path" in str(w.message) for w in caught), [str(w.message) for w in caught]
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_check_ptxas_flags_spills_and_missing_arch(tmp_path):
    entry = ("ptxas info    : Compiling entry function '_Z1kv' for '{arch}'\n"
             "ptxas info    : Function properties for _Z1kv\n"
             "    0 bytes stack frame, {st} bytes spill stores, {ld} bytes spill loads\n"
             "ptxas info    : Used 40 registers, used 0 barriers\n")
    clean = entry.format(arch="sm_80", st=0, ld=0) + entry.format(arch="sm_90", st=0, ld=0)
    spilled = entry.format(arch="sm_80", st=0, ld=0) + entry.format(arch="sm_90", st=8, ld=4)
    only_80 = entry.format(arch="sm_80", st=0, ld=0)
    assert check_ptxas.problems(check_ptxas.parse(clean)) == []
    assert check_ptxas.parse(clean)[1] == {"name": "_Z1kv", "arch": "sm_90", "registers": 40, "stack": 0,
                                           "spill_stores": 0, "spill_loads": 0}
    assert any("8 B spill stores" in p for p in check_ptxas.problems(check_ptxas.parse(spilled)))
    assert any("sm_90" in p for p in check_ptxas.problems(check_ptxas.parse(only_80)))
    log = tmp_path / "build.log"
    log.write_text(spilled)
    assert check_ptxas.main(["check_ptxas.py", str(log)]) == 1


@pytest.mark.skipif(not pe.extension_has_cuda(),
                    reason="vit_fast._C was built without CUDA (no nvcc or CPU-only torch), so no ptxas log"
                    if pe.extension_available() else f"extension not loaded: {pe.extension_error()}")
def test_cuda_build_has_no_spills():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "check_ptxas.py")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
    assert "sm_80" in res.stdout and "sm_90" in res.stdout
