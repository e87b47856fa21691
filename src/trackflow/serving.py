"""Registry-based serving: a REST service that answers with ``models:/NAME@ALIAS`` and follows it.

Routes (JSON in and out; an error is ``{"error_code": ..., "message": ...}``, never a traceback):

- ``GET /health``: the process is up (open even when a token is set);
- ``GET /ready``: a version is loaded, smoke-tested and warmed up (503 until then; open);
- ``GET /models/NAME``: the served version, its run, lineage tags, input schema, refused versions;
- ``POST /models/NAME/predictions``: ``{"rows": [{column: number, ...}, ...]}`` in; per row
  ``label``, ``probabilities``, ``anomaly_score`` and ``is_anomaly`` out;
- ``POST /invocations`` and ``GET /ping``: MLflow's scoring contract, for MLflow's own clients;
- ``GET /openapi.json`` and ``GET /docs``: the OpenAPI document (:mod:`trackflow.serving_api`:
  the served version's exact columns and ranges) and Swagger UI.

A :class:`ModelFollower` thread reads the alias every ``poll_interval_s``. A new version is loaded,
smoke-tested on its input example and warmed up off the request path, then swapped in by one
reference assignment: a request keeps the version it was checked against until it is answered,
and every scored response names its version in ``X-Model-Version``. A version that fails through
its own fault (it does not load, is not a trackflow model, or fails its smoke test) is refused
(reported on ``GET /models/NAME``, not retried); a transient failure (a locked store, an artifact
store out of reach) is retried at the next poll. Either way the old version keeps serving.

Rows are checked as the model's :meth:`~trackflow.packaging.Scorer.check` checks them
(:func:`~trackflow.inputs.check_rows`; NaN and ``null`` allowed if the model imputes; values
within the model's range): plain JSON numbers under exactly the model's columns go straight to an
array, range-checked; anything else goes through ``Scorer.check``, which accepts or refuses it
with its message. Rows are checked before they are batched: concurrent requests are scored
together (:class:`Batcher`; a call of the packaged model costs little more for 64 rows than for 1),
and a batch that fails is scored again request by request, so a request fails only by its own rows.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import itertools
import json
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from trackflow import __version__, serving_api
from trackflow.errors import preview
from trackflow.inputs import InputError, check_range
from trackflow.tracking import TAG_PREFIX, is_transient_error

if TYPE_CHECKING:
    from trackflow.config import ServeConfig
    from trackflow.packaging import Scorer
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)

#: Environment variable holding the bearer token; unset or empty = no authentication.
TOKEN_VARIABLE = "TRACKFLOW_API_TOKEN"
#: JSON keys of MLflow's scoring contract (``POST /invocations``), one per request.
INVOCATION_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
ERROR_CODES = {
    400: "MALFORMED_REQUEST",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_INPUT",
    500: "INTERNAL_ERROR",
    503: "NOT_READY",
}
_NUMBER_TYPES = frozenset((int, float))
_NUMBER_OR_NULL_TYPES = frozenset((int, float, type(None)))
_EXACT_INT = 2**53  # integers up to this are exact in float64
_WARM_UP = "trackflow.warm_up"  # in the scope of the requests the app sends itself at start
_WARM_UP_CALLS = 5


@dataclass(frozen=True)
class ServeSettings:
    """What the service serves, how often it reads the alias, and what it accepts.

    Built by :meth:`from_config` from the params' ``serve`` section, which holds the defaults.
    """

    name: str
    alias: str
    poll_interval_s: float
    max_rows: int
    max_body_bytes: int
    token: str | None
    access_log: bool

    @classmethod
    def from_config(cls, name: str, config: ServeConfig, token: str | None) -> ServeSettings:
        """Settings to serve registered model ``name`` as ``config`` says; ``token``: bearer."""
        return cls(
            name=name,
            alias=config.alias,
            poll_interval_s=config.poll_interval_s,
            max_rows=config.max_rows,
            max_body_bytes=int(config.max_body_mb * 2**20),
            token=token or None,
            access_log=config.access_log,
        )


class RequestError(Exception):
    """A request the service refuses, with its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class RefusedVersion(Exception):
    """A registered version that cannot be served (says why)."""


