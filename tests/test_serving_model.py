"""The served model: what a version answers, what it says about itself, and refusing a broken one.

A real ``trackflow serve`` process: ``open_server`` (its alias never moves) and ``guarded_server``
(its tests move the alias to imputing and broken versions, and put it back).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from tests.helpers import (
    MAX_ROWS,
    POLL_S,
    current_version,
    expected_predictions,
    row_dicts,
    with_cell,
)

pytestmark = pytest.mark.slow  # every test here talks to a trackflow serve process


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
