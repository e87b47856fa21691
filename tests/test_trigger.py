"""The drift trigger fires: a real Prefect server's automation creates runs of ``retrain``.

The deployment is the project's own ``prefect.yaml`` ``retrain`` (deployed with ``prefect
deploy``, which creates its trigger's automation), its cool-down shortened; the events are sent as
batch scoring sends them (``flows.scoring.emit_drift``, in a process of its own pointed at the
server). Nothing creates a run by hand: the server's triggers and actions services do. No worker
runs here, so the runs stay scheduled; what a run does is ``test_loop``'s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO_ROOT
from tests.prefect_helpers import (
    deploy,
    deployment_runs,
    prefect_env,
    project_deployment,
    running_prefect_server,
    server_log,
)
from trackflow.pipeline.schedule import RETRAIN_OVERRIDES

pytestmark = pytest.mark.slow

COOL_DOWN_S = 12  # the trigger's `within`, shortened from 600 s
WAIT_S = 30  # an event becomes a flow run in about a second here

EMIT = """
import json, sys, time
from pathlib import Path
from prefect.events.worker import EventsWorker
from flows.scoring import emit_drift
ids = []
for model, batch in json.loads(sys.argv[1]):
    summary = {
        "model_uri": f"models:/{model}@champion", "model_version": "1", "mlflow_run_id": "r",
        "counts": {"n_rows": 50, "anomaly_rate": 0.9},
        "drift": {"rules_fired": ["severe_psi"], "share_drifted": 0.5, "max_psi": 4.0},
    }
    ids.append(str(emit_drift(model, Path(batch), summary).id))
    time.sleep(0.2)  # batches scored one after the other (each scoring run emits once)
EventsWorker.drain_all()
print(json.dumps(ids))
"""


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``prefect server start`` on loopback with its services (triggers and actions among them)."""
    home = tmp_path / "prefect-home"
    with running_prefect_server(home) as api_url:
        yield api_url, home


def emit(env: dict[str, str], *events: tuple[str, str]) -> list[str]:
    """Send drift events ``(model, batch)`` as batch scoring does, from a new process; their ids."""
    argv = [sys.executable, "-c", EMIT, json.dumps(events)]
    result = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def wait_for_runs(api_url: str, name: str, count: int, home: Path) -> list[Any]:
    """The deployment's runs once there are ``count``; fails after ``WAIT_S``."""
    deadline = time.monotonic() + WAIT_S
    while len(runs := deployment_runs(api_url, name)) < count:
        assert time.monotonic() < deadline, (
            f"{len(runs)} runs of {name}, not {count}, {WAIT_S} s after the event:\n"
            + server_log(home)
        )
        time.sleep(0.5)
    return runs


def test_a_drift_event_starts_one_retrain_run_per_cool_down_and_only_for_its_model(
    prefect_server: tuple[str, Path], tmp_path: Path
) -> None:
    api_url, home = prefect_server
    env = prefect_env(home, api_url)
    deployment = project_deployment("retrain")
    deployment["parameters"]["repo"] = str(tmp_path / "repo")
    (trigger,) = deployment["triggers"]
    trigger["within"] = COOL_DOWN_S
    disabled = project_deployment("retrain") | {"name": "retrain-off"}
    disabled["triggers"] = [trigger | {"enabled": False, "name": "off"}]
    deploy([deployment, disabled], tmp_path, env)
    name, off = "trackflow-retrain/retrain", "trackflow-retrain/retrain-off"
    model = trigger["match"]["prefect.resource.id"].removeprefix("trackflow.model.")

    # A burst of five drifted batches of the model: one run, started by the first.
    burst = [(model, f"/data/stream-{n}.csv") for n in range(5)]
    first_sent = time.monotonic()
    ids = emit(env, *burst)
    (run,) = wait_for_runs(api_url, name, 1, home)
    time.sleep(3)
    runs = deployment_runs(api_url, name)
    assert len(runs) == 1, [(r.parameters, r.created, first_sent) for r in runs]
    assert run.parameters["drifted_batch"] == "/data/stream-0.csv"
    assert run.parameters["drift_event_id"] == ids[0]
    assert run.parameters["overrides"] == RETRAIN_OVERRIDES  # the deployment's, kept
    assert run.parameters["repo"] == str(tmp_path / "repo")
    assert run.state.is_scheduled()  # no worker here: the automation created it, nothing ran it

    # Another model's drift matches no trigger; more drift of this model is inside the cool-down.
    emit(env, ("another-model", "/data/other.csv"), (model, "/data/stream-5.csv"))
    time.sleep(3)
    runs = deployment_runs(api_url, name)
    assert len(runs) == 1, [(r.parameters, r.created, first_sent) for r in runs]
    assert deployment_runs(api_url, off) == []  # enabled: false -> no automation acts

    # After the cool-down the next drifted batch starts the next run.
    time.sleep(max(0.0, first_sent + COOL_DOWN_S + 1 - time.monotonic()))
    (later,) = emit(env, (model, "/data/stream-6.csv"))
    runs = wait_for_runs(api_url, name, 2, home)
    assert [r.parameters["drift_event_id"] for r in runs] == [ids[0], later]
    time.sleep(2)
    assert len(deployment_runs(api_url, name)) == 2
