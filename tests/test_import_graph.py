"""Imports run one way down (issue 26): module -> op -> launcher, with no circle anywhere in the
package, imports inside functions included (a deferred import is still a dependency)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"vit_fast": ROOT / "vit_fast", "vit_fast.kernels": ROOT / "kernels"}


def _modules():
    """module name -> source path, for every module of the package."""
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([pkg, *parts])] = path
    return found


def _resolve(module, node, is_pkg):
    """Absolute names a From/Import node refers to (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module if is_pkg else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    prefix = (base + "." + node.module) if node.level and node.module else (
        base if node.level else node.module)
    return [prefix] + [f"{prefix}.{a.name}" for a in node.names]


def import_graph():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, node, path.name == "__init__.py"):
                    # a name imported from a module is that module; a package's __init__ is
                    # the package
                    while target and target not in mods:
                        target = target.rsplit(".", 1)[0] if "." in target else ""
                    if target and target != name and target != "vit_fast":
                        deps.add(target)
        graph[name] = deps
    return graph


def _cycles(graph):
    """Each strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    cycles = _cycles(import_graph())
    assert cycles == [], "\n".join(" <-> ".join(c) for c in cycles)


def test_kernels_import_only_torch_and_triton():
    """vit_fast.kernels ships inside the wheel and is what the ops call: it depends on nothing of
    vit_fast above it (the AOT spec lists may use vit_fast.aot: compile-check reads them)."""
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("vit_fast.kernels.") and not name.endswith("_aot"):
            above = [d for d in deps if not d.startswith("vit_fast.kernels")]
            assert above == [], f"{name} imports {above}"
