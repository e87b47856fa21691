"""The REST service as a real ``trackflow serve`` process on loopback, serving trained candidates.

Two servers are shared by the module: ``open_server`` (no token; its alias never moves) and
``guarded_server`` (a bearer token; its tests move the alias to good, imputing and broken versions
and put it back). Each start imports torch and MLflow in a fresh process, so each starts once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
import requests

from tests.conftest import REPO_ROOT, Candidate, candidate_store_uri
from trackflow.config import PreprocessConfig, ServeConfig, load_params
from trackflow.data.inputs import InputError
from trackflow.data.preprocessing import build_preprocessor
from trackflow.io import read_json, read_table
from trackflow.registry.packaging import Scorer, log_packaged_model
from trackflow.serving.app import TOKEN_VARIABLE, ServeSettings, create_app
from trackflow.serving.batching import Batcher
from trackflow.serving.follower import ModelFollower
from trackflow.serving.model import ServedModel
from trackflow.serving.rows import _plain_numbers, records_rows, split_rows
from trackflow.tracking import Tracking, setup_tracking

TOKEN = "test-token-0123"
MAX_ROWS = 50
MAX_BODY_MB = 0.1  # 104,857 bytes: 50 rows of 64 columns fit (~52 kB)
POLL_S = 3.0  # poll interval of the server whose alias moves


@dataclass(frozen=True)
class Registry:
    """Packaged models logged once, registered under each server's own model name."""

    tracking: Tracking
    uri: str
    rows: pd.DataFrame  # raw target test rows, features only
    sources: dict[str, dict[str, Any]]  # kind -> create_model_version arguments

    def register(self, name: str, *kinds: str) -> list[str]:
        client = self.tracking.client
        client.create_registered_model(name)
        with pytest.MonkeyPatch.context() as patch:  # MLflow finds logged models by the global URI
            patch.setenv("MLFLOW_TRACKING_URI", self.uri)
            return [
                str(client.create_model_version(name, **self.sources[kind]).version)
                for kind in kinds
            ]

    def promote(self, name: str, version: str) -> None:
        self.tracking.client.set_registered_model_alias(name, "champion", version)


@dataclass
class Server:
    """A ``trackflow serve`` process on loopback serving ``name``, and a client for it."""

    name: str
    port: int
    process: subprocess.Popen
    log: Path
    token: str | None = None

    def request(self, method: str, path: str, auth: bool = True, **kwargs: Any):
        headers = dict(kwargs.pop("headers", {}))
        if auth and self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        url = f"http://127.0.0.1:{self.port}{path}"
        return requests.request(method, url, headers=headers, timeout=30, **kwargs)

    def predict(self, rows: pd.DataFrame, **kwargs: Any):
        body = {"rows": rows.to_dict(orient="records")}
        return self.request("POST", f"/models/{self.name}/predictions", json=body, **kwargs)

    def describe(self) -> dict[str, Any]:
        return self.request("GET", f"/models/{self.name}").json()

    def is_ready(self) -> bool:
        return self.request("GET", "/ready", auth=False).status_code == 200

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``condition()`` holds (not listening yet = not yet); fails after."""
        start = time.monotonic()
        while not self._holds(condition):
            assert self.process.poll() is None, f"the server exited:\n{self.log_tail()}"
            if time.monotonic() - start > timeout:
                pytest.fail(f"{what}: not within {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - start

    @staticmethod
    def _holds(condition: Callable[[], bool]) -> bool:
        try:
            return condition()
        except requests.ConnectionError:
            return False

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]


@contextmanager
def running_server(
    registry: Registry,
    name: str,
    folder: Path,
    token: str | None = None,
    poll_s: float = 30.0,
    *options: str,
) -> Iterator[Server]:
    """``trackflow serve`` for ``name`` on a free loopback port, stopped (by its pid) after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri}
    env.pop(TOKEN_VARIABLE, None)
    if token:
        env[TOKEN_VARIABLE] = token
    argv = [sys.executable, "-m", "trackflow.cli", "serve", "--model-name", name]
    argv += ["--params", str(REPO_ROOT / "params.yaml"), "--port", str(port)]
    argv += ["--poll-interval", str(poll_s), "--max-rows", str(MAX_ROWS)]
    argv += ["--max-body-mb", str(MAX_BODY_MB), *options]
    log = folder / f"serve-{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, port, process, log, token)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def packaged_model(
    tracking: Tracking, candidate: Candidate, rows: pd.DataFrame, preprocessor: Path | None = None
) -> dict[str, Any]:
    """Log a candidate (with another preprocessor if given) as a packaged model; return the
    arguments that register it."""
    files = candidate.files
    run_id = read_json(files["run"])["run_id"]
    info = log_packaged_model(
        tracking, run_id, preprocessor or files["preprocessor"], files["model"],
        files["detector"], rows.head(5), training_rows(candidate),
    )  # fmt: skip
    return {"source": info.model_uri, "run_id": run_id, "model_id": info.model_id}


def training_rows(candidate: Candidate) -> pd.DataFrame:
    return read_table(candidate.files["splits"] / "target_train.parquet").drop(columns="target")


