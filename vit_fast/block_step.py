"""The fused Block's step as one autograd node, for a configuration that has run once.

    y1      = LN1(x)                          kernel; not saved (the backward rebuilds it)
    qkv     = y1·Wqkvᵀ + bqkv                 cuBLAS
    o, lse  = attention(qkv)                  the kernel, or the alternative chosen for the key;
                                              where dispatch sends it to the reference (fp32 on
                                              a GPU) the public op, with a graph of its own
    p       = o·Wpᵀ + bp                      cuBLAS
    h, s    = LN2(s),  s = x + ls1·ss1·p      kernel; h not saved
    out     = s + ls2·ss2·MLP(h)              the MLP implementation chosen for the key

The general fused path (vit_fast/block_plan.py) runs the same math as three ops and an F.linear:
four autograd nodes, each op re-entering its launchers' per-call logic, plus under AMP eight
autograd casts. Once a configuration has run forward and backward there (kernels built, tuning
choices made), :class:`BlockStep` runs it as one node: the same launchers, kernels and configs,
the same roundings and casts, called straight down from one forward and one backward with
everything that depends only on the configuration decided when the step is made: the LayerNorm,
attention and MLP launches bound to it (kernels/layer_norm_bound.py, attention_bound.py,
matmul_bound.py through kernels/gelu_mlp.Gemms), AMP's weight casts kept per autocast region.
Under AMP its backward leaves out three of the general path's activation-sized casts -- the
LayerNorm backwards read their dy (and LN2 its branch) in the GEMMs' dtype, widening on the load
(exact), and LN2's writes the branch's gradient in it, rounding once on the store as the cast of
its fp32 value does (round to nearest even) -- so the bits stay the general path's.

Saved for backward, as the three ops save it: x, qkv, o, lse, s, the fc1 pre-activation, the
attention branch p only when ls1 or ss1 needs it, the GEMM weights (under AMP their casts) and
LayerNorm parameters. Neither LayerNorm output nor any statistic is saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import functional, step_program, tuning
from .amp_weights import AmpWeights
from .kernels import attention_bound as _attn
from .kernels import gelu_mlp as _gm
from .kernels import layer_norm_bound as _ln
from .kernels.gelu_elementwise import gelu_mlp_cublas_bwd as _cublas_mlp_bwd
from .kernels.gelu_mlp import gelu_mlp_fwd as _triton_mlp_fwd
from .ops import attention_sdpa as _attention
from .ops import gelu_mlp as _mlp
from .ops import gelu_mlp_tuned as _tuned
from .ops.gelu_mlp_tuned import mlp_launchers
from .ops.layer_norm import sample_scale_grad
from .ops.residual_layer_norm_mlp import gemm_grad


class BlockStep:
    """What one configuration of the fused Block runs (made by :meth:`make` from its BlockPlan
    and the shape it was planned for): the LayerNorm launches bound to that shape
    (kernels/layer_norm_bound.py), the attention and MLP implementations the plan's policy and
    the tuner chose for it (looked up once per variant: dropout, segments, drop-path, which
    gradients), AMP's dtype, and the parameters it was made with, by storage (:meth:`holds`)."""
    __slots__ = ("heads", "approximate", "amp", "policy", "mlp_fwd", "mlp_bwd", "attn_public",
                 "ptrs", "tuner", "x_shape", "lp", "ln1", "ln2", "ln_stats", "ln1_adds",
                 "ln_bwd", "attn_fwd", "attn_bwd", "mlp_choice", "x_dtype", "device", "casts",
                 "programs", "attn_ref")

    def __init__(self, plan, ptrs, x_shape, x_dtype, lp, device):
        self.heads, self.approximate, self.amp, self.policy = (plan.heads, plan.approximate,
                                                               plan.amp, plan.policy)
        self.ptrs, self.tuner, self.x_shape, self.lp = ptrs, tuning.tuner(), x_shape, lp
        if self.amp is not None:  # AMP's contract: the Triton MLP writes into the fp32 stream
            self.mlp_fwd, self.mlp_bwd = _triton_mlp_fwd, _mlp.backward_kernels
        else:
            self.mlp_fwd, self.mlp_bwd = mlp_launchers(self.policy)[:2]
        self.ln1 = _ln.bind_fwd(x_shape, device, lp)
        self.ln2 = {}  # (layer scale, drop-path) -> the bound residual LayerNorm
        self.ln_stats = _ln.bind_stats(x_shape, device, lp)
        self.ln_bwd = {}  # (which LayerNorm, its options) -> the bound backward
        self.attn_fwd, self.attn_bwd, self.mlp_choice = {}, {}, {}
        self.x_dtype, self.device = x_dtype, device
        # x's gradient is LN1's plus the residual's. In an fp32 stream LN1's backward adds the
        # residual's as it writes (one fp32 pass over [B, N, C] fewer), rounding as autograd's
        # add after it does (kernels/layer_norm._add_rounded); in a 16-bit one a single rounding
        # of the sum would not be the general path's bits, so the step adds afterwards.
        self.ln1_adds = x_dtype == torch.float32 and x_shape[-1] <= _ln.DS_MAX_C
        self.casts = None  # AMP: the GEMM parameters' casts of the last region (AmpWeights)
        # Where dispatch sends the attention to the reference (fp32 on CUDA), the step runs it
        # as the general path does, through the public op (:meth:`public_attention`).
        self.attn_public = not plan.attn_kernel
        # There, calls without segments run SDPA's own forward/backward pair where SDPA picks one
        # for the problem (ops/attention_sdpa.reference_pair): the reference's ops, no graph.
        self.attn_ref = (_attention.reference_pair((*x_shape[:-1], 3 * x_shape[-1]), lp, device,
                                                   self.heads) if self.attn_public else None)
        # The bodies of BlockFn recorded per key and replayed from C++ (vit_fast/step_program.py),
        # where the attention is not the public op's (which records a graph of its own).
        self.programs = (step_program.Programs(self._decided) if step_program.ENABLED and (
            not self.attn_public or self.attn_ref is not None) else None)

    def _decided(self):
        """What the step and its tuner have chosen so far (a recording must not choose)."""
        t = self.tuner
        return (len(self.ln2), len(self.ln_bwd), len(self.attn_fwd), len(self.attn_bwd),
                len(self.mlp_choice), len(t._fast), len(t._records))

    @classmethod
    def make(cls, block, plan, x_shape, x_dtype, device, params=None):
        """The step of ``plan``'s configuration for inputs of ``x_shape`` (the plan's), with
        ``block``'s parameters as they are now (or ``params``, in :meth:`forward`'s order: a
        converted transformers or vit-pytorch layer's); None where the bound
        launches do not apply (LayerNorms without weight or bias, a parameter vector that is not
        unit-stride, no rows)."""
        if params is None:
            params = _block_params(block)
        n1w, n1b, qw = params[0], params[1], params[2]
        vectors = (n1w, n1b, params[6], params[7], params[8], params[13])
        if (any(t is None for t in (n1w, n1b, params[7], params[8]))
                or any(t is not None and t.stride(-1) != 1 for t in vectors)
                or 0 in x_shape):
            return None
        lp = plan.amp if plan.amp is not None else qw.dtype
        return cls(plan, _storages(params), x_shape, x_dtype, lp, device)

    def holds(self, params) -> bool:
        """Whether ``params`` are the tensors the step was made with, by storage: a parameter
        replaced, or its ``.data`` swapped (whatever its shape, dtype or layout now), is not.
        Updates in place (optimizers) keep the storage."""
        return _storages(params) == self.ptrs

    def takes(self, x) -> bool:
        """Whether this call can be the step's: x contiguous (the bound launches read rows), the
        tuner it looked its choices up in in force, no profiler recording (the tuner's labels).
        With the public attention, no saved-tensor hooks either (checkpoint, offloading): its
        graph is kept on the node, out of their reach.
        Where not, the call takes the general path and the step stays for the next."""
        return (x.is_contiguous() and tuning.tuner() is self.tuner
                and not torch.autograd.profiler._is_profiler_enabled
                and not (self.attn_public and _saved_tensor_hooks(False) is not None))

    def forward(self, x, params, scalars, ss1, ss2, seed, segment_ids):
        """The Block's output; params = (n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2,
        ls2) as the modules hold them (fp32 under AMP); scalars = (eps1, eps2, scale, drop).
        The bound launches go to the current device: x's is entered when it is another (the
        backward runs on autograd's thread for x's device, where it is current)."""
        index = self.device.index if self.device.type == "cuda" else None
        if index is not None and torch._C._cuda_getDevice() != index:
            with torch.cuda.device(index):
                return BlockFn.apply(self, scalars, ss1, ss2, seed, segment_ids, x, *params)
        return BlockFn.apply(self, scalars, ss1, ss2, seed, segment_ids, x, *params)

    # -- what each variant runs, looked up once -------------------------------------------

    def residual_ln(self, ls1, ss1):
        key = (ls1 is not None, ss1 is not None)
        bound = self.ln2.get(key)
        if bound is None:
            bound = self.ln2[key] = _ln.bind_fwd(self.x_shape, self.device, self.lp, self.x_dtype,
                                                 *key)
        return bound

    def ln_backward(self, which, key):
        bound = self.ln_bwd.get((which, key))
        if bound is None:
            if which == 2:  # the residual LayerNorm: (bias grad, bias, weight, ls1 dtypes, ss1)
                bias_grad, bias_dtype, weight_dtype, ls_dtype, has_ss = key
                bound = _ln.bind_bwd(self.x_shape, self.device, self.x_dtype, has_ds=True,
                                     residual_dtype=self.x_dtype, layer_scale=ls_dtype,
                                     sample_scale=has_ss, bias_grad=bias_grad,
                                     bias_dtype=bias_dtype, weight_dtype=weight_dtype,
                                     dx_dtype=self.lp)  # dp: only the proj GEMMs read it
            else:  # LN1: (bias grad, bias dtype, weight dtype); adds the residual's dx
                bound = _ln.bind_bwd(self.x_shape, self.device, self.x_dtype,
                                     has_ds=self.ln1_adds, bias_grad=key[0], bias_dtype=key[1],
                                     weight_dtype=key[2])
            self.ln_bwd[(which, key)] = bound
        return bound

    def public_attention(self, qkv, scale, segment_ids, grad):
        """(o, graph): the attention as the general path runs it where dispatch sends it to the
        reference -- the public op, dispatch's choice (SDPA) -- without dropout (the plan gives
        the step no call with it: the reference draws its mask in the call's order). With
        ``grad``, the op records a graph of its own from a detached qkv: graph = (that qkv, o as
        recorded), for :func:`_public_attention_grad`; else None."""
        if not grad:
            return functional.fused_qkv_attention(qkv, self.heads, scale=scale,
                                                  segment_ids=segment_ids), None
        with torch.enable_grad():
            leaf = qkv.detach().requires_grad_()
            o = functional.fused_qkv_attention(leaf, self.heads, scale=scale,
                                               segment_ids=segment_ids)
        return o.detach(), (leaf, o)

    def attention_fwd(self, qkv, scale, drop, seed, segment_ids):
        key = (scale, drop, segment_ids is not None)
        fn = self.attn_fwd.get(key)
        if fn is None:
            chosen = _attention.forward_choice(qkv, self.heads, scale, drop, key[2], self.policy)
            if chosen is None:  # still open: choose through the op (next time it is known)
                return _attention.attention_forward(qkv, self.heads, scale, drop, seed,
                                                    segment_ids, self.policy)
            fn = self.attn_fwd[key] = self._bound_attention(chosen, key, _attn.bind_fwd)
        if type(fn) is _attn.AttentionFwd:
            return fn(qkv, scale, drop, seed)
        return fn(qkv, self.heads, scale, drop, seed, segment_ids)

    def attention_bwd(self, do, qkv, o, lse, scale, drop, seed, segment_ids):
        key = (scale, drop, segment_ids is not None)
        fn = self.attn_bwd.get(key)
        if fn is None:
            chosen = _attention.backward_choice(qkv, self.heads, scale, drop, key[2], self.policy)
            if chosen is None:
                return _attention.attention_backward(do, qkv, o, lse, self.heads, scale, drop,
                                                     seed, segment_ids, self.policy)
            fn = self.attn_bwd[key] = self._bound_attention(chosen, key, _attn.bind_bwd)
        if type(fn) is _attn.AttentionBwd:
            return fn(do, qkv, o, lse, scale, drop, seed)
        return fn(do, qkv, o, lse, self.heads, scale, drop, seed, segment_ids)

    def _bound_attention(self, chosen, key, bind):
        """The kernel's launch bound to this configuration where the kernel was chosen and the
        call is a plain one (no segments, a positive scale); else the chosen implementation."""
        name, fn = chosen
        scale, drop, segmented = key
        if name != "triton" or segmented or not scale > 0:
            return fn
        C = self.x_shape[-1]
        return bind((*self.x_shape[:-1], 3 * C), self.heads, self.lp, drop != 0.0, self.device)

    def mlp_forward(self, h, w1, b1, w2, b2, s, ls2, ss2):
        """(out, pre) of the MLP implementation for this variant (LayerScale, drop-path): the
        Triton MLP with its launches bound to the variant (AMP's contract; the policy 'triton';
        under 'auto' where the tuner chose it), else the implementation chosen for the key."""
        key = ("fwd", ls2 is None, ss2 is None)
        impl = self.mlp_choice.get(key)
        args = (h, w1, b1, w2, b2, self.approximate, s, ls2, ss2, True)
        if impl is None:
            fn = self.mlp_fwd
            if self.amp is None and self.policy == "auto":
                fn = _tuned.forward_choice(*args)
                if fn is None:  # still open: choose through the op (next time it is known)
                    return self.mlp_fwd(*args)
            impl = self.mlp_choice[key] = self._gemms() if fn in _TRITON_FWD else fn
        if type(impl) is _gm.Gemms:
            return _gm.mlp_forward(impl, *args, s.dtype if self.amp is not None else None)
        return impl(*args)

    def mlp_backward(self, args, wanted):
        """(dx, dW1, db1, dW2, db2, dls, dss), None or empty where not wanted; the
        implementation as :meth:`mlp_forward` chooses it, for the backward's key."""
        key = ("bwd", wanted, args[6] is None, args[7] is None)
        impl = self.mlp_choice.get(key)
        if impl is None:
            fn = self.mlp_bwd
            if self.amp is None and self.policy == "auto":
                fn = _tuned.backward_choice(*args, approximate=self.approximate,
                                            has_residual=True, wanted=wanted)
                if fn is None:
                    return self.mlp_bwd(*args, approximate=self.approximate, has_residual=True,
                                        **_mlp.wanted_kwargs(wanted))
            base = getattr(fn, "impl", fn)
            impl = self.mlp_choice[key] = (self._gemms() if base in _TRITON_BWD else
                                           ("cublas", self._gemms()) if base in _CUBLAS_BWD
                                           else fn)
        if type(impl) is _gm.Gemms:
            return _gm.mlp_backward(impl, *args, self.approximate, True, wanted)
        if type(impl) is tuple:  # the cuBLAS MLP, its column sums bound
            return _cublas_mlp_bwd(*args, approximate=self.approximate, has_residual=True,
                                   wanted=wanted, gemms=impl[1])
        if impl is self.mlp_bwd:
            return impl(*args, approximate=self.approximate, has_residual=True,
                        **_mlp.wanted_kwargs(wanted))
        return impl(*args)

    @staticmethod
    def _gemms():
        """The Triton MLP's launches, each bound on its first call (kernels/gelu_mlp.Gemms)."""
        return _gm.Gemms(_mlp.gemm_chooser(), {})


