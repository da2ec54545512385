"""The modules' layers (docs/architecture.md): every import runs down the reading order, so
that the layout shows the design and no cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

import autopar

PACKAGE = Path(autopar.__file__).parent

ORDER = [
    # the public surface
    "__init__",
    "_decorator",
    # tools over whole loops
    "_verify",
    "_replay",
    # the result collector
    "_collect",
    # the dispatch engine and its parts
    "_engine",
    "_outcomes",
    "_sending",
    "_timeouts",
    "_recovery",
    # the pools
    "_backends",
    "_exit",
    "_pool",
    "_main_guard",
    # what a loop is
    "_plan",
    "_options",
    "_chunking",
    "_calls",
    # analysis and debugging in the parent
    "_hazards",
    "_debugger",
    "_progress",
    # what runs in the workers
    "_worker",
    "_capture",
    "_logs",
    "_random",
    "_returns",
    "_shared",
    "_slots",
    # records, pickling and errors: the leaves
    "_culprit",
    "_serialize",
    "_results",
    "_records",
    "_errors",
    "_cpus",
]


def imported_modules(path: Path) -> set[str]:
    """The autopar modules ``path`` imports, anywhere in it (functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "autopar":
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("autopar."))
    return found


def test_every_module_has_its_place_in_the_layers() -> None:
    unplaced = {path.stem for path in PACKAGE.glob("*.py")} - set(ORDER)
    assert not unplaced, f"place these in ORDER and in docs/architecture.md: {sorted(unplaced)}"


def test_imports_run_down_the_layers() -> None:
    rank = {name: position for position, name in enumerate(ORDER)}
    upward = [
        f"{path.stem} imports {module}"
        for path in sorted(PACKAGE.glob("*.py"))
        for module in sorted(imported_modules(path))
        if module in rank and rank[module] <= rank[path.stem]
    ]
    assert upward == [], "imports up the layers (move the code, or invert the dependency): " + "; ".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "_errors.py"
    module.write_text("def f():\n    from autopar._engine import Dispatcher\n")
    assert imported_modules(module) == {"_engine"}