def imputing_preprocessor(candidate: Candidate, folder: Path) -> Path:
    """The candidate's fitted preprocessor behind a median imputer fitted on its training rows.

    On complete rows it answers as the candidate does; missing values get the training median,
    as ``data.non_finite: impute`` makes the pipeline do.
    """
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    fitted = joblib.load(candidate.files["preprocessor"])
    imputer = SimpleImputer(strategy="median", keep_empty_features=True)
    imputer.set_output(transform="pandas").fit(training_rows(candidate))
    path = folder / "imputing-preprocessor.joblib"
    joblib.dump(Pipeline([("impute", imputer), *fitted.steps]).set_output(transform="pandas"), path)
    return path


def broken_copy(
    good: dict[str, Any], folder: Path, corrupt: Callable[[Path], None]
) -> dict[str, Any]:
    """A copy of the good packaged model with ``corrupt`` applied to its artifacts folder."""
    import mlflow

    path = Path(mlflow.artifacts.download_artifacts(good["source"], dst_path=str(folder)))
    corrupt(path / "artifacts")
    return {"source": str(path), "run_id": good["run_id"]}


@pytest.fixture(scope="module")
def registry(
    candidates: dict[str, Candidate], tmp_path_factory: pytest.TempPathFactory
) -> Registry:
    """The good and weak candidates as packaged models, the good one with an imputer in front,
    and two broken copies of the good one.

    ``imputing``: the good candidate whose preprocessor imputes missing values. ``unloadable``:
    its network file is not a network, so it fails to load. ``failing``: it loads, but its
    detector is the weak candidate's (fitted on a 4-wide embedding, not the good network's 64),
    so every prediction fails.
    """
    uri = candidate_store_uri(next(iter(candidates.values())).folder.parent)
    good = candidates["good"]
    rows = read_table(good.files["splits"] / "target_test.parquet").drop(columns="target")
    folder = tmp_path_factory.mktemp("broken")
    weak_detector = joblib.load(candidates["weak"].files["detector"])
    corruptions = {
        "unloadable": lambda artifacts: (artifacts / "model.pt").write_bytes(b"not a network"),
        "failing": lambda artifacts: joblib.dump(weak_detector, artifacts / "detector.joblib"),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking = setup_tracking(load_params(good.folder / "params.yaml").base.mlflow)
        sources = {
            kind: packaged_model(tracking, candidates[kind], rows) for kind in ("good", "weak")
        }
        imputing = imputing_preprocessor(good, folder)
        sources["imputing"] = packaged_model(tracking, good, rows, imputing)
        for kind, corrupt in corruptions.items():
            sources[kind] = broken_copy(sources["good"], folder / kind, corrupt)
    return Registry(tracking, uri, rows, sources)


@pytest.fixture(scope="module")
def open_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No token, an access log; ``serving-open`` version 1 (good, with lineage tags) is champion."""
    name = "serving-open"
    (version,) = registry.register(name, "good")
    client = registry.tracking.client
    client.set_model_version_tag(name, version, "trackflow.gate.decision", "promoted")
    client.set_model_version_tag(name, version, "reviewer", "not lineage")
    registry.promote(name, version)
    folder = tmp_path_factory.mktemp("open")
    with running_server(registry, name, folder, None, 30.0, "--access-log") as server:
        server.wait_for(server.is_ready, 120, "ready")
        yield server


@pytest.fixture(scope="module")
def guarded_server(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Token required; versions 1 good (champion), 2 weak, 3 unloadable, 4 failing, 5 imputing."""
    name = "serving-guarded"
    versions = registry.register(name, "good", "weak", "unloadable", "failing", "imputing")
    assert versions == ["1", "2", "3", "4", "5"]
    registry.promote(name, "1")
    folder = tmp_path_factory.mktemp("guarded")
    with running_server(registry, name, folder, token=TOKEN, poll_s=POLL_S) as server:
        server.wait_for(server.is_ready, 120, "ready")
        yield server


def expected_predictions(registry: Registry, uri: str, rows: pd.DataFrame) -> pd.DataFrame:
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry.uri)
        return mlflow.pyfunc.load_model(uri).predict(rows)


def test_predictions_match_the_pyfunc_model_on_the_same_rows(open_server, registry) -> None:
    rows = registry.rows.head(MAX_ROWS)
    expected = expected_predictions(registry, f"models:/{open_server.name}/1", rows)

    response = open_server.predict(rows)

    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "1"
    body = response.json()
    assert body["model"] == {"name": open_server.name, "version": "1"}
    got = body["predictions"]
    classes = [c.removeprefix("proba_") for c in expected.columns if c.startswith("proba_")]
    assert [p["label"] for p in got] == expected["label"].tolist()
    assert [list(p["probabilities"]) for p in got] == [classes] * len(rows)
    np.testing.assert_allclose(
        [[p["probabilities"][c] for c in classes] for p in got],
        expected[[f"proba_{c}" for c in classes]].to_numpy(),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        [p["anomaly_score"] for p in got], expected["anomaly_score"], rtol=1e-5
    )
    assert [p["is_anomaly"] for p in got] == expected["is_anomaly"].tolist()