# The Triton MLP's launchers, by which the step knows to run it with bound launches: the
# functions its policies and the tuner's choices name (all launch with vit_fast.tuning's chooser).
_TRITON_FWD = (_triton_mlp_fwd, _tuned.FWD["triton"])
_TRITON_BWD = (_mlp.backward_kernels, _tuned.BWD["triton"])
# The cuBLAS MLP's backward (the policy 'cublas', the tuner's cuBLAS choice): its two column sums
# bound (kernels/gelu_elementwise.gelu_mlp_cublas_bwd's gemms).
_CUBLAS_BWD = (mlp_launchers("cublas")[1], _tuned.BWD["cublas"])


def _block_params(block):
    a, mlp = block.attn, block.mlp
    return (block.norm1.weight, block.norm1.bias, a.qkv.weight, a.qkv.bias, a.proj.weight,
            a.proj.bias, block.ls1._parameters.get("gamma"), block.norm2.weight, block.norm2.bias,
            mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
            block.ls2._parameters.get("gamma"))


def _as(t, dtype):
    """t in dtype: a call of .to() costs a dispatch even when it has nothing to do (fp32)."""
    return t if t.dtype == dtype else t.to(dtype)


def _storages(params):
    return [0 if p is None else p.data_ptr() for p in params]


# The step's own cast cache: its casts are made inside the node (no autograd), so they must never
# be handed to the general path, whose casts carry the gradient to the fp32 parameter.
_CASTS = AmpWeights()


