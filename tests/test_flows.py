"""The Prefect flows over real DVC repositories, under Prefect's test harness.

Most flow tests drive a toy pipeline (``toy_repo``: four small stages that read the project's
params.yaml and write to a real MLflow store) through the real flow; two run the project's own
pipeline. Every test that runs a flow needs Prefect's API (``prefect_api``, a server started once
for the session), so it is marked slow; the driver's own functions are tested without it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from flows.common import retry_if_transient
from tests.helpers import (
    FAST_TRAINING,
    REPO_ROOT,
    copy_project,
    dvc,
    prefect_deployment,
    raw_rows,
    register_champion,
    write_project_params,
)
from trackflow.config import load_params
from trackflow.errors import ConfigError, TrackflowError
from trackflow.io import read_json
from trackflow.pipeline.driver import (
    StageFailed,
    applied_params,
    classify_failure,
    describe_changes,
    exclusive_repo,
    repo_tracking_config,
    reproduce_stage,
    stage_env,
)
from trackflow.tracking import setup_tracking


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A temporary Prefect API (server and database) for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    import flows  # noqa: F401  (sets the start timeout this machine needs)

    with prefect_test_harness(server_startup_timeout=None):
        yield str(PREFECT_API_URL.value())


def tracking_of(repo: Path):
    """The repository's MLflow store (``MLFLOW_TRACKING_URI`` if set), seen from any folder."""
    return setup_tracking(repo_tracking_config(repo, load_params(repo / "params.yaml")))