def test_mlflow_clients_get_the_pyfunc_answers_from_invocations(open_server, registry) -> None:
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    rows = registry.rows.iloc[10:30]
    expected = expected_predictions(registry, f"models:/{open_server.name}/1", rows)

    client = ScoringServerClient("127.0.0.1", open_server.port)
    client.ping()
    got = client.invoke(rows).get_predictions()  # sends {"dataframe_split": ...}

    assert list(got.columns) == list(expected.columns)
    assert got["label"].tolist() == expected["label"].tolist()
    assert got["is_anomaly"].tolist() == expected["is_anomaly"].tolist()
    numbers = [c for c in expected.columns if c.startswith("proba_")] + ["anomaly_score"]
    np.testing.assert_allclose(got[numbers], expected[numbers], rtol=1e-5, atol=1e-7)


def invocation_bodies(rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    shuffled = rows[list(reversed(rows.columns))]  # any column order is taken
    return {
        "dataframe_split": {"json": {"dataframe_split": shuffled.to_dict(orient="split")}},
        "dataframe_records": {"json": {"dataframe_records": rows.to_dict(orient="records")}},
        "instances": {"json": {"instances": rows.to_dict(orient="records")}},
        "inputs as columns": {"json": {"inputs": rows.to_dict(orient="list")}},
        "integers": {"json": {"dataframe_records": rows.round().astype(int).to_dict("records")}},
        "csv": {"data": rows.to_csv(index=False), "headers": {"Content-Type": "text/csv"}},
    }


@pytest.mark.parametrize(
    "form",
    ["dataframe_split", "dataframe_records", "instances", "inputs as columns", "integers", "csv"],
)
def test_invocations_take_every_mlflow_input_format(open_server, registry, form: str) -> None:
    rows = registry.rows.iloc[:5]
    if form == "integers":
        rows = rows.round()
    reference = open_server.predict(rows).json()["predictions"]

    response = open_server.request("POST", "/invocations", **invocation_bodies(rows)[form])

    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "1"
    got = response.json()["predictions"]
    assert [p["label"] for p in got] == [p["label"] for p in reference]
    np.testing.assert_allclose(
        [p["anomaly_score"] for p in got], [p["anomaly_score"] for p in reference], rtol=1e-5
    )


def test_the_model_resource_names_version_run_lineage_and_schema(open_server, registry) -> None:
    body = open_server.describe()

    good = registry.sources["good"]
    assert (body["name"], body["alias"], body["version"]) == (open_server.name, "champion", "1")
    assert body["run_id"] == good["run_id"] and body["source"] == good["source"]
    assert body["classes"] == [5, 6, 7, 8, 9]
    assert body["input_schema"] == {
        "columns": list(registry.rows.columns),
        "type": "number",
        "max_rows": MAX_ROWS,
    }
    run_tags = registry.tracking.client.get_run(good["run_id"]).data.tags
    assert body["lineage"]["version_tags"] == {"trackflow.gate.decision": "promoted"}
    assert body["lineage"]["run_tags"] == {
        key: value for key, value in run_tags.items() if key.startswith("trackflow.")
    }
    assert "trackflow.data_digest" in body["lineage"]["run_tags"]
    assert body["refused"] == [] and body["status"] == "serving version 1"
    for probe in ("/health", "/ready", "/ping"):
        assert open_server.request("GET", probe).status_code == 200
    assert open_server.request("GET", "/ready").json() == {
        "ready": True,
        "name": open_server.name,
        "version": "1",
    }


def row_dicts(rows: pd.DataFrame, count: int = 1) -> list[dict[str, Any]]:
    return rows.head(count).to_dict(orient="records")


def with_cell(rows: pd.DataFrame, value: str, row: int = 0, column: str = "pixel_0_0") -> bytes:
    """Two rows as JSON text with one cell replaced by raw JSON ``value`` (e.g. ``NaN``)."""
    records = row_dicts(rows, 2)
    records[row][column] = "@CELL@"
    return json.dumps({"rows": records}).replace('"@CELL@"', value).encode()


def without(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in names}


PREDICTIONS = "/models/serving-open/predictions"
BAD_REQUESTS = {
    # id: (path, request arguments from the rows, status, what the message says)
    "malformed JSON": (PREDICTIONS, lambda r: {"data": b'{"rows": [{'}, 400, "malformed JSON"),
    "not UTF-8": (PREDICTIONS, lambda r: {"data": b'{"rows": "\xff"}'}, 400, "not UTF-8"),
    "a list, not an object": (
        PREDICTIONS,
        lambda r: {"json": row_dicts(r)},
        422,
        'JSON object {"rows"',
    ),
    "no rows key": (
        PREDICTIONS,
        lambda r: {"json": {"data": row_dicts(r)}},
        422,
        "got an object with keys data",
    ),
    "rows not a list": (
        PREDICTIONS,
        lambda r: {"json": {"rows": row_dicts(r)[0]}},
        422,
        "rows must be a list of objects, got an object",
    ),
    "empty batch": (PREDICTIONS, lambda r: {"json": {"rows": []}}, 422, "no rows to score"),
    "oversized batch": (
        PREDICTIONS,
        lambda r: {"json": {"rows": row_dicts(r, MAX_ROWS + 1)}},
        413,
        f"{MAX_ROWS + 1} rows in one request; this service takes at most {MAX_ROWS}",
    ),
    "oversized body": (
        PREDICTIONS,
        lambda r: {"data": b'{"rows": []}' + b" " * 200_000},
        413,
        "over this service's limit of 104857 bytes",
    ),
    "missing column": (
        PREDICTIONS,
        lambda r: {"json": {"rows": [without(row_dicts(r)[0], "pixel_0_0")]}},
        422,
        "missing columns: pixel_0_0. The model takes exactly these 64 columns",
    ),
    "extra column": (
        PREDICTIONS,
        lambda r: {"json": {"rows": [row_dicts(r)[0] | {"colour": 1}]}},
        422,
        "unexpected columns: colour",
    ),
    "text value": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, '"0.5"')},
        422,
        "non-numeric columns: pixel_0_0",
    ),
    "boolean value": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "true")},
        422,
        "non-numeric columns: pixel_0_0",
    ),
    "list value": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "[1]")},
        422,
        "non-numeric columns: pixel_0_0",
    ),
    "null value": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "null", row=1)},
        422,
        "NaN or infinite values at row 1 column pixel_0_0",
    ),
    "NaN": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "NaN", column="pixel_3_3")},
        422,
        "NaN or infinite values at row 0 column pixel_3_3",
    ),
    "Infinity": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "-Infinity", row=1)},
        422,
        "NaN or infinite values at row 1 column pixel_0_0",
    ),
    "overflowing number": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "1e999")},
        422,
        "NaN or infinite values at row 0 column pixel_0_0",
    ),
    "a huge number": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "1e50", column="pixel_3_3")},
        422,
        "values out of the model's range at row 0 column pixel_3_3 (1e+50, not in ",
    ),
    "a number that overflows float32 once scaled": (
        PREDICTIONS,
        lambda r: {"data": with_cell(r, "-3e30", row=1)},
        422,
        "values out of the model's range at row 1 column pixel_0_0 (-3e+30, not in ",
    ),
    "every cell huge": (
        "/invocations",
        lambda r: {"json": {"dataframe_split": (r.head(2) * 0 + 1e39).to_dict("split")}},
        422,
        "values out of the model's range at row 0 column pixel_0_0 (1e+39, not in ",
    ),
    "1e308 as records": (
        "/invocations",
        lambda r: {"json": {"dataframe_records": row_dicts(r.head(1) * 0 + 1e308)}},
        422,
        "values out of the model's range at row 0 column pixel_0_0 (1e+308",
    ),
    "a lone surrogate escape": (
        PREDICTIONS,
        lambda r: {"data": b'{"rows":[{"\\ud800":1}]}'},
        400,
        "malformed JSON: a string holds a lone surrogate escape",
    ),
    "a row that is not an object": (
        PREDICTIONS,
        lambda r: {"json": {"rows": [row_dicts(r)[0], [1, 2]]}},
        422,
        "row 1 is a list; each row must be an object",
    ),
    "rows with other columns": (
        PREDICTIONS,
        lambda r: {"json": {"rows": [row_dicts(r)[0], without(row_dicts(r)[0], "pixel_7_7")]}},
        422,
        "row 1 does not have the columns of row 0 (missing: pixel_7_7; unexpected: none)",
    ),
    "not JSON": (
        PREDICTIONS,
        lambda r: {"data": b"pixel_0_0=1", "headers": {"Content-Type": "text/plain"}},
        415,
        "send the rows as JSON (application/json), got text/plain",
    ),
    "unknown model": (
        "/models/other/predictions",
        lambda r: {"json": {"rows": row_dicts(r)}},
        404,
        "no model 'other' here; this service serves 'serving-open'",
    ),
    "invocations without a format key": (
        "/invocations",
        lambda r: {"json": {"rows": row_dicts(r)}},
        422,
        "exactly one of dataframe_split, dataframe_records, instances, inputs and no other key; "
        "got an object with keys rows",
    ),
    "invocations with two format keys": (
        "/invocations",
        lambda r: {"json": {"instances": row_dicts(r), "inputs": row_dicts(r)}},
        422,
        "exactly one of dataframe_split",
    ),
    "invocations with params": (
        "/invocations",
        lambda r: {"json": {"instances": row_dicts(r), "params": {"k": 1}}},
        422,
        "and no other key; got an object with keys instances, params",
    ),
    "invocations split with an unknown key": (
        "/invocations",
        lambda r: {"json": {"dataframe_split": r.head(1).to_dict("split") | {"dtype": "f"}}},
        422,
        'dataframe_split must be an object {"columns": [...], "data": [[...], ...]}',
    ),
    "invocations split with a missing column": (
        "/invocations",
        lambda r: {
            "json": {"dataframe_split": r.head(2).drop(columns="pixel_1_1").to_dict("split")}
        },
        422,
        "missing columns: pixel_1_1",
    ),
    "invocations split with ragged data": (
        "/invocations",
        lambda r: {"json": {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2, 3]]}}},
        422,
        "dataframe_split does not make a table",
    ),
    "invocations malformed CSV": (
        "/invocations",
        lambda r: {"data": b"a,b\n1,2\n3,4,5,6\n", "headers": {"Content-Type": "text/csv"}},
        400,
        "malformed CSV",
    ),
    "invocations as text": (
        "/invocations",
        lambda r: {"data": b"1,2", "headers": {"Content-Type": "text/plain"}},
        415,
        "send JSON (Content-Type: application/json) or CSV (text/csv), got text/plain",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_with_a_clear_message_and_no_traceback(
    open_server, registry, case: str
) -> None:
    path, arguments, status, message = BAD_REQUESTS[case]

    response = open_server.request("POST", path, **arguments(registry.rows))

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error_code", "message"}
    assert message in body["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert "X-Model-Version" not in response.headers


def checking_scorer(columns: list[str], imputes: bool) -> Scorer:
    """A Scorer for checking rows only: the pipeline fitted on three rows, no network.

    Column ``a`` has mean 4 and standard deviation ~3.27: it takes about -3.27e9 to 3.27e9.
    """
    preprocessor = build_preprocessor(PreprocessConfig(), impute=imputes, seed=0)
    preprocessor.fit(pd.DataFrame({"a": [0.0, 4.0, 8.0], "b": [1.0, 2.0, 4.0]})[columns])
    return Scorer(preprocessor, network=None, detector={}, columns=columns, classes=[0, 1])


@pytest.mark.parametrize("imputes", [False, True], ids=["not imputing", "imputing"])
@pytest.mark.parametrize(
    "value",
    [
        *(0, 7, 2.5, 2**31, 2**53, 2**60, 2**70, -(2**64), 3e9, -3.3e9, 1e25, -1e30, 1e39),
        *(1e50, 1e308, -1.7976931348623157e308, True, "3", None, float("nan"), -math.inf, [1]),
    ],
)
def test_rows_are_taken_and_refused_exactly_as_the_model_checks_them(
    value: Any, imputes: bool
) -> None:
    """The JSON fast path takes no table Scorer.check would refuse, and gives the same rows."""
    columns = ["a", "b"]
    scorer = checking_scorer(columns, imputes)
    assert scorer.imputes is imputes
    for other in (1, value):  # the value in one cell; in the whole column
        records = [{"a": value, "b": 1.5}, {"b": 2.5, "a": other}]
        split = {"columns": columns, "data": [[value, 1.5], [other, 2.5]]}
        for rows_of, body, frame in (
            (records_rows, records, pd.DataFrame(records)),
            (split_rows, split, pd.DataFrame(split["data"], columns=columns)),
        ):
            try:
                expected = scorer.check(frame).to_numpy()
            except InputError as exc:
                with pytest.raises(InputError, match=re.escape(str(exc))):
                    rows_of(body, scorer, MAX_ROWS)
            else:
                np.testing.assert_array_equal(rows_of(body, scorer, MAX_ROWS), expected)


def test_missing_values_take_the_fast_path_only_for_a_model_that_imputes() -> None:
    table = [[None, 1.5], [float("nan"), 2.5], [3, None]]

    np.testing.assert_array_equal(
        _plain_numbers(table, allow_missing=True), [[np.nan, 1.5], [np.nan, 2.5], [3.0, np.nan]]
    )
    assert _plain_numbers(table, allow_missing=False) is None
    assert _plain_numbers([[math.inf, 1.5]], allow_missing=True) is None  # check_rows words it


def test_unknown_routes_and_methods_answer_in_the_same_error_shape(open_server) -> None:
    missing = open_server.request("GET", "/models/serving-open/nothing")
    wrong = open_server.request("GET", PREDICTIONS)

    assert missing.status_code == 404 and missing.json()["error_code"] == "NOT_FOUND"
    assert wrong.status_code == 405 and wrong.json() == {
        "error_code": "METHOD_NOT_ALLOWED",
        "message": f"GET {PREDICTIONS}: Method Not Allowed",
    }
    assert wrong.headers["Allow"] == "POST"


def test_the_access_log_names_the_version_that_answered(open_server, registry) -> None:
    lines = {
        rf"POST {PREDICTIONS} 200 version=1 [0-9.]+ ms\n": lambda: open_server.predict(
            registry.rows.head(2)
        ),
        rf"POST {PREDICTIONS} 422 version=- [0-9.]+ ms\n": lambda: open_server.request(
            "POST", PREDICTIONS, json={"rows": []}
        ),
    }
    for line, send in lines.items():
        before = len(re.findall(line, open_server.log.read_text()))
        send()
        open_server.wait_for(  # written once the answer has been sent
            lambda line=line, before=before: (
                len(re.findall(line, open_server.log.read_text())) == before + 1
            ),
            5,
            f"one more log line {line!r}",
        )


def test_without_a_token_no_credentials_are_asked_for(open_server, registry) -> None:
    assert open_server.predict(registry.rows.head(1)).status_code == 200
    assert open_server.request("GET", "/models/serving-open").status_code == 200


def test_with_a_token_every_route_but_the_probes_requires_it(guarded_server, registry) -> None:
    name = guarded_server.name
    body = {"rows": row_dicts(registry.rows)}
    protected = [
        ("GET", f"/models/{name}", {}),
        ("POST", f"/models/{name}/predictions", {"json": body}),
        ("POST", "/invocations", {"json": {"dataframe_records": body["rows"]}}),
    ]
    for probe in ("/health", "/ready", "/ping"):
        assert guarded_server.request("GET", probe, auth=False).status_code == 200
    for method, path, arguments in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            refused = guarded_server.request(method, path, False, headers=headers, **arguments)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            assert refused.json()["message"].startswith("missing or wrong bearer token")
        assert guarded_server.request(method, path, **arguments).status_code == 200


def current_version(server: Server) -> str:
    return server.describe()["version"]


@pytest.mark.slow
def test_a_promoted_version_takes_over_mid_stream_without_a_failed_request(
    guarded_server, registry
) -> None:
    before = current_version(guarded_server)
    after = "2" if before == "1" else "1"  # the other good version
    answers: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def stream(offset: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        url = f"http://127.0.0.1:{guarded_server.port}/models/{guarded_server.name}/predictions"
        count = 0
        while not stop.is_set():
            rows = row_dicts(registry.rows.iloc[(offset + count) % 100 :], 1 + count % 3)
            response = session.post(url, json={"rows": rows}, timeout=30)
            answers.append(
                (time.monotonic(), response.status_code, response.headers.get("X-Model-Version"))
            )
            count += 1

    streams = [threading.Thread(target=stream, args=(n * 7,)) for n in range(4)]
    for thread in streams:
        thread.start()
    try:
        time.sleep(1.0)
        promoted_at = time.monotonic()
        registry.promote(guarded_server.name, after)
        guarded_server.wait_for(
            lambda: any(version == after for _, _, version in answers), 4 * POLL_S, "new version"
        )
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in streams:
            thread.join()

    assert {status for _, status, _ in answers} == {200}
    assert {version for _, _, version in answers} == {before, after}
    switched_at = min(t for t, _, version in answers if version == after)
    assert switched_at - promoted_at <= 2 * POLL_S, "new version later than two poll intervals"
    assert all(version == before for t, _, version in answers if t < promoted_at)
    assert current_version(guarded_server) == after
    assert len(answers) > 40


@pytest.mark.slow
def test_a_model_that_imputes_takes_missing_values_but_not_infinities(
    guarded_server, registry
) -> None:
    before = current_version(guarded_server)
    predictions = f"/models/{guarded_server.name}/predictions"
    rows = registry.rows.head(4).astype(float)
    rows.iloc[0, 3] = rows.iloc[1, 0] = rows.iloc[1, 9] = np.nan
    expected = expected_predictions(registry, f"models:/{guarded_server.name}/5", rows)
    records = [
        {column: None if math.isnan(value) else value for column, value in record.items()}
        for record in row_dicts(rows, len(rows))
    ]
    split = {"columns": list(rows.columns), "data": [list(record.values()) for record in records]}

    registry.promote(guarded_server.name, "5")
    try:
        guarded_server.wait_for(
            lambda: current_version(guarded_server) == "5", 2 * POLL_S + 10, "imputing version"
        )
        answers = {
            "null": guarded_server.request("POST", predictions, json={"rows": records}),
            "NaN": guarded_server.request(  # the literal Python's json writes
                "POST", predictions, data=json.dumps({"rows": row_dicts(rows, len(rows))})
            ),
            "null in dataframe_split": guarded_server.request(
                "POST", "/invocations", json={"dataframe_split": split}
            ),
        }
        infinite = guarded_server.request(
            "POST", predictions, data=with_cell(rows.fillna(0.0), "Infinity", 1, "pixel_2_2")
        )
    finally:
        registry.promote(guarded_server.name, before)
        guarded_server.wait_for(
            lambda: current_version(guarded_server) == before, 2 * POLL_S + 10, "version back"
        )

    for form, answer in answers.items():
        assert answer.status_code == 200, (form, answer.text)
        assert answer.headers["X-Model-Version"] == "5"
        got = answer.json()["predictions"]
        labels = [p["label"] for p in got]
        scores = [p["anomaly_score"] for p in got]
        assert labels == expected["label"].tolist(), form
        np.testing.assert_allclose(scores, expected["anomaly_score"], rtol=1e-5, err_msg=form)
    assert infinite.status_code == 422
    assert infinite.json()["message"] == "infinite values at row 1 column pixel_2_2"


BROKEN = {  # version of guarded_server, start of the error it is refused with
    "unloadable": ("3", "UnpicklingError"),
    "failing its smoke prediction": ("4", "ValueError"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_version_is_refused_once_and_the_old_one_keeps_serving(
    guarded_server, registry, case: str
) -> None:
    version, error = BROKEN[case]
    before = current_version(guarded_server)

    registry.promote(guarded_server.name, version)
    try:
        guarded_server.wait_for(
            lambda: version in [r["version"] for r in guarded_server.describe()["refused"]],
            2 * POLL_S + 10,  # the failed load itself takes a few seconds
            f"refusal of version {version}",
        )
        time.sleep(POLL_S + 0.5)  # one more poll: a refused version is not tried again
        body = guarded_server.describe()
        answer = guarded_server.predict(registry.rows.head(3))
    finally:
        registry.promote(guarded_server.name, before)

    (refusal,) = [r for r in body["refused"] if r["version"] == version]
    assert refusal["error"].startswith(error), refusal
    assert "Traceback" not in refusal["error"]
    assert body["version"] == before
    assert body["status"].startswith(f"refused version {version}: {error}")
    assert body["status"].endswith(f"serving version {before}")
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == before
    assert guarded_server.is_ready()
    assert guarded_server.log_tail().count(f"refused version {version}:") == 1


@pytest.mark.slow
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


@pytest.mark.slow
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
    caplog.set_level(logging.INFO, logger="trackflow.serving.app")
    logging.getLogger("trackflow.serving.app").addHandler(lock)
    try:
        follower.check()  # reads the alias, then meets the lock while loading
        during = follower.describe()
        follower.check()  # the next poll
    finally:
        logging.getLogger("trackflow.serving.app").removeHandler(lock)
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


def test_stopping_the_service_leaves_the_event_loop_free_while_a_load_finishes() -> None:
    class StillLoading(ModelFollower):
        """A follower whose check is loading a version when the service stops."""

        def __init__(self) -> None:
            super().__init__(None, "m", "champion", poll_interval_s=30.0)  # type: ignore[arg-type]
            self.started, self.finished = threading.Event(), threading.Event()

        def check(self) -> None:
            self.started.set()
            self.finished.wait(10)

    follower = StillLoading()
    app = create_app(follower, ServeSettings.from_config("m", ServeConfig(), token=None))

    async def stop_while_loading() -> float:
        async with app.router.lifespan_context(app):
            await asyncio.to_thread(follower.started.wait, 10)
            # Runs only if the loop is free while the follower's thread is joined:
            asyncio.get_running_loop().call_later(0.2, follower.finished.set)
            start = time.perf_counter()
        return time.perf_counter() - start

    assert asyncio.run(stop_while_loading()) < 5  # blocked: 10 s, until the load gave up


# --- one client's bad numbers fail only that client ---------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_batch_that_fails_is_scored_request_by_request(
    candidates: dict[str, Candidate], caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose rows fail in scoring fails alone; the requests batched with it answer.

    The poisoned rows skip the checks (they go to the batcher directly), so scoring them meets a
    real fault: 1e50 overflows float32 in the network and the detector refuses the NaN.
    """
    files = candidates["good"].files
    scorer = Scorer.from_files(files["preprocessor"], files["model"], files["detector"])
    served = ServedModel("m", "1", None, "", scorer, {}, "now")
    rows = scorer.check(training_rows(candidates["good"]).head(8)).to_numpy()
    valid = [rows[start : start + 2] for start in range(0, 8, 2)]
    poisoned = np.full((1, rows.shape[1]), 1e50)
    with pytest.raises(ValueError):
        served.score(poisoned)
    batcher = Batcher(max_rows=100)

    async def score_together() -> list[Any]:
        requests_ = [valid[0], poisoned, *valid[1:]]
        calls = [batcher.score(served, values) for values in requests_]
        return await asyncio.gather(*calls, return_exceptions=True)

    with caplog.at_level(logging.WARNING, logger="trackflow.serving.app"):
        answers = asyncio.run(score_together())

    assert "a batch of 5 requests failed; scoring them one by one" in caplog.text
    assert isinstance(answers[1], ValueError)
    assert [answers[0], *answers[2:]] == [served.score(values) for values in valid]


def test_a_client_sending_huge_numbers_fails_alone_beside_valid_clients(
    open_server, registry
) -> None:
    """Four clients send valid rows while a fifth sends 1e308 and 1e30 rows: only it fails."""
    reference = open_server.predict(registry.rows.head(3)).json()["predictions"]
    huge = [registry.rows.head(3) * 0 + value for value in (1e308, 1e30)]
    bodies = {
        "valid": json.dumps({"rows": row_dicts(registry.rows, 3)}).encode(),
        "poisoned": [json.dumps({"rows": row_dicts(rows, 3)}).encode() for rows in huge],
    }
    answers: dict[str, list[tuple[int, Any]]] = {"valid": [], "poisoned": []}
    stop = threading.Event()
    url = f"http://127.0.0.1:{open_server.port}{PREDICTIONS}"

    def client(kind: str) -> None:
        session = requests.Session()
        count = 0
        while not stop.is_set():
            body = bodies[kind] if kind == "valid" else bodies[kind][count % 2]
            response = session.post(url, data=body, timeout=30)
            answers[kind].append((response.status_code, response.json()))
            count += 1

    clients = [threading.Thread(target=client, args=(kind,)) for kind in ["valid"] * 4]
    clients.append(threading.Thread(target=client, args=("poisoned",)))
    for thread in clients:
        thread.start()
    time.sleep(3.0)
    stop.set()
    for thread in clients:
        thread.join()

    assert len(answers["valid"]) > 20 and len(answers["poisoned"]) > 5
    assert {status for status, _ in answers["valid"]} == {200}
    for _, body in answers["valid"]:  # batched with others: equal up to float32 rounding
        got = body["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in reference]
        np.testing.assert_allclose(
            [p["anomaly_score"] for p in got], [p["anomaly_score"] for p in reference], rtol=1e-5
        )
    assert {status for status, _ in answers["poisoned"]} == {422}
    assert all(
        body["message"].startswith("values out of the model's range at row 0 column pixel_0_0")
        for _, body in answers["poisoned"]
    )


def test_a_csv_of_integers_scores_as_its_floats(open_server, registry, tmp_path: Path) -> None:
    """Integer columns (pandas reads a CSV of whole numbers as int64) score like floats."""
    path = tmp_path / "integers.csv"
    registry.rows.head(8).round().astype("int64").to_csv(path, index=False)
    table = pd.read_csv(path)
    assert set(table.dtypes) == {np.dtype("int64")}
    expected = open_server.predict(table.astype("float64")).json()["predictions"]

    answers = {
        "csv": open_server.request(
            "POST", "/invocations", data=path.read_bytes(), headers={"Content-Type": "text/csv"}
        ),
        "split": open_server.request(
            "POST", "/invocations", json={"dataframe_split": table.to_dict(orient="split")}
        ),
    }
    for form, answer in answers.items():
        assert answer.status_code == 200, (form, answer.text)
        got = answer.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in expected], form
        np.testing.assert_allclose(
            [p["anomaly_score"] for p in got], [p["anomaly_score"] for p in expected], rtol=1e-6
        )


# --- the published contract ---------------------------------------------------------------------


ROUTES = {
    "/health",
    "/ready",
    "/ping",
    "/models/{name}",
    "/models/{name}/predictions",
    "/invocations",
}


def test_the_openapi_document_describes_every_route_and_the_rows_taken(
    open_server, registry
) -> None:
    document = open_server.request("GET", "/openapi.json").json()

    assert set(document["paths"]) == ROUTES
    schemas = document["components"]["schemas"]
    for item in document["paths"].values():
        for operation in item.values():
            answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert answer["$ref"].removeprefix("#/components/schemas/") in schemas
            assert "security" not in operation  # no token on this server
    body = document["paths"]["/models/{name}/predictions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("/PredictionRequest")
    row = schemas["Row"]
    assert row["required"] == list(registry.rows.columns)
    assert row["additionalProperties"] is False
    cell = row["properties"]["pixel_3_3"]
    low, high = cell["minimum"], cell["maximum"]
    assert low < -1e8 and high > 1e8
    at_the_ends = registry.rows.head(2).assign(pixel_3_3=[low, high])
    beyond = registry.rows.head(1).assign(pixel_3_3=np.nextafter(high, np.inf))
    assert open_server.predict(at_the_ends).status_code == 200
    assert open_server.predict(beyond).status_code == 422
    docs = open_server.request("GET", "/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


def test_the_openapi_document_and_docs_take_the_token_when_one_is_set(guarded_server) -> None:
    for path in ("/openapi.json", "/docs"):
        assert guarded_server.request("GET", path, auth=False).status_code == 401
        assert guarded_server.request("GET", path).status_code == 200
    document = guarded_server.request("GET", "/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}
    }
    paths = document["paths"]
    assert paths["/invocations"]["post"]["security"] == [{"bearer": []}]
    assert "401" in paths["/models/{name}"]["get"]["responses"]
    assert "security" not in paths["/health"]["get"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
    registry, tmp_path: Path
) -> None:
    """``st run URL/openapi.json --checks all`` against a token-guarded server of its own.

    Every check: no 5xx, statuses, content types, headers and bodies as documented, rows the
    document allows taken, rows it forbids refused, the token enforced. The coverage phase of
    the two routes that take rows (boundary cases of 64 columns: minutes here) is left out;
    fuzzing and the stateful phase cover them.
    """
    name = "serving-fuzzed"
    (version,) = registry.register(name, "good")
    registry.promote(name, version)
    st = str(Path(sys.executable).with_name("st"))
    with running_server(registry, name, tmp_path, TOKEN, 30.0, "--max-body-mb", "4") as server:
        server.wait_for(server.is_ready, 120, "ready")
        common = [st, "run", f"http://127.0.0.1:{server.port}/openapi.json", "--checks", "all"]
        common += ["-H", f"Authorization: Bearer {TOKEN}", "--seed", "1", "--workers", "1"]
        common += ["--no-color", "--generation-database", "none", "--max-examples", "50"]
        runs = {
            "coverage": ["--phases", "coverage", "--exclude-path-regex", ROWS_ROUTES],
            "fuzzing": ["--phases", "examples,fuzzing,stateful"],
        }
        for phase, options in runs.items():
            result = subprocess.run(
                [*common, *options], capture_output=True, text=True, timeout=300, cwd=tmp_path
            )
            assert result.returncode == 0, f"{phase}:\n{result.stdout[-8000:]}{result.stderr}"
            assert "No issues found" in result.stdout, result.stdout[-4000:]
        assert "Traceback" not in server.log_tail()


ROWS_ROUTES = r"^/(invocations|models/\{name\}/predictions)$"
