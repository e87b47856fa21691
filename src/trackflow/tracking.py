"""MLflow set-up, done by one explicit call: importing trackflow never touches a tracking store.

Runs are addressed by an explicit ``run_id`` through an ``MlflowClient``, never through the fluent
active run, which is per thread and would be lost between stages, tasks and processes.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
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

#: Environment variable DVC sets to the experiment's name while ``dvc exp run`` runs a stage.
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
#: MLflow's tag of a run's description, shown on the run's page in the UI (Markdown).
NOTE_TAG = "mlflow.note.content"
#: A paragraph of a run's description written by a stage: ``**<stage>**: ...``.
_NOTE_OWNER = re.compile(r"^\*\*([\w-]+)\*\*: ")
#: Order of the stages' paragraphs in a run's description; other stages' follow by name.
NOTE_ORDER = ("pretrain", "train", "evaluate", "anomaly", "register")
#: Suffix of the experiment scored batches are recorded in: ``<experiment>-scoring``.
SCORING_SUFFIX = "-scoring"

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
    "connection broken",  # a response cut short (CUT_SHORT): the server went away mid-answer
    "temporary failure in name resolution",
    "read timed out",
    "connect timeout",
    "503 service unavailable",
    "too many 500 error responses",
    "too many 503 error responses",
    "unable to acquire lock",  # DVC: another dvc process holds the repository
    "is being blocked by",
)


def is_transient(error: BaseException | str) -> bool:
    """Whether an error (or a failed command's output) bears a sign of a passing fault.

    The one test of "busy store, unreachable server: trying again may succeed" that the stages,
    the flows' retries, the pipeline driver and the service's follower all use.
    """
    lowered = str(error).lower()
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


def setup_tracking(config: MlflowConfig, experiment_name: str | None = None) -> Tracking:
    """Point MLflow at the configured store and make sure the experiment exists.

    Returns a client bound to the store; the process-wide MLflow state is left alone. A local
    SQLite store gets its folder created; a new experiment stores its artifacts under
    ``config.artifact_location`` (made absolute, so runs read back from any working directory),
    or, on a tracking server, where the server keeps them. A tracking server that does not answer
    or refuses the credentials is one line of error (:func:`check_server`), not minutes of retries.

    Args:
        config: The store and the experiment of the candidates.
        experiment_name: Another experiment of the same store to record runs in (e.g.
            :func:`scoring_experiment`); default ``config.experiment_name``.
    """
    experiment_name = experiment_name or config.experiment_name
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(config)
    shown = redact(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if is_server(uri):
        check_server(uri)
    # No mlflow.set_tracking_uri(): it also sets MLFLOW_TRACKING_URI for the whole process, which
    # would then override the params of every later set-up in it. The client carries the URI.
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, experiment_name, config.artifact_location, uri)
    except Exception as exc:  # MLflow raises many kinds for a bad URI or an unreachable store
        refused = refusal(exc)
        if refused:
            raise ConfigError(f"the MLflow tracking server {shown} {refused}") from None
        if is_transient(exc):
            raise TrackingUnavailable(
                f"the MLflow tracking store {shown!r} is busy or unreachable, try again: "
                f"{type(exc).__name__}: {redact(str(exc))[:500]}"
            ) from None
        raise ConfigError(
            f"cannot use the MLflow tracking store {shown!r} (base.mlflow.tracking_uri, or "
            f"MLFLOW_TRACKING_URI if set): {type(exc).__name__}: {redact(str(exc))}"
        ) from None
    return Tracking(client=client, tracking_uri=uri, experiment_id=experiment_id)


def _experiment_id(client: MlflowClient, name: str, artifacts: str, uri: str) -> str:
    """The experiment's id, creating it when missing.

    Processes starting together (sweep workers, machines) may all find it missing: the ones whose
    create loses the race read the winner's.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_uri(artifacts, uri))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


#: What a server's refusal means, by MLflow's error code (basic-auth answers 401 and 403).
_REFUSALS = {
    "UNAUTHENTICATED": "refused the credentials (401): set MLFLOW_TRACKING_USERNAME and "
    "MLFLOW_TRACKING_PASSWORD (`source .services/env.sh` for the services of `make services`)",
    "PERMISSION_DENIED": "refused the request (403): the user MLFLOW_TRACKING_USERNAME has no "
    "permission for it; an admin grants it (docs/scale-out.md)",
}


def refusal(exc: BaseException) -> str | None:
    """What a tracking server's refusal (401, 403) means and what to do; None for other errors."""
    return _REFUSALS.get(str(getattr(exc, "error_code", "")))


def is_server(uri: str) -> bool:
    """Whether a tracking URI names a tracking server (HTTP) rather than a store it opens."""
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout_s: float = 10) -> None:
    """Fail at once, in one line, when a tracking server does not answer.

    MLflow's client retries a refused connection for about two minutes before it gives up; a wrong
    URL or a server that is not started deserves a quicker answer. The flows retry
    :class:`TrackingUnavailable`.
    """
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as exc:
        reason = "no answer" if isinstance(exc, requests.Timeout) else "connection refused"
        raise TrackingUnavailable(
            f"the MLflow tracking server {redact(uri)} is unreachable ({reason}): is it "
            "running (make services)? Check MLFLOW_TRACKING_URI or base.mlflow.tracking_uri"
        ) from None


