"""The packaged model: raw rows in; labels, probabilities, anomaly scores out, wherever loaded."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import candidate_store_uri, free_port, imputing_twin
from trackflow.data.inputs import InputError, check_rows
from trackflow.io import read_json
from trackflow.registry.packaging import Scorer

ROWS = 6


@pytest.fixture(scope="module")
def champion(candidates, tmp_path_factory) -> dict:
    """The ``good`` candidate logged, registered and aliased champion in the candidates' store."""
    from trackflow.config import MlflowConfig
    from trackflow.registry.packaging import log_packaged_model
    from trackflow.registry.promotion import register_candidate
    from trackflow.tracking import setup_tracking

    files = candidates["good"].files
    uri = candidate_store_uri(candidates["good"].folder.parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking = setup_tracking(MlflowConfig())
    raw = pd.read_parquet(files["splits"] / "target_test.parquet").drop(columns="target")
    run_id = read_json(files["run"])["run_id"]
    info = log_packaged_model(
        tracking, run_id, files["preprocessor"], files["model"], files["detector"], raw.head(3), raw
    )
    name = "packaged"
    version = register_candidate(tracking, name, info.model_uri, run_id, info.model_id, {}, 60)
    tracking.client.set_registered_model_alias(name, "champion", version)
    scorer = Scorer.from_files(files["preprocessor"], files["model"], files["detector"])
    return {
        "uri": uri,
        "model": f"models:/{name}@champion",
        "rows": raw,
        "scorer": scorer,
        "info": info,
    }


def test_signature_and_input_example(champion) -> None:
    """Outputs declared; inputs checked by the model itself, their columns named in metadata."""
    info = champion["info"]
    assert info.signature.inputs is None
    assert info.metadata["input_columns"] == list(champion["rows"].columns)
    outputs = info.signature.outputs.input_names()
    assert outputs == [
        "label",
        *(f"proba_{c}" for c in (5, 6, 7, 8, 9)),
        "anomaly_score",
        "is_anomaly",
    ]
    assert info.saved_input_example_info is not None


def test_the_logged_model_is_the_run_s_output_and_carries_its_last_metrics(champion) -> None:
    """Linked in two requests, not one per metric; the run's curves gain no entry."""
    from mlflow import MlflowClient

    client = MlflowClient(champion["uri"])
    model = client.get_logged_model(champion["info"].model_id)
    run_id = model.source_run_id
    run = client.get_run(run_id)  # the session's candidate: other tests log models to it too
    assert model.model_id in [o.model_id for o in run.outputs.model_outputs]
    linked = {m.key: m.value for m in model.metrics}
    assert linked == run.data.metrics
    epochs = client.get_metric_history(run_id, "val/loss")
    assert [m.step for m in epochs] == sorted({m.step for m in epochs})  # one entry per epoch


def test_the_champion_loads_and_scores_in_a_fresh_process(champion, tmp_path) -> None:
    rows = champion["rows"].head(ROWS)
    rows.to_parquet(tmp_path / "rows.parquet")
    code = (
        "import sys, mlflow, pandas as pd; "
        f"model = mlflow.pyfunc.load_model({champion['model']!r}); "
        "print(model.predict(pd.read_parquet(sys.argv[1])).to_json(orient='split'))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"]}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "rows.parquet")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    fresh = pd.read_json(io.StringIO(result.stdout.strip().splitlines()[-1]), orient="split")
    local = champion["scorer"].predict(rows)
    assert fresh["label"].tolist() == local["label"].tolist()
    np.testing.assert_allclose(fresh["proba_5"], local["proba_5"], rtol=1e-6)
    np.testing.assert_allclose(fresh["anomaly_score"], local["anomaly_score"], rtol=1e-6)
    proba = local.filter(like="proba_")
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    assert (
        local["label"].tolist()
        == proba.columns.str.removeprefix("proba_")
        .astype(int)[proba.to_numpy().argmax(axis=1)]
        .tolist()
    )


