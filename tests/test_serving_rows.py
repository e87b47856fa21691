"""Rows in: every body the service takes becomes the array the model's own check gives.

The fast path (plain JSON numbers straight to an array) is compared with ``Scorer.check`` cell by
cell; MLflow's scoring formats and CSV are sent to a real ``trackflow serve`` (``open_server``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import (
    MAX_ROWS,
)
from trackflow.config import PreprocessConfig
from trackflow.data.inputs import InputError
from trackflow.data.preprocessing import build_preprocessor
from trackflow.registry.packaging import Scorer
from trackflow.serving.rows import _plain_numbers, records_rows, split_rows


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


@pytest.mark.slow
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


@pytest.mark.slow
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