#: The password of a URL's ``user:password@`` part.
_URL_PASSWORD = re.compile(r"(\b[a-z][\w+.-]*://[^\s:/@]+:)[^\s@/]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked: ``postgresql://u:***@host/db``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def scoring_experiment(config: MlflowConfig) -> str:
    """The experiment scored batches are recorded in, beside (not among) the candidates."""
    return config.experiment_name + SCORING_SUFFIX


def run_label(*parts: str | None) -> str:
    """A run name from its parts (stage, mode, ...) and what tells this run from its siblings.

    The last part is the DVC experiment's name under ``dvc exp run``, else the given fallback
    (e.g. a short params digest); empty parts are left out: ``train-finetune-3f2a1c``.
    """
    *head, fallback = parts
    last = os.environ.get(DVC_EXP_NAME_ENV) or fallback
    return "-".join(part for part in (*head, last) if part)


def source_tags(source: str | None = None) -> dict[str, str]:
    """MLflow's own tags of where a run came from: entry point, kind, git commit, user.

    ``mlflow.start_run`` sets these by itself; runs created through a client get them here.

    Args:
        source: The entry point, e.g. ``trackflow.stages.train``; default: the module run with
            ``python -m``, else the program's file name.
    """
    from trackflow.registry.lineage import FLOW_RUN_ENV, git_state

    tags = {
        "mlflow.source.name": source or _entry_point(),
        "mlflow.source.type": "JOB" if os.environ.get(FLOW_RUN_ENV) else "LOCAL",
        "mlflow.user": _user(),
    }
    commit = git_state()["git_commit"]
    if not commit.startswith("unknown"):
        tags["mlflow.source.git.commit"] = commit
    return tags


def _entry_point() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name and no user database entry (some containers)
        return "unknown"


@contextmanager
def tracked_run(
    tracking: Tracking, run_name: str, tags: dict[str, str], source: str | None = None
) -> Iterator[str]:
    """Create a run and yield its id; it ends FINISHED, or FAILED if the block raises.

    The run gets :func:`source_tags` (``source`` is its entry point) under ``tags``.
    """
    tags = source_tags(source) | tags
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
    """Log many params in one call (one ``log_param`` costs a round trip each).

    Values are written as in ``params.yaml`` (:func:`yaml_text`): ``null``, ``true``, ``[32, 16]``;
    a URL's password (a storage URL in params) is masked (:func:`redact`).
    """
    from mlflow.entities import Param

    batch = [Param(key, redact(yaml_text(value))) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per call
        _log_batch(tracking, run_id, params=batch[start : start + 100])


def yaml_text(value: Any) -> str:
    """A param's value as YAML writes it: ``null``, ``true``, ``0.95``, ``[knn, mahalanobis]``."""
    import yaml

    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def update_note(tracking: Tracking, run_id: str, stage: str, text: str) -> str:
    """Set ``stage``'s paragraph of a run's description (``mlflow.note.content``); return it all.

    The description is Markdown, one paragraph per stage, ``**<stage>**: <text>``, in
    :data:`NOTE_ORDER`: a stage that runs again replaces its paragraph instead of adding one, and
    paragraphs written by hand in the UI are kept, after the stages'.
    """
    note = tracking.client.get_run(run_id).data.tags.get(NOTE_TAG, "")
    parts = {}
    for paragraph in filter(None, (p.strip() for p in note.split("\n\n"))):
        owner = _NOTE_OWNER.match(paragraph)
        parts[owner[1] if owner else f"~{len(parts)}"] = paragraph  # unowned: after the stages
    parts[stage] = f"**{stage}**: {text}"
    order = {name: i for i, name in enumerate(NOTE_ORDER)}
    ordered = sorted(parts, key=lambda name: (order.get(name, len(order)), name))
    note = "\n\n".join(parts[name] for name in ordered)
    set_tags(tracking, run_id, {NOTE_TAG: note})
    return note


def set_tags(tracking: Tracking, run_id: str, tags: dict[str, Any]) -> None:
    """Set many tags in one call."""
    from mlflow.entities import RunTag

    _log_batch(tracking, run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_metrics(tracking: Tracking, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log many metrics in one call."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _log_batch(
        tracking,
        run_id,
        metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
    )


#: Seconds between the tries of a batch of params, metrics or tags cut short by the server.
LOG_BATCH_BACKOFF_S = (1.0, 3.0, 9.0)
#: The sign of an answer cut short, the one transport fault MLflow's client does not retry.
CUT_SHORT = "connection broken"


def _log_batch(tracking: Tracking, run_id: str, **batch: Any) -> None:
    """``log_batch``, tried again when its answer was cut short.

    MLflow's client retries a refused connection itself (with backoff, for minutes), but not a
    response cut short (a server restarted mid-answer: "Connection broken: IncompleteRead"): only
    that is tried again here, so a server that is gone is not waited for four times over. Sending
    the same batch twice is harmless: tags and params are set to the same values, and a metric
    point that exists is not added again.
    """
    import time

    for pause in (*LOG_BATCH_BACKOFF_S, None):
        try:
            tracking.client.log_batch(run_id, **batch)
            return
        except Exception as exc:  # MLflow wraps the transport's errors in MlflowException
            if pause is None or CUT_SHORT not in str(exc).lower():
                raise
            time.sleep(pause)


def _artifact_uri(location: str, tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts.

    A local folder is for a local store only: against a tracking server it would be a path on the
    client's machine that no other machine (nor the server) can read, so the server's own
    location (``mlflow-artifacts:``, proxied by ``--serve-artifacts``) is used instead.
    """
    if "://" in location:
        return location
    if is_server(tracking_uri):
        return None
    return Path(location).absolute().as_uri()