def _amp_casts(step, amp, params):
    """The GEMM weights in the autocast dtype, cast once per autocast region (as the general
    path's AmpWeights casts them; the step keeps the group's entry), the rest as they are."""
    n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = params
    qw, qb, pw, pb, w1, b1, w2, b2 = _CASTS.cast_group((qw, qb, pw, pb, w1, b1, w2, b2), amp,
                                                       _CASTS.region(qw.device, amp), step)
    return n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2


def _saved_tensor_hooks(ignore_is_tracing):
    """The innermost saved-tensor hooks in force (None: none)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(ignore_is_tracing)


def _public_attention_grad(ctx, do):
    """dqkv through the public attention's own graph (BlockStep.public_attention), kept for
    another backward only when this one keeps the graph (retain_graph): else freed here, as the
    node's saved tensors are."""
    if ctx.attn_graph is None:
        raise RuntimeError("Trying to backward through the fused Block's attention a second time "
                           "(or directly access saved tensors after they have already been "
                           "freed): specify retain_graph=True the first time")
    leaf, o = ctx.attn_graph
    keep = _keep_graph()
    dqkv = torch.autograd.grad(o, leaf, do, retain_graph=keep)[0]
    if not keep:
        ctx.attn_graph = None
    return dqkv


def _keep_graph():
    """Whether the running backward keeps its graph (retain_graph); True where this torch cannot
    tell (the graph is then kept until the node is freed)."""
    fn = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if fn is None else fn()