# --- rows in ------------------------------------------------------------------------------------


def parse_json(body: bytes) -> Any:
    """The body as JSON. ``NaN`` and ``Infinity`` literals are read, to be refused as values."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # the standard parser reads NaN/Infinity, which Python clients send and orjson refuses
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "malformed request: the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    try:  # it also reads lone surrogate escapes ("\ud800"), which are not text: orjson says so
        orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise RequestError(
            400,
            "malformed JSON: a string holds a lone surrogate escape (\\ud800-\\udfff), "
            "which is not Unicode text",
        ) from None
    return payload


def prediction_rows(body: bytes, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows of ``POST /models/NAME/predictions``: ``{"rows": [{column: number, ...}, ...]}``.

    Returns:
        The rows as ``scorer`` checks them: float64 of shape (n_rows, n_features), in the model's
        column order.

    Raises:
        RequestError: Malformed JSON (400) or more than ``max_rows`` rows (413).
        InputError: Anything else that does not fit the model (422), with ``Scorer.check``'s
            message.
    """
    payload = parse_json(body)
    if not isinstance(payload, dict) or set(payload) != {"rows"}:
        raise InputError(
            'the body must be a JSON object {"rows": [{column: number, ...}, ...]} and nothing '
            f"else, got {_describe_json(payload)}"
        )
    return records_rows(payload["rows"], scorer, max_rows)


