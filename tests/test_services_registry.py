"""The promotion lock and the alias follower against the services' MLflow tracking server
(``make services``: PostgreSQL behind it, basic-auth in front).

The same scenarios as test_promotion.py's racing promotions and test_serving_follower.py's hot
swap (each written once, in tests/helpers.py), where SQLite's single writer no longer serialises
anything: two web workers, each with its own database connections, answer the racers.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import (
    LOW_FLOORS,
    POLL_S,
    TOKEN,
    Candidate,
    Registry,
    check_hot_swap,
    packaged_model,
    race_two_promotions,
    raw_rows,
    running_server,
    write_project_params,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture
def server_name(services: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this process (and the processes it starts) at the services; return a name no other
    test uses, for the model and its experiment (the server's store is shared and persists)."""
    for key, value in services.items():
        monkeypatch.setenv(key, value)
    return f"test-{uuid.uuid4().hex}"


def test_two_promotions_racing_on_the_tracking_server_leave_one_champion(
    candidates: dict[str, Candidate], server_name: str, services: dict[str, str], tmp_path: Path
) -> None:
    from trackflow.config import load_params
    from trackflow.tracking import setup_tracking, tracked_run

    overrides = {"model.name": server_name, "base.mlflow.experiment_name": server_name}
    params = write_project_params(tmp_path / "params.yaml", {**overrides, **LOW_FLOORS})
    tracking = setup_tracking(load_params(params).base.mlflow)
    assert tracking.tracking_uri == services["MLFLOW_TRACKING_URI"]
    # The candidates' training runs are in a SQLite store: each gets a run on the server.
    with tracked_run(tracking, "weak", {}) as weak, tracked_run(tracking, "good", {}) as good:
        race_two_promotions(tracking, server_name, candidates, params, {"weak": weak, "good": good})


def test_a_promoted_version_takes_over_mid_stream_with_the_registry_on_the_tracking_server(
    candidates: dict[str, Candidate], server_name: str, tmp_path: Path
) -> None:
    from trackflow.config import MlflowConfig
    from trackflow.tracking import setup_tracking, tracked_run

    tracking = setup_tracking(MlflowConfig(experiment_name=server_name))
    rows = raw_rows(candidates["good"], "test").drop(columns="target")
    sources = {}
    for kind in ("good", "weak"):
        with tracked_run(tracking, kind, {}) as run_id:
            sources[kind] = packaged_model(tracking, candidates[kind], rows, run_id=run_id)
    registry = Registry(tracking, tracking.tracking_uri, rows, sources)
    assert registry.register(server_name, "good", "weak") == ["1", "2"]
    registry.promote(server_name, "1")
    with running_server(registry, server_name, tmp_path, token=TOKEN, poll_s=POLL_S) as server:
        server.wait_for(server.is_ready, 120, "ready")
        check_hot_swap(server, registry, POLL_S)
