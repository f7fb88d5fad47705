"""The package layering (DESIGN.md, "Layering"): raft/ is a generic multi-Raft
library that imports nothing from engine/ or bench/, and native/ imports none
of engine/, raft/ or bench/. Read from the source with `ast`, so an import
inside a function counts as much as one at the top. And pysyncobj's private
names (name-mangled state, single-underscore methods, patched module globals)
appear in raft/pysyncobj_adapter.py alone.

The folders install as one package (pyproject's package-dir): engine/ is
`raftka`, raft/ `raftka.raft`, native/ `raftka.native`, bench/ `raftka.bench`;
no code names the folders themselves as packages."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"raft": {"engine", "bench"}, "native": {"engine", "raft", "bench"}}
FOLDERS = ("engine", "raft", "native", "bench")
SUBPACKAGE_FOLDERS = {"raft", "native", "bench"}   # raftka.<these> live in their own folder


def folder_of(module: str) -> str | None:
    """The repository folder holding the module `module` names, or None when it is not ours."""
    parts = module.split(".")
    if parts[0] != "raftka":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGE_FOLDERS else "engine"


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
            if folder_of(name) in FORBIDDEN[package]:
                violations.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return violations


def test_raft_imports_nothing_from_engine_or_bench():
    assert layering_violations("raft") == []


def test_native_imports_nothing_from_engine_raft_or_bench():
    assert layering_violations("native") == []


def test_the_layering_check_catches_raft_importing_the_engine(tmp_path, monkeypatch):
    (tmp_path / "raft").mkdir()
    (tmp_path / "raft" / "leak.py").write_text("import raftka\nfrom raftka.storage.log import PartitionLog\n"
                                              "from raftka.raft.codec import encode\nfrom raftka.native import crc32c\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert [v.split(" imports ")[1] for v in layering_violations("raft")] == ["raftka", "raftka.storage.log"]


def test_no_code_imports_a_folder_name_as_a_package():
    """`import engine` or `from raft.x import y` would work from a clone's root
    only, by accident, and never from an installed raftka."""
    stray = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for folder in (*FOLDERS, "tests") for path in sorted((ROOT / folder).rglob("*.py"))
             for line, name in imported_packages(path) if name.split(".")[0] in FOLDERS]
    assert stray == []


def test_the_package_dir_mapping_installs_every_folder_under_raftka():
    import tomllib
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"raftka": "engine", "raftka.raft": "raft", "raftka.native": "native",
                                   "raftka.bench": "bench"}
    on_disk = {"raftka" + "".join("." + part for part in path.parent.relative_to(ROOT / "engine").parts)
               for path in (ROOT / "engine").rglob("__init__.py")}
    on_disk |= {f"raftka.{folder}" for folder in SUBPACKAGE_FOLDERS}
    assert set(tool["packages"]) == on_disk
    assert {name.split(".")[0] for name in tool["packages"]} == {"raftka"}


# ---- pysyncobj's private names: only raft/pysyncobj_adapter.py uses them ----

ADAPTER = ROOT / "raft" / "pysyncobj_adapter.py"
EXEMPT = {ADAPTER, Path(__file__).resolve()}   # this file names them as test data
CHECKED_PACKAGES = ("raft", "engine", "bench", "tests")


def pysyncobj_private_names() -> set[str]:
    """Every private name of pysyncobj's classes (their methods, and what
    SyncObj.__init__ assigns), plus the module globals the adapter patches."""
    from pysyncobj import SyncObj
    from pysyncobj.journal import Journal
    from pysyncobj.node import Node
    from pysyncobj.transport import Transport

    from raftka.raft import pysyncobj_adapter as adapter
    names = set(adapter.MODULE_GLOBALS) | set(adapter.SYNCOBJ_METHODS) | set(adapter.TRANSPORT_METHODS)
    names |= set(adapter.JOURNAL_METHODS)
    names |= {f"_SyncObj{name}" if name.startswith("__") else name for name in adapter.SYNCOBJ_ATTRIBUTES}
    for owner in (SyncObj, Transport, Journal, Node):
        names |= {name for name in vars(owner) if name.startswith("_") and not name.startswith("__")}
    return names


def private_name_uses(paths: list[Path]) -> list[str]:
    """"path:line uses name" for every pysyncobj private name in the files at `paths`."""
    names = sorted(pysyncobj_private_names(), key=len, reverse=True)
    pattern = re.compile(r"_SyncObj__\w+|\b(?:%s)\b" % "|".join(map(re.escape, names)))
    uses = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            uses += [f"{path}:{number} uses {name}" for name in pattern.findall(line)]
    return uses


def checked_files() -> list[Path]:
    return [path for package in CHECKED_PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
            if path not in EXEMPT]


def test_only_the_adapter_names_pysyncobj_private_attributes():
    assert private_name_uses(checked_files()) == []


def test_the_private_name_check_catches_mangled_single_underscore_and_patched_names(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("x = group._SyncObj__raftCommitIndex\n_syncobj.PIPE_NOTIFIER_ENABLED = False\n"
                      "group._onTick(0.0)\ngroup.transport._onMessageReceived(node, message)\n")
    found = {use.split(" uses ")[1] for use in private_name_uses([sample])}
    assert found == {"_SyncObj__raftCommitIndex", "PIPE_NOTIFIER_ENABLED", "_onTick", "_onMessageReceived"}


def test_the_adapter_refuses_a_pysyncobj_without_what_it_overrides(monkeypatch):
    from raftka.raft import pysyncobj_adapter as adapter
    monkeypatch.setattr(adapter, "SYNCOBJ_METHODS", adapter.SYNCOBJ_METHODS + ("_SyncObj__gone",))
    monkeypatch.setattr(adapter, "SYNCOBJ_ATTRIBUTES", adapter.SYNCOBJ_ATTRIBUTES + ("__vanished",))
    with pytest.raises(ImportError, match=r"SyncObj\._SyncObj__gone.*self\.__vanished"):
        adapter._check_pysyncobj()


# engine/'s own layers, bottom to top; a module may import its own layer and any below it
ENGINE_LAYERS = [
    {"config", "errors", "ports", "partitioner"},
    {"records", "protocol"},
    {"storage", "security"},
    {"replication", "cluster"},
    {"broker", "groups", "client"},
    {"admin", "cli", "simulate_cli", "security_cli"},
]


def engine_layer(name: str) -> int | None:
    """The layer of module `raftka.<name>...` of engine/ (bench counts with admin and cli, the top;
    `raftka` itself, the embedded API's face, too)."""
    folder = folder_of(name)
    if folder == "bench" or name == "raftka":
        return len(ENGINE_LAYERS) - 1
    if folder != "engine":
        return None
    return next((i for i, layer in enumerate(ENGINE_LAYERS) if name.split(".")[1] in layer), None)


def module_name(path: Path) -> str:
    """The installed name of the engine/ module at `path`: engine/storage/log.py is raftka.storage.log."""
    parts = path.relative_to(ROOT / "engine").with_suffix("").parts
    return ".".join(("raftka", *parts))


def engine_layering_violations() -> list[str]:
    violations = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative == Path("engine/__init__.py"):   # the package face: the embedded API, on top
            continue
        mine = engine_layer(module_name(path))
        for line, name in imported_packages(path):
            theirs = engine_layer(name)
            if mine is not None and theirs is not None and theirs > mine:
                violations.append(f"{relative}:{line} (layer {mine}) imports {name} (layer {theirs})")
    return violations


def test_engine_layers_import_only_their_own_layer_and_below():
    assert engine_layering_violations() == []


def test_every_engine_module_has_a_layer():
    unplaced = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "engine").rglob("*.py"))
                if p.relative_to(ROOT) != Path("engine/__init__.py")
                and engine_layer(module_name(p)) is None]
    assert unplaced == []