def invocation_rows(body: bytes, media_type: str, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows of ``POST /invocations`` in any of MLflow's formats: JSON or CSV.

    JSON holds exactly one of ``dataframe_split`` (``{"columns", "data"}``),
    ``dataframe_records``, ``instances`` or ``inputs`` (a list of row objects, or an object of
    columns), and no other key (``params`` neither: the model takes none, as MLflow says too).
    """
    if media_type == "text/csv":
        return csv_rows(body, scorer, max_rows)
    if media_type != "application/json":
        raise RequestError(
            415, f"send JSON (Content-Type: application/json) or CSV (text/csv), got {media_type}"
        )
    payload = parse_json(body)
    keys = [key for key in INVOCATION_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1 or len(payload) != 1:
        raise InputError(
            f"the body must be a JSON object with exactly one of {', '.join(INVOCATION_KEYS)} "
            f"and no other key; got {_describe_json(payload)}"
        )
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        return split_rows(data, scorer, max_rows)
    if isinstance(data, dict):  # {column: [values]}
        return _checked(_frame(data, None, keys[0]), scorer, max_rows)
    return records_rows(data, scorer, max_rows)


def records_rows(records: Any, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as a list of objects ``{column: number}``, checked, in the model's order."""
    if not isinstance(records, list):
        raise InputError(f"rows must be a list of objects, got {_describe_json(records)}")
    _require_rows(len(records), max_rows)
    columns, expected = scorer.columns, set(scorer.columns)
    if all(type(row) is dict and row.keys() == expected for row in records):
        values = _plain_numbers([[row[c] for c in columns] for row in records], scorer.imputes)
        if values is not None:
            return _in_range(values, scorer)
    for number, row in enumerate(records):
        if not isinstance(row, dict):
            raise InputError(
                f"row {number} is {_describe_json(row)}; each row must be an object mapping "
                "column names to numbers"
            )
        if row.keys() != records[0].keys():
            raise InputError(
                f"row {number} does not have the columns of row 0 (missing: "
                f"{preview(c for c in records[0] if c not in row) or 'none'}; unexpected: "
                f"{preview(c for c in row if c not in records[0]) or 'none'}); every row must "
                "have the same columns"
            )
    return _checked(pd.DataFrame(records), scorer, max_rows)


def split_rows(split: Any, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as ``{"columns": [...], "data": [[...], ...]}`` (pandas' ``orient="split"``)."""
    if (
        not isinstance(split, dict)
        or not isinstance(split.get("data"), list)
        or not set(split) <= {"columns", "data", "index"}
        or not isinstance(split.get("index"), list | None)
    ):
        raise InputError(
            'dataframe_split must be an object {"columns": [...], "data": [[...], ...]} (and '
            f'optionally "index": [...]), got {_describe_json(split)}'
        )
    data = split["data"]
    _require_rows(len(data), max_rows)
    width = len(scorer.columns)
    if split.get("columns") == list(scorer.columns) and all(
        type(row) is list and len(row) == width for row in data
    ):
        values = _plain_numbers(data, scorer.imputes)
        if values is not None:
            return _in_range(values, scorer)
    frame = _frame(data, split.get("columns"), "dataframe_split")
    return _checked(frame, scorer, max_rows)


def csv_rows(body: bytes, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as CSV with a header line."""
    try:
        frame = pd.read_csv(io.BytesIO(body))
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise RequestError(400, f"malformed CSV: {exc}") from None
    return _checked(frame, scorer, max_rows)


def _plain_numbers(table: list[list[Any]], allow_missing: bool) -> np.ndarray | None:
    """``table`` as float64 if it holds finite JSON numbers only, else None.

    With ``allow_missing`` (a model that imputes), ``null`` and NaN are taken too, as NaN, unless
    a column holds nothing but ``null`` (pandas makes that a column of objects, for
    ``check_rows`` to judge). Such a table is one ``check_rows`` takes as it is; anything else
    goes to ``check_rows``, which decides and words the refusal.
    """
    kinds = set(map(type, itertools.chain.from_iterable(table)))
    if not kinds <= (_NUMBER_OR_NULL_TYPES if allow_missing else _NUMBER_TYPES):
        return None
    if int in kinds and not all(  # huge integers: let pandas and check_rows judge them
        abs(v) <= _EXACT_INT for v in itertools.chain.from_iterable(table) if type(v) is int
    ):
        return None
    try:
        values = np.array(table, dtype=np.float64)  # null -> NaN
    except ValueError:  # ragged rows
        return None
    if not allow_missing:
        return values if np.isfinite(values).all() else None
    if np.isinf(values).any() or (type(None) in kinds and _null_column(table, values)):
        return None
    return values


def _in_range(values: np.ndarray, scorer: Scorer) -> np.ndarray:
    """``values`` of the fast path, once ``check_rows``' range check has passed them."""
    check_range(values, scorer.columns, scorer.limits)
    return values


def _null_column(table: list[list[Any]], values: np.ndarray) -> bool:
    """Whether a column of ``table`` (``values`` as floats) holds nothing but ``null``."""
    empty = np.flatnonzero(np.isnan(values).all(axis=0))
    return any(all(row[column] is None for row in table) for column in empty)


def _checked(frame: pd.DataFrame, scorer: Scorer, max_rows: int) -> np.ndarray:
    _require_rows(len(frame), max_rows)
    return scorer.check(frame).to_numpy()


def _frame(data: Any, names: Any, source: str) -> pd.DataFrame:
    try:
        return pd.DataFrame(data, columns=names)
    except (ValueError, TypeError) as exc:  # ragged or mismatched lists
        raise InputError(f"{source} does not make a table: {exc}") from None


def _require_rows(count: int, max_rows: int) -> None:
    if count == 0:
        raise InputError("no rows to score: the request holds an empty list of rows")
    if count > max_rows:
        raise RequestError(
            413,
            f"{count} rows in one request; this service takes at most {max_rows} (serve.max_rows)",
        )


def _describe_json(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {preview(value)}" if value else "an empty object"
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# --- the served model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    """One registered version, loaded, smoke-tested and warmed up: what answers requests.

    Attributes:
        name: Registered model name.
        version: Registered version number.
        run_id: The MLflow run the version was logged from.
        source: Where the version's files come from (``models:/m-<id>`` for a logged model).
        scorer: The packaged model's scorer (raw rows in).
        lineage: ``version_tags`` and ``run_tags``: the version's and its run's ``trackflow.*``
            tags.
        loaded_at: When it was loaded (ISO 8601, UTC).
    """

    name: str
    version: str
    run_id: str | None
    source: str
    scorer: Scorer
    lineage: dict[str, dict[str, str]]
    loaded_at: str

    @cached_property
    def columns(self) -> list[str]:
        """Raw feature columns, in the order the model takes them."""
        return [str(c) for c in self.scorer.columns]

    @cached_property
    def _frame_columns(self) -> pd.Index:
        return pd.Index(self.columns, dtype=object)  # builds frames faster than string columns

    @cached_property
    def _probabilities(self) -> list[tuple[str, str]]:
        return [(str(c), f"proba_{c}") for c in self.scorer.classes]

    def score(self, values: np.ndarray) -> list[dict[str, Any]]:
        """Score checked rows, shape (n_rows, n_features).

        Returns:
            One record per row with the packaged model's output columns (``label``,
            ``proba_<class>``..., ``anomaly_score``, ``is_anomaly``), as plain Python values.
        """
        frame = self.scorer.score(pd.DataFrame(values, columns=self._frame_columns))
        names = [str(c) for c in frame.columns]
        columns = [frame[name].tolist() for name in frame.columns]
        return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records of :meth:`score` as the service's predictions (probabilities by class)."""
        return [
            {
                "label": record["label"],
                "probabilities": {label: record[key] for label, key in self._probabilities},
                "anomaly_score": record["anomaly_score"],
                "is_anomaly": record["is_anomaly"],
            }
            for record in records
        ]

    def smoke_test(self, example: Any) -> None:
        """Answer the version's input example the way requests are answered, a few times.

        This is both the check (any exception, or insane output, refuses the version) and the
        warm-up: first-call costs are paid here, not by the first request.

        Raises:
            RefusedVersion: No example to test on, or answers that are not probabilities.
        """
        if not isinstance(example, pd.DataFrame) or example.empty:
            raise RefusedVersion("it has no input example (a table of rows) to smoke-test it on")
        rows = self.scorer.check(example)
        bodies = [
            orjson.dumps({"rows": rows.head(n).to_dict(orient="records")}) for n in (1, len(rows))
        ]
        for _ in range(_WARM_UP_CALLS):
            for body in bodies:
                values = prediction_rows(body, self.scorer, len(rows))
                records = self.score(values)
                orjson.dumps({"predictions": self.predictions(records)})
        proba = np.array([[r[key] for _, key in self._probabilities] for r in records])
        anomaly = np.array([r["anomaly_score"] for r in records], dtype=np.float64)
        if (
            len(records) != len(rows)
            or not np.isfinite(proba).all()
            or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-3)
            or not np.isfinite(anomaly).all()
        ):
            raise RefusedVersion(
                "its smoke prediction on its input example is not sane (probabilities that are "
                "not finite or do not sum to 1, or non-finite anomaly scores)"
            )


def load_version(tracking: Tracking, name: str, version: str) -> ServedModel:
    """Download, load and smoke-test (which warms up) one registered version.

    Raises:
        RefusedVersion: It is not a trackflow packaged model, or its smoke test gives answers
            that are not probabilities.
        Exception: Anything else that stops it: the version's own fault (it does not unpickle,
            its smoke prediction fails), or a transient one (a locked store, an artifact store
            out of reach; see :func:`is_transient_failure`).
    """
    import mlflow.pyfunc

    from trackflow.packaging import Scorer
    from trackflow.tracking import fluent_tracking

    registered = tracking.client.get_model_version(name, version)
    # MLflow finds a version's logged model (models:/m-<id>) through the process-wide URI.
    with tempfile.TemporaryDirectory(prefix="trackflow-") as folder, fluent_tracking(tracking):
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}", dst_path=folder)
    scorer = getattr(model.unwrap_python_model(), "scorer", None)
    if not isinstance(scorer, Scorer):
        raise RefusedVersion("it is not a trackflow packaged model (it holds no Scorer)")
    run_tags = tracking.client.get_run(registered.run_id).data.tags if registered.run_id else {}
    served = ServedModel(
        name=name,
        version=str(version),
        run_id=registered.run_id,
        source=registered.source,
        scorer=scorer,
        lineage={"version_tags": _lineage(registered.tags), "run_tags": _lineage(run_tags)},
        loaded_at=_now(),
    )
    served.smoke_test(model.input_example)
    return served


def _lineage(tags: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in sorted(tags.items()) if key.startswith(TAG_PREFIX)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- following the alias ------------------------------------------------------------------------


class ModelFollower:
    """Serves the version ``models:/NAME@ALIAS`` names, and the next one when the alias moves.

    ``current`` is the served model (None until one is ready). :meth:`start` runs :meth:`check`
    on a thread now and every ``poll_interval_s``; loading happens there, off the request path.
    A version that fails through its own fault is refused until restart; one that fails on a
    passing fault (:func:`is_transient_failure`) is tried again at the next poll.
    """

    def __init__(self, tracking: Tracking, name: str, alias: str, poll_interval_s: float) -> None:
        self.tracking = tracking
        self.name = name
        self.alias = alias
        self.poll_interval_s = poll_interval_s
        self.current: ServedModel | None = None
        self.refused: dict[str, dict[str, str]] = {}
        self.status = "starting: the alias has not been read yet"
        self.last_checked: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> None:
        """Read the alias once; load, test and swap in the version it names if that is new."""
        try:
            version = str(
                self.tracking.client.get_model_version_by_alias(self.name, self.alias).version
            )
        except Exception as exc:  # the store is down, the model or the alias does not exist
            self._report(f"cannot read models:/{self.name}@{self.alias}: {_message(exc)}")
            return
        finally:
            self.last_checked = _now()
        if version in self.refused:
            self._report(self._refusal(version))
            return
        if self.current and self.current.version == version:
            self._report(f"serving version {version}", logging.INFO)
            return
        self.status = f"loading version {version}"
        log.info("models:/%s@%s -> version %s: loading it", self.name, self.alias, version)
        try:
            served = load_version(self.tracking, self.name, version)
        except Exception as exc:
            if is_transient_failure(exc):  # not the version's fault: try it again next poll
                self._report(self._retrying(version, exc), logging.WARNING)
                log.debug("why version %s could not be loaded", version, exc_info=True)
                return
            self.refused[version] = {"version": version, "error": _message(exc), "at": _now()}
            self._report(self._refusal(version))
            log.debug("why version %s was refused", version, exc_info=True)
            return
        previous, self.current = self.current, served
        self.status = f"serving version {version}"
        log.info(
            "now serving version %s%s", version, f" (was {previous.version})" if previous else ""
        )

    def start(self) -> None:
        """Check now, then every ``poll_interval_s`` seconds, on a daemon thread."""
        self._thread = threading.Thread(target=self._follow, name="model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (a load in progress finishes on its own)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval_s + 1)

    def describe(self) -> dict[str, Any]:
        """What ``GET /models/NAME`` shows of the served version and the follower's state."""
        served = self.current
        return {
            "name": self.name,
            "alias": self.alias,
            "version": served.version if served else None,
            "run_id": served.run_id if served else None,
            "source": served.source if served else None,
            "loaded_at": served.loaded_at if served else None,
            "classes": list(served.scorer.classes) if served else None,
            "lineage": served.lineage if served else None,
            "status": self.status,
            "refused": list(self.refused.values()),
            "poll": {"interval_s": self.poll_interval_s, "last_checked": self.last_checked},
        }

    def _follow(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a bug here must not stop the following
                log.exception("checking models:/%s@%s failed", self.name, self.alias)
            if self._stop.wait(self.poll_interval_s):
                return

    def _refusal(self, version: str) -> str:
        return f"refused version {version}: {self.refused[version]['error']}; {self._keeping()}"

    def _retrying(self, version: str, exc: Exception) -> str:
        return (
            f"cannot load version {version} now, retrying at the next poll: {_message(exc)}; "
            f"{self._keeping()}"
        )

    def _keeping(self) -> str:
        return f"serving {f'version {self.current.version}' if self.current else 'nothing'}"

    def _report(self, status: str, level: int = logging.ERROR) -> None:
        if status != self.status:  # once per change, not once per poll
            log.log(level, "%s", status)
        self.status = status


def is_transient_failure(exc: Exception) -> bool:
    """Whether loading a version failed on a passing fault rather than through its own fault.

    Transient: the error's text bears a sign of a busy or unreachable store
    (:func:`~trackflow.tracking.is_transient_error`). A :class:`RefusedVersion` or an
    :class:`~trackflow.inputs.InputError` (its smoke test) never is; anything else (it does not
    unpickle or import, its prediction fails) is the version's own fault too.
    """
    return not isinstance(exc, RefusedVersion | InputError) and is_transient_error(str(exc))


def _message(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or "no message"
    return f"{type(exc).__name__}: {text}"


# --- scoring concurrent requests together --------------------------------------------------------


class Batcher:
    """Scores the rows of concurrent requests together, in the event loop's thread.

    A request queues its rows and waits. The first one queued schedules a flush ``turns`` turns
    of the event loop later: each turn reads the sockets that have data, so requests already sent
    join the batch, and no clock is waited on (an idle service adds microseconds). Requests
    arriving while a batch is scored form the next one. Each request is scored by the version
    it was checked against; a batch holds at most ``max_rows`` rows (or one request).
    """

    def __init__(self, max_rows: int, turns: int = 3) -> None:
        self.max_rows = max_rows
        self.turns = turns
        self._pending: list[tuple[ServedModel, np.ndarray, asyncio.Future[Any]]] = []
        self._scheduled = False
        self._turns_left = 0

    async def score(self, served: ServedModel, values: np.ndarray) -> list[dict[str, Any]]:
        """Records of :meth:`ServedModel.score` for these rows, scored with others if any."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((served, values, future))
        if not self._scheduled:
            self._scheduled, self._turns_left = True, self.turns
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        if self._turns_left > 0:
            self._turns_left -= 1
            asyncio.get_running_loop().call_soon(self._flush)
            return
        pending, self._pending, self._scheduled = self._pending, [], False
        for batch in self._batches(pending):
            start = time.perf_counter()
            try:
                records = batch[0][0].score(np.concatenate([values for _, values, _ in batch]))
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0][2], exc)
                else:  # only the requests that fail on their own fail
                    self._score_alone(batch)
                continue
            log.debug(
                "scored %d requests, %d rows in %.2f ms",
                len(batch),
                len(records),
                (time.perf_counter() - start) * 1e3,
            )
            first = 0
            for _, values, future in batch:
                _answer(future, records[first : first + len(values)])
                first += len(values)

    @staticmethod
    def _score_alone(batch: list[Any]) -> None:
        """Score each request of a failed batch on its own: a bad request fails alone."""
        log.warning("a batch of %d requests failed; scoring them one by one", len(batch))
        for served, values, future in batch:
            try:
                records = served.score(values)
            except Exception as exc:
                _fail(future, exc)
            else:
                _answer(future, records)

    def _batches(self, pending: list[Any]) -> Iterator[list[Any]]:
        batch: list[Any] = []
        rows = 0
        for item in pending:
            if batch and (item[0] is not batch[0][0] or rows + len(item[1]) > self.max_rows):
                yield batch
                batch, rows = [], 0
            batch.append(item)
            rows += len(item[1])
        if batch:
            yield batch


def _answer(future: asyncio.Future[Any], records: list[dict[str, Any]]) -> None:
    if not future.done():  # done = the client went away
        future.set_result(records)


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


# --- the HTTP service ---------------------------------------------------------------------------


def create_app(follower: ModelFollower, settings: ServeSettings) -> FastAPI:
    """The service's ASGI app; it starts and stops ``follower`` with itself."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _warm_routes(app, follower.name, settings.token)
        follower.start()
        yield
        await asyncio.to_thread(follower.stop)  # joins the follower's thread: not in the loop

    # /openapi.json and /docs are routes of their own below, behind the token when one is set.
    app = FastAPI(
        title="trackflow",
        version=__version__,
        description=__doc__.split("\n\n")[0],
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    batcher = Batcher(settings.max_rows)
    # On the app itself, not an included APIRouter: FastAPI builds an included router's routes
    # on the first request that reaches them (~4 ms, paid by a client).
    guarded = [Depends(_bearer(settings.token))] if settings.token else []
    refusals = serving_api.errors

    def require_name(name: str) -> None:
        if name != follower.name:
            raise RequestError(
                404, f"no model {name!r} here; this service serves {follower.name!r}"
            )

    def served_model() -> ServedModel:
        served = follower.current
        if served is None:
            raise RequestError(
                503,
                f"not ready: {follower.status}",
                {"Retry-After": str(max(1, round(follower.poll_interval_s)))},
            )
        return served

    async def ready() -> Response:
        served = served_model()
        return _json({"ready": True, "name": served.name, "version": served.version})

    @app.get("/health", response_model=serving_api.Health)
    async def health() -> Response:
        return _json({"status": "ok"})

    for probe in ("/ready", "/ping"):
        app.get(probe, response_model=serving_api.Ready, responses=refusals(503))(ready)

    @app.get(
        "/models/{name}",
        dependencies=guarded,
        response_model=serving_api.ModelDescription,
        responses=refusals(404),
    )
    async def model(name: str) -> Response:
        require_name(name)
        served = follower.current
        columns = served.columns if served else None
        schema = {"columns": columns, "type": "number", "max_rows": settings.max_rows}
        return _json(follower.describe() | {"input_schema": schema})

    @app.post(
        "/models/{name}/predictions",
        dependencies=guarded,
        response_model=serving_api.PredictionResponse,
        responses=refusals(400, 404, 413, 415, 422, 503),
    )
    async def predictions(name: str, request: Request) -> Response:
        require_name(name)
        served = served_model()
        if (media_type := _media_type(request)) != "application/json":
            raise RequestError(415, f"send the rows as JSON (application/json), got {media_type}")
        body = await _read_body(request, settings.max_body_bytes)
        values = prediction_rows(body, served.scorer, settings.max_rows)
        records = await batcher.score(served, values)
        payload = {"model": {"name": served.name, "version": served.version}}
        return _json(payload | {"predictions": served.predictions(records)}, served.version)

    @app.post(
        "/invocations",
        dependencies=guarded,
        response_model=serving_api.InvocationResponse,
        responses=refusals(400, 413, 415, 422, 503),
    )
    async def invocations(request: Request) -> Response:
        served = served_model()
        body = await _read_body(request, settings.max_body_bytes)
        values = invocation_rows(body, _media_type(request), served.scorer, settings.max_rows)
        return _json({"predictions": await batcher.score(served, values)}, served.version)

    _add_openapi(app, follower, settings, guarded)
    _add_error_handlers(app)
    if settings.access_log:
        app.add_middleware(AccessLog)
    return app


def serve(tracking: Tracking, settings: ServeSettings, host: str, port: int) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM finish the requests in flight)."""
    import uvicorn

    follower = ModelFollower(tracking, settings.name, settings.alias, settings.poll_interval_s)
    app = create_app(follower, settings)
    log.info(
        "serving models:/%s@%s from %s on http://%s:%d (polling every %gs, %s)",
        settings.name,
        settings.alias,
        tracking.tracking_uri,
        host,
        port,
        settings.poll_interval_s,
        f"bearer token from {TOKEN_VARIABLE} required" if settings.token else "no authentication",
    )
    uvicorn.run(
        app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )


#: Routes that take the bearer token when one is set, as (path, method) of the OpenAPI document.
GUARDED_OPERATIONS = [
    ("/models/{name}", "get"),
    ("/models/{name}/predictions", "post"),
    ("/invocations", "post"),
]


def _add_openapi(
    app: FastAPI, follower: ModelFollower, settings: ServeSettings, guarded: list[Any]
) -> None:
    """``GET /openapi.json`` and ``GET /docs`` (Swagger UI), behind the token when one is set.

    The document names the served version's exact columns and ranges; it is rebuilt when the
    version changes.
    """
    cache: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _generic_document(app, settings)
        served = follower.current
        if served is None:
            return app.openapi_schema
        if cache.get("served") is not served:  # a new version: its columns and ranges
            scorer = served.scorer
            cache["document"] = serving_api.for_model(
                app.openapi_schema,
                served.name,
                served.columns,
                scorer.limits,
                scorer.imputes,
                settings.max_rows,
            )
            cache["served"] = served
        return cache["document"]

    app.openapi = document  # type: ignore[method-assign]

    @app.get("/openapi.json", dependencies=guarded, include_in_schema=False)
    async def openapi() -> Response:
        return _json(document())

    @app.get("/docs", dependencies=guarded, include_in_schema=False)
    async def docs() -> Response:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="trackflow - API")


def _generic_document(app: FastAPI, settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI document of the routes, for any model: request bodies and the token added."""
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    serving_api.drop_validation_errors(document)
    serving_api.add_request_bodies(document)
    if settings.token:
        serving_api.add_bearer(document, GUARDED_OPERATIONS)
    return document


async def _warm_routes(app: FastAPI, name: str, token: str | None) -> None:
    """Send one request to each route through the app itself, before the server listens.

    FastAPI does some work on a route's first request (it reads the endpoint's source, for error
    messages: ~1-2 ms here); done now, no client pays it. No model is loaded yet: the scoring
    routes answer 503.
    """
    headers = [(b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    routes = [("GET", "/health"), ("GET", "/ready"), ("GET", "/ping"), ("GET", f"/models/{name}")]
    routes += [("POST", f"/models/{name}/predictions"), ("POST", "/invocations")]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        pass

    for method, path in routes:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": None,
            "server": None,
            _WARM_UP: True,
        }
        await app(scope, receive, send)


def _bearer(token: str) -> Any:
    expected = token.encode()

    async def authorize(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise RequestError(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                {"WWW-Authenticate": "Bearer"},
            )

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def invalid(request: Request, exc: InputError) -> Response:
        return _error(422, str(exc))

    @app.exception_handler(HTTPException)  # routing: unknown path (404), wrong method (405)
    async def routing(request: Request, exc: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error(exc.status_code, message, exc.headers)  # 405: Allow

    @app.exception_handler(Exception)  # the traceback goes to the service's log only
    async def crashed(request: Request, exc: Exception) -> Response:
        return _error(500, "internal error while answering; the service's log has the details")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    body = bytearray()
    if not (declared.isdigit() and int(declared) > limit):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                break
        else:
            return bytes(body)
    raise RequestError(413, f"the body is over this service's limit of {limit} bytes")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _json(payload: Any, version: str | None = None) -> Response:
    headers = {"X-Model-Version": version} if version else None
    return Response(orjson.dumps(payload), headers=headers, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    code = ERROR_CODES.get(status, "ERROR")
    return Response(
        orjson.dumps({"error_code": code, "message": message}),
        status,
        headers,
        media_type="application/json",
    )


class AccessLog:
    """ASGI middleware: one log line per request with its status, answering version and time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on; log it once answered."""
        if scope["type"] != "http" or scope.get(_WARM_UP):
            await self.app(scope, receive, send)
            return
        start, answer = time.perf_counter(), {"status": 0, "version": "-"}

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                headers = dict(message.get("headers", []))
                answer["version"] = headers.get(b"x-model-version", b"-").decode()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info(
                "%s %s %s version=%s %.1f ms",
                scope["method"],
                scope["path"],
                answer["status"],
                answer["version"],
                (time.perf_counter() - start) * 1e3,
            )
