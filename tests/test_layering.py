"""The package layering (DESIGN.md, "Layering"): raft/ is a generic multi-Raft
library that imports nothing from engine/ or bench/, and native/ imports none
of engine/, raft/ or bench/. Read from the source with `ast`, so an import
inside a function counts as much as one at the top."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"raft": {"engine", "bench"}, "native": {"engine", "raft", "bench"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the module at `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def layering_violations(package: str) -> list[str]:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, name in imported_packages(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return violations


def test_raft_imports_nothing_from_engine_or_bench():
    assert layering_violations("raft") == []


def test_native_imports_nothing_from_engine_raft_or_bench():
    assert layering_violations("native") == []
