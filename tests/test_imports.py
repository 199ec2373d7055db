"""The package's modules import each other one way along the data flow: no cycles.

Every `import autopar...` counts, those inside functions too (a lazy import still
ties two modules together); only `if TYPE_CHECKING:` blocks, which never run, do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

import autopar

PACKAGE = Path(autopar.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            hidden |= {id(child) for child in ast.walk(node)}
    return hidden


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    hidden, found = _type_checking_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autopar"):
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> nx.DiGraph:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    for name, path in paths.items():
        for target in _imported(ast.parse(path.read_text()), set(paths)) - {name}:
            graph.add_edge(name, target)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert graph.has_edge("autopar.codegen.shard", "autopar.ops")  # the graph is real
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])
