"""Absent optional tensors reach the kernels as None (Triton specializes them away and the HAS_*
flags say so), never as another tensor standing in for them: a stand-in is a pointer the kernel
could read or write by mistake, and a build that differs from the AOT-compiled one."""
import pytest
import torch

from test_aot_coverage import launches_on
from vit_fast.kernels import layer_norm, qk_norm


def _stand_ins(launch):
    """Names of the pointer arguments that repeat a tensor passed earlier in the same launch."""
    seen, repeated = set(), []
    for name, value in launch["args"].items():
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                repeated.append(name)
            seen.add(id(value))
    return repeated


def _assert_no_stand_ins(seen):
    assert seen
    for launch in seen:
        assert not _stand_ins(launch), (launch["kernel"], _stand_ins(launch))


@pytest.mark.parametrize("per_head", [False, True])
def test_qk_norm_launches_pass_absent_parameters_as_none(monkeypatch, per_head):
    H, D = 2, 8
    qkv = torch.randn(1, 5, 3 * H * D)
    shape = (H, D) if per_head else (D,)
    w = torch.randn(shape)
    with launches_on(monkeypatch, None) as seen:
        y = qk_norm.qk_norm_fwd(qkv, H, w, None, None, None, False, 1e-6)
        qk_norm.qk_norm_bwd(torch.randn_like(y), qkv, H, w, None, False, 1e-6,
                            q_weight_grad=True, k_weight_grad=False)
    _assert_no_stand_ins(seen)
    fwd = next(s for s in seen if s["kernel"] == "qk_norm_fwd_kernel")
    assert fwd["args"]["QB"] is None and fwd["args"]["KW"] is None
    reduce = next(s for s in seen if s["kernel"] == "layer_norm_param_grad_reduce_kernel")
    assert reduce["args"]["OUT1"] is None and not reduce["args"]["HAS_OUT1"]


def test_layer_norm_gradient_reduce_passes_absent_outputs_as_none(monkeypatch):
    """Only dweight wanted: one output of the reduce's three."""
    x, w = torch.randn(2, 3, 24), torch.randn(24)
    with launches_on(monkeypatch, None) as seen:
        y, _, mean, rstd = layer_norm.residual_layer_norm_fwd(x, w, None, 1e-6)
        layer_norm.residual_layer_norm_bwd(torch.randn_like(y), None, x, mean, rstd, w,
                                           has_residual=False, need_bias_grad=False)
    _assert_no_stand_ins(seen)
    reduce = next(s for s in seen if s["kernel"] == "layer_norm_param_grad_reduce_kernel")
    assert reduce["args"]["OUT1"] is None and reduce["args"]["OUT2"] is None