# Positions of the inputs of BlockFn.apply (for ctx.needs_input_grad).
_X, _N1W, _N1B, _QW, _QB, _PW, _PB, _LS1, _N2W, _N2B, _W1, _B1, _W2, _B2, _LS2 = range(6, 21)
_SS1, _SS2 = 2, 3


class BlockFn(torch.autograd.Function):
    """The fused Block forward and backward (see the module docstring); non-differentiable
    arguments first: step, scalars, ss1, ss2, seed, segment_ids, then x and the parameters."""

    @staticmethod
    def forward(ctx, step, scalars, ss1, ss2, seed, segment_ids, x, *params):
        amp = step.amp
        if amp is not None:
            params = _amp_casts(step, amp, params)
        n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = params
        programs = step.programs
        if programs is not None and ss1 is None and ss2 is None and seed is None \
                and segment_ids is None:
            out, qkv, o, lse, s, pre, p, r1, r2 = programs.run(
                scalars, (x, *params), _forward_body, ctx, step, scalars, x, params, None, None,
                None, None)
        else:
            out, qkv, o, lse, s, pre, p, r1, r2 = _forward_body(ctx, step, scalars, x, params,
                                                                ss1, ss2, seed, segment_ids)
        ctx.save_for_backward(x, qkv, o, lse, s, pre, p, n1w, n1b, qw, pw,
                              n2w, n2b, w1, w2, b2, ls1, ls2, ss1, ss2, seed, segment_ids, r1, r2)
        ctx.step, ctx.scalars = step, scalars
        ctx.bias_dtypes = (n1b.dtype if n1b is not None else None,
                           n2b.dtype if n2b is not None else None, b1 is not None,
                           qb is not None, pb is not None)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, dout):
        if dout is None:
            return (None,) * 21
        saved = ctx.saved_tensors
        programs = ctx.step.programs
        if (programs is not None and saved[18] is None and saved[19] is None
                and saved[20] is None and saved[21] is None and not torch.is_grad_enabled()):
            return programs.run((ctx.scalars, ctx.needs_input_grad, ctx.bias_dtypes),
                                (dout, *saved[:18], *saved[22:]), _backward_body, ctx, dout,
                                saved)
        return _backward_body(ctx, dout, saved)


