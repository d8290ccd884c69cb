"""What the launchers launch on a GPU is in the AOT lists (kernels/*_aot.py), so every build that
can run was compiled for sm_80/sm_90 with 0 spills (tests/test_aot_*.py).

Two ways, neither needing a compiler:
- the config functions, swept over shapes and GPUs the AOT modules did not use, offer only
  configs that are compiled;
- the real launchers run under the interpreter with their CUDA configs (kernels/_device.Target
  patched in: an H100 and an A100), and every launch they make -- kernel, constexprs, warps,
  stages, pointer dtypes -- is matched against a spec. A spec covers a launch when everything is
  equal except that the spec may have more optional inputs on (a flag on, a pointer where the
  launch passes None): absent inputs only remove code. This also runs every GEMM candidate and
  checks that they agree.
"""
import contextlib
import random

import pytest
import torch

from vit_fast.kernels import (gelu_elementwise, gelu_elementwise_aot, gelu_mlp, gelu_mlp_aot,
                              layer_norm, layer_norm_aot, matmul)
from vit_fast.kernels._device import Target

SPECS = gelu_mlp_aot.aot_specs() + layer_norm_aot.aot_specs() + gelu_elementwise_aot.aot_specs()
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_FLAG_PREFIXES = ("HAS_", "STORE_", "ROW_DOT")


def _mismatches(launch, spec):
    """Why ``spec`` does not cover ``launch`` ([] when it does)."""
    why = []
    if spec.num_warps != launch["num_warps"]:
        why.append(f"num_warps {launch['num_warps']} vs {spec.num_warps}")
    if spec.num_stages != launch.get("num_stages"):
        why.append(f"num_stages {launch.get('num_stages')} vs {spec.num_stages}")
    for name, value in launch["args"].items():
        sig, const = spec.signature[name], spec.constants.get(name, "-")
        if name == "DOT_FP32":  # the interpreter's own flag (upcast dots); compiled: False
            continue
        if isinstance(value, torch.Tensor):
            if sig != _PTR[value.dtype]:
                why.append(f"{name} {_PTR[value.dtype]} vs {sig}")
        elif value is None:
            if sig == "constexpr" and const is not None:
                why.append(f"{name} None vs {const}")
        elif name.startswith(_FLAG_PREFIXES):
            if value and const is not True:
                why.append(f"{name} on, spec {const}")
        elif sig == "constexpr" and value != const:
            why.append(f"{name} {value!r} vs {const!r}")
    return why


def assert_covered(launches):
    assert launches
    for launch in launches:
        candidates = [s for s in SPECS if s.kernel.fn.__name__ == launch["kernel"]]
        reasons = [(s.name, _mismatches(launch, s)) for s in candidates]
        if not any(not why for _, why in reasons):
            closest = sorted(reasons, key=lambda r: len(r[1]))[:3]
            pytest.fail(f"no AOT spec covers {launch['kernel']} "
                        f"{ {k: v for k, v in launch['args'].items() if not torch.is_tensor(v)} }"
                        f" warps={launch['num_warps']} stages={launch.get('num_stages')}; "
                        f"closest: {closest}")


@contextlib.contextmanager
def launches_on(monkeypatch, target):
    """Yields the list of launches the enclosed code makes, each with its arguments by name,
    while the launchers pick their configs for ``target``."""
    from triton.runtime import interpreter as interp
    for module in (matmul, layer_norm, gelu_elementwise):
        monkeypatch.setattr(module, "gpu_target", lambda device: target)
    seen = []
    orig = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        named = dict(zip(self.arg_names, args))
        named.update({k: v for k, v in kwargs.items() if k in self.arg_names})
        seen.append({"kernel": self.fn.__name__, "args": named,
                     "num_warps": kwargs.get("num_warps", 4),
                     "num_stages": kwargs.get("num_stages")})
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    yield seen


