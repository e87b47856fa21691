from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from tests.helpers import run_data_stages
from trackflow.config import DataConfig, PreprocessConfig, SplitConfig
from trackflow.data.batches import ORIGIN_COLUMN, ORIGINAL, ORIGINS_FILE, read_origins
from trackflow.data.ingest import load_bundled, to_canonical
from trackflow.data.preprocessing import (
    ROW_DIGESTS_FILE,
    fit_preprocessor,
    preprocess,
    training_features,
    transform_table,
    variance_metrics,
)
from trackflow.data.split import split_table
from trackflow.errors import ConfigError
from trackflow.io import read_json, read_table, write_table
from trackflow.registry.gate import row_digests
from trackflow.stages.preprocess import main as preprocess_stage

LABEL = "target"


@pytest.fixture(scope="module")
def parts() -> dict[str, pd.DataFrame]:
    digits = to_canonical(load_bundled("digits"), LABEL)[0]
    return split_table(digits, LABEL, DataConfig(), SplitConfig(), seed=0)


def config(**pca: object) -> PreprocessConfig:
    return PreprocessConfig(pca=pca or {"n_components": None})


@pytest.mark.parametrize(
    ("fit_on", "parts_used"),
    [
        ("target", ["target_train"]),
        ("source", ["source_train"]),
        ("both", ["source_train", "target_train"]),
    ],
)
def test_statistics_come_from_the_training_rows_alone(parts, fit_on, parts_used) -> None:
    features = training_features(parts, fit_on, LABEL)
    expected = pd.concat([parts[name] for name in parts_used]).drop(columns=LABEL)
    pd.testing.assert_frame_equal(features, expected)
    fitted = fit_preprocessor(features, config(n_components=10), impute=False, seed=0)
    scaler = fitted.named_steps["scale"]
    np.testing.assert_allclose(scaler.mean_, expected.mean().to_numpy())
    np.testing.assert_allclose(
        scaler.scale_, np.where(expected.std(ddof=0) > 0, expected.std(ddof=0), 1.0)
    )
    reference = PCA(n_components=10, random_state=0).fit(scaler.transform(expected))
    np.testing.assert_allclose(
        np.abs(fitted.named_steps["pca"].components_), np.abs(reference.components_), atol=1e-8
    )


@pytest.mark.parametrize(("n_components", "expected_width"), [(12, 12), (None, 64)])
def test_n_components_as_int_or_null(parts, n_components, expected_width) -> None:
    features = training_features(parts, "both", LABEL)
    fitted = fit_preprocessor(features, config(n_components=n_components), False, 0)
    out = transform_table(fitted, parts["target_test"], LABEL)
    assert out.shape == (len(parts["target_test"]), expected_width + 1)
    assert out.index.equals(parts["target_test"].index)
    assert out[LABEL].equals(parts["target_test"][LABEL])


def test_n_components_as_fraction_keeps_that_much_variance(parts) -> None:
    features = training_features(parts, "both", LABEL)
    fitted = fit_preprocessor(features, config(n_components=0.8), False, 0)
    metrics = variance_metrics(fitted, 64)
    assert metrics["explained_variance"] >= 0.8
    fewer = fit_preprocessor(features, config(n_components=metrics["n_components"] - 1), False, 0)
    assert variance_metrics(fewer, 64)["explained_variance"] < 0.8
    assert list(transform_table(fitted, parts["target_val"], LABEL).columns[:2]) == ["pca0", "pca1"]


def test_scaler_choices(parts) -> None:
    features = training_features(parts, "target", LABEL)
    minmax = fit_preprocessor(
        features, PreprocessConfig(scaler="minmax", pca={"n_components": None}), False, 0
    )
    scaled = minmax.transform(features)
    assert scaled.min().min() == 0 and scaled.max().max() == 1
    raw = fit_preprocessor(
        features, PreprocessConfig(scaler="none", pca={"n_components": None}), False, 0
    )
    pd.testing.assert_frame_equal(raw.transform(features), features)


def test_too_many_components_is_a_config_error(parts) -> None:
    with pytest.raises(ConfigError, match=r"n_components=65 exceeds .* use at most 64"):
        fit_preprocessor(training_features(parts, "both", LABEL), config(n_components=65), False, 0)


def test_fit_on_source_without_a_source_task_is_refused(parts) -> None:
    target_only = {k: v for k, v in parts.items() if k.startswith("target")}
    with pytest.raises(ConfigError, match="fit_on='source' but there is no source task"):
        training_features(target_only, "source", LABEL)


def test_imputation_uses_the_training_median(parts) -> None:
    features = training_features(parts, "target", LABEL).copy()
    features.iloc[:5, 10] = np.nan
    fitted = fit_preprocessor(
        features, PreprocessConfig(scaler="none", pca={"n_components": None}), impute=True, seed=0
    )
    row = features.iloc[[0]]
    assert fitted.transform(row).iloc[0, 10] == features.iloc[:, 10].median()


