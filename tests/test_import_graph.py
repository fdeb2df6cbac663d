"""Import hygiene the code relies on: scripts do not reach into tests/, and the builder's modules do
not import each other in a circle (function-level imports included: those hide a cycle, not break it)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_scripts_users_run_do_not_import_the_tests() -> None:
    for script in ("make_demo_data.py", "data_dirs.py", "fetch_coco128.py", "say_when_ready.py", "check_port.py"):
        modules = imported_modules(REPO_ROOT / "scripts" / script)
        assert not {m for m in modules if m == "tests" or m.startswith("tests.")}, script


def test_index_builder_modules_import_no_cycle() -> None:
    package = REPO_ROOT / "index_builder"
    graph = {
        path.stem: {m.split(".")[1] for m in imported_modules(path) if m.startswith("index_builder.")}
        for path in package.glob("*.py")
    }

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import cycle: {' -> '.join((*trail, module))}"
        for imported in sorted(graph.get(module, ())):
            visit(imported, (*trail, module))

    for module in sorted(graph):
        visit(module, ())
