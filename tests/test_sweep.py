"""``trackflow sweep``: real Optuna and MLflow stores in ``tmp_path``, tiny trials on the digits.

Trials train from scratch (no backbone needed) for a few epochs of a small network on the session's
preprocessed data (``processed``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FAST_TRAINING, REPO_ROOT, prefect_deployment
from trackflow.cli import main as cli
from trackflow.config import load_params, validate_params
from trackflow.errors import ConfigError
from trackflow.params_file import update_params_file

STUDY = "test-sweep"
TRIAL_SETTINGS: dict[str, Any] = {
    **FAST_TRAINING,
    "train.mode": "scratch",
    "model.widths": [16],
    "sweep.study": STUDY,
    "sweep.pruner": "none",
    "sweep.sampler": "random",
    "sweep.space": {"train.lr": {"log_uniform": [0.001, 0.01]}},
}


@pytest.fixture
def sweep_params(tmp_path: Path) -> Callable[..., Path]:
    """The repository's params.yaml, comments kept, with the trial settings and ``overrides``."""

    def write(overrides: dict[str, Any] | None = None) -> Path:
        path = tmp_path / "params.yaml"
        path.write_text((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
        update_params_file(path, {**TRIAL_SETTINGS, **(overrides or {})})
        return path

    return write


def sweep(params: Path, processed: Path, *options: str) -> int:
    return cli(["sweep", "--params", str(params), "--data", str(processed), *options])


def load_study(tmp_path: Path) -> Any:
    import optuna

    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")


def runs(tracking_uri: str | None = None) -> dict[str, Any]:
    """The sweep's MLflow runs by name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("trackflow")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


# --- the space is validated with the params ------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "unknown key (did you mean 'train.lr'?)"),
        ({"data.source": {"choice": ["sklearn:wine"]}}, "dvc exp run --queue"),
        ({"preprocess.scaler": {"choice": ["minmax"]}}, "model.*, pretrain.* or train.* keys"),
        ({"train.optimizer": {"choice": []}}, "choice needs a non-empty list"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "low 0.1 is above high 0.01"),
        ({"train.lr": {"log_uniform": [0, 0.01]}}, "log_uniform needs low > 0"),
        ({"train.batch_size": {"uniform": [16, 128]}}, "uniform fits a float key"),
        ({"model.dropout": {"int": [0, 1]}}, "int fits an integer key"),
        ({"train.optimizer": {"uniform": [0, 1]}}, "search it with choice"),
        ({"train.optimizer": {"choice": ["adam", "lbfgs"]}}, "the value 'lbfgs' is refused"),
        ({"model.dropout": {"uniform": [0, 1]}}, "the value 1 is refused"),
        ({"train.schedule": {"choice": [{}]}}, "is a section; search one of its keys"),
        ({"train.lr": {"normal": [0, 1]}}, "give one distribution"),
        ({"train.lr": 0.1}, "Input should be a valid dictionary"),
    ],
)
def test_a_bad_space_is_refused_with_what_is_wrong(space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_params({"sweep": {"space": space}})
    assert f"sweep.space.{next(iter(space))}" in str(error.value)
    assert message in str(error.value)


def test_grid_needs_finite_distributions_and_metric_its_direction() -> None:
    with pytest.raises(ConfigError, match="the grid sampler needs a finite set of values"):
        validate_params({"sweep": {"sampler": "grid", "space": {"train.lr": {"uniform": [0, 1]}}}})
    with pytest.raises(ConfigError, match="set direction: minimize"):
        validate_params({"sweep": {"metric": "val/loss"}})
    space = {"model.widths": {"choice": [[32], [64, 32]]}, "train.max_epochs": {"int": [2, 6]}}
    grid = validate_params({"sweep": {"sampler": "grid", "space": space}})
    assert grid.sweep.space["model.widths"]["choice"] == [[32], [64, 32]]


def test_a_bad_combination_fails_with_the_params_message() -> None:
    from trackflow.tuning.trials import trial_params

    params = validate_params({"train": {"mode": "scratch", "backbone": None}})
    with pytest.raises(ConfigError, match="needs a backbone"):
        trial_params(params, {"train.mode": "feature_extraction"})


def test_choices_of_lists_go_through_optuna_and_back() -> None:
    import optuna

    from trackflow.tuning.space import suggest

    space = {"model.widths": {"choice": [[32], [64, 32]]}, "train.max_epochs": {"int": [2, 6]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    values = suggest(study.ask(), space)
    assert values["model.widths"] in ([32], [64, 32])
    assert 2 <= values["train.max_epochs"] <= 6


def test_without_the_workspace_data_it_says_what_to_run(
    sweep_params: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sweep(sweep_params(), tmp_path / "nothing") == 3
    assert "run dvc repro pretrain first" in capsys.readouterr().err


# --- running a study -----------------------------------------------------------------------------


@pytest.mark.slow
def test_trials_are_child_runs_and_a_failed_one_does_not_stop_the_sweep(
    sweep_params: Callable[..., Path],
    processed: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Grid of two learning rates with SGD; 1e8 makes the loss NaN: that trial fails, with why."""
    overrides = {
        "train.optimizer": "sgd",
        "sweep.sampler": "grid",
        "sweep.n_trials": 3,
        "sweep.space": {
            "train.lr": {"choice": [0.01, 1.0e8]},
            "train.batch_size": {"int": [32, 64], "step": 32},
        },
    }
    params = sweep_params(overrides)
    text_before = params.read_text()
    assert sweep(params, processed) == 0
    out = capsys.readouterr()
    study = load_study(tmp_path)
    states = sorted(t.state.name for t in study.trials)
    assert len(study.trials) == 3, states
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed, out.err
    assert all(t.user_attrs["fail_reason"].startswith("loss became NaN at epoch") for t in failed)
    assert f"trial {failed[0].number}: fail" in out.err  # one line per trial off a terminal

    found = runs()
    parent = found[f"sweep-{STUDY}"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/n_failed"] == len(failed)
    assert parent.data.tags["trackflow.sweep.best_trial"] == str(study.best_trial.number)
    for trial in study.trials:
        run = found[f"sweep-{STUDY}-trial-{trial.number:03d}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        state = {"COMPLETE": "complete", "FAIL": "failed"}[trial.state.name]
        assert run.data.tags["trackflow.sweep.state"] == state
        assert run.info.status == {"complete": "FINISHED", "failed": "FAILED"}[state]
        assert run.data.params["train.lr"] == run.data.tags["trackflow.sweep.value.train.lr"]
    complete = found[f"sweep-{STUDY}-trial-{study.best_trial.number:03d}"]
    assert "val/acc" in complete.data.metrics  # the curves
    from mlflow import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/optimization_history.png"} <= artifacts
    assert "sweep/param_importances.png" in artifacts

    # The study is complete: running again only applies the best values, comments kept.
    assert sweep(params, processed, "--apply", "--top", "2") == 0
    assert len(load_study(tmp_path).trials) == 3
    applied = load_params(params)
    assert applied.train.lr == study.best_trial.params["train.lr"]
    members = applied.train.ensemble.members
    assert members[0] == study.best_trial.params  # all train.* keys
    assert len(members) == min(2, len(study.trials) - len(failed))
    assert "# finetune | feature_extraction | scratch" in params.read_text()
    assert params.read_text() != text_before
    assert "dvc repro" in capsys.readouterr().out


@pytest.mark.slow
def test_a_poor_trial_is_pruned(
    sweep_params: Callable[..., Path], processed: Path, tmp_path: Path
) -> None:
    """Three good learning rates, then a hopeless one: the median pruner stops it."""
    import optuna

    params = sweep_params(
        {
            "train.max_epochs": 4,
            "train.early_stopping_patience": None,
            "sweep.pruner": "median",
            "sweep.n_trials": 4,
            "sweep.space": {"train.lr": {"log_uniform": [1e-9, 0.1]}},
        }
    )
    (tmp_path / "mlruns").mkdir()
    study = optuna.create_study(
        study_name=STUDY,
        storage=f"sqlite:///{tmp_path}/mlruns/optuna.db",
        direction="maximize",
    )
    for lr in (0.02, 0.03, 0.05, 1e-9):
        study.enqueue_trial({"train.lr": lr})
    assert sweep(params, processed) == 0
    study = load_study(tmp_path)
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert [t.params["train.lr"] for t in pruned] == [1e-9]
    run = runs()[f"sweep-{STUDY}-trial-{pruned[0].number:03d}"]
    assert (run.info.status, run.data.tags["trackflow.sweep.state"]) == ("KILLED", "pruned")


def _start(params: Path, processed: Path, *options: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "trackflow.cli", "sweep", "--params", str(params)]
    return subprocess.Popen(
        [*command, "--data", str(processed), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_complete(tmp_path: Path, process: subprocess.Popen[str], count: int) -> None:
    import optuna

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            trials = load_study(tmp_path).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        except (KeyError, Exception):  # the study is not created yet
            trials = []
        if len(trials) >= count:
            return
        time.sleep(0.3)
    raise AssertionError("no trial completed in time")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_killed_sweep_resumes(
    sweep_params: Callable[..., Path], processed: Path, tmp_path: Path
) -> None:
    """Ctrl-C: exit 130, study intact. kill -9: the running trial is not counted, runs again."""
    import optuna

    # Trials of a few seconds each, so that the signals land while the sweep still runs trials
    slow = {"train.max_epochs": 15, "train.early_stopping_patience": None}
    params = sweep_params({"sweep.n_trials": 3, **slow})
    process = _start(params, processed)
    _wait_for_complete(tmp_path, process, 1)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert f"trackflow sweep --study {STUDY}" in output
    assert runs()[f"sweep-{STUDY}"].info.status == "KILLED"

    process = _start(params, processed)
    _wait_for_complete(tmp_path, process, 2)
    process.kill()
    process.wait()
    running = load_study(tmp_path).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # A trial killed before it recorded its process cannot be told from one another machine has
    # just started: Optuna's heartbeat fails it after 60 s. Those that recorded it fail at once.
    killed = [trial for trial in running if "pid" in trial.user_attrs]

    assert sweep(params, processed) == 0
    study = load_study(tmp_path)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 3
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]
    assert all(t.state.name == "FAIL" for t in interrupted)
    assert {t.number for t in killed} <= {t.number for t in interrupted}
    found = runs()
    for trial in killed:
        run = found.get(f"sweep-{STUDY}-trial-{trial.number:03d}")
        if run is None:  # killed between recording its process and creating its run
            continue
        assert run.info.status == "KILLED"
        assert "ended while it ran" in run.data.tags["trackflow.sweep.fail_reason"]
    assert found[f"sweep-{STUDY}"].info.status == "FINISHED"


@pytest.mark.slow
def test_parallel_workers_share_the_study(
    sweep_params: Callable[..., Path], processed: Path, tmp_path: Path
) -> None:
    params = sweep_params({"sweep.n_trials": 4, "train.max_epochs": 3})
    assert sweep(params, processed, "--parallel", "2") == 0
    study = load_study(tmp_path)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 4
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2


@pytest.mark.slow
def test_the_prefect_flow_runs_the_sweep_and_applies_it(
    sweep_params: Callable[..., Path], processed: Path, tmp_path: Path
) -> None:
    import shutil

    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (sets the start timeout this machine needs)
    from flows.sweep import sweep_flow

    shutil.copytree(processed, tmp_path / "data" / "processed")
    params = sweep_params({"sweep.n_trials": 2})
    with prefect_test_harness(server_startup_timeout=None):
        summary = sweep_flow(repo=str(tmp_path), apply_best_values=True)
    assert summary["n_complete"] == 2
    assert load_params(params).train.lr == summary["best_params"]["train.lr"]
    assert runs()[f"sweep-{STUDY}"].info.status == "FINISHED"


def test_prefect_yaml_deploys_the_sweep_flow() -> None:
    deployment, loaded = prefect_deployment("sweep")
    assert loaded.name == "trackflow-sweep"
    assert set(deployment["parameters"]) <= set(loaded.parameters.properties)


@pytest.mark.slow
def test_a_trial_searching_model_keys_pretrains_its_own_backbone(
    sweep_params: Callable[..., Path], processed: Path
) -> None:
    params = sweep_params(
        {
            "train.mode": "finetune",
            "sweep.n_trials": 1,
            "sweep.space": {"model.dropout": {"uniform": [0.1, 0.2]}},
        }
    )
    assert sweep(params, processed, "--backbone", "no-such-backbone.pt") == 0
    found = runs()
    trial = found[f"sweep-{STUDY}-trial-000"]
    pretrain = found[f"sweep-{STUDY}-trial-000-pretrain"]
    assert pretrain.data.tags["mlflow.parentRunId"] == trial.info.run_id
    assert trial.data.tags["trackflow.sweep.state"] == "complete"
    assert trial.data.tags["trackflow.backbone_source"].endswith("backbone.pt")