def test_stage_writes_outputs_and_tracks_them_in_mlflow(write_params, tmp_path) -> None:
    from mlflow import MlflowClient

    assert run_data_stages(write_params({"preprocess.pca.n_components": 20})) == 0
    metrics = read_json(tmp_path / "plots/all_metrics.json")  # every number
    assert metrics["n_components"] == 20 and metrics["n_features_in"] == 64
    headline = {k: metrics[k] for k in ("explained_variance", "n_components")}
    assert read_json(tmp_path / "metrics/preprocess.json") == headline
    assert 0 < metrics["explained_variance"] < 1
    processed = read_table(tmp_path / "processed/target_test.parquet")
    assert processed.shape[1] == 21
    fitted = joblib.load(tmp_path / "models/preprocessor.joblib")
    test_rows = read_table(tmp_path / "split/target_test.parquet")
    np.testing.assert_allclose(
        fitted.transform(test_rows.drop(columns=LABEL)), processed.drop(columns=LABEL)
    )
    spectrum = pd.read_csv(tmp_path / "plots/explained_variance.csv")
    assert spectrum["cumulative"].iloc[19] == pytest.approx(metrics["explained_variance"])
    assert (tmp_path / "plots/scree.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("trackflow").experiment_id])
    digest = read_json(tmp_path / "ingested/profile.json")["digest"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["trackflow.data_digest"] == digest
    assert run.data.params["preprocess.pca.n_components"] == "20"
    assert run.data.metrics["preprocess/explained_variance"] == pytest.approx(
        metrics["explained_variance"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "preprocess")}
    assert artifacts == {
        "preprocess/all_metrics.json",
        "preprocess/explained_variance.csv",
        "preprocess/scree.png",
    }


@pytest.mark.parametrize("scaler", ["standard", "minmax", "none"])
@pytest.mark.parametrize("n_components", [5, 0.5, None])
def test_stage_runs_with_every_scaler_and_pca_setting(write_params, scaler, n_components) -> None:
    params = write_params(
        {"preprocess.scaler": scaler, "preprocess.pca.n_components": n_components}
    )
    assert run_data_stages(params) == 0
    metrics = read_json("plots/all_metrics.json")
    assert metrics["n_components"] == {5: 5, None: 64}.get(n_components, metrics["n_components"])
    assert metrics["n_fit_rows"] == len(read_table("split/source_train.parquet")) + len(
        read_table("split/target_train.parquet")
    )


def table_params(write_params, source: Path, extra: dict[str, object]) -> Path:
    """Params for a user's table: one task of all its classes, PCA off."""
    return write_params(
        {
            "data.source": str(source),
            "data.source_classes": None,
            "data.target_classes": None,
            "preprocess.pca.n_components": None,
            **extra,
        }
    )


def test_pca_off_on_a_table_wider_than_it_is_long(write_params, tmp_path) -> None:
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(30, 50)), columns=[f"f{i}" for i in range(50)])
    table["label"] = np.arange(30) % 2
    table.to_csv(tmp_path / "wide.csv", index=False)
    params = table_params(write_params, tmp_path / "wide.csv", {"data.label_column": "label"})
    assert run_data_stages(params) == 0
    assert read_json(tmp_path / "metrics/preprocess.json")["n_components"] == 50


def test_imputed_values_are_counted_in_the_metrics(write_params, tmp_path) -> None:
    table = load_bundled("iris")
    table.iloc[[0, 60, 120], 1] = np.nan
    table.to_csv(tmp_path / "iris.csv", index=False)
    params = table_params(write_params, tmp_path / "iris.csv", {"data.non_finite": "impute"})
    assert run_data_stages(params) == 0
    assert read_json(tmp_path / "plots/all_metrics.json")["imputed_values"] == 3
    tables = (tmp_path / "processed").glob("*_*.parquet")  # the parts, not the row digests
    processed = pd.concat(read_table(p) for p in tables if p.name != ROW_DIGESTS_FILE)
    assert not processed.isna().any().any()


def test_a_failure_while_writing_rolls_back_and_fails_the_run(
    write_params, tmp_path, monkeypatch
) -> None:
    from mlflow import MlflowClient

    import trackflow.data.preprocessing

    def broken_plot(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(trackflow.data.preprocessing, "plot_spectrum", broken_plot)
    with pytest.raises(OSError, match="disk full"):
        run_data_stages(write_params())
    for name in ("processed", "models", "metrics", "plots"):
        assert not (tmp_path / name).exists(), name
    assert not list(tmp_path.glob(".*.tmp-*"))
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("trackflow").experiment_id])
    assert run.info.status == "FAILED"