def _forward_body(ctx, step, scalars, x, params, ss1, ss2, seed, segment_ids):
    """(out, qkv, o, lse, s, pre, p, r1, r2): the forward's math (see the module docstring); p
    only where the backward needs it (ls1, or a sample scale that requires grad); r1, r2: the
    Philox seed and offset of SDPA's reference pair where it ran and has them."""
    eps1, eps2, scale, drop = scalars
    n1w, n1b, qw, qb, pw, pb, ls1, n2w, n2b, w1, b1, w2, b2, ls2 = params
    y1 = step.ln1(x, n1w, n1b, eps1)[0]
    qkv = F.linear(y1, qw, qb)
    del y1
    r1 = r2 = None
    if step.attn_ref is not None and segment_ids is None:
        o, lse, r1, r2 = _attention.reference_fwd(step.attn_ref, qkv, step.heads, scale)
    elif step.attn_public:
        o, ctx.attn_graph = step.public_attention(qkv, scale, segment_ids,
                                                  any(ctx.needs_input_grad))
        lse = None
    else:
        o, lse = step.attention_fwd(qkv, scale, drop, seed, segment_ids)
    p = F.linear(o, pw, pb)
    h, s = step.residual_ln(ls1, ss1)(p, n2w, n2b, eps2, x, ls1, ss1)
    out, pre = step.mlp_forward(h, w1, b1, w2, b2, s, ls2, ss2)
    need_p = ls1 is not None or (ss1 is not None and ss1.requires_grad)
    return out, qkv, o, lse, s, pre, p if need_p else None, r1, r2


