"""The schedule fires: a real Prefect server's scheduler creates runs, a real worker completes one.

The deployment is the project's own ``prefect.yaml`` (deployed with ``prefect deploy``, as the
README says), pointed at a toy DVC pipeline and given a schedule a few seconds apart; nothing
triggers a run by hand. This is what caught SQLAlchemy 2.1 breaking Prefect 3.8's scheduler (every
scheduler pass failed with "Can't evaluate bulk DML statement", so no run was ever created).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO_ROOT, prefect_deployment
from tests.prefect_helpers import (
    deploy,
    prefect_env,
    project_deployment,
    running_prefect_server,
    server_log,
    stop,
)

WAIT_S = 240  # the first scheduled run is due within seconds; the toy pipeline takes ~20 s


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``prefect server start`` on loopback with its services (the scheduler among them)."""
    home = tmp_path / "prefect-home"
    with running_prefect_server(home) as api_url:
        yield api_url, home


def deploy_project_yaml(toy: Path, folder: Path, env: dict[str, str]) -> str:
    """``prefect deploy --all`` of the project's prefect.yaml, repo and schedule changed only."""
    deployment = project_deployment("nightly")  # the training flow's (not the sweep's, retrain's)
    deployment["parameters"]["repo"] = str(toy)
    deployment["schedules"] = [{"interval": 5}]
    deploy([deployment], folder, env)
    return f"trackflow-training/{deployment['name']}"


def completed_scheduled_runs(api_url: str, deployment_name: str) -> tuple[list, list]:
    """The deployment's flow runs the scheduler created, and those of them that completed."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name(deployment_name)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        runs = client.read_flow_runs(deployment_filter=only_this)
    scheduled = [run for run in runs if run.auto_scheduled]
    return scheduled, [run for run in scheduled if run.state and run.state.is_completed()]


@pytest.mark.slow
def test_the_server_s_scheduler_creates_runs_of_the_deployment_and_a_worker_completes_one(
    prefect_server: tuple[str, Path],
    toy_repo: Path,
    tmp_path: Path,
) -> None:
    api_url, home = prefect_server
    env = prefect_env(home, api_url)
    name = deploy_project_yaml(toy_repo, tmp_path, env)
    worker = subprocess.Popen(
        ["prefect", "worker", "start", "--pool", "trackflow", "--type", "process"],
        cwd=REPO_ROOT,  # flow runs import flows.training from here
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        scheduled, completed = [], []
        while not completed and time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()[0]
            time.sleep(2)
            with contextlib.suppress(httpx.HTTPError):  # a server busy failing its scheduler
                scheduled, completed = completed_scheduled_runs(api_url, name)
    finally:
        worker_log = stop(worker)
    assert scheduled, f"the scheduler created no run of {name} in {WAIT_S} s:\n{server_log(home)}"
    assert completed, f"no scheduled run completed in {WAIT_S} s; worker log:\n{worker_log}"
    assert (toy_repo / "report.txt").is_file()  # the pipeline's last stage ran


def test_the_retrain_deployment_is_triggered_by_the_drift_event_with_a_cool_down() -> None:
    """The trigger names what the library emits: the event, the model's resource, the cool-down."""
    from trackflow.config import load_params
    from trackflow.pipeline.schedule import (
        DRIFT_EVENT,
        RETRAIN_COOLDOWN_S,
        RETRAIN_DEPLOYMENT,
        RETRAIN_OVERRIDES,
        model_resource_id,
    )

    deployment, loaded = prefect_deployment(RETRAIN_DEPLOYMENT)
    assert loaded.name == "trackflow-retrain"
    assert deployment["parameters"]["overrides"] == RETRAIN_OVERRIDES
    assert deployment["concurrency_limit"] == 1
    (trigger,) = deployment["triggers"]
    model_name = load_params(REPO_ROOT / "params.yaml").model.name
    assert trigger["enabled"] is True
    assert trigger["match"] == {"prefect.resource.id": model_resource_id(model_name)}
    assert trigger["expect"] == [DRIFT_EVENT]
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert (trigger["posture"], trigger["threshold"]) == ("Reactive", 1)
    assert trigger["within"] == RETRAIN_COOLDOWN_S
    assert set(trigger["parameters"]) <= set(loaded.parameters.properties)
