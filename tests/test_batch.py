"""Batch scoring with a registered champion: outputs next to the batch, drift, bad batches."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import Candidate, imputing_twin, raw_rows, register_champion
from trackflow.cli import main as cli
from trackflow.data.inputs import InputError
from trackflow.errors import ConfigError
from trackflow.io import read_json, read_table
from trackflow.serving.batch import (
    load_model,
    output_paths,
    read_batch,
    score_batch,
    write_batch_outputs,
)
from trackflow.tracking import Tracking


@pytest.fixture
def champion(candidates: dict[str, Candidate], candidate_store: str) -> tuple[Tracking, str, str]:
    """The good candidate as ``models:/<name>@champion``: tracking, name, version."""
    tracking, version = register_champion(candidates["good"], candidate_store)
    return tracking, candidate_store, version


def score_argv(batch: Path, params: Path, name: str) -> list[str]:
    """``trackflow score`` of ``batch`` with the champion of ``name``."""
    return ["score", str(batch), "--params", str(params), "--model", f"models:/{name}@champion"]


def test_a_good_batch_gets_scores_next_to_it_and_an_mlflow_run(
    champion, candidates, write_params, tmp_path: Path
) -> None:
    tracking, name, version = champion
    batch = tmp_path / "new rows.csv"
    rows = raw_rows(candidates["good"], "test")
    rows.reset_index().to_csv(batch, index=False)  # row_id and target pass through

    argv = score_argv(batch, write_params(), name)
    assert cli(argv) == 0

    scored_path, report_path = output_paths(batch)
    assert scored_path.name == "new rows.scored.csv" and report_path.name == "new rows.drift.json"
    scored = pd.read_csv(scored_path)
    assert list(scored.columns[:2]) == ["row_id", "pixel_0_0"] and len(scored) == len(rows)
    probabilities = scored.filter(like="proba_")
    assert list(probabilities.columns) == [f"proba_{c}" for c in (5, 6, 7, 8, 9)]
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (scored["label"] == scored["target"]).mean() > 0.85
    assert scored["is_anomaly"].dtype == bool and scored["anomaly_score"].notna().all()
    report = read_json(report_path)
    assert report["counts"]["n_rows"] == len(rows) and report["counts"]["anomaly_rate"] < 0.2
    assert not report["drift"]["detected"] and report["drift"]["n_features"] == 64

    (run,) = scoring_runs(tracking, name)
    assert run.data.tags["trackflow.model_uri"] == f"models:/{name}@champion"
    assert run.data.tags["trackflow.model_version"] == version
    assert run.data.metrics["batch/n_rows"] == len(rows)
    assert run.data.metrics["batch/anomaly_rate"] == report["counts"]["anomaly_rate"]
    assert run.data.metrics["drift/detected"] == 0
    assert sum(v for k, v in run.data.metrics.items() if "label_count" in k) == len(rows)
    assert run.info.status == "FINISHED"
    # Told apart in the UI: its own name, source and description, not among the candidates.
    assert run.info.run_name == f"batch-score-new rows-v{version}"
    assert run.data.tags["mlflow.source.name"] == "trackflow score"
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(
        f"{len(rows)} rows scored by models:/{name}@champion (version {version})"
    )
    assert "drift none" in note and run.data.tags["trackflow.drift_rules"] == "none"
    candidates_runs = tracking.client.search_runs(
        [tracking.experiment_id], f"tags.`trackflow.model_uri` = 'models:/{name}@champion'"
    )
    assert candidates_runs == []


def scoring_runs(tracking: Tracking, name: str) -> list:
    """The runs of the scoring experiment that scored with ``models:/<name>@champion``."""
    experiment = tracking.client.get_experiment_by_name("trackflow-scoring")
    return tracking.client.search_runs(
        [experiment.experiment_id], f"tags.`trackflow.model_uri` = 'models:/{name}@champion'"
    )


def test_a_batch_of_noisy_digits_is_flagged_and_the_rules_that_fired_are_named(
    champion, candidates, write_params, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracking, name, _ = champion
    rows = raw_rows(candidates["good"], "test").drop(columns="target")
    noisy = (rows + np.random.default_rng(6).normal(0, 3, rows.shape)).clip(0, 16)
    batch = tmp_path / "noisy.csv"
    noisy.to_csv(batch, index=False)

    assert cli(score_argv(batch, write_params(), name)) == 0

    out = capsys.readouterr().out
    assert "drift: DETECTED by " in out
    assert re.search(rf"anomaly_rate: FIRED: 9\d\.\d% of {len(rows)} rows are anomalies", out)
    report = read_json(output_paths(batch)[1])
    assert report["counts"]["anomaly_rate"] > 0.9 and report["drift"]["detected"]
    assert {"anomaly_rate", "severe_psi"} <= set(report["drift"]["rules_fired"])
    rules = {rule["name"]: rule for rule in report["drift"]["rules"]}
    assert rules["anomaly_rate"]["limit"] == pytest.approx(0.15)  # 3 x anomaly.target_fpr
    assert rules["severe_psi"]["value"] > 4
    (run,) = scoring_runs(tracking, name)
    assert set(run.data.tags["trackflow.drift_rules"].split(",")) == set(
        report["drift"]["rules_fired"]
    )
    assert run.data.metrics["drift/rule/anomaly_rate"] == 1  # fired
    assert "drift DETECTED by" in run.data.tags["mlflow.note.content"]


def test_the_batch_report_names_the_rules_that_fired(champion, candidates) -> None:
    from trackflow.pipeline.report import render_batch_markdown

    tracking, name, _ = champion
    model = load_model(tracking, f"models:/{name}@champion")
    rows = raw_rows(candidates["good"], "test").drop(columns="target")
    result = score_batch(16 - rows, model)
    drift = result.drift.to_dict()
    summary = {
        "model_uri": model.uri,
        "model_version": model.version,
        "counts": result.counts,
        "drift": {k: v for k, v in drift.items() if k != "features"},
        "top_features": [],
        "outputs": ["x.scored.csv", "x.drift.json"],
        "mlflow_run_id": "0" * 32,
    }
    markdown = render_batch_markdown(summary)
    assert f"**DRIFT DETECTED** by {', '.join(drift['rules_fired'])}" in markdown
    assert "| anomaly_rate | **yes** | 1 | 0.15 |" in markdown


def test_a_shifted_parquet_batch_is_flagged_and_its_rows_are_anomalies(
    champion, candidates
) -> None:
    tracking, name, version = champion
    model = load_model(tracking, f"models:/{name}@champion")
    assert model.version == version
    rows = raw_rows(candidates["good"], "test").drop(columns="target")
    inverted = 16 - rows  # the digits' intensities run from 0 to 16
    result = score_batch(inverted, model)
    assert result.drift.detected and result.drift.share > 0.5
    assert result.counts["anomaly_rate"] > 0.9
    batch = Path("inverted.parquet")
    inverted.to_parquet(batch)
    scored_path, report_path = write_batch_outputs(result, batch)
    assert scored_path.name == "inverted.scored.parquet"
    assert read_table(scored_path).index.equals(rows.index)  # row ids kept
    assert read_json(report_path)["drift"]["detected"]


def test_bad_batches_fail_with_a_clear_message_and_write_nothing(
    champion, candidates, write_params, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tracking, name, _ = champion
    model = load_model(tracking, f"models:/{name}@champion")
    good = raw_rows(candidates["good"], "test").drop(columns="target").head(20)
    texts = good.astype(object)
    texts.iloc[3, 5] = "dark"
    with_nan = good.copy()
    with_nan.iloc[2, 1] = np.nan
    bad = {
        "missing columns: pixel_0_0, pixel_0_1": good.drop(columns=["pixel_0_0", "pixel_0_1"]),
        "non-numeric columns: pixel_0_5 ": texts,
        "no rows to score": good.head(0),
        "NaN or infinite values at row .* column pixel_0_1": with_nan,
        "have the names of output columns": good.assign(label=1),
    }
    batch = tmp_path / "batch.csv"
    good.to_csv(batch, index=False)
    write_batch_outputs(score_batch(good, model), batch)
    before = {path: path.read_bytes() for path in output_paths(batch)}
    for message, frame in bad.items():
        frame.to_csv(batch, index=False)
        with pytest.raises(InputError, match=message):
            score_batch(read_batch(batch), model)
    argv = score_argv(batch, write_params(), name)
    assert cli(argv) == 3  # through the command line: a data error's exit status
    assert "have the names of output columns" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in output_paths(batch)} == before  # untouched

    batch.write_text("")
    with pytest.raises(InputError, match="is empty"):
        read_batch(batch)
    with pytest.raises(InputError, match="does not exist"):
        read_batch(tmp_path / "missing.csv")
    with pytest.raises(InputError, match=r"use a \.csv or \.parquet file"):
        read_batch(tmp_path / "rows.json")
    assert sorted(p.name for p in tmp_path.iterdir() if "batch" in p.name) == [
        "batch.csv",
        "batch.drift.json",
        "batch.scored.csv",
    ]


def test_a_model_that_does_not_exist_is_a_config_error(champion) -> None:
    tracking, name, _ = champion
    with pytest.raises(ConfigError, match=r"cannot load model 'models:/.*@nope'"):
        load_model(tracking, f"models:/{name}@nope")


def test_a_model_that_imputes_scores_a_batch_with_missing_values(champion, candidates) -> None:
    tracking, name, _ = champion
    model = load_model(tracking, f"models:/{name}@champion")
    base = model.scorer
    train = raw_rows(candidates["good"], "train").drop(columns="target")
    imputing = replace(model, scorer=imputing_twin(base, train))
    rows = raw_rows(candidates["good"], "test").drop(columns="target")
    rows.iloc[::5, 10] = np.nan
    result = score_batch(rows, imputing)
    assert result.counts["n_rows"] == len(rows) and result.scored["label"].notna().all()
    feature = result.drift.features[rows.columns[10]]
    assert np.isfinite(feature.psi) and np.isfinite(feature.ks)
    # Missing values are not drift. (The twin's refitted PCA no longer matches the detector's
    # space, so its anomaly rate is high: that rule fires, rightly, and is not looked at here.)
    assert [r.name for r in result.drift.fired if r.name != "anomaly_rate"] == []
    with pytest.raises(InputError, match="NaN or infinite"):
        score_batch(rows, model)  # the model that does not impute refuses them


@pytest.mark.parametrize(
    ("option", "key"), [("--psi-threshold=-1", "psi_threshold"), ("--drift-share=2", "drift_share")]
)
def test_a_bad_threshold_option_fails_like_a_bad_param_before_the_model_loads(
    option: str, key: str, write_params, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = tmp_path / "batch.csv"
    batch.write_text("pixel_0_0\n1\n")
    argv = ["score", str(batch), "--params", str(write_params()), "--model", "models:/none@x"]
    assert cli([*argv, option]) == 2
    assert f"batch.{key}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv", "params.yaml"]
