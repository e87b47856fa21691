"""The pipeline under real DVC, in a temporary git repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import FAST_TRAINING, copy_project
from trackflow.config import set_dotted
from trackflow.io import read_json

STAGES = ("ingest", "split", "preprocess", "pretrain", "train", "evaluate", "anomaly", "register")
FAST = {**FAST_TRAINING, "promotion.min_accuracy": 0.5}  # the pipeline's wiring, not accuracy
OUTPUTS = (
    "data/ingested/dataset.parquet",
    "data/split/target_train.parquet",
    "data/processed/target_test.parquet",
    "models/preprocessor.joblib",
    "metrics/preprocess.json",
    "plots/preprocess/scree.png",
    "models/backbone.pt",
    "models/model.pt",
    "models/train_run.json",
    "metrics/evaluate.json",
    "models/detector.joblib",
    "plots/anomaly/roc_curves.png",
    "models/registered.json",
)


def sh(*args: str, cwd: Path, fails: bool = False) -> str:
    """Run a command with the test interpreter's environment first on PATH; return its output.

    It must succeed, or with ``fails`` exit non-zero.
    """
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")  # the stages use the params' store, inside the repository
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert (result.returncode != 0) == fails, f"{' '.join(args)}: {result.returncode}\n{output}"
    return output


def ran(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def edit_params(repo: Path, changes: dict[str, object]) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        set_dotted(raw, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    copy_project(repo)  # with the project's .dvc/config, naming its default remote
    edit_params(repo, FAST)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "project", cwd=repo)
    return repo


@pytest.mark.slow
def test_repro_skips_unchanged_stages_and_reruns_from_what_changed(repo: Path) -> None:
    assert ran(sh("dvc", "repro", cwd=repo)) == list(STAGES)
    assert all((repo / path).exists() for path in OUTPUTS)
    assert (repo / "mlruns/mlflow.db").exists()

    again = sh("dvc", "repro", cwd=repo)
    assert ran(again) == [] and "Data and pipelines are up to date" in again

    valid = (repo / "params.yaml").read_text()
    edit_params(repo, {"trian.lr": 0.1})  # a misspelt section: no stage lists its keys
    refused = sh("dvc", "repro", cwd=repo, fails=True)
    assert "unknown key 'trian' (did you mean 'train'?)" in refused and ran(refused) == []
    (repo / "params.yaml").write_text(valid)
    assert ran(sh("dvc", "repro", cwd=repo)) == []

    edit_params(repo, {"preprocess.pca.n_components": 8, "model.backbone": "mlp"})
    assert ran(sh("dvc", "repro", cwd=repo)) == list(STAGES[2:])
    assert read_json(repo / "metrics/preprocess.json")["n_components"] == 8
    metrics = sh("dvc", "metrics", "show", "--json", cwd=repo)
    assert '"n_components": 8' in metrics


@pytest.mark.slow
def test_push_then_pull_restores_the_data_in_a_fresh_clone(repo: Path, tmp_path: Path) -> None:
    sh("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline results", cwd=repo)
    sh("dvc", "push", cwd=repo)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"), cwd=clone)
    assert not (clone / OUTPUTS[0]).exists()
    sh("dvc", "pull", cwd=clone)
    for path in OUTPUTS:
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "up to date" in sh("dvc", "status", cwd=clone)


@pytest.mark.slow
def test_a_users_csv_runs_through_by_changing_params_only(repo: Path) -> None:
    sh("trackflow", "example-data", "breast_cancer", "data/raw/breast_cancer.csv", cwd=repo)
    sh("dvc", "add", "data/raw/breast_cancer.csv", cwd=repo)
    edit_params(
        repo,
        {
            "data.source": "data/raw/breast_cancer.csv",
            "data.source_classes": None,
            "data.target_classes": None,
            "preprocess.pca.n_components": 0.9,
            "model.backbone": "mlp",
            "train.mode": "scratch",
        },
    )
    assert ran(sh("dvc", "repro", cwd=repo)) == list(STAGES)
    profile = read_json(repo / "data/ingested/profile.json")
    assert profile["n_rows"] == 569 and profile["n_features"] == 30
    assert profile["class_counts"] == {"0": 212, "1": 357}
    assert read_json(repo / "metrics/preprocess.json")["explained_variance"] >= 0.9
    assert not (repo / "data/split/source_train.parquet").exists()
    assert read_json(repo / "models/pretrain_run.json")["run_id"] is None  # nothing to pretrain
    assert read_json(repo / "models/train_run.json")["mode"] == "scratch"
    evaluation = read_json(repo / "plots/evaluate/all_metrics.json")["test"]
    assert set(evaluation["per_class"]) == {"0", "1"} and evaluation["accuracy"] > 0.8
    assert "source_classes" not in read_json(repo / "plots/anomaly/all_metrics.json")["knn"]


@pytest.mark.slow
def test_repro_registers_a_champion_with_its_lineage_and_a_worse_experiment_is_not_promoted(
    repo: Path,
) -> None:
    sh("dvc", "repro", cwd=repo)
    first = read_json(repo / "models/registered.json")
    assert first["promoted"] and first["version"] == "1" and first["champion"] == "1"

    chain = json.loads(sh("trackflow", "lineage", "trackflow@champion", "--json", cwd=repo))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for stage, path in (("preprocess", "data/processed"), ("train", "models/model.pt")):
        out = next(o for o in lock[stage]["outs"] if o["path"] == path)
        assert chain["data"]["dvc"][path] == out["md5"]
    head = sh("git", "rev-parse", "HEAD", cwd=repo).strip()
    assert chain["training"]["git_commit"] == head
    assert chain["preprocessing"]["n_components"] is not None
    assert chain["backbone"]["source"] == "models/backbone.pt"
    assert [h["action"] for h in chain["history"]] == ["challenger", "promote"]

    out = sh("dvc", "exp", "run", "-S", "train.max_epochs=1", "-S", "train.lr=0.00001", cwd=repo)
    assert ran(out) == ["train", "evaluate", "anomaly", "register"]
    worse = read_json(repo / "models/registered.json")
    assert worse["version"] == "2" and not worse["promoted"] and worse["champion"] == "1"
    history = sh("trackflow", "history", "--format", "json", cwd=repo)
    assert [e["action"] for e in json.loads(history)][-1] == "reject"


def error_line(output: str) -> str:
    (error,) = [line for line in output.splitlines() if line.startswith("error: ")]
    return error


@pytest.mark.slow
def test_a_refused_stage_says_dvc_deleted_its_outputs_and_how_to_restore_them(repo: Path) -> None:
    valid = (repo / "params.yaml").read_text()
    edit_params(repo, {"data.source": "data/raw/absent.csv"})
    # A dvc.lock with no entry for ingest. A command of its own: ingest does not depend on the
    # params stage, so `dvc repro params ingest` may run ingest first.
    sh("dvc", "repro", "params", cwd=repo)
    first = error_line(sh("dvc", "repro", "ingest", cwd=repo, fails=True))
    assert first.endswith("dvc.lock records no successful run of it to restore")

    (repo / "params.yaml").write_text(valid)
    assert ran(sh("dvc", "repro", "ingest", cwd=repo)) == ["ingest"]
    good = (repo / "data/ingested/dataset.parquet").read_bytes()

    edit_params(repo, {"data.source": "data/raw/absent.csv"})
    error = error_line(sh("dvc", "repro", "ingest", cwd=repo, fails=True))
    assert "data file 'data/raw/absent.csv' does not exist" in error
    assert "DVC deleted stage ingest's outputs before running it" in error
    assert "`dvc checkout ingest` restores its last good outputs from DVC's cache" in error
    assert not (repo / "data/ingested").exists()  # what DVC does before running a stage

    sh("dvc", "checkout", "ingest", cwd=repo)
    assert (repo / "data/ingested/dataset.parquet").read_bytes() == good


def test_a_misspelt_section_fails_the_params_stage(repo: Path) -> None:
    edit_params(repo, {"trian.lr": 0.1})
    refused = sh("dvc", "repro", "params", cwd=repo, fails=True)
    assert "unknown key 'trian' (did you mean 'train'?)" in refused
    assert "DVC deleted" not in refused  # the check has no outputs
