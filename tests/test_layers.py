"""The library's layers, checked by reading its imports: nothing reaches up or sideways.

``src/trackflow`` never imports ``flows`` (Prefect wiring sits above the library) and only the
stages themselves and the command line's stage dispatch (``trackflow/cli.py``) import a stage
module: a command, a flow helper or a library module that needs what a stage does calls the library
function the stage calls. Nor does the library edit ``sys.path``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
MODULES = sorted(SRC.rglob("*.py"))
#: Modules allowed to import ``trackflow.stages``: the stages themselves and the CLI's dispatch.
STAGE_IMPORTERS = ("trackflow.stages", "trackflow.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, as absolute dotted names."""
    names: set[str] = set()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_modules_are_found() -> None:
    names = {module_name(path) for path in MODULES}
    assert {"trackflow.cli", "trackflow.stages.train", "trackflow.commands.schedule"} <= names


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_the_library_imports_no_flow(path: Path) -> None:
    assert not [name for name in imported(path) if within(name, "flows")]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_only_stages_and_the_stage_dispatch_import_a_stage(path: Path) -> None:
    name = module_name(path)
    if any(within(name, allowed) for allowed in STAGE_IMPORTERS):
        return
    assert not [i for i in imported(path) if within(i, "trackflow.stages")], name


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_the_library_does_not_edit_sys_path(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    edits = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]
    assert not edits, f"{module_name(path)} uses sys.path at lines {edits}"


def test_the_checks_see_imports_inside_functions() -> None:
    module = SRC / "trackflow" / "commands" / "promote.py"  # imports inside run()
    assert "trackflow.io.require_inputs" in imported(module)
