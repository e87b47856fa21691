"""A user's whole workflow against the team services (``make services``), end to end.

The services run for this checkout (the ``services`` fixture finds them): PostgreSQL, an MLflow
tracking server with basic-auth and proxied artifacts, a Prefect server with an auth string and
its workers. Their stores are shared and persist, so every name here (experiment, registered
model, study, deployment) ends in a fresh suffix. One copy of the project runs ``dvc repro`` once
against them (``project``); the tests then use what it left.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import yaml

from tests.helpers import (
    FAST_TRAINING,
    REPO_ROOT,
    copy_project,
    free_port,
    make_toy_repo,
    stop_process,
    write_project_params,
)
from trackflow.services.stack import DIR_ENV, WORK_POOL
from trackflow.tracking import SCORING_SUFFIX
from trackflow.tuning.study import STORAGE_ENV

pytestmark = [pytest.mark.services, pytest.mark.slow]

# The wiring, not the accuracy: fast training, one detector.
FAST = {**FAST_TRAINING, "promotion.min_accuracy": 0.5, "anomaly.detectors": ["knn"]}
SWEEP_TRIALS = 6
SCHEDULE_WAIT_S = 300  # the scheduler fires within seconds; a busy worker takes its time


@dataclass(frozen=True)
class Project:
    """A copy of the project after ``dvc repro`` against the services."""

    repo: Path
    suffix: str
    env: dict[str, str]  # the services' client environment over this process's
    repro_output: str

    @property
    def name(self) -> str:
        """The registered model and the experiment: one name."""
        return f"svc-{self.suffix}"


def client_env(services: dict[str, str], home: Path) -> dict[str, str]:
    """This process's environment with the services' client variables (over the SQLite URI)."""
    env = {**os.environ, **services}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PREFECT_HOME"] = str(home)  # the Prefect CLI's profile and cache, not the user's
    env["DVC_NO_ANALYTICS"] = "1"
    for variable in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        env[variable] = "trackflow tests"
    for variable in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        env[variable] = "tests@trackflow.invalid"
    return env


def sh(*args: str, cwd: Path, env: dict[str, str], code: int = 0) -> subprocess.CompletedProcess:
    """Run a command; it must exit with ``code``."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == code, (
        f"{' '.join(args)}: {result.returncode}\n" + (result.stdout + result.stderr)[-6000:]
    )
    return result


def secrets_of(services: dict[str, str]) -> dict[str, str]:
    """The admin's password and the database's, which nothing may show."""
    return {
        "admin password": services["MLFLOW_TRACKING_PASSWORD"],
        "database password": urlsplit(services[STORAGE_ENV]).password or "",
    }


def assert_no_secret(text: str, services: dict[str, str], where: str) -> None:
    for what, secret in secrets_of(services).items():
        assert secret, f"the services' {what} is empty"
        assert secret not in text, f"the {what} appears in {where}"


def artifacts_folder() -> Path:
    """Where the tracking server keeps the artifacts it proxies."""
    return Path(os.environ.get(DIR_ENV) or REPO_ROOT / ".services") / "mlflow" / "artifacts"