def artifact_of(flow_run_id: str) -> str:
    """The markdown the flow run published (a failed run also stores its exception as one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    the_report = ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]),
        key=ArtifactFilterKey(any_=["trackflow-training"]),
    )
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=the_report)
    return str(artifact.data)


def statuses(summary: dict) -> dict[str, str]:
    return {stage["stage"]: stage["status"] for stage in summary["stages"]}


@pytest.mark.slow
def test_stages_run_in_dvc_order_then_skip_and_an_override_reruns_what_it_touches(
    prefect_api: str, toy_repo: Path
) -> None:
    from flows.training import training_flow

    committed = (toy_repo / "params.yaml").read_bytes()
    first = training_flow(repo=str(toy_repo))
    assert list(statuses(first)) == ["prepare", "train", "evaluate", "report"]
    assert set(statuses(first).values()) == {"ran"}
    assert {stage["reason"] for stage in first["stages"]} == {"never run (no entry in dvc.lock)"}
    assert all(stage["attempts"] == 1 for stage in first["stages"])
    train_run = read_json(toy_repo / "models/train_run.json")
    assert train_run["flow_run_id"] == first["flow_run_id"]  # exported to the stages
    assert first["mlflow_run_id"] == train_run["run_id"]
    assert first["metrics"] == {"test/accuracy": 0.9}
    tracking = tracking_of(toy_repo)
    tags = tracking.client.get_run(train_run["run_id"]).data.tags
    assert tags["trackflow.prefect_flow_run_id"] == first["flow_run_id"]
    report = artifact_of(first["flow_run_id"])
    assert "| train | ran |" in report and f"`{train_run['run_id']}`" in report

    second = training_flow(repo=str(toy_repo))
    assert statuses(second) == dict.fromkeys(statuses(first), "skipped")
    assert {stage["reason"] for stage in second["stages"]} == {"up to date"}
    assert "| train | skipped | up to date |" in artifact_of(second["flow_run_id"])

    third = training_flow(repo=str(toy_repo), overrides={"train.mode": "scratch"})
    assert statuses(third) == {
        "prepare": "skipped",
        "train": "ran",
        "evaluate": "ran",  # a new run id in models/train_run.json
        "report": "skipped",  # ... but the same metrics: DVC sees nothing new for it
    }
    assert "changed deps: params.yaml (train.mode: modified)" in third["stages"][1]["reason"]
    run_id = read_json(toy_repo / "models/train_run.json")["run_id"]
    run = tracking.client.get_run(run_id)
    assert run.data.params["train.mode"] == "scratch"
    assert "Overrides: `train.mode=scratch`" in artifact_of(third["flow_run_id"])
    assert (toy_repo / "params.yaml").read_bytes() == committed
    assert not (toy_repo / ".dvc/tmp/trackflow-params.yaml.orig").exists()


@pytest.mark.slow
def test_bad_overrides_and_stages_fail_before_any_stage_runs(
    prefect_api: str, toy_repo: Path
) -> None:
    from flows.training import training_flow

    committed = (toy_repo / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"unknown key 'train\.mod' \(did you mean 'mode'\?\)"):
        training_flow(repo=str(toy_repo), overrides={"train.mod": "scratch"})
    with pytest.raises(ConfigError, match=r"train\.mode: Input should be 'finetune'"):
        training_flow(repo=str(toy_repo), overrides={"train.mode": "sideways"})
    with pytest.raises(ConfigError, match=r"no stage 'trian' in dvc\.yaml"):
        training_flow(repo=str(toy_repo), until="trian")
    assert not (toy_repo / "data.txt").exists() and not (toy_repo / "dvc.lock").exists()
    assert (toy_repo / "params.yaml").read_bytes() == committed


class ReleaseOnRetry(logging.Handler):
    """Ends an exclusive SQLite transaction once the flow logs that it will retry."""

    def __init__(self, store: Path) -> None:
        super().__init__()
        self.connection = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
        self.connection.execute("BEGIN EXCLUSIVE")  # the store is locked for every other process
        self.released = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "failed, retrying" in record.getMessage() and not self.released.is_set():
            self.connection.execute("ROLLBACK")
            self.released.set()


@pytest.mark.slow
def test_a_locked_tracking_store_is_retried_with_backoff(prefect_api: str, toy_repo: Path) -> None:
    from flows.training import training_flow

    tracking_of(toy_repo)  # the store exists before it is locked
    store = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    release = ReleaseOnRetry(store)
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(release)
    try:
        summary = training_flow(repo=str(toy_repo), until="train", retries=2, retry_delay_s=1.0)
    finally:
        logger.removeHandler(release)
        release.connection.close()
    assert release.released.is_set()  # the first attempt failed on the lock
    assert statuses(summary) == {"prepare": "ran", "train": "ran"}
    assert [stage["attempts"] for stage in summary["stages"]] == [1, 2]
    assert "| train | ran |" in artifact_of(summary["flow_run_id"])


@pytest.mark.slow
def test_a_deterministic_failure_is_not_retried_and_fails_the_candidate_run(
    prefect_api: str, toy_repo: Path
) -> None:
    from flows.training import training_flow

    committed = (toy_repo / "params.yaml").read_bytes()
    training_flow(repo=str(toy_repo))
    overrides = {"train.mode": "scratch", "evaluate.calibration_bins": 3}
    start = time.perf_counter()
    with pytest.raises(StageFailed, match="three bins cannot hold these rows") as failed:
        training_flow(repo=str(toy_repo), overrides=overrides, retries=3, retry_delay_s=5.0)
    assert time.perf_counter() - start < 30  # no retry waited 5 s, 10 s, 20 s
    error = failed.value
    assert (error.stage, error.kind, error.exit_code, error.attempts) == ("evaluate", "data", 3, 1)
    run_id = read_json(toy_repo / "models/train_run.json")["run_id"]
    run = tracking_of(toy_repo).client.get_run(run_id)
    assert run.data.params["train.mode"] == "scratch"  # the candidate this flow run trained ...
    assert run.info.status == "FAILED"  # ... failed with it
    assert run.data.tags["trackflow.failed_stage"] == "evaluate"
    assert (toy_repo / "params.yaml").read_bytes() == committed


def test_failures_are_classified_from_exit_status_first_then_output() -> None:
    unreachable = "error: the MLflow tracking store 'http://x' is busy or unreachable, try again"
    assert classify_failure(75, unreachable) == "transient"
    retried = "urllib3: Connection refused, retrying (1/3)\n"
    assert classify_failure(3, f"{retried}error: missing input data/split") == "data"
    assert classify_failure(2, f"{retried}error: unknown key 'train.mod'") == "params"
    locked = "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked"
    assert classify_failure(1, f"Traceback (most recent call last):\n{locked}") == "transient"
    assert classify_failure(255, "ERROR: Unable to acquire lock. Most likely ...") == "transient"
    assert classify_failure(1, "Traceback (most recent call last):\nKeyError: 'x'") == "crash"
    assert classify_failure(1, "error: the registry refused") == "error"


STAGE_SCRIPT = """
import os, sys, time

