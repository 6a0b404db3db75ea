"""The shape of the package, kept: no import cycles, the front imported only by the
package root and the CLI, no module that regrows into a god piece (issue #19)."""

from __future__ import annotations

import ast
from pathlib import Path

import modelvault

PACKAGE = Path(modelvault.__file__).parent
MAX_MODULE_LINES = 700
MAX_VAULT_LINES = 600


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            stem = (f"{base}.{node.module}" if node.module else base) if node.level \
                else node.module or ""
            # `from . import _x` imports the module _x; `from ._x import y` imports _x.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem
                       for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_itself_back():
    graph = _graph()
    # The package root imports everything and is imported back for the front only by
    # modules loaded after it: leave it out of the search.
    graph = {n: {t for t in ts if t != "modelvault"} for n, ts in graph.items()
             if n != "modelvault"}
    cycles = []

    def visit(node: str, path: list[str], on_path: set[str], done: set[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, [*path, target], on_path | {target}, done)
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start}, done)
    assert cycles == []


def test_only_the_package_root_and_the_cli_import_the_front():
    importers = {name for name, targets in _graph().items() if "modelvault._vault" in targets}
    assert importers <= {"modelvault"} | {n for n in importers
                                          if n == "modelvault._cli"
                                          or n.startswith("modelvault._cli.")}


def test_no_module_regrows_into_a_god_piece():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}
    tree = ast.parse((PACKAGE / "_vault.py").read_text())
    (vault,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Vault"]
    assert vault.end_lineno - vault.lineno + 1 <= MAX_VAULT_LINES