@pytest.fixture(scope="module")
def project(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The project, copied into a git repository, reproduced once on the services.

    Fast training, and a model and experiment named ``svc-<suffix>``.
    """
    root = tmp_path_factory.mktemp("services")
    suffix = uuid.uuid4().hex[:10]
    env = client_env(services, root / "prefect-home")
    repo = root / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    copy_project(repo)
    name = f"svc-{suffix}"
    write_project_params(
        repo / "params.yaml",
        {**FAST, "model.name": name, "base.mlflow.experiment_name": name},
    )
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "project", cwd=repo, env=env)
    result = sh("dvc", "repro", cwd=repo, env=env)
    return Project(repo, suffix, env, result.stdout + result.stderr)


@pytest.fixture
def tracking_client(services: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """An MLflow client of the tracking server, signed in as the admin."""
    from mlflow import MlflowClient

    for key, value in services.items():
        monkeypatch.setenv(key, value)
    return MlflowClient(services["MLFLOW_TRACKING_URI"])


def experiment_runs(client: Any, name: str) -> list[Any]:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the tracking server"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def assert_artifacts_on_the_server(client: Any, runs: list[Any]) -> None:
    """Every run's artifacts go through the server's proxy into the services' folder."""
    stored = 0
    for run in runs:
        uri = run.info.artifact_uri
        assert uri.startswith("mlflow-artifacts:"), f"{run.info.run_name}: artifacts at {uri}"
        folder = artifacts_folder() / uri.removeprefix("mlflow-artifacts:").lstrip("/")
        for item in client.list_artifacts(run.info.run_id):
            assert (folder / item.path).exists(), f"{item.path} not in {folder}"
            stored += 1
    assert stored, "no run logged an artifact"


def assert_no_secret_in_runs(runs: list[Any], services: dict[str, str]) -> None:
    for run in runs:
        values = {**run.data.params, **run.data.tags}
        text = "\n".join(f"{k}={v}" for k, v in values.items())
        assert_no_secret(text, services, f"run {run.info.run_name}'s params or tags")


# --- 1. the pipeline and every command on the servers ---------------------------------------------


def test_the_pipeline_runs_on_the_servers_and_every_command_reads_them_unchanged(
    project: Project, services: dict[str, str], tracking_client: Any, tmp_path: Path
) -> None:
    import pandas as pd

    from trackflow.io import read_json

    client, repo, env = tracking_client, project.repo, project.env
    runs = experiment_runs(client, project.name)
    assert len(runs) >= 2  # pretrain, train (evaluate, anomaly and register add to train's)
    assert_artifacts_on_the_server(client, runs)
    assert not (repo / "mlruns").exists(), "a stage wrote a local MLflow store"
    registered = read_json(repo / "models/registered.json")
    champion = client.get_model_version_by_alias(project.name, "champion")
    assert registered["promoted"] and champion.version == registered["champion"]
    if champion.model_id:  # MLflow 3: the version's files are a logged model's
        location = client.get_logged_model(champion.model_id).artifact_location
        assert location.startswith("mlflow-artifacts:"), location
        stored = artifacts_folder() / location.removeprefix("mlflow-artifacts:").lstrip("/")
        assert (stored / "MLmodel").is_file(), f"the champion's files are not in {stored}"
    outputs = {"dvc repro": project.repro_output}

    history = sh("trackflow", "history", "--format", "json", cwd=repo, env=env)
    assert [e["action"] for e in json.loads(history.stdout)] == ["challenger", "promote"]
    lineage = sh("trackflow", "lineage", f"{project.name}@champion", "--json", cwd=repo, env=env)
    head = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).stdout.strip()
    assert json.loads(lineage.stdout)["training"]["git_commit"] == head

    rows = pd.read_parquet(repo / "data/split/target_test.parquet").drop(columns="target")
    batch = tmp_path / "batch.csv"
    rows.head(40).to_csv(batch, index=False)
    score = sh("trackflow", "score", str(batch), cwd=repo, env=env)
    assert f"scored 40 rows with models:/{project.name}@champion" in score.stdout
    assert (tmp_path / "batch.scored.csv").is_file()
    scoring = experiment_runs(client, project.name + SCORING_SUFFIX)
    assert len(scoring) == 1
    assert_artifacts_on_the_server(client, scoring)

    port = free_port()
    log = tmp_path / "serve.log"
    serve_env = {k: v for k, v in env.items() if k != "TRACKFLOW_API_TOKEN"}
    argv = ["trackflow", "serve", "--port", str(port), "--poll-interval", "60"]
    with log.open("wb") as out:
        server = subprocess.Popen(argv, cwd=repo, env=serve_env, stdout=out, stderr=out)
    try:
        answer = predict_when_ready(server, port, project.name, rows.head(2), log)
    finally:
        stop_process(server, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Model-Version"] == champion.version
    assert len(answer.json()["predictions"]) == 2

    outputs |= {
        "trackflow history": history.stdout + history.stderr,
        "trackflow lineage": lineage.stdout + lineage.stderr,
        "trackflow score": score.stdout + score.stderr,
        "trackflow serve": log.read_text(errors="replace"),
    }
    for command, output in outputs.items():
        assert_no_secret(output, services, f"the output of {command}")
    assert_no_secret_in_runs(runs + scoring, services)


def predict_when_ready(
    server: subprocess.Popen, port: int, name: str, rows: Any, log: Path, timeout_s: float = 180
) -> requests.Response:
    """One prediction request, once ``trackflow serve`` has loaded the champion."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}"
    while True:
        assert server.poll() is None, f"trackflow serve exited:\n{log.read_text()[-4000:]}"
        try:
            if requests.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"not ready in {timeout_s} s:\n{log.read_text()}"
        time.sleep(0.5)
    body = {"rows": rows.to_dict(orient="records")}
    return requests.post(f"{url}/models/{name}/predictions", json=body, timeout=60)


# --- 2. refusals, one line each -------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single line a refused command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_refused_or_unreachable_server_is_one_line_and_prefect_wants_the_auth_string(
    project: Project, services: dict[str, str]
) -> None:
    repo, env = project.repo, project.env
    history = ("trackflow", "history")
    anonymous = {k: v for k, v in env.items() if not k.startswith("MLFLOW_TRACKING_USER")}
    anonymous.pop("MLFLOW_TRACKING_PASSWORD", None)
    wrong = env | {"MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    for case in (anonymous, wrong):
        line = one_error_line(sh(*history, cwd=repo, env=case, code=2))
        assert line.startswith("error: the MLflow tracking server http://127.0.0.1:")
        assert "refused the credentials (401)" in line
        assert_no_secret(line, services, "the refusal")

    start = time.monotonic()
    away = env | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    line = one_error_line(sh(*history, cwd=repo, env=away, code=75))
    assert time.monotonic() - start < 30  # not MLflow's two minutes of retries
    assert "is unreachable (connection refused)" in line

    pool = f"{services['PREFECT_API_URL']}/work_pools/{WORK_POOL}"
    assert httpx.get(pool, timeout=30).status_code == 401
    token = base64.b64encode(services["PREFECT_API_AUTH_STRING"].encode()).decode()
    signed = httpx.get(pool, headers={"Authorization": f"Basic {token}"}, timeout=30)
    assert signed.status_code == 200 and signed.json()["type"] == "process"
    inspect = ("prefect", "work-pool", "inspect", WORK_POOL)
    unsigned = {k: v for k, v in env.items() if k != "PREFECT_API_AUTH_STRING"}
    refused = subprocess.run(inspect, cwd=repo, env=unsigned, capture_output=True, text=True)
    assert refused.returncode != 0, refused.stdout
    assert f"name='{WORK_POOL}'" in sh(*inspect, cwd=repo, env=env).stdout


def test_a_user_who_may_only_read_is_refused_a_promotion_in_one_line_and_nothing_moves(
    project: Project, services: dict[str, str], tracking_client: Any
) -> None:
    """basic-auth's permissions: a signed-in user reads (default_permission READ); moving an alias
    takes a permission the admin did not grant: one line, exit 2, the registry as it was."""
    from mlflow.server import get_app_client

    repo, env, name = project.repo, project.env, project.name
    champion = tracking_client.get_model_version_by_alias(name, "champion")
    model_id = champion.source.removeprefix("models:/")  # the logged model of the version
    other = tracking_client.create_model_version(
        name, source=champion.source, run_id=champion.run_id, model_id=model_id
    ).version  # registered by the admin: the reader may try to promote it
    admin = get_app_client("basic-auth", tracking_uri=services["MLFLOW_TRACKING_URI"])
    user, password = f"reader-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin.create_user(username=user, password=password)
    try:
        reader = env | {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
        ledger = sh("trackflow", "history", "--format", "json", cwd=repo, env=reader).stdout
        promote = ("trackflow", "promote", "--version", other, "--force", "--reason", "a reader")
        refused = sh(*promote, cwd=repo, env=reader, code=2)
        assert "Traceback" not in refused.stderr, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the MLflow tracking server") and "(403)" in last, last
        assert_no_secret(refused.stderr, services, "the refusal")
    finally:
        admin.delete_user(user)
    after = sh("trackflow", "history", "--format", "json", cwd=repo, env=env).stdout
    assert after == ledger
    assert tracking_client.get_model_version_by_alias(name, "champion").version == champion.version
    assert not tracking_client.search_registered_models(f"name = '{name}.promotion-lock'")


# --- 3. a sweep spread over processes sharing the PostgreSQL study --------------------------------


def test_two_sweeps_started_at_once_share_the_study_on_postgresql(
    project: Project, services: dict[str, str], tracking_client: Any
) -> None:
    """As two machines would: the same params and study, the trials split between them."""
    import optuna

    from trackflow.tuning.trials import SWEEP_TAG

    repo, study_name = project.repo, f"{project.name}-sweep"
    settings = {
        **FAST,
        "model.name": project.name,
        "base.mlflow.experiment_name": project.name,
        "sweep.study": study_name,
        "sweep.n_trials": SWEEP_TRIALS,
        "sweep.sampler": "random",
        "sweep.pruner": "none",
        "sweep.space": {"train.lr": {"log_uniform": [0.001, 0.01]}},
    }
    write_project_params(repo / "sweep.yaml", settings)
    argv = ["trackflow", "sweep", "--params", "sweep.yaml"]
    sweeps = [
        subprocess.Popen(
            argv,
            cwd=repo,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [sweep.communicate(timeout=900)[0] for sweep in sweeps]
    for sweep, output in zip(sweeps, outputs, strict=True):
        assert sweep.returncode == 0, output[-4000:]
        assert_no_secret(output, services, "a sweep's output")

    study = optuna.load_study(study_name=study_name, storage=services[STORAGE_ENV])
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(study.trials) == len(finished), [t.state for t in study.trials]
    # Exactly n_trials, unless both sweeps ended a trial at the same moment, each then seeing
    # n_trials - 1 counted and none running, and each started one more (a known race): one over.
    assert SWEEP_TRIALS <= len(finished) <= SWEEP_TRIALS + 1, len(finished)
    assert all(t.state.name == "COMPLETE" for t in finished), [t.state for t in finished]
    assert {t.user_attrs["pid"] for t in finished} == {sweep.pid for sweep in sweeps}

    runs = experiment_runs(tracking_client, project.name)
    mine = [r for r in runs if r.data.tags.get(SWEEP_TAG + "study") == study_name]
    parents = [r for r in mine if r.data.tags.get(SWEEP_TAG + "role") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in mine if r.data.tags.get(SWEEP_TAG + "role") == "trial"}
    for trial in finished:
        child = children[f"sweep-{study_name}-trial-{trial.number:03d}"]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert_artifacts_on_the_server(tracking_client, parents)
    assert_no_secret_in_runs(mine, services)
    assert not (repo / "mlruns").exists(), "a sweep wrote a local store (MLflow's or Optuna's)"


def test_sweeps_that_create_their_parent_run_at_the_same_moment_keep_one(
    services: dict[str, str], tracking_client: Any, tmp_path: Path
) -> None:
    """Three sweeps of one study each find no parent run and create one: all keep the first."""
    import threading

    from mlflow.entities import ViewType

    from trackflow.config import load_params
    from trackflow.tracking import setup_tracking
    from trackflow.tuning.study import parent_run
    from trackflow.tuning.trials import SWEEP_TAG

    name = f"svc-{uuid.uuid4().hex[:10]}"
    params = load_params(write_project_params(tmp_path / "params.yaml", {
        "base.mlflow.experiment_name": name,
    }))  # fmt: skip
    tracking = setup_tracking(params.base.mlflow)
    start = threading.Barrier(3)
    kept: list[str] = []

    def sweep() -> None:
        start.wait()
        kept.append(parent_run(tracking, params, name, services[STORAGE_ENV]))

    threads = [threading.Thread(target=sweep) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    query = f"tags.`{SWEEP_TAG}study` = '{name}' and tags.`{SWEEP_TAG}role` = 'parent'"
    (parent,) = tracking_client.search_runs([tracking.experiment_id], query)
    assert kept == [parent.info.run_id] * 3
    created = tracking_client.search_runs(
        [tracking.experiment_id], query, run_view_type=ViewType.ALL
    )
    assert len(created) >= 2, "no race happened: the sweeps did not start together"
    assert parent.data.tags[SWEEP_TAG + "storage"].count("***") == 1  # its password masked


def test_sweeps_opening_a_new_study_database_at_once_all_open_it(
    services: dict[str, str],
) -> None:
    """Sweeps starting together on an empty database all create Optuna's tables: none fails."""
    import threading

    import psycopg
    from sqlalchemy.engine import make_url

    from trackflow.tuning.study import open_storage

    url = make_url(services[STORAGE_ENV])
    database = f"optuna_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password,
        dbname="postgres", autocommit=True,
    )  # fmt: skip
    with admin:
        admin.execute(f'CREATE DATABASE "{database}"')
        try:
            fresh = url.set(database=database).render_as_string(hide_password=False)
            start, failed = threading.Barrier(4), []

            def sweep() -> None:
                start.wait()
                try:
                    open_storage(fresh).engine.dispose()
                except Exception as exc:  # what the test is about: none may fail
                    failed.append(exc)

            threads = [threading.Thread(target=sweep) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    assert not failed, failed[0]


# --- 4. the schedule fires on the services' Prefect server, a services' worker runs it ------------


def test_the_nightly_deployment_fires_on_the_server_and_a_services_worker_completes_it(
    project: Project, services: dict[str, str], tracking_client: Any, tmp_path: Path
) -> None:
    """prefect.yaml's ``nightly``, on a toy pipeline, every few seconds, under a name of its own.

    The services' workers run in the checkout (flows/ is there); none is started here. The
    deployment is deleted after, so that it does not keep firing on the shared server.
    """
    toy = make_toy_repo(tmp_path / "toy")
    experiment = f"{project.name}-toy"
    write_project_params(toy / "params.yaml", {"base.mlflow.experiment_name": experiment})
    name = deploy_nightly(toy, tmp_path, f"nightly-{project.suffix}", project.env)
    try:
        run = wait_for_a_completed_scheduled_run(services, name, project.env)
    finally:
        delete_deployment(services, name, project.env)
    assert run.work_pool_name == WORK_POOL
    assert_no_secret(flow_run_logs(services, run.id), services, "the flow run's logs")
    assert (toy / "report.txt").is_file()  # the toy pipeline's last stage ran
    (train,) = experiment_runs(tracking_client, experiment)
    assert train.data.tags["trackflow.prefect_flow_run_id"] == str(run.id)
    assert train.info.artifact_uri.startswith("mlflow-artifacts:")


def deploy_nightly(toy: Path, folder: Path, name: str, env: dict[str, str]) -> str:
    """``prefect deploy`` of prefect.yaml's ``nightly`` as ``name``: repo and schedule changed."""
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    spec["deployments"] = [deployment]
    deployment["name"] = name
    deployment["parameters"]["repo"] = str(toy)
    deployment["schedules"] = [{"interval": 10}]
    prefect_file = folder / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    deploy = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    sh(*deploy, cwd=REPO_ROOT, env=env)  # from the checkout, where the workers run
    return f"trackflow-training/{name}"


def prefect_client(services: dict[str, str]) -> Any:
    """A synchronous Prefect client of the services' server, authenticated."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(
        services["PREFECT_API_URL"], auth_string=services["PREFECT_API_AUTH_STRING"]
    )


def wait_for_a_completed_scheduled_run(
    services: dict[str, str], name: str, env: dict[str, str]
) -> Any:
    """The first run the scheduler created for the deployment, once a worker completed it."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + SCHEDULE_WAIT_S
    runs: list[Any] = []
    with prefect_client(services) as client:
        deployment = client.read_deployment_by_name(name)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        while time.monotonic() < deadline:
            runs = [
                r for r in client.read_flow_runs(deployment_filter=only_this) if r.auto_scheduled
            ]
            done = [r for r in runs if r.state and r.state.is_final()]
            if done:
                (first, *_) = sorted(done, key=lambda r: r.expected_start_time)
                assert first.state.is_completed(), f"{first.state}: {first.state.message}"
                return first
            time.sleep(2)
    states = [(r.name, r.state_name) for r in runs]
    pytest.fail(f"no scheduled run of {name} completed in {SCHEDULE_WAIT_S} s: {states}")


def flow_run_logs(services: dict[str, str], run_id: Any) -> str:
    """What a flow run logged to the Prefect server (the worker's and the stages' lines)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    only_this = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
    with prefect_client(services) as client:
        logs = client.read_logs(log_filter=only_this)
    assert logs, "the flow run logged nothing"
    return "\n".join(log.message for log in logs)


def delete_deployment(services: dict[str, str], name: str, env: dict[str, str]) -> None:
    """Pause the schedule, cancel the runs not finished, delete the deployment."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.states import Cancelled

    with prefect_client(services) as client:
        deployment = client.read_deployment_by_name(name)
        client.pause_deployment(deployment.id)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        for run in client.read_flow_runs(deployment_filter=only_this):
            if not (run.state and run.state.is_final()):
                client.set_flow_run_state(run.id, Cancelled(), force=True)
        client.delete_deployment(deployment.id)