def test_config_functions_offer_only_compiled_configs():
    """Shapes and GPUs other than the AOT modules' own sweep."""
    rng = random.Random(0)
    compiled = {}
    for s in SPECS:
        if s.kernel.fn.__name__ == "matmul_kernel":
            kind, dtype = s.name.split("[")[1].split("/")[:2]
            precision = s.constants["INPUT_PRECISION"]
            compiled.setdefault((kind, dtype, precision), set()).add(matmul.GemmConfig(
                *(s.constants[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")),
                s.num_warps, s.num_stages, s.constants["SPLIT_K"]))
    ln = {(s.kernel.fn.__name__, s.constants.get("BLOCK_M"), s.constants.get("BLOCK_C"),
           s.constants.get("BLOCK_P"), s.constants.get("BLOCK_N"), s.num_warps) for s in SPECS}
    for _ in range(300):
        target = Target(rng.choice([1, 46, 80, 108, 114, 132, 144, 1000]),
                        rng.choice([80, 86, 89, 90]))
        M, N, K = rng.randint(1, 1 << 17), rng.randint(1, 1 << 14), rng.randint(1, 1 << 17)
        for (kind, dtype, precision), configs in compiled.items():
            epilogue = gelu_mlp_aot.KINDS[kind][0]
            for cfg in matmul.gemm_candidates(M, N, gelu_mlp_aot._DT[dtype], epilogue, precision,
                                              target, K):
                assert cfg in configs, (kind, dtype, precision, M, N, target, cfg)
        C = rng.randint(1, layer_norm.MAX_C)
        f = layer_norm.fwd_config(C, M, target)
        b = layer_norm.bwd_config(C, M, target)
        r = layer_norm.reduce_config(b.programs, C, target)
        assert ("residual_layer_norm_fwd_kernel", f.block_m, f.block_c, None, None,
                f.num_warps) in ln, (C, f)
        assert ("residual_layer_norm_bwd_kernel", b.block_m, b.block_c, None, None,
                b.num_warps) in ln, (C, b)
        assert ("layer_norm_param_grad_reduce_kernel", None, None, *r, 4) in ln, (C, r)


def _mlp_inputs(dtype, stream=None, bias=True):
    g = torch.Generator().manual_seed(0)
    B, N, C, H = 2, 5, 24, 40

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)
    stream = stream or dtype
    return dict(x=r(B, N, C), w1=r(H, C) * 0.2, b1=r(H) if bias else None, w2=r(C, H) * 0.2,
                b2=r(C) if bias else None, res=r(B, N, C, dt=stream), ls=r(C, dt=stream),
                ss=torch.tensor([1.25, 0.0]).to(stream))


def _all_candidates(results):
    """A ``choose`` that runs every candidate config and keeps the outputs for comparison."""
    def choose(a, fields, candidates):
        outs = {name: fn() for name, fn in candidates.items()}
        results.append(outs)
        return next(iter(outs.values()))
    return choose


@pytest.mark.parametrize("target", [Target(132, 90), Target(108, 80)], ids=["h100", "a100"])
@pytest.mark.parametrize("dtype,approximate", [(torch.bfloat16, "tanh"), (torch.float16, "none"),
                                               (torch.float32, "none")])
def test_mlp_launches_are_compiled(monkeypatch, target, dtype, approximate):
    t = _mlp_inputs(dtype)
    results = []
    choose = _all_candidates(results)
    with launches_on(monkeypatch, target) as seen:
        for res, save in ((None, False), (t["res"], True)):  # the training call last: its pre
            out, pre = gelu_mlp.gelu_mlp_fwd(t["x"], t["w1"], t["b1"], t["w2"], t["b2"],
                                             approximate, res, t["ls"], t["ss"], save,
                                             choose=choose)
        gelu_mlp.gelu_mlp_bwd(torch.randn_like(out), t["x"], t["w1"], t["w2"], t["b2"], pre,
                              t["ls"], t["ss"], approximate=approximate, has_residual=True,
                              choose=choose)
        gelu_mlp.gelu_mlp_bwd(torch.randn_like(out), t["x"], t["w1"], t["w2"], None, pre,
                              None, None, approximate=approximate, has_residual=False,
                              wanted=gelu_mlp.MlpGrads(False, False, False, False), choose=choose)
    assert_covered(seen)
    if dtype != torch.float32:  # exact fp32 dots have one config; 16-bit GEMMs several
        assert max(len(r) for r in results) >= 3
    for outs in results:  # every candidate computes the same GEMM (fp32 accumulation)
        first = next(iter(outs.values()))
        for name, out in outs.items():
            for a, b in zip(first, out):
                if a is not None:
                    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2,
                                               msg=name)


def test_amp_mlp_and_layer_norm_launches_are_compiled(monkeypatch):
    """AMP's Block: LN1 reads the fp32 stream, LN2 adds the bf16 branch into it, fc2 adds into
    it; the backward runs in fp32 for the LayerNorm and in bf16 for the GEMMs."""
    t = _mlp_inputs(torch.bfloat16, stream=torch.float32)
    stream, w = t["res"], torch.randn(24)
    with launches_on(monkeypatch, Target(132, 90)) as seen:
        layer_norm.residual_layer_norm_fwd(stream, w, w, 1e-6, out_dtype=torch.bfloat16)
        h, s, mean, rstd = layer_norm.residual_layer_norm_fwd(
            t["x"], w, w, 1e-6, stream, t["ls"], t["ss"], out_dtype=torch.bfloat16)
        out, pre = gelu_mlp.gelu_mlp_fwd(h, t["w1"], t["b1"], t["w2"], t["b2"], "none", s,
                                         t["ls"], t["ss"], True, out_dtype=torch.float32)
        gelu_mlp.gelu_mlp_bwd(torch.randn_like(h), h, t["w1"], t["w2"], t["b2"], pre,
                              t["ls"].bfloat16(), t["ss"].bfloat16(), approximate="none",
                              has_residual=True)
        layer_norm.residual_layer_norm_bwd(torch.randn_like(s), torch.randn_like(s), s, mean,
                                           rstd, w, has_residual=True, need_bias_grad=True,
                                           x=t["x"].float(), layer_scale=t["ls"],
                                           sample_scale=t["ss"])
    assert_covered(seen)


