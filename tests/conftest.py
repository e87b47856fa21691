"""Shared fixtures: every test runs in its own folder with its own MLflow store."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from trackflow.config import set_dotted
from trackflow.stages.ingest import main as ingest
from trackflow.stages.preprocess import main as preprocess
from trackflow.stages.split import main as split

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``tmp_path`` with a fresh SQLite MLflow store there: nothing touches the checkout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for variable in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(variable, "trackflow tests")
    for variable in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(variable, "tests@trackflow.invalid")
    return tmp_path


@pytest.fixture
def write_params(tmp_path: Path) -> Callable[..., Path]:
    """Write the repository's ``params.yaml`` with dotted overrides applied; return its path."""

    def write(overrides: dict[str, Any] | None = None, name: str = "params.yaml") -> Path:
        raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        for key, value in (overrides or {}).items():
            set_dotted(raw, key, value)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


def copy_project(destination: Path) -> None:
    """Copy what a pipeline run needs (code, dvc.yaml, params, DVC config) into ``destination``."""
    for name in ("src", "data/raw", ".dvc/config", "dvc.yaml", "params.yaml", ".gitignore"):
        source = REPO_ROOT / name
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def train_argv(params: Path, data: Path, backbone: str = "backbone.pt") -> list[str]:
    """Arguments of the train stage: model.pt, train.json, train_run.json, train_history.csv."""
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--backbone",
        backbone,
        "--model-out",
        "model.pt",
        "--metrics",
        "train.json",
        "--run-out",
        "train_run.json",
        "--history",
        "train_history.csv",
    ]


def pretrain_argv(params: Path, data: Path) -> list[str]:
    """Arguments of the pretrain stage, writing backbone.pt, pretrain.json, pretrain_run.json."""
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--backbone-out",
        "backbone.pt",
        "--metrics",
        "pretrain.json",
        "--run-out",
        "pretrain_run.json",
    ]


def run_data_stages(params: Path) -> int:
    """ingest -> split -> preprocess into the working directory; the first non-zero exit code."""
    steps = (
        (ingest, ["--out", "ingested"]),
        (split, ["--dataset", "ingested/dataset.parquet", "--out", "split"]),
        (
            preprocess,
            [
                "--splits",
                "split",
                "--out",
                "processed",
                "--preprocessor",
                "models/preprocessor.joblib",
                "--metrics",
                "metrics/preprocess.json",
                "--plots",
                "plots",
            ],
        ),
    )
    for stage, argv in steps:
        if code := stage(["--params", str(params), *argv]):
            return code
    return 0


@pytest.fixture(scope="session")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, split and preprocessed (16 PCA components) once for the session.

    Returns the ``processed`` folder; ``split`` and ``models/preprocessor.joblib`` sit beside it.
    """
    folder = tmp_path_factory.mktemp("data")
    params = folder / "params.yaml"
    text = (REPO_ROOT / "params.yaml").read_text()
    params.write_text(text.replace("n_components: 0.95", "n_components: 16"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
        patch.chdir(folder)
        assert run_data_stages(params) == 0
    return folder / "processed"
