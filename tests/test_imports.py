"""The package's modules import one another in one direction: no import circle at module level.

A circle works only as long as each module's top level avoids the other's names, and breaks on a
harmless-looking reorder; imports inside functions run later and are left out on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "robustbench_fvae"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: its body, and top-level ``if``/``try``
    blocks, but not ``if TYPE_CHECKING:`` (never run)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                stack += handler.body
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, inside functions too, but not under ``if TYPE_CHECKING:``."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node) if n is not node}
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skipped]


def import_graph(*, inside_functions: bool = False) -> dict[str, set[str]]:
    """Module → the package modules it imports at module level (with ``inside_functions``, also
    the imports that run later, inside functions); ``from pkg import mod`` counts as importing
    ``pkg.mod`` when that is a module, else ``pkg``."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    find = _all_imports if inside_functions else _top_level_imports
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in find(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module
                           for a in node.names]
            edges |= {t for t in targets if t in paths and t != name}
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "robustbench_fvae.data.registry" in graph["robustbench_fvae.data"]
    assert "robustbench_fvae.data.base" in graph["robustbench_fvae.data.registry"]


def test_no_import_circle_among_the_package_modules():
    assert find_cycles(import_graph()) == []


def test_no_import_circle_even_through_imports_inside_functions():
    """A lazy import hides a circle from the interpreter, not from the reader: the concepts
    still depend both ways. A package's ``__init__`` only hands names on, so an import of the
    package counts as an import of the modules it takes them from."""
    graph = import_graph(inside_functions=True)
    faces = {name for name in graph if (ROOT.parent / name.replace(".", "/") / "__init__.py")
             .is_file()}

    def through_faces(edges: set[str], seen: frozenset = frozenset()) -> set[str]:
        out: set[str] = set()
        for target in edges:
            if target in faces and target not in seen:
                out |= through_faces(graph[target], seen | {target})
            elif target not in faces:
                out.add(target)
        return out

    graph = {name: through_faces(edges) for name, edges in graph.items() if name not in faces}
    graph = {name: edges - {name} for name, edges in graph.items()}
    assert find_cycles(graph) == []


def test_the_registry_imports_neither_the_verifier_nor_the_downloader():
    """Not even inside a function: the data modules depend one way, registry ← verify ←
    download."""
    data = ROOT / "data"
    for module, forbidden in (("registry", {"verify", "download"}), ("verify", {"download"})):
        tree = ast.parse((data / f"{module}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        leaks = {m for m in imported if m.rsplit(".", 1)[-1] in forbidden}
        assert not leaks, (module, leaks)
