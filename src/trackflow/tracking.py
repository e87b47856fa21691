"""MLflow set-up, done by one explicit call: importing trackflow never touches a tracking store.

Runs are addressed by an explicit ``run_id`` through an ``MlflowClient``, never through the fluent
active run, which is per thread and would be lost between stages, tasks and processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.config import MlflowConfig
from trackflow.errors import ConfigError, TrackingUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG_PREFIX = "trackflow."

#: Signs, in an error's text, of a passing fault: the store or server was busy or away, not wrong.
TRANSIENT_SIGNS = (
    "database is locked",
    "database table is locked",
    "connection refused",
    "failed to establish a new connection",
    "max retries exceeded",
    "connection reset",
    "connection aborted",
    "remote end closed connection",
    "temporary failure in name resolution",
    "read timed out",
    "connect timeout",
    "503 service unavailable",
    "too many 500 error responses",
    "too many 503 error responses",
    "unable to acquire lock",  # DVC: another dvc process holds the repository
    "is being blocked by",
)


def is_transient_error(text: str) -> bool:
    """Whether an error text bears a sign of a passing fault (busy store, unreachable server)."""
    lowered = text.lower()
    return any(sign in lowered for sign in TRANSIENT_SIGNS)


@dataclass(frozen=True)
class Tracking:
    """A configured tracking store and the experiment runs go to."""

    client: MlflowClient
    tracking_uri: str
    experiment_id: str


def resolve_tracking_uri(config: MlflowConfig) -> str:
    """``MLFLOW_TRACKING_URI`` from the environment if set, else the configured URI."""
    return os.environ.get("MLFLOW_TRACKING_URI") or config.tracking_uri


def setup_tracking(config: MlflowConfig) -> Tracking:
    """Point MLflow at the configured store and make sure the experiment exists.

    Returns a client bound to the store; the process-wide MLflow state is left alone. A local
    SQLite store gets its folder created; a new experiment stores its artifacts under
    ``config.artifact_location`` (made absolute, so runs read back from any working directory).
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(config)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # No mlflow.set_tracking_uri(): it also sets MLFLOW_TRACKING_URI for the whole process, which
    # would then override the params of every later set-up in it. The client carries the URI.
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(config.experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(
                config.experiment_name, artifact_location=_artifact_uri(config.artifact_location)
            )
    except Exception as exc:  # MLflow raises many kinds for a bad URI or an unreachable store
        if is_transient_error(str(exc)):
            raise TrackingUnavailable(
                f"the MLflow tracking store {uri!r} is busy or unreachable, try again: "
                f"{type(exc).__name__}: {str(exc)[:500]}"
            ) from None
        raise ConfigError(
            f"cannot use the MLflow tracking store {uri!r} (base.mlflow.tracking_uri, or "
            f"MLFLOW_TRACKING_URI if set): {type(exc).__name__}: {exc}"
        ) from None
    return Tracking(client=client, tracking_uri=uri, experiment_id=experiment_id)


@contextmanager
def tracked_run(tracking: Tracking, run_name: str, tags: dict[str, str]) -> Iterator[str]:
    """Create a run and yield its id; it ends FINISHED, or FAILED if the block raises."""
    run = tracking.client.create_run(tracking.experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        tracking.client.set_terminated(run_id, status="FAILED")
        raise
    tracking.client.set_terminated(run_id, status="FINISHED")


@contextmanager
def fluent_tracking(tracking: Tracking) -> Iterator[None]:
    """Point MLflow's process-wide (fluent) API at ``tracking`` for a block, then restore it.

    For the few MLflow calls that have no client form (logging a model). The previous URI and the
    ``MLFLOW_TRACKING_URI`` variable, which ``mlflow.set_tracking_uri`` also sets, come back after.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking.tracking_uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_uri
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def log_params(tracking: Tracking, run_id: str, params: dict[str, Any]) -> None:
    """Log many params in one call (one ``log_param`` costs a round trip each)."""
    from mlflow.entities import Param

    batch = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per call
        tracking.client.log_batch(run_id, params=batch[start : start + 100])


def set_tags(tracking: Tracking, run_id: str, tags: dict[str, Any]) -> None:
    """Set many tags in one call."""
    from mlflow.entities import RunTag

    tracking.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_metrics(tracking: Tracking, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log many metrics in one call."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    tracking.client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
    )


def _artifact_uri(location: str) -> str:
    if "://" in location:
        return location
    return Path(location).absolute().as_uri()
