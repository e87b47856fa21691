"""What a run shows in the MLflow UI besides its metrics: params, source tags, description."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from trackflow.config import MlflowConfig, Params, flatten_params
from trackflow.tracking import (
    log_params,
    scoring_experiment,
    setup_tracking,
    source_tags,
    tracked_run,
    update_note,
    yaml_text,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (0.95, "0.95"),
        (3e-4, "0.0003"),
        ("sklearn:digits", "sklearn:digits"),
        ([256, 128], "[256, 128]"),
        ((0, 1, 2), "[0, 1, 2]"),
        (["knn", "isolation_forest"], "[knn, isolation_forest]"),
        ([None, "7"], "[null, '7']"),
        ({}, "{}"),
    ],
)
def test_param_values_are_written_as_yaml(value, text) -> None:
    assert yaml_text(value) == text


def test_every_param_is_logged_as_it_reads_in_params_yaml() -> None:
    tracking = setup_tracking(MlflowConfig())
    with tracked_run(tracking, "params", {}) as run_id:
        log_params(tracking, run_id, flatten_params(Params()))
    logged = tracking.client.get_run(run_id).data.params
    assert logged["train.gradient_clip_val"] == "null"
    assert logged["train.deterministic"] == "true"
    assert logged["data.source_classes"] == "[0, 1, 2, 3, 4]"
    assert not [key for key, value in logged.items() if value in ("None", "True", "False")]


def test_source_tags_name_the_entry_point_commit_user_and_orchestrator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tags = source_tags("trackflow score")
    assert tags["mlflow.source.name"] == "trackflow score"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert "mlflow.source.git.commit" not in tags  # tmp_path is no git checkout
    for command in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "code"]):
        subprocess.run(["git", *command], check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    monkeypatch.setenv("TRACKFLOW_FLOW_RUN_ID", "a-flow-run")
    tags = source_tags()
    assert tags["mlflow.source.git.commit"] == head.strip()
    assert tags["mlflow.source.type"] == "JOB" and tags["mlflow.source.name"]


def test_each_stage_owns_one_paragraph_of_the_description() -> None:
    tracking = setup_tracking(MlflowConfig())
    with tracked_run(tracking, "train-finetune-abc123", {}) as run_id:
        update_note(tracking, run_id, "evaluate", "test acc 0.9.")
        update_note(tracking, run_id, "train", "finetune, val acc 0.8.")
        note = update_note(tracking, run_id, "evaluate", "test acc 0.95.")
    assert note == "**train**: finetune, val acc 0.8.\n\n**evaluate**: test acc 0.95."
    assert tracking.client.get_run(run_id).data.tags["mlflow.note.content"] == note


def test_scored_batches_have_an_experiment_of_their_own() -> None:
    config = MlflowConfig(experiment_name="digits")
    candidates = setup_tracking(config)
    scoring = setup_tracking(config, scoring_experiment(config))
    assert scoring_experiment(config) == "digits-scoring"
    assert scoring.experiment_id != candidates.experiment_id
    assert scoring.client.get_experiment(scoring.experiment_id).name == "digits-scoring"


def test_processes_creating_one_experiment_at_once_all_get_it() -> None:
    """Sweep workers or machines starting together: the creates that lose read the winner's."""
    import threading

    from trackflow.config import MlflowConfig
    from trackflow.tracking import setup_tracking

    config = MlflowConfig(experiment_name="race")  # in the test's own SQLite store
    setup_tracking(MlflowConfig(experiment_name="first"))  # the store's tables made once
    start, found, failed = threading.Barrier(8), [], []

    def create() -> None:
        start.wait()
        try:
            found.append(setup_tracking(config).experiment_id)
        except Exception as exc:  # what the test is about: none may fail
            failed.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failed
    assert len(found) == 8 and len(set(found)) == 1
