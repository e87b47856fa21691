"""A real ``prefect server start`` for the tests of what its services do (scheduler, triggers).

Plain helpers, imported by ``test_schedule``, ``test_trigger`` and ``test_loop``; each defines its
own ``prefect_server`` fixture on :func:`running_prefect_server` (marked slow, as conftest asks).
Not Prefect's test harness: its ephemeral server runs no scheduler and no automations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import REPO_ROOT, free_port


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of every Prefect process of a test: its own home, no analytics."""
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
    """Terminate a process started with ``stdout=PIPE`` (kill it after 30 s); its output."""
    process.terminate()
    try:
        return process.communicate(timeout=30)[0] or ""
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0] or ""


@contextmanager
def running_prefect_server(home: Path) -> Iterator[str]:
    """``prefect server start`` on loopback with its services, its state in ``home``; its API URL.

    Its output goes to ``home/server.log`` (:func:`server_log`).
    """
    home.mkdir(parents=True, exist_ok=True)
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
        yield api_url
    finally:
        stop(server)
        log.close()


def server_log(home: Path, lines: int = 40) -> str:
    """The last lines the server printed (its services' errors land there)."""
    return "\n".join((home / "server.log").read_text().splitlines()[-lines:])


def project_deployment(name: str) -> dict[str, Any]:
    """``prefect.yaml``'s deployment ``name``, as a dict to change before :func:`deploy`."""
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == name]
    return deployment


def deploy(deployments: list[dict[str, Any]], folder: Path, env: dict[str, str]) -> None:
    """``prefect deploy --all`` of ``deployments`` (the project's prefect.yaml's, changed), from
    the checkout, after creating their work pools."""
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    spec["deployments"] = deployments
    prefect_file = folder / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    for pool in sorted({d["work_pool"]["name"] for d in deployments}):
        create = ["prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"]
        subprocess.run(create, env=env, check=True, capture_output=True, text=True)
    command = ["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def deployment_runs(api_url: str, name: str) -> list[Any]:
    """The flow runs of deployment ``name`` (``flow/deployment``), oldest first."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(api_url) as client:
        deployment = client.read_deployment_by_name(name)
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        return client.read_flow_runs(
            deployment_filter=only_this, sort=FlowRunSort.EXPECTED_START_TIME_ASC
        )
