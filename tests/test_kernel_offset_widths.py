"""Static check of the Triton kernels' pointer offsets: a tile, batch or loop index times a stride
must be computed in int64.

Triton passes integer arguments (strides, sizes) as i32 and program ids and ``range`` loop
variables are i32, so ``kb * stride_part_kb`` is an i32 product: it wraps once the tensor it
indexes passes 2^31 elements (the attention backward's dq partials at large batch, the split-K
GEMM's K offset over a large weight-gradient reduction), and the load then reads the wrong
element (or faults) without any error. Neither the interpreter tests (small shapes) nor the AOT
compiles see it, so every ``@triton.jit`` function under kernels/ is parsed here and each product

    <scalar index> * <...stride...>

where neither factor is cast to int64 is reported. A scalar index is a ``tl.program_id``, a ``for``
loop variable, a value a jit helper returns computed from one (``_tile_of_head``), a helper's
parameter that a call site passes one to, or a name computed from any of these. A stride is a name
containing "stride" (the kernels' argument convention). Blocks of element indices built with
``tl.arange`` (``rows[:, None] * stride_row``) are not scalar indices: they are bounded by one
dimension and cast where they span a batch (the GEMM's ``rows64``, qk_norm's ``r64``), which
tests/test_matmul_offsets.py checks at run time.
"""
import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "kernels"

# Products the scan finds that cannot wrap, each with the reason. A head index times the head
# stride of a [H, D] norm weight stays below that weight's size.
ALLOWED = {
    ("qk_norm_fwd_kernel", "h * stride_qw"): "h < H, stride_qw <= D: a [H, D] weight",
    ("qk_norm_fwd_kernel", "h * stride_qb"): "h < H, stride_qb <= D: a [H, D] bias",
    ("qk_norm_fwd_kernel", "h * stride_kw"): "h < H, stride_kw <= D: a [H, D] weight",
    ("qk_norm_fwd_kernel", "h * stride_kb"): "h < H, stride_kb <= D: a [H, D] bias",
    ("qk_norm_bwd_kernel", "h * stride_qw"): "h < H, stride_qw <= D: a [H, D] weight",
    ("qk_norm_bwd_kernel", "h * stride_kw"): "h < H, stride_kw <= D: a [H, D] weight",
    # The GLU epilogues' column offset inside one row: columns < 2H and C is the launcher's own
    # row-major output (stride_cn == 1), so the product stays below the row length.
    ("_glu_store", "offs_h[None, :] * stride_cn"): "offs_h < H, stride_cn == 1: a row of C",
    ("_dglu_store", "cols_i[None, :] * stride_cn"): "cols_i < H, stride_cn == 1: a row of C",
}


def _is_jit(fn):
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if (isinstance(target, ast.Attribute) and target.attr == "jit") or (
                isinstance(target, ast.Name) and target.id == "jit"):
            return True
    return False


def _names(expr):
    return {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}


def _calls(expr):
    """Names of the functions (``f`` or ``tl.f``) called anywhere in expr."""
    out = set()
    for node in ast.walk(expr):
        if isinstance(node, ast.Call):
            func = node.func
            out.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None))
    return out


def _is_int64_cast(expr):
    return (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
            and expr.func.attr in ("to", "cast") and any(
                isinstance(a, ast.Attribute) and a.attr in ("int64", "uint64")
                for a in list(expr.args) + [k.value for k in expr.keywords]))


