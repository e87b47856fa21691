"""The promotion lock and the alias follower against the services' MLflow tracking server
(``make services``: PostgreSQL behind it, basic-auth in front).

The same scenarios as test_promotion.py's racing promotions and test_serving_follower.py's hot
swap (each written once, in tests/helpers.py), where SQLite's single writer no longer serialises
anything: two web workers, each with its own database connections, answer the racers.
"""

from __future__ import annotations

import threading
import time
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


def test_creators_racing_for_the_lock_model_each_take_it_alone_or_are_told_it_is_taken(
    server_name: str,
) -> None:
    """The lock's primitive, churned: four threads take the lock's name (create it), hold it a
    moment and free it (delete it) as fast as the server answers, for 20 s.

    Every create either takes the name or says it is taken, never fails, and no two threads hold
    it at once. (PostgreSQL's store re-reads a name its insert met, to say it exists: a name
    freed in between read as "does not exist", about once per 100 creates racing a delete.)
    """
    from mlflow import MlflowClient

    from trackflow.registry.promotion import LOCK_SUFFIX
    from trackflow.registry.uris import create_registered_model

    lock = server_name + LOCK_SUFFIX
    counts = {"inside": 0, "most": 0, "taken": 0, "refused": 0}
    errors: list[str] = []
    guard, stop = threading.Lock(), threading.Event()

    def contend() -> None:
        client = MlflowClient()
        while not stop.is_set():
            try:
                took = create_registered_model(client, lock)
            except Exception as exc:  # what the test is about: say which, keep going
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with guard:
                counts["taken" if took else "refused"] += 1
                counts["inside"] += took
                counts["most"] = max(counts["most"], counts["inside"])
            if took:
                time.sleep(0.02)
                with guard:
                    counts["inside"] -= 1
                client.delete_registered_model(lock)

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(20)
    stop.set()
    for thread in threads:
        thread.join()

    assert not errors, f"{len(errors)} creates failed, e.g. {errors[:3]}"
    assert counts["most"] == 1
    assert counts["taken"] > 20 and counts["refused"] > 20, counts
    assert not MlflowClient().search_registered_models(f"name = '{lock}'")


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
