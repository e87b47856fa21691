"""Following the alias: a promoted version takes over without a failed request; a service starts
before its champion exists; a locked store is retried at the next poll, not refused.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from tests.helpers import (
    POLL_S,
    Registry,
    check_hot_swap,
    running_server,
)
from trackflow.serving.follower import ModelFollower
from trackflow.tracking import Tracking

pytestmark = pytest.mark.slow  # each test here waits on a trackflow serve process or its polls


def test_a_promoted_version_takes_over_mid_stream_without_a_failed_request(
    guarded_server, registry
) -> None:
    check_hot_swap(guarded_server, registry, POLL_S)


def test_the_service_is_live_but_not_ready_until_a_champion_exists(
    registry, tmp_path: Path
) -> None:
    name = "serving-later"
    (version,) = registry.register(name, "good")
    with running_server(registry, name, tmp_path, poll_s=1.0) as server:
        server.wait_for(
            lambda: "cannot read" in server.describe()["status"], 120, "first read of the alias"
        )
        health = server.request("GET", "/health")
        ready = server.request("GET", "/ready")
        early = server.predict(registry.rows.head(1))

        registry.promote(name, version)
        server.wait_for(server.is_ready, 2 * 1.0 + 10, "ready after the promotion")
        late = server.predict(registry.rows.head(1))

    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.status_code == 503 and ready.json()["error_code"] == "NOT_READY"
    assert f"cannot read models:/{name}@champion" in ready.json()["message"]
    assert early.status_code == 503 and early.headers["Retry-After"] == "1"
    assert late.status_code == 200 and late.headers["X-Model-Version"] == version


class LockWhileLoading(logging.Handler):
    """Holds an exclusive SQLite transaction on ``store`` from the moment the follower says it
    is loading a version until it says it will retry: the alias read before succeeds, the load
    meets a locked store (the register stage writing, as far as the service can tell)."""

    def __init__(self, store: Path) -> None:
        super().__init__()
        self.connection = sqlite3.connect(store, isolation_level=None, check_same_thread=False)
        self.locked = threading.Event()
        self.released = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.endswith("loading it") and not self.locked.is_set():
            self.connection.execute("BEGIN EXCLUSIVE")
            self.locked.set()
        elif "retrying at the next poll" in message and not self.released.is_set():
            self.connection.execute("ROLLBACK")
            self.released.set()


def test_a_version_that_meets_a_locked_store_is_loaded_at_the_next_poll_not_refused(
    registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At start-up: nothing serves yet, and a transient failure must not keep it that way."""
    from mlflow import MlflowClient

    store = tmp_path / "mlflow.db"  # a copy: the running servers poll the module's store
    with (
        closing(sqlite3.connect(registry.uri.removeprefix("sqlite:///"))) as source,
        closing(sqlite3.connect(store)) as copy,
    ):
        source.backup(copy)
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow finds logged models by the global URI
    tracking = Tracking(MlflowClient(uri), uri, registry.tracking.experiment_id)
    copied = Registry(tracking, uri, registry.rows, registry.sources)
    (version,) = copied.register("serving-locked", "good")
    copied.promote("serving-locked", version)
    follower = ModelFollower(tracking, "serving-locked", "champion", poll_interval_s=1.0)
    lock = LockWhileLoading(store)
    caplog.set_level(logging.INFO, logger="trackflow.serving.follower")
    logging.getLogger("trackflow.serving.follower").addHandler(lock)
    try:
        follower.check()  # reads the alias, then meets the lock while loading
        during = follower.describe()
        follower.check()  # the next poll
    finally:
        logging.getLogger("trackflow.serving.follower").removeHandler(lock)
        lock.connection.close()
    after = follower.describe()

    assert lock.released.is_set()
    assert during["version"] is None and during["refused"] == []
    assert during["status"].startswith(
        f"cannot load version {version} now, retrying at the next poll: MlflowException: "
    )
    assert "database is locked" in during["status"]
    assert during["status"].endswith("; serving nothing")
    retries = [r for r in caplog.records if "retrying at the next poll" in r.getMessage()]
    assert [r.levelname for r in retries] == ["WARNING"]
    assert after["version"] == version and after["refused"] == []
    assert after["status"] == f"serving version {version}"