def integer_table(champion: dict, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A CSV of whole numbers read back with pandas (int64 columns), and its rows' scores as
    floats."""
    path = folder / "integers.csv"
    champion["rows"].head(ROWS).round().astype("int64").to_csv(path, index=False)
    table = pd.read_csv(path)
    assert set(table.dtypes) == {np.dtype("int64")}
    return table, champion["scorer"].predict(table.astype("float64"))


def load_champion(champion: dict, monkeypatch: pytest.MonkeyPatch):
    import mlflow

    from trackflow.config import MlflowConfig
    from trackflow.tracking import fluent_tracking, setup_tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["uri"])
    with fluent_tracking(setup_tracking(MlflowConfig())):
        return mlflow.pyfunc.load_model(champion["model"])


@pytest.mark.parametrize("dtype", ["int64", "int32", "float32"])
def test_the_pyfunc_scores_integer_and_float32_columns(
    champion, monkeypatch, tmp_path, dtype: str
) -> None:
    """What MLflow refused with "Can not safely convert int64 to float64"."""
    model = load_champion(champion, monkeypatch)
    table, expected = integer_table(champion, tmp_path)

    scored = model.predict(table.astype(dtype))

    assert scored["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(scored["anomaly_score"], expected["anomaly_score"], rtol=1e-6)
    np.testing.assert_allclose(scored["proba_5"], expected["proba_5"], rtol=1e-5, atol=1e-7)


def test_the_accepted_range_is_a_billion_standard_deviations(champion) -> None:
    scorer = champion["scorer"]
    scaler = scorer.preprocessor.named_steps["scale"]
    low, high = scorer.limits
    np.testing.assert_allclose(low, scaler.mean_ - 1e9 * scaler.scale_)
    np.testing.assert_allclose(high, scaler.mean_ + 1e9 * scaler.scale_)
    rows = champion["rows"].head(2).astype(float)
    ends = rows.assign(pixel_3_3=[low[27], high[27]])
    assert scorer.predict(ends)["anomaly_score"].map(np.isfinite).all()


@pytest.mark.parametrize("value", [1e39, -1e25, 1e50, 1.7976931348623157e308])
def test_huge_values_are_refused_naming_row_and_column(champion, monkeypatch, value) -> None:
    """Finite values that overflowed float32 once scaled: NaN errors, or a null anomaly score."""
    from mlflow.exceptions import MlflowException

    rows = champion["rows"].head(3).astype(float)
    rows.iloc[2, 27] = value  # pixel_3_3
    row = rows.index[2]  # rows are named by their label in the table
    message = f"values out of the model's range at row {row} column pixel_3_3 ({value:.6g}, not in "
    with pytest.raises(InputError) as error:
        champion["scorer"].predict(rows)
    assert str(error.value).startswith(message)
    assert "check the units" in str(error.value)
    with pytest.raises(MlflowException, match=re.escape(message)):
        load_champion(champion, monkeypatch).predict(rows)


def test_anomalies_score_higher_than_healthy_rows(champion) -> None:
    rows = champion["rows"]
    healthy = champion["scorer"].predict(rows)
    inverted = champion["scorer"].predict(rows.max() - rows)
    assert inverted["anomaly_score"].median() > healthy["anomaly_score"].median()
    assert inverted["is_anomaly"].mean() > 0.5 > healthy["is_anomaly"].mean()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["pixel_0_1"]), "missing columns: pixel_0_1"),
        (lambda f: f.assign(extra=1.0), "unexpected columns: extra"),
        (lambda f: f.assign(pixel_0_1="dark"), "non-numeric columns: pixel_0_1 (str)"),
        (lambda f: f.assign(pixel_0_1=np.nan), "NaN or infinite values at row"),
        (lambda f: f.assign(pixel_0_1=np.inf), "NaN or infinite values at row"),
        (lambda f: f.iloc[:0], "no rows to score"),
    ],
)
def test_bad_tables_get_a_clear_error(champion, change, message) -> None:
    with pytest.raises(InputError) as error:
        champion["scorer"].predict(change(champion["rows"].head(3)))
    assert message in str(error.value)


def test_columns_in_another_order_and_integer_values_are_fine(champion) -> None:
    rows = champion["rows"].head(3)
    shuffled = rows[rows.columns[::-1]].astype(int)
    pd.testing.assert_frame_equal(
        check_rows(shuffled, list(rows.columns)), rows.astype(int).astype(float)
    )


def test_the_pyfunc_refuses_bad_tables_with_the_same_message(champion, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException

    model = load_champion(champion, monkeypatch)
    rows = champion["rows"].head(2)
    for bad, message in (
        (rows.assign(pixel_0_1=np.nan), "NaN or infinite"),
        (rows.iloc[:0], "no rows"),
    ):
        with pytest.raises(MlflowException, match=message):
            model.predict(bad)
    for bad, message in (
        (rows.drop(columns=["pixel_0_1"]), "^missing columns: pixel_0_1. The model takes"),
        (rows.assign(extra=1.0), "^unexpected columns: extra"),  # not dropped without a word
    ):
        with pytest.raises(MlflowException, match=message):
            model.predict(bad)
    assert set(model.unwrap_python_model().profile["features"]) == set(rows.columns)


def post(url: str, body: dict | str, media_type: str = "application/json") -> tuple[int, dict]:
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": media_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(champion, tmp_path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": champion["uri"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = ["mlflow", "models", "serve", "-m", champion["model"], "--env-manager", "local"]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        rows = champion["rows"].head(ROWS)
        status, body = post(
            f"{base}/invocations", {"dataframe_split": rows.to_dict(orient="split")}
        )
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        local = champion["scorer"].predict(rows)
        assert served["label"].tolist() == local["label"].tolist()
        np.testing.assert_allclose(served["anomaly_score"], local["anomaly_score"], rtol=1e-6)
        bad = rows.assign(pixel_0_1=None).to_dict(orient="split")
        status, body = post(f"{base}/invocations", {"dataframe_split": bad})
        assert status == 400 and "NaN or infinite values" in body["message"]
        status, body = post(
            f"{base}/invocations", {"dataframe_split": (rows * 0 + 1e39).to_dict("split")}
        )
        assert status == 400 and "Error: values out of the model's range" in body["message"]
        table, expected = integer_table(champion, tmp_path)
        records = table.to_dict("records")
        answers = {
            "csv": post(f"{base}/invocations", table.to_csv(index=False), "text/csv"),
            "split": post(f"{base}/invocations", {"dataframe_split": table.to_dict("split")}),
            "records": post(f"{base}/invocations", {"dataframe_records": records}),
            "instances": post(f"{base}/invocations", {"instances": records}),
            "inputs": post(f"{base}/invocations", {"inputs": records}),
            "inputs as columns": post(f"{base}/invocations", {"inputs": table.to_dict("list")}),
        }
        for form, (status, body) in answers.items():
            assert status == 200, (form, body)
            served = pd.DataFrame(body["predictions"])
            assert served["label"].tolist() == expected["label"].tolist(), form
            np.testing.assert_allclose(
                served["anomaly_score"], expected["anomaly_score"], rtol=1e-6
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_model_that_imputes_scores_missing_values_and_still_refuses_infinities(champion) -> None:
    base = champion["scorer"]
    rows = champion["rows"].copy()
    rows.iloc[::7, 3] = np.nan
    imputing = imputing_twin(base, rows)
    assert imputing.imputes and not base.imputes
    scored = imputing.predict(rows)
    assert len(scored) == len(rows) and scored["anomaly_score"].notna().all()
    with pytest.raises(InputError, match="NaN or infinite"):
        base.predict(rows)
    with pytest.raises(InputError, match=r"^infinite values at row"):
        imputing.predict(rows.fillna(np.inf))


def test_scoring_leaves_the_fitted_preprocessor_as_it_was(champion) -> None:
    rows = champion["rows"].head(3)
    assert isinstance(champion["scorer"].preprocessor.transform(rows), pd.DataFrame)


def test_a_model_that_imputes_takes_a_column_of_nulls() -> None:
    rows = pd.DataFrame({"a": [None], "b": [1.0]})
    assert check_rows(rows, ["a", "b"], allow_nan=True)["a"].isna().all()
    with pytest.raises(InputError, match=r"^NaN or infinite values at row 0 column a$"):
        check_rows(rows, ["a", "b"])