if sys.argv[1] == "bad_data":
    print("worker exited with 1; Connection refused, retrying")
    sys.exit(3)
print(os.getpid(), flush=True)
time.sleep(60)
"""


@pytest.fixture
def stage_repo(tmp_path: Path) -> Path:
    """Two stages without deps: ``bad_data`` exits 3, ``slow`` prints its pid and sleeps."""
    repo = tmp_path / "stages"
    repo.mkdir()
    dvc("init", "--no-scm", "-q", cwd=repo)
    stages = {name: {"cmd": f"python stage.py {name}"} for name in ("bad_data", "slow")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (repo / "stage.py").write_text(STAGE_SCRIPT)
    return repo


def test_a_stage_failure_is_read_from_dvc_s_last_exit_line_and_its_status_first(
    stage_repo: Path,
) -> None:
    with pytest.raises(StageFailed) as failed:
        reproduce_stage(stage_repo, "bad_data", "never run", stage_env(None))
    assert (failed.value.exit_code, failed.value.kind) == (3, "data")


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_error_while_reading_the_output_kills_dvc(
    stage_repo: Path, interruption: type[BaseException]
) -> None:
    import psutil

    running: list[psutil.Process] = []  # the stage's command, then the dvc process running it

    def interrupt(line: str) -> None:
        if line.isdigit():
            command = psutil.Process(int(line))
            running.append(command)
            running.extend(p for p in command.parents() if "repro" in p.cmdline())
            raise interruption("stop")

    try:
        start = time.perf_counter()
        with pytest.raises(interruption):
            reproduce_stage(stage_repo, "slow", "never run", stage_env(None), interrupt)
        assert time.perf_counter() - start < 30  # no waiting for the command's 60 s
        _, alive = psutil.wait_procs(running[1:], timeout=5)
        assert len(running) == 2 and not alive
    finally:
        if running:  # the command itself, left without its dvc
            with contextlib.suppress(psutil.NoSuchProcess):
                running[0].kill()


BREAKS_PARAMS = """
from pathlib import Path