@pytest.mark.parametrize("C", [24, 96, 700])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_layer_norm_launches_are_compiled(monkeypatch, C, dtype):
    x, res = torch.randn(2, 9, C, dtype=dtype), torch.randn(2, 9, C, dtype=dtype)
    w, ls, ss = (torch.randn(C, dtype=dtype), torch.randn(C, dtype=dtype),
                 torch.tensor([1.0, 0.0], dtype=dtype))
    with launches_on(monkeypatch, Target(132, 90)) as seen:
        for kw in (dict(), dict(residual=res, layer_scale=ls, sample_scale=ss)):
            y, s, mean, rstd = layer_norm.residual_layer_norm_fwd(x, w, w, 1e-5, **kw)
            has_res = s is not None
            layer_norm.residual_layer_norm_bwd(
                torch.randn_like(y), torch.randn_like(y) if has_res else None,
                s if has_res else x, mean, rstd, w, has_residual=has_res, need_bias_grad=True,
                x=x, layer_scale=kw.get("layer_scale"), sample_scale=kw.get("sample_scale"))
    assert_covered(seen)


def test_cublas_elementwise_launches_are_compiled(monkeypatch):
    pre = torch.randn(10, 40, dtype=torch.bfloat16)
    y, res = torch.randn(10, 24, dtype=torch.bfloat16), torch.randn(10, 24, dtype=torch.bfloat16)
    ss = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    with launches_on(monkeypatch, Target(132, 90)) as seen:
        gelu_elementwise.gelu_forward(pre, torch.empty_like(pre), "tanh")
        gelu_elementwise.gelu_backward(torch.randn_like(pre), pre, "none", ss, 5, row_dot=True,
                                       col_sum=True)
        gelu_elementwise.residual_epilogue(y, y[0], None, ss, res, 5)
    assert_covered(seen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_k_launches_are_compiled(monkeypatch, dtype):
    """A weight gradient with few output tiles and a long K (tokens) gets split-K candidates;
    each launches a build in the list (run here at a short K: the launch is the same)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g).to(dtype)  # [tokens, C]
    d = torch.randn(300, 40, generator=g).to(dtype)  # [tokens, H]
    offered = matmul.gemm_candidates(40, 24, dtype, matmul.Epilogue(), "ieee", Target(132, 90),
                                     K=1 << 14)
    splits = [c for c in offered if c.split_k > 1]
    assert splits
    with launches_on(monkeypatch, Target(132, 90)) as seen:
        for config in splits:
            matmul.matmul(d.t(), x, dtype, config=config)  # dW1 = dᵀ·x
    assert sorted(launch["args"]["SPLIT_K"] for launch in seen) == [c.split_k for c in splits]
    assert_covered(seen)


def test_a_launch_outside_the_list_is_caught():
    """The matcher itself: a config no spec has is reported."""
    launch = {"kernel": "matmul_kernel", "num_warps": 8, "num_stages": 3,
              "args": dict(matmul.matmul_constexprs(matmul.Epilogue(), matmul.GemmConfig(
                  96, 96, 64, 8, 8, 3)), A=torch.empty(0, dtype=torch.bfloat16))}
    with pytest.raises(pytest.fail.Exception, match="no AOT spec covers matmul_kernel"):
        assert_covered([launch])


def test_each_gemm_kernel_rejects_the_others_config_field():
    """GemmConfig is shared: a split-K config cannot reach the Hopper kernel (which does not
    split K) and a subtiled one cannot reach matmul_kernel (which stores its tile whole)."""
    from vit_fast.kernels import matmul_hopper
    with pytest.raises(ValueError, match="config: the Hopper kernel does not split K"):
        matmul_hopper.hopper_constexprs(matmul.Epilogue(), matmul_hopper.LARGE._replace(split_k=2),
                                        False, False)
    with pytest.raises(ValueError, match="config: matmul_kernel stores its tile whole"):
        matmul.matmul_constexprs(matmul.Epilogue(), matmul_hopper.WIDE)
    assert matmul_hopper.WIDE._replace(num_stages=4).name == "tma128x256x64w8s4e2"
