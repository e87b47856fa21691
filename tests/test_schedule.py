"""The schedule fires: a real Prefect server's scheduler creates runs, a real worker completes one.

The deployment is the project's own ``prefect.yaml`` (deployed with ``prefect deploy``, as the
README says), pointed at a toy DVC pipeline and given a schedule a few seconds apart; nothing
triggers a run by hand. This is what caught SQLAlchemy 2.1 breaking Prefect 3.8's scheduler (every
scheduler pass failed with "Can't evaluate bulk DML statement", so no run was ever created).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

WAIT_S = 240  # the first scheduled run is due within seconds; the toy pipeline takes ~20 s


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of every Prefect process of the test: its own home, no analytics."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def stop(process: subprocess.Popen) -> str:
    process.terminate()
    try:
        return process.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0] or ""


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``prefect server start`` on loopback with its services (the scheduler among them).

    Not Prefect's test harness: its ephemeral server runs no scheduler.
    """
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=prefect_env(home),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server_log(home)
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not answer in 120 s"
            time.sleep(1)
        yield api_url, home
    finally:
        stop(server)
        log.close()


def server_log(home: Path, lines: int = 40) -> str:
    """The last lines the server printed (its scheduler's errors land there)."""
    return "\n".join((home / "server.log").read_text().splitlines()[-lines:])


def deploy_project_yaml(toy: Path, folder: Path, env: dict[str, str]) -> str:
    """``prefect deploy --all`` of the project's prefect.yaml, repo and schedule changed only."""
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "nightly"]
    spec["deployments"] = [deployment]  # the training flow's (prefect.yaml also has the sweep's)
    deployment["parameters"]["repo"] = str(toy)
    deployment["schedules"] = [{"interval": 5}]
    prefect_file = folder / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    pool = ["prefect", "work-pool", "create", deployment["work_pool"]["name"], "--type", "process"]
    subprocess.run(pool, env=env, check=True, capture_output=True, text=True)
    deploy = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    result = subprocess.run(deploy, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
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