def _backward_body(ctx, dout, saved):
    """The backward's 21 gradients (None where not wanted), from the forward's saved tensors."""
    (x, qkv, o, lse, s, pre, p, n1w, n1b, qw, pw, n2w, n2b, w1, w2, b2, ls1, ls2, ss1, ss2,
     seed, segment_ids, r1, r2) = saved
    step = ctx.step
    eps1, eps2, scale, drop = ctx.scalars
    n1b_dtype, n2b_dtype, has_b1, has_qb, has_pb = ctx.bias_dtypes
    need = ctx.needs_input_grad
    lp = qw.dtype
    C = x.shape[-1]

    # residual -> LN2 -> MLP (vit_fast/ops/residual_layer_norm_mlp.py's backward)
    g = dout.contiguous()
    h, mean, rstd = step.ln_stats(s, n2w, n2b, eps2)  # LN2's rows: x's shape and dtype
    wanted = _mlp.MlpGrads(fc1_bias=need[_B1] and has_b1, fc2_bias=need[_B2] and b2 is not None,
                           layer_scale=need[_LS2] and ls2 is not None,
                           sample_scale=need[_SS2] and ss2 is not None)
    g_lp, ls_lp, k = gemm_grad(g, ls2, lp)
    dh, dw1, db1, dw2, db2, dls2, dss2 = step.mlp_backward(
        (g_lp, h, w1, w2, b2, pre, ls_lp, _as(ss2, lp) if ss2 is not None else None), wanted)
    del h
    if k is not None and dls2 is not None and dls2.numel():
        dls2 = dls2.float() / k  # exact: k is a power of two
    # The LayerNorm backwards read dh (and p) in the GEMMs' dtype, widening on the load
    # (exact), and LN2's writes dp in it, rounding once as the general path's cast does:
    # three activation-sized casts fewer under AMP.
    ln2_bwd = step.ln_backward(2, (need[_N2B], n2b_dtype, n2w.dtype,
                                   ls1.dtype if ls1 is not None else None, ss1 is not None))
    dp, dres, dn2w, dn2b, dls1 = ln2_bwd(dh, g, s, mean, rstd, n2w, p, ls1, ss1)
    dss1 = sample_scale_grad(dres, p, ls1, ss1) if (need[_SS1] and ss1 is not None) else None
    del dh, g, g_lp

    # proj (F.linear's backward, in the GEMMs' dtype)
    gp = dp.reshape(-1, C)
    dpw = gp.t().mm(o.reshape(-1, C)) if need[_PW] else None
    dpb = gp.sum(0) if (has_pb and need[_PB]) else None
    do = gp.mm(pw).reshape(o.shape)
    del gp, dp

    # attention
    if step.attn_ref is not None and segment_ids is None:
        dqkv = _attention.reference_bwd(step.attn_ref, do, qkv, o, lse, r1, r2, step.heads,
                                        scale)
    elif step.attn_public:
        dqkv = _public_attention_grad(ctx, do)
    else:
        dqkv = step.attention_bwd(do, qkv, o, lse, scale, drop, seed, segment_ids)
    del do

    # LN1 -> qkv (vit_fast/ops/layer_norm_linear.py's backward)
    g3 = dqkv.reshape(-1, 3 * C)
    y1, mean, rstd = step.ln_stats(x, n1w, n1b, eps1)
    dqw = g3.t().mm(y1.reshape(-1, C)) if need[_QW] else None
    del y1
    dqb = g3.sum(0) if (has_qb and need[_QB]) else None
    dy1 = g3.mm(qw).reshape(x.shape)
    del g3, dqkv
    adds = step.ln1_adds
    dx, _, dn1w, dn1b, _ = step.ln_backward(1, (need[_N1B], n1b_dtype, n1w.dtype))(
        dy1, dres if adds else None, x, mean, rstd, n1w)
    if not adds:
        dx.add_(dres)

    def kept(grad, i):
        return grad if (need[i] and grad is not None and grad.numel()) else None
    return (None, None, dss1, kept(dss2, _SS2), None, None, dx,
            kept(dn1w, _N1W), kept(dn1b, _N1B), dqw, dqb, dpw, dpb, kept(dls1, _LS1),
            kept(dn2w, _N2W), kept(dn2b, _N2B), dw1, kept(db1, _B1), dw2, kept(db2, _B2),
            kept(dls2, _LS2))