Path("data.txt").write_text("rows")
Path("params.yaml").write_text("train: [")
"""


@pytest.mark.slow
def test_a_failure_other_than_a_stage_s_still_publishes_the_report(
    prefect_api: str, toy_repo: Path
) -> None:
    from flows.training import training_flow

    (toy_repo / "toy.py").write_text(BREAKS_PARAMS)  # prepare corrupts params.yaml ...
    state = training_flow(repo=str(toy_repo), until="train", retries=0, return_state=True)
    error = state.result(raise_on_failure=False)  # ... so DVC cannot tell whether train is stale
    assert type(error).__name__ == "YAMLFileCorruptedError" and not isinstance(error, StageFailed)
    report = artifact_of(str(state.state_details.flow_run_id))
    assert report.startswith("# trackflow training: failed")
    assert "| prepare | ran |" in report
    assert "| train | failed | YAMLFileCorruptedError: unable to read" in report


def test_only_transient_failures_meet_the_retry_condition() -> None:
    from prefect.states import Failed

    def retried(error: Exception) -> bool:
        return retry_if_transient(None, None, Failed(data=error))

    assert retried(StageFailed("train", 2, "transient", "database is locked", 1.0))
    assert not retried(StageFailed("train", 3, "data", "no rows", 1.0))
    assert retried(OSError("[Errno 111] Connection refused"))
    assert not retried(ValueError("bad value"))


def test_dvc_status_changes_read_as_one_line() -> None:
    changes = [
        {"changed deps": {"params.yaml": {"train": "modified"}, "data/processed": "modified"}},
        {"changed outs": {"models/model.pt": "deleted"}},
        "always changed",
    ]
    assert describe_changes(changes) == (
        "changed deps: params.yaml (train: modified), data/processed (modified); "
        "changed outs: models/model.pt (deleted); always changed"
    )


def test_one_flow_run_at_a_time_per_repository(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    with (
        exclusive_repo(tmp_path),
        pytest.raises(TrackflowError, match="another trackflow flow run is using"),
        exclusive_repo(tmp_path),
    ):
        pass
    with exclusive_repo(tmp_path):  # released
        pass


def test_params_come_back_byte_for_byte_and_an_interrupted_run_is_noticed(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    params = tmp_path / "params.yaml"
    params.write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    committed = params.read_bytes()
    with applied_params(tmp_path, params, {"train.mode": "scratch"}) as changed:
        assert changed and yaml.safe_load(params.read_text())["train"]["mode"] == "scratch"
    assert params.read_bytes() == committed
    with pytest.raises(RuntimeError), applied_params(tmp_path, params, {"train.lr": 0.1}):
        raise RuntimeError("a stage crashed")
    assert params.read_bytes() == committed
    with applied_params(tmp_path, params, {}) as changed:
        assert not changed
    backup = tmp_path / ".dvc/tmp/trackflow-params.yaml.orig"
    backup.write_bytes(committed)  # as a killed run leaves it
    with (
        pytest.raises(ConfigError, match="an earlier flow run was interrupted"),
        applied_params(tmp_path, params, {"train.lr": 0.1}),
    ):
        pass


def test_prefect_yaml_deploys_the_training_flow_on_the_default_schedule() -> None:
    from trackflow.pipeline.schedule import DEFAULT_CRON

    deployment, loaded = prefect_deployment("nightly")
    assert loaded.name == "trackflow-training"
    (schedule,) = deployment["schedules"]
    assert schedule["cron"] == DEFAULT_CRON  # the library's, which trackflow schedule uses
    assert deployment["work_pool"]["name"] == "trackflow"
    assert deployment["concurrency_limit"] == 1


# --- Batch scoring -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_batch_scoring_flow_scores_publishes_and_refuses_a_bad_batch(
    prefect_api: str, candidates, candidate_store: str, write_params, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.scoring import batch_scoring_flow
    from trackflow.data.inputs import InputError

    tracking, version = register_champion(candidates["good"], candidate_store)
    model = f"models:/{candidate_store}@champion"
    rows = raw_rows(candidates["good"], "val").drop(columns="target")
    batch = tmp_path / "new.csv"
    rows.to_csv(batch, index=False)
    summary = batch_scoring_flow(str(batch), model, str(write_params()))
    assert summary["model_version"] == version and summary["counts"]["n_rows"] == len(rows)
    assert not summary["drift"]["detected"]
    assert [Path(p).name for p in summary["outputs"]] == ["new.scored.csv", "new.drift.json"]
    run = tracking.client.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["batch/n_rows"] == len(rows)
    assert run.data.tags["trackflow.prefect_flow_run_id"]
    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trackflow-batch-scoring"]))
        )
    assert f"{len(rows)} rows" in str(latest[-1].data)

    bad = tmp_path / "bad.csv"
    rows.drop(columns="pixel_3_3").to_csv(bad, index=False)
    with pytest.raises(InputError, match="missing columns: pixel_3_3"):
        batch_scoring_flow(str(bad), model, str(write_params()))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bad")) == ["bad.csv"]


@pytest.mark.slow
def test_the_batch_scoring_flow_refuses_a_bad_threshold_before_loading_the_model(
    prefect_api: str, write_params, tmp_path: Path
) -> None:
    from flows.scoring import batch_scoring_flow

    batch = tmp_path / "batch.csv"
    batch.write_text("pixel_0_0\n1\n")
    with pytest.raises(ConfigError, match=r"batch\.drift_share: Input should be less than"):
        batch_scoring_flow(str(batch), "models:/none@x", str(write_params()), drift_share=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv", "params.yaml"]


# --- The project's pipeline (slow) ---------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project in a temporary git + DVC repository, with short training."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc("init", "-q", cwd=repo)
    copy_project(repo)
    write_project_params(repo / "params.yaml", FAST_TRAINING)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=repo, check=True)
    return repo


def pipeline_stages(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_then_skips_every_stage_and_a_failing_stage_registers_nothing(
    prefect_api: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.training import training_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the stages use the params' store in the repo
    overrides = {"train.mode": "feature_extraction"}
    cold = training_flow(repo=str(project), overrides=overrides)
    assert list(statuses(cold)) == pipeline_stages(project)  # the order of dvc.yaml here
    assert set(statuses(cold).values()) == {"ran"}
    assert cold["metrics"]["test/accuracy"] > 0.3
    tracking = tracking_of(project)
    run = tracking.client.get_run(cold["mlflow_run_id"])
    assert run.data.params["train.mode"] == "feature_extraction"
    assert run.data.tags["trackflow.prefect_flow_run_id"] == cold["flow_run_id"]
    assert run.info.status == "FINISHED"
    git_status = subprocess.run(
        ["git", "status", "--porcelain", "params.yaml"], cwd=project, capture_output=True, text=True
    )
    assert git_status.stdout == ""  # the committed params.yaml, untouched
    registered = cold["registered"]
    assert registered["run_id"] == cold["mlflow_run_id"] and cold["registered_by_this_run"]
    version = tracking.client.get_model_version(registered["name"], registered["version"])
    assert version.run_id == cold["mlflow_run_id"]
    report = artifact_of(cold["flow_run_id"])
    assert f"version {registered['version']}" in report and "| register | ran |" in report

    start = time.perf_counter()
    warm = training_flow(repo=str(project), overrides=overrides)
    warm_seconds = time.perf_counter() - start
    assert set(statuses(warm).values()) == {"skipped"} and warm_seconds < 20
    assert warm["mlflow_run_id"] == cold["mlflow_run_id"]

    versions_before = tracking.client.search_model_versions()
    bad_backbone = overrides | {"train.backbone": "models:/no-such-model@champion"}
    with pytest.raises(StageFailed, match="no-such-model") as failed:
        training_flow(repo=str(project), overrides=bad_backbone, retry_delay_s=5.0)
    error = failed.value
    assert (error.stage, error.transient, error.attempts) == ("train", False, 1)
    failed_train = "attributes.status = 'FAILED' and tags.`trackflow.stage` = 'train'"
    (failed_run,) = tracking.client.search_runs([run.info.experiment_id], failed_train)
    assert failed_run.data.params["train.backbone"] == "models:/no-such-model@champion"
    assert len(tracking.client.search_model_versions()) == len(versions_before)
    assert (
        git_status.stdout
        == subprocess.run(
            ["git", "status", "--porcelain", "params.yaml"],
            cwd=project,
            capture_output=True,
            text=True,
        ).stdout
    )


@pytest.mark.slow
def test_the_scheduled_deployment_runs_the_pipeline(
    prefect_api: str, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cron = "15 4 * * 1"
    serve = subprocess.Popen(
        ["trackflow", "schedule", "--repo", str(project), "--cron", cron],
        cwd=REPO_ROOT,  # flow runs import flows.training from here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deployment = None
        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    deployment = client.read_deployment_by_name("trackflow-training/served")
                    break
                except Exception:
                    assert serve.poll() is None, serve.stdout.read()
                    time.sleep(1)
            assert deployment is not None, "the deployment did not appear"
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == cron and schedule.active
            assert deployment.parameters["repo"] == str(project)

        flow_run = run_deployment("trackflow-training/served", timeout=540, poll_interval=2)
        assert flow_run.state.is_completed(), flow_run.state
    finally:
        serve.terminate()
        output = serve.communicate(timeout=60)[0]
    assert "trackflow-training/served" in output
    train_run = read_json(project / "models/train_run.json")
    run = tracking_of(project).client.get_run(train_run["run_id"])
    assert run.data.tags["trackflow.prefect_flow_run_id"] == str(flow_run.id)
    registered = read_json(project / "models/registered.json")  # a registered model
    client = tracking_of(project).client
    version = client.get_model_version(registered["name"], registered["version"])
    assert version.run_id == train_run["run_id"]
