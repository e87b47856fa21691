"""Running the pipeline's own stages in a scratch folder with params overrides, for benchmarks."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def scratch(overrides: dict[str, Any]) -> Iterator[Path]:
    """A temporary working folder with ``params.yaml`` (the repository's, overridden) and its
    own MLflow store; the process works inside it until the block ends."""
    from trackflow.config import set_dotted

    before = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())
        for key, value in {
            "base.mlflow.tracking_uri": f"sqlite:///{folder}/mlflow.db",
            **overrides,
        }.items():
            set_dotted(raw, key, value)
        (folder / "params.yaml").write_text(yaml.safe_dump(raw))
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(before)


def set_params(folder: Path, overrides: dict[str, Any]) -> None:
    """Change params of a scratch folder between stages."""
    from trackflow.config import set_dotted

    raw = yaml.safe_load((folder / "params.yaml").read_text())
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))


def stage_argv(name: str) -> list[str]:
    """A stage's arguments as ``dvc.yaml`` gives them (paths relative to the folder)."""
    cmd = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["cmd"]
    return shlex.split(cmd)[3:]  # after "python -m trackflow.stages.<name>"


def run(*stages: str) -> float:
    """Run stages in order in the current scratch folder; return their wall time in seconds."""
    import importlib

    start = time.perf_counter()
    for name in stages:
        module = importlib.import_module(f"trackflow.stages.{name}")
        if module.main(stage_argv(name)) != 0:
            sys.exit(f"stage {name} failed")
    return time.perf_counter() - start


def add_overrides_option(parser: Any, flag: str = "--set", what: str = "params") -> None:
    """A ``--set KEY=VALUE ...`` option for params overrides."""
    parser.add_argument(
        flag, nargs="*", default=[], metavar="KEY=VALUE", help=f"{what} overrides (YAML values)"
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings, values read as YAML."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}
