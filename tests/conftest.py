"""Shared fixtures: every test runs in its own folder with its own MLflow store."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Candidate:
    """A trained target model with its detector, as the train and anomaly stages leave them."""

    folder: Path
    processed: Path

    @property
    def files(self) -> dict[str, Path]:
        """The pipeline's paths to this candidate's inputs and outputs, by register-stage flag."""
        data = self.processed.parent
        return {
            "splits": data / "split",
            "data": self.processed,
            "preprocessor": data / "models/preprocessor.joblib",
            "model": self.folder / "model.pt",
            "detector": self.folder / "detector.joblib",
            "run": self.folder / "train_run.json",
        }


@pytest.fixture(scope="session")
def candidates(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Candidate]:
    """Two candidates trained once for the session, in the session store (``candidate_store``).

    ``good`` trains 15 epochs (test accuracy ~0.95), ``weak`` one epoch of a narrow network.
    """
    from trackflow.stages.anomaly import main as anomaly
    from trackflow.stages.train import main as train

    root = tmp_path_factory.mktemp("candidates")
    settings = {
        "good": {"train.max_epochs": 15, "model.widths": [64]},
        "weak": {"train.max_epochs": 1, "model.widths": [4], "train.lr": 0.0003},
    }
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", candidate_store_uri(root))
        for name, overrides in settings.items():
            folder = root / name
            folder.mkdir()
            patch.chdir(folder)
            raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
            for key, value in {
                **overrides,
                "train.mode": "scratch",
                "anomaly.detectors": ["knn"],
            }.items():
                set_dotted(raw, key, value)
            params = folder / "params.yaml"
            params.write_text(yaml.safe_dump(raw))
            assert train(train_argv(params, processed, "none.pt")) == 0
            data = processed.parent
            argv = ["--params", str(params), "--splits", str(data / "split")]
            argv += ["--preprocessor", str(data / "models/preprocessor.joblib")]
            argv += ["--model", "model.pt", "--run", "train_run.json"]
            argv += ["--detector-out", "detector.joblib", "--metrics", "anomaly.json"]
            assert anomaly([*argv, "--plots", "plots"]) == 0
            found[name] = Candidate(folder, processed)
    return found


def candidate_store_uri(root: Path) -> str:
    """The MLflow store the session's candidates were trained in."""
    return f"sqlite:///{root}/mlflow.db"


@pytest.fixture
def candidate_store(
    candidates: dict[str, Candidate],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> str:
    """Use the candidates' MLflow store in this test; return a model name no other test uses."""
    root = next(iter(candidates.values())).folder.parent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", candidate_store_uri(root))
    return "m-" + "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]


def imputing_twin(scorer: Any, rows: Any) -> Any:
    """A Scorer like ``scorer`` whose preprocessor, fitted on ``rows``, imputes missing values."""
    from trackflow.config import PreprocessConfig
    from trackflow.data.preprocessing import fit_preprocessor
    from trackflow.registry.packaging import Scorer

    config = PreprocessConfig(pca={"n_components": scorer.preprocessor[-1].n_components_})
    return Scorer(
        preprocessor=fit_preprocessor(rows, config, impute=True, seed=0),
        network=scorer.network,
        detector=scorer.detector,
        columns=scorer.columns,
        classes=scorer.classes,
    )
