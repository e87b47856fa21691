"""The HTTP app: error answers, routes, the access log, the token, shutdown, and the published
contract (the OpenAPI document, and Schemathesis checking the service against it).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    MAX_ROWS,
    PREDICTIONS,
    TOKEN,
    row_dicts,
    running_server,
    with_cell,
    without,
)
from trackflow.config import ServeConfig
from trackflow.serving.app import ServeSettings, create_app
from trackflow.serving.follower import ModelFollower

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_routes_and_methods_answer_in_the_same_error_shape(open_server) -> None:
    missing = open_server.request("GET", "/models/serving-open/nothing")
    wrong = open_server.request("GET", PREDICTIONS)

    assert missing.status_code == 404 and missing.json()["error_code"] == "NOT_FOUND"
    assert wrong.status_code == 405 and wrong.json() == {
        "error_code": "METHOD_NOT_ALLOWED",
        "message": f"GET {PREDICTIONS}: Method Not Allowed",
    }
    assert wrong.headers["Allow"] == "POST"


@pytest.mark.slow
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


@pytest.mark.slow
def test_without_a_token_no_credentials_are_asked_for(open_server, registry) -> None:
    assert open_server.predict(registry.rows.head(1)).status_code == 200
    assert open_server.request("GET", "/models/serving-open").status_code == 200


@pytest.mark.slow
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


ROUTES = {
    "/health",
    "/ready",
    "/ping",
    "/models/{name}",
    "/models/{name}/predictions",
    "/invocations",
}


@pytest.mark.slow
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


@pytest.mark.slow
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
