"""No import circles through the conversion modules (issue 27: convert <-> convert_vit_pytorch).

The graph is read from the source, lazy imports inside functions included: a function-level
``from .convert import _adopt`` is a circle that only shows when that function first runs.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "vit_fast"
CONVERSION = {"convert", "convert_vit_pytorch", "convert_transformers", "convert_navit", "navit",
              "naflexvit", "record", "transformers_autograd", "adopt", "reclass", "timm_blocks",
              "vit_pytorch_match", "vit_pytorch_forms", "vit_pytorch_probe",
              "vit_pytorch_modules"}


def _graph():
    """{module: modules it imports} for the top-level modules of vit_fast (relative imports)."""
    names = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module is None:  # from . import x, y
                    deps.update(a.name for a in node.names)
                else:                    # from .x import y
                    deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_fast."):
                deps.add(node.module.split(".")[1])
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def _cycle_through(graph, start):
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph[node]):
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_the_graph_sees_lazy_imports():
    graph = _graph()
    assert "convert_vit_pytorch" in graph["convert"]      # imported at the top
    assert "vit_pytorch_modules" in graph["record"]        # imported inside a function


def test_no_import_circle_through_the_conversion_modules():
    graph = _graph()
    assert CONVERSION <= set(graph), CONVERSION - set(graph)
    circles = [c for c in (_cycle_through(graph, m) for m in sorted(CONVERSION)) if c]
    assert not circles, circles
