"""Import layering of the package, checked statically (the modules are parsed, never imported).

Layers, lowest first; a module may import its own layer or a lower one, never a higher one, and
no two modules may import each other, directly or not. Lazy (function-level) imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "runguard_autolog"
PKG = PACKAGE_DIR.name

LAYERS = [  # (layer, modules named relative to the package, "" being the package itself)
    ("core", {"_errors", "_config", "_counters", "_runtime", "_scopes", "_loops", "pricing", "tokens"}),
    ("stores", {"_store", "_redis", "_shared"}),
    ("guard", {"_call", "_streams", "_guard", "_attempts"}),
    ("recording", {"_recording"}),
    ("integrations", {"_patching", "_evaluation", "_artifacts", "integrations.*"}),
    ("api", {"", "__main__", "cli", "_bootstrap", "_report", "demo", "bootstrap.sitecustomize", "testing.*", "asgi", "wsgi", "_web"}),
]
FORBIDDEN = {"core": ("mlflow", "wrapt", "redis"), "stores": ("mlflow", "wrapt"), "guard": ("mlflow", "redis")}


def _module_names(package_dir: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def collect_imports(package_dir: Path):
    """-> (graph, external, lines): graph[module] = package modules it imports; external[module] =
    {top-level name of an absolute non-package import: line numbers}; lines[(module, imported)] =
    line numbers of that edge."""
    modules = _module_names(package_dir)
    pkg = package_dir.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    external: dict[str, dict[str, set[int]]] = {name: {} for name in modules}
    lines: dict[tuple[str, str], set[int]] = {}

    def resolve(dotted: str) -> str:  # the longest prefix that is a module of the package
        parts = dotted.split(".")
        while ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts)

    for name, path in modules.items():
        is_package = path.name == "__init__.py"

        def edge(target: str, lineno: int, name: str = name) -> None:
            graph[name].add(target)
            lines.setdefault((name, target), set()).add(lineno)

        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    if top == pkg:
                        edge(resolve(alias.name), node.lineno)
                    else:
                        external[name].setdefault(top, set()).add(node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                    if source.split(".")[0] != pkg:
                        external[name].setdefault(source.split(".")[0], set()).add(node.lineno)
                        continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    edge(sub if sub in modules else resolve(source), node.lineno)
    return graph, external, lines


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, and modules importing themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def upward_edges(graph: dict[str, set[str]], layers: dict[str, int]) -> list[tuple[str, str]]:
    """Imports from a module to one of a higher layer (modules without a layer are skipped)."""
    return sorted(
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if source in layers and target in layers and layers[target] > layers[source]
    )


def layer_of(module: str) -> str | None:
    short = module[len(PKG) + 1 :] if module.startswith(PKG + ".") else "" if module == PKG else module
    for layer, members in LAYERS:
        for member in members:
            if short == member or (member.endswith(".*") and (short + ".").startswith(member[:-1])):
                return layer
    return None


GRAPH, EXTERNAL, LINES = collect_imports(PACKAGE_DIR)
RANK = {layer: rank for rank, (layer, _) in enumerate(LAYERS)}


def _where(source: str, target: str) -> str:
    return f"{source} -> {target} (line {', '.join(map(str, sorted(LINES[(source, target)])))})"


def test_every_module_has_a_layer():
    missing = sorted(module for module in GRAPH if layer_of(module) is None)
    assert not missing, "modules with no layer (add them to LAYERS in tests/test_layers.py): " + ", ".join(missing)


def test_no_import_cycles():
    report = []
    for cycle in find_cycles(GRAPH):
        edges = [_where(s, t) for s in cycle for t in sorted(GRAPH[s]) if t in cycle]
        report.append("cycle " + " <-> ".join(cycle) + ":\n    " + "\n    ".join(edges))
    assert not report, "import cycles among package modules:\n  " + "\n  ".join(report)


def test_no_upward_imports():
    layers = {module: RANK[layer_of(module)] for module in GRAPH if layer_of(module)}
    report = [f"{_where(s, t)}: {layer_of(s)} imports {layer_of(t)}" for s, t in upward_edges(GRAPH, layers)]
    assert not report, "imports of a higher layer:\n  " + "\n  ".join(report)


def test_lower_layers_do_not_import_forbidden_libraries():
    report = [
        f"{module} ({layer_of(module)}) imports {name} (line {', '.join(map(str, sorted(at)))})"
        for module in sorted(EXTERNAL)
        for name, at in sorted(EXTERNAL[module].items())
        if name.startswith(FORBIDDEN.get(layer_of(module), ()))
    ]
    assert not report, "forbidden third-party imports:\n  " + "\n  ".join(report)


# --- the checker itself can fail ---


def test_checker_reports_cycles_and_upward_edges():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    layers = {"low": 0, "mid": 1, "high": 2}
    graph = {"low": {"mid"}, "mid": {"low"}, "high": {"low", "mid"}}
    assert upward_edges(graph, layers) == [("low", "mid")]


def test_collector_resolves_relative_absolute_and_lazy_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from . import a\nfrom .b import thing\n",
        "a.py": "import os\ndef f():\n    import pkg.b\n    from pkg import VERSION\n",
        "b.py": "def g():\n    from mlflow.tracking import X\n    from . import a\n",
        "sub/__init__.py": "from .. import b\nfrom . import c\n",
        "sub/c.py": "from ..a import f\nfrom pkg.sub import c\nfrom .. import *\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph, external, lines = collect_imports(pkg)
    assert graph == {
        "pkg": {"pkg.a", "pkg.b"},
        "pkg.a": {"pkg.b", "pkg"},
        "pkg.b": {"pkg.a"},
        "pkg.sub": {"pkg.b", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.a", "pkg.sub.c", "pkg"},
    }
    assert external["pkg.a"] == {"os": {1}} and external["pkg.b"] == {"mlflow": {2}}
    assert lines[("pkg.b", "pkg.a")] == {3}
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.b"], ["pkg.sub.c"]]