def test_a_bad_tracking_store_is_a_config_error(
    write_params, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    assert run_data_stages(write_params()) == 2
    assert (
        "cannot use the MLflow tracking store 'nosuchscheme://nowhere'" in capsys.readouterr().err
    )
    assert not (tmp_path / "processed").exists()


def test_stage_needs_the_split(write_params, capsys) -> None:
    code = preprocess_stage(
        [
            "--params",
            str(write_params()),
            "--splits",
            "nope",
            "--out",
            "o",
            "--preprocessor",
            "p",
            "--metrics",
            "m",
            "--plots",
            "pl",
        ]
    )
    assert code == 3 and "run the split stage first" in capsys.readouterr().err


def test_stage_failure_leaves_no_outputs_and_no_run(write_params, tmp_path, capsys) -> None:
    params = write_params({"preprocess.pca.n_components": 500})
    assert run_data_stages(params) == 2
    assert "exceeds" in capsys.readouterr().err
    for name in ("processed", "models", "metrics", "plots"):
        assert not (tmp_path / name).exists(), name
    assert not list(tmp_path.glob(".*.tmp-*"))
    assert not (tmp_path / "mlruns").exists()


def with_batch(
    parts: dict[str, pd.DataFrame], origins: pd.Series, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], pd.Series]:
    """The parts with a batch of new rows (shifted copies of test rows) appended to every part.

    Returns the parts and every row id's origin, the batch's ids following the original ones.
    """
    rng = np.random.default_rng(seed)
    next_id = max(int(part.index.max()) for part in parts.values()) + 1
    grown, batch_ids = {}, []
    for name, part in parts.items():
        rows = part.head(40).copy()
        features = rows.columns != LABEL
        rows.loc[:, features] = rows.loc[:, features] * 1.5 + rng.normal(size=(40, 64))
        rows.index = pd.RangeIndex(next_id, next_id + 40, name=part.index.name)
        next_id += 40
        batch_ids += list(rows.index)
        grown[name] = pd.concat([part, rows])
    added = pd.Series("001-shifted", index=batch_ids, name=ORIGIN_COLUMN)
    return grown, pd.concat([origins, added])


def all_original(parts: dict[str, pd.DataFrame]) -> pd.Series:
    ids = pd.concat(parts.values()).index
    return pd.Series(ORIGINAL, index=ids, name=ORIGIN_COLUMN)


@pytest.mark.parametrize("fit_on", ["target", "both"])
def test_batch_rows_are_transformed_but_never_fitted_on(parts, fit_on) -> None:
    settings = PreprocessConfig(fit_on=fit_on, pca={"n_components": 10})
    before = preprocess(parts, settings, LABEL, impute=False, seed=0)
    grown, origins = with_batch(parts, all_original(parts))
    after = preprocess(grown, settings, LABEL, impute=False, seed=0, origins=origins)
    unfiltered = preprocess(grown, settings, LABEL, impute=False, seed=0)

    for step in ("scale", "pca"):
        for attribute in ("mean_", "scale_", "components_"):
            if hasattr(before.preprocessor.named_steps[step], attribute):
                np.testing.assert_array_equal(
                    getattr(after.preprocessor.named_steps[step], attribute),
                    getattr(before.preprocessor.named_steps[step], attribute),
                )
    assert after.metrics == before.metrics
    assert unfiltered.metrics["n_fit_rows"] > before.metrics["n_fit_rows"]  # the batch counts
    for name, part in parts.items():  # every row transformed, the old ones as before
        assert len(after.parts[name]) == len(grown[name])
        pd.testing.assert_frame_equal(after.parts[name].loc[part.index], before.parts[name])


def test_rows_without_an_origin_are_a_data_error(parts) -> None:
    from trackflow.errors import DataError

    origins = all_original(parts).drop(parts["target_train"].index[:5])
    with pytest.raises(DataError, match=r"no origin.*run the split stage again"):
        training_features(parts, "target", LABEL, origins)


def test_stage_fits_on_the_original_rows_when_the_split_holds_a_batch(
    write_params, tmp_path
) -> None:
    params = write_params({"preprocess.pca.n_components": 12})
    assert run_data_stages(params) == 0
    before = joblib.load(tmp_path / "models/preprocessor.joblib")
    names = read_json(tmp_path / "split/summary.json")["parts"]
    parts = {name: read_table(tmp_path / f"split/{name}.parquet") for name in names}
    origins = read_origins(tmp_path / "split")
    grown, origins = with_batch(parts, all_original(parts) if origins is None else origins)
    for name, part in grown.items():
        write_table(part, tmp_path / f"split/{name}.parquet")
    write_table(origins.to_frame(), tmp_path / f"split/{ORIGINS_FILE}")

    argv = ["--params", str(params), "--splits", "split", "--out", "processed"]
    argv += ["--preprocessor", "models/preprocessor.joblib", "--metrics", "metrics/p.json"]
    assert preprocess_stage([*argv, "--plots", "plots"]) == 0
    after = joblib.load(tmp_path / "models/preprocessor.joblib")
    rows = pd.concat(grown.values()).drop(columns=LABEL)
    pd.testing.assert_frame_equal(after.transform(rows), before.transform(rows))
    processed = read_table(tmp_path / "processed/target_train.parquet")
    assert len(processed) == len(grown["target_train"])
    digests = read_table(tmp_path / f"processed/{ROW_DIGESTS_FILE}")["digest"]
    assert len(digests) == len(rows) and digests.index.is_unique
    np.testing.assert_array_equal(digests.loc[rows.index], row_digests(rows, list(rows.columns)))
