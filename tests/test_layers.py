"""The house in order: no import circles, and no layer imports a layer above it.

Layers, bottom to top (a module may import its own layer and the layers below):

1. root utilities: ``errors``, ``atomic``, ``config``, ``runs``, ``progress``, ``devices``, ``locking``,
   ``seeding``, ``tokenizer``, ``formatting``, ``images``
2. models and data: ``backbones``, ``identity`` (a model folder's fingerprint), ``data``, ``toyworld``
3. what stages share: ``training``, ``methods``
4. the meta objective: ``meta``
5. the stages: ``unlearn``, ``unlearn_config``, ``unlearn_data``, ``attacks``, ``metrics``
6. the Python API: ``api`` and the package itself (``metaunlearn.__version__``, the lazy API names)
7. the report: ``experiment/`` report, paper_tables, curve_tables, signals_table, yardsticks, figures, plots, html, provenance
8. the experiment: the rest of ``experiment/`` (config, grid, preflight, runner, schedule, demo)
9. the front ends: ``cli``, ``__main__``, ``commands``, ``docs_reference``, ``testing``

Read from the source with ``ast``: imports inside functions count (lazy imports are still dependencies), imports
under ``if TYPE_CHECKING:`` do not; ``from package import name`` counts as importing ``package.name`` when that is
a module; a module imported by name (``importlib``, as ``cli`` loads ``commands``) is not seen. A circle is a cycle of
the module graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "metaunlearn"
REPORT = ("report", "paper_tables", "curve_tables", "signals_table", "yardsticks", "figures", "plots", "html",
          "provenance")
LAYERS = [
    ["errors", "atomic", "config", "runs", "progress", "devices", "locking", "seeding", "tokenizer", "formatting",
     "images"],
    ["backbones", "identity", "data", "toyworld"],
    ["training", "methods"],
    ["meta"],
    ["unlearn", "unlearn_config", "unlearn_data", "unlearn_plan", "attacks", "metrics"],
    ["api", ""],
    [f"experiment.{name}" for name in REPORT],
    ["experiment"],
    ["cli", "__main__", "commands", "docs_reference", "testing"],
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["metaunlearn", *path.relative_to(PACKAGE).with_suffix("").parts]
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_node(other)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name: str) -> int:
    """The layer of a module: its longest listed prefix (``""`` is the package itself)."""
    rel = name.removeprefix("metaunlearn").removeprefix(".")
    best, level = -1, None
    for index, names in enumerate(LAYERS):
        for prefix in names:
            if (rel == prefix or rel.startswith(prefix + ".") or (prefix == "" and rel == "")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{name} is in no layer: add it to LAYERS (and the docstring)"
    return level


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_layer_imports_a_layer_above_it():
    upward = sorted(f"{name} -> {target}" for name, targets in graph().items() for target in targets
                    if layer(target) > layer(name))
    assert upward == []


def test_no_import_circles():
    edges = graph()
    circles, done, stack = [], set(), []

    def walk(name: str) -> None:
        stack.append(name)
        for target in sorted(edges.get(name, ())):
            if target in stack:
                circles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in done:
                walk(target)
        stack.pop()
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            walk(name)
    assert circles == []


def test_the_checker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from metaunlearn import api\n"
                      "def f():\n    from metaunlearn.experiment import plots\n    import metaunlearn.errors\n")
    known = modules()
    assert imports("metaunlearn.m", source, known) == {"metaunlearn.experiment.plots", "metaunlearn.errors"}
