"""File I/O shared by the stages: tables, JSON, and all-or-nothing outputs."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from trackflow.errors import DataError


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by :func:`write_table` (its index holds the original row ids)."""
    return pd.read_parquet(path)


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a table as Parquet, keeping its index (the row ids of the ingested dataset)."""
    frame.to_parquet(path, index=True)


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON with stable key order, so diffs of metrics and profiles stay readable."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def require_inputs(*paths: Path, made_by: str) -> None:
    """Refuse to start when an input from an earlier stage is missing, naming that stage."""
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise DataError(
            f"missing input {', '.join(missing)}: run the {made_by} stage first "
            f"(`dvc repro {made_by}` or `trackflow {made_by}`)"
        )


@contextmanager
def atomic_outputs(*targets: str | Path) -> Iterator[tuple[Path, ...]]:
    """Stage outputs in temporary places and move them onto ``targets`` only if the block succeeds.

    The block receives one staging path per target, each next to its target (so the final move is
    a rename on the same file system) and free to be written as a file or created as a directory.
    If the block raises, every staging path is removed and the targets are left as they were, so
    a failed stage never leaves partial outputs behind. The final moves are two-phase: the old
    targets are set aside first and put back if any move fails.

    Yields:
        The staging paths, in the order of ``targets``.
    """
    final = tuple(Path(target) for target in targets)
    token = uuid.uuid4().hex[:8]
    created = _missing_parents(final)
    for parent in reversed(created):
        parent.mkdir()
    staging = tuple(path.with_name(f".{path.name}.tmp-{token}") for path in final)
    try:
        yield staging
    except BaseException:
        for path in staging:
            _remove(path)
        for parent in created:
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        raise
    _commit(staging, final, token)


def _commit(staging: tuple[Path, ...], final: tuple[Path, ...], token: str) -> None:
    set_aside: list[tuple[Path, Path]] = []
    moved_in: list[Path] = []
    try:
        for target in final:
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old-{token}")
                os.replace(target, old)
                set_aside.append((old, target))
        for source, target in zip(staging, final, strict=True):
            os.replace(source, target)
            moved_in.append(target)
    except BaseException:
        for path in (*staging, *moved_in):
            _remove(path)
        for old, target in set_aside:
            os.replace(old, target)
        raise
    for old, _ in set_aside:
        _remove(old)


def _missing_parents(paths: tuple[Path, ...]) -> list[Path]:
    """Parents that do not exist yet, deepest first, without duplicates."""
    missing: list[Path] = []
    for path in paths:
        for parent in path.absolute().parents:
            if parent.exists():
                break
            if parent not in missing:
                missing.append(parent)
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