class _Scan:
    """The jit functions of some modules and, after run(), the unsafe products in them."""

    def __init__(self, sources):
        self.funcs = {}  # name -> (file name, FunctionDef)
        for name, text in sources:
            for node in ast.parse(text).body:
                if isinstance(node, ast.FunctionDef) and _is_jit(node):
                    self.funcs[node.name] = (name, node)
        self.index_params = {f: set() for f in self.funcs}  # params a call site passes an index to
        self.returns_index = set()
        self.index = {f: set() for f in self.funcs}  # names holding a scalar index
        self.int64 = {f: set() for f in self.funcs}  # names assigned int64 values only

    def _wide(self, fn, expr):
        if _is_int64_cast(expr):
            return True
        if isinstance(expr, ast.Name):
            return expr.id in self.int64[fn]
        if isinstance(expr, ast.BinOp):  # i32 op i64 is promoted to i64
            return self._wide(fn, expr.left) or self._wide(fn, expr.right)
        if isinstance(expr, ast.Subscript):
            return self._wide(fn, expr.value)
        return False

    def _is_index(self, fn, expr):
        if self._wide(fn, expr):
            return False
        calls = _calls(expr)
        if "arange" in calls:
            return False
        return ("program_id" in calls or bool(calls & self.returns_index)
                or bool(_names(expr) & self.index[fn]))

    def _propagate(self, fn):
        """One pass over fn; True when it learnt something new."""
        _, node = self.funcs[fn]
        before = (len(self.index[fn]), len(self.int64[fn]), sum(map(len, self.index_params.values())),
                  len(self.returns_index))
        self.index[fn] |= self.index_params[fn]
        assigned = {}  # name -> [values]
        for sub in ast.walk(node):
            if isinstance(sub, ast.For):
                self.index[fn] |= _names(sub.target)
            elif isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and sub.value is not None:
                targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                for target in targets:
                    for name in _names(target):
                        assigned.setdefault(name, []).append(sub.value)
                        if isinstance(sub, ast.AugAssign):
                            assigned[name].append(target)
                        if self._is_index(fn, sub.value):
                            self.index[fn].add(name)
            elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in self.funcs:
                params = [a.arg for a in self.funcs[sub.func.id][1].args.args]
                for param, arg in zip(params, sub.args):
                    if self._is_index(fn, arg):
                        self.index_params[sub.func.id].add(param)
                for kw in sub.keywords:
                    if kw.arg in params and self._is_index(fn, kw.value):
                        self.index_params[sub.func.id].add(kw.arg)
            elif isinstance(sub, ast.Return) and sub.value is not None and self._is_index(fn, sub.value):
                self.returns_index.add(fn)
        for name, values in assigned.items():
            if all(self._wide(fn, v) for v in values):
                self.int64[fn].add(name)
        after = (len(self.index[fn]), len(self.int64[fn]), sum(map(len, self.index_params.values())),
                 len(self.returns_index))
        return after != before

    def run(self):
        """[(file, line, function, product source)] of the index * stride products in i32."""
        while any([self._propagate(fn) for fn in self.funcs]):
            pass
        found = []
        for fn, (file, node) in self.funcs.items():
            for sub in ast.walk(node):
                if not (isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Mult)):
                    continue
                for idx, other in ((sub.left, sub.right), (sub.right, sub.left)):
                    if (any("stride" in n for n in _names(other)) and self._is_index(fn, idx)
                            and not self._wide(fn, other)):
                        found.append((file, sub.lineno, fn, ast.unparse(sub)))
                        break
        return found


def _kernel_sources():
    return [(p.name, p.read_text()) for p in sorted(KERNELS.glob("*.py"))]


def test_the_scan_finds_what_it_should():
    """The scan itself on a made-up kernel: what wraps is found, what is cast or bounded is not."""
    src = '''
import triton
import triton.language as tl

@triton.jit
def _tile(N, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    return pid // N, (pid % N) * BLOCK

@triton.jit
def _at(base, row, stride_row):
    return tl.load(base + row * stride_row)

@triton.jit
def k(X, P, N, n_blocks, stride_xb, stride_xn, stride_pk, BLOCK: tl.constexpr):
    b, start = _tile(N, BLOCK)
    rows = start + tl.arange(0, BLOCK)
    x = tl.load(X + b * stride_xb + rows * stride_xn)
    y = tl.load(X + b.to(tl.int64) * stride_xb)
    b64 = b.to(tl.int64)
    z = tl.load(X + b64 * stride_xb)
    for kb in range(0, n_blocks):
        x += tl.load(P + kb * stride_pk)
        x += tl.load(P + kb.to(tl.int64) * stride_pk)
        lo = kb * BLOCK
        x += tl.load(P + lo * 2 * stride_pk)
    x += _at(P, start, stride_pk)
'''
    got = {(fn, expr) for _, _, fn, expr in _Scan([("k.py", src)]).run()}
    assert got == {("k", "b * stride_xb"), ("k", "kb * stride_pk"), ("k", "lo * 2 * stride_pk"),
                   ("_at", "row * stride_row")}, got


def test_index_times_stride_products_are_int64():
    scan = _Scan(_kernel_sources())
    found = scan.run()
    assert {"matmul_kernel", "attention_bwd_dq_reduce_kernel", "_tile_of_head"} <= set(scan.funcs)
    keys = {(fn, expr) for _, _, fn, expr in found}
    unsafe = [f"kernels/{file}:{line} {fn}: {expr}" for file, line, fn, expr in found
              if (fn, expr) not in ALLOWED]
    assert not unsafe, "i32 index * stride products (cast the index to tl.int64):\n" + "\n".join(unsafe)
    stale = set(ALLOWED) - keys
    assert not stale, f"ALLOWED names products the kernels no longer have: {sorted(stale)}"
