"""Running the pipeline's own stages in a scratch folder with params overrides, for benchmarks."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

ARGS = {
    "ingest": ["--out", "ingested"],
    "split": ["--dataset", "ingested/dataset.parquet", "--out", "split"],
    "preprocess": [
        "--splits",
        "split",
        "--out",
        "processed",
        "--preprocessor",
        "pre.joblib",
        "--metrics",
        "preprocess.json",
        "--plots",
        "plots/preprocess",
    ],
    "pretrain": [
        "--data",
        "processed",
        "--backbone-out",
        "backbone.pt",
        "--metrics",
        "pretrain.json",
        "--run-out",
        "pretrain_run.json",
    ],
    "train": [
        "--data",
        "processed",
        "--backbone",
        "backbone.pt",
        "--model-out",
        "model.pt",
        "--metrics",
        "train.json",
        "--run-out",
        "train_run.json",
        "--history",
        "train_history.csv",
    ],
    "evaluate": [
        "--data",
        "processed",
        "--model",
        "model.pt",
        "--run",
        "train_run.json",
        "--history",
        "train_history.csv",
        "--metrics",
        "evaluate.json",
        "--plots",
        "plots/evaluate",
    ],
    "anomaly": [
        "--splits",
        "split",
        "--preprocessor",
        "pre.joblib",
        "--model",
        "model.pt",
        "--run",
        "train_run.json",
        "--detector-out",
        "detector.joblib",
        "--metrics",
        "anomaly.json",
        "--plots",
        "plots/anomaly",
    ],
}


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


def run(*stages: str) -> float:
    """Run stages in order in the current scratch folder; return their wall time in seconds."""
    import importlib

    start = time.perf_counter()
    for name in stages:
        module = importlib.import_module(f"trackflow.stages.{name}")
        if module.main(["--params", "params.yaml", *ARGS[name]]) != 0:
            sys.exit(f"stage {name} failed")
    return time.perf_counter() - start


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings, values read as YAML."""
    return {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in items)}
