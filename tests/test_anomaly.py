"""Anomaly detectors on planted outliers, thresholds, no test-row fitting, and the stage."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from trackflow.config import AnomalyConfig
from trackflow.io import read_json
from trackflow.learn.anomaly import (
    SPACES,
    AnomalySets,
    GaussianMixtureDetector,
    IsolationForestDetector,
    KNNDetector,
    MahalanobisDetector,
    PCAReconstructionDetector,
    ShiftedKNNDetector,
    calibrate_threshold,
    corrupt,
    evaluate_detectors,
    represent,
    shifted_images,
)
from trackflow.stages.anomaly import main as anomaly

DETECTORS = [
    KNNDetector(n_neighbors=5),
    MahalanobisDetector(),
    PCAReconstructionDetector(variance=0.9, random_state=0),
    IsolationForestDetector(random_state=0),
    GaussianMixtureDetector(n_components=3, reg_covar=0.01, random_state=0),
]


def healthy(n: int, seed: int) -> np.ndarray:
    """Rows near a 3-d subspace of 8 dimensions, correlated like real features."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) @ rng.normal(size=(3, 8)) + 0.1 * rng.normal(size=(n, 8))


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_planted_outliers_are_found_at_the_chosen_false_positive_rate(detector) -> None:
    rng = np.random.default_rng(1)
    everything = healthy(1200, 0)
    train, val, test = everything[:400], everything[400:800], everything[800:]
    outliers = rng.normal(size=(100, 8)) * 4
    fitted = clone(detector).fit(train)
    threshold = calibrate_threshold(fitted, val, target_fpr=0.05)
    assert np.mean(fitted.score_samples(val) < threshold) == pytest.approx(0.05, abs=1 / 400)
    assert np.mean(fitted.predict(test) == -1) == pytest.approx(0.05, abs=0.04)
    assert np.mean(fitted.predict(outliers) == -1) > 0.9


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: type(d).__name__)
def test_estimator_contract(detector) -> None:
    unfitted = clone(detector)
    assert not [k for k in vars(unfitted) if k.endswith("_")]
    with pytest.raises(NotFittedError):
        unfitted.score_samples(healthy(5, 0))
    assert unfitted.fit(healthy(50, 0)) is unfitted
    with pytest.raises(ValueError, match="features"):
        unfitted.score_samples(np.zeros((3, 5)))


def test_detectors_are_fitted_on_training_rows_only() -> None:
    import torch
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from trackflow.config import ModelConfig
    from trackflow.learn.networks import build_backbone, build_head

    rng = np.random.default_rng(0)

    def rows(n: int, shift: float = 0.0) -> pd.DataFrame:
        values = healthy(n, int(rng.integers(1000))) + shift
        return pd.DataFrame(values, columns=[f"f{i}" for i in range(8)])

    sets = AnomalySets(
        train=rows(200),
        val=rows(100),
        test=rows(100),
        val_anomalies={"far": rows(20, 5.0)},
        test_anomalies={"far": rows(20, 5.0)},
    )
    preprocessor = make_pipeline(StandardScaler(), PCA(4)).fit(sets.train)
    network = torch.nn.Sequential(build_backbone(ModelConfig(widths=(6,)), 4), build_head(6, 3))
    config = AnomalyConfig(detectors=[n for n in SPACES if n != "knn_shifted"])  # 8 features
    report = evaluate_detectors(sets, preprocessor, network, config, seed=0)
    changed = AnomalySets(
        sets.train,
        sets.val,
        sets.test + 100,
        sets.val_anomalies,
        {"far": sets.test_anomalies["far"] * 3},
    )
    again = evaluate_detectors(changed, preprocessor, network, config, seed=0)
    assert report.detectors["knn"].neighbors_.n_samples_fit_ == 200
    scaled_train = preprocessor[:-1].transform(sets.train)
    np.testing.assert_allclose(
        report.detectors["pca_reconstruction"].pca_.mean_,
        np.asarray(scaled_train).mean(axis=0),
        atol=1e-12,
    )
    for name in config.detectors:  # test rows changed; fitted state and threshold did not
        assert report.detectors[name].threshold_ == again.detectors[name].threshold_
    assert report.val_auroc == again.val_auroc
    assert report.detectors["knn_raw"].neighbors_._fit_X.tolist() == sets.train.to_numpy().tolist()


def test_shifted_knn_remembers_images_moved_a_pixel() -> None:
    image = np.zeros((1, 4, 4))
    image[0, 1:3, 1] = 1.0
    moved = shifted_images(image.reshape(1, 16), shift=1).reshape(5, 4, 4)
    np.testing.assert_array_equal(moved[0], image[0])
    assert [m.sum() for m in moved] == [2.0] * 5  # nothing wrapped around the edge
    np.testing.assert_array_equal(moved[3][1:3, 2], [1.0, 1.0])  # one of them moved right
    detector = ShiftedKNNDetector(n_neighbors=1).fit(image.reshape(1, 16))
    right = np.roll(image, 1, axis=2).reshape(1, 16)
    assert detector.score_samples(right) == 0.0  # plain kNN: distance sqrt(4)
    assert KNNDetector(n_neighbors=1).fit(image.reshape(1, 16)).score_samples(right) == -2.0
    with pytest.raises(ValueError, match="square"):
        ShiftedKNNDetector().fit(healthy(10, 0))
    unfitted = ShiftedKNNDetector(n_neighbors=3, shift=2)
    assert clone(unfitted).get_params() == {"n_neighbors": 3, "shift": 2}
    assert not [k for k in vars(unfitted) if k.endswith("_")]
    with pytest.raises(NotFittedError):
        unfitted.score_samples(np.zeros((2, 16)))


def test_raw_space_is_imputed_but_not_scaled() -> None:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rows = pd.DataFrame({"a": [1.0, np.nan, 3.0], "b": [10.0, 20.0, 60.0]})
    imputing = Pipeline([("impute", SimpleImputer()), ("scale", StandardScaler())]).fit(rows)
    np.testing.assert_array_equal(
        represent(rows, "raw", imputing, network=None), [[1, 10], [2, 20], [3, 60]]
    )
    plain = Pipeline([("scale", StandardScaler()), ("pca", "passthrough")]).fit(rows.fillna(0))
    np.testing.assert_array_equal(represent(rows.fillna(0), "raw", plain, None), rows.fillna(0))


@pytest.mark.parametrize("impute", [False, True])
@pytest.mark.parametrize("space", ["raw", "scaled", "embedding"])
def test_packaged_model_feeds_each_detector_its_space(space: str, impute: bool) -> None:
    """The packaged model scores with the detector, on rows as :func:`represent` gives them."""
    import torch

    from trackflow.config import ModelConfig, PreprocessConfig
    from trackflow.data.preprocessing import build_preprocessor
    from trackflow.learn.networks import build_backbone, build_head
    from trackflow.registry.packaging import Scorer

    rows = pd.DataFrame(
        healthy(60, 3) * [1, 10, 1, 1, 1, 1, 1, 1], columns=[f"f{i}" for i in range(8)]
    )
    preprocessor = build_preprocessor(PreprocessConfig(), impute=impute, seed=0).fit(rows)
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        build_backbone(ModelConfig(widths=(6,)), preprocessor.transform(rows).shape[1]),
        build_head(6, 2),
    ).eval()
    inputs = represent(rows, space, preprocessor, network)
    detector = KNNDetector(n_neighbors=3).fit(inputs[:40])
    bundle = {"name": "knn", "space": space, "detector": detector, "target_fpr": 0.05}
    scorer = Scorer(preprocessor, network, bundle, list(rows.columns), [0, 1])
    scored = scorer.score(rows.iloc[40:])
    np.testing.assert_allclose(
        scored["anomaly_score"], -detector.score_samples(inputs[40:]), rtol=1e-5, atol=1e-6
    )


def test_corruptions_keep_shape_and_change_rows() -> None:
    raw = pd.DataFrame(np.arange(24.0).reshape(6, 4), columns=list("abcd"))
    corrupted = corrupt(raw, raw, noise_scale=1.0, feature_scale=3.0, seed=0)
    assert set(corrupted) == {"gaussian_noise", "inverted", "constant", "scaled"}
    for table in corrupted.values():
        assert table.shape == raw.shape and not np.allclose(table, raw)
    assert (corrupted["constant"].nunique(axis=1) == 1).all()
    np.testing.assert_allclose(
        corrupted["inverted"]["a"], raw["a"].min() + raw["a"].max() - raw["a"]
    )


@pytest.mark.slow
def test_anomaly_stage_writes_one_table_and_the_selected_detector(processed, trained_model) -> None:
    from mlflow import MlflowClient

    params = trained_model
    data = processed.parent
    code = anomaly(
        [
            "--params",
            str(params),
            "--splits",
            str(data / "split"),
            "--preprocessor",
            str(data / "models/preprocessor.joblib"),
            "--model",
            "model.pt",
            "--run",
            "train_run.json",
            "--detector-out",
            "detector.joblib",
            "--metrics",
            "anomaly.json",
            "--plots",
            "plots",
        ]
    )
    assert code == 0
    metrics = read_json("plots/all_metrics.json")  # every number; anomaly.json: the headline
    kinds = {"source_classes", "gaussian_noise", "inverted", "constant", "scaled", "all"}
    assert set(metrics) == set(AnomalyConfig().detectors) == set(SPACES)
    for per_kind in metrics.values():
        assert set(per_kind) == kinds
        assert all(set(m) == {"auroc", "auprc", "recall_at_fpr"} for m in per_kind.values())
    bundle = joblib.load("detector.joblib")
    run = MlflowClient().get_run(read_json("train_run.json")["run_id"])
    assert run.data.tags["trackflow.anomaly_detector"] == bundle["name"]
    assert bundle["space"] == SPACES[bundle["name"]] and np.isfinite(bundle["detector"].threshold_)
    assert (
        run.data.metrics["anomaly/knn/source_classes/auroc"]
        == metrics["knn"]["source_classes"]["auroc"]
    )
    assert metrics[bundle["name"]]["all"]["auroc"] > 0.9
    saved = metrics[bundle["name"]]
    assert read_json("anomaly.json") == {
        "detector": bundle["name"],
        "auroc": saved["all"]["auroc"],
        "auroc_real": saved["source_classes"]["auroc"],
        "auroc_worst_corruption": min(
            saved[k]["auroc"] for k in ("gaussian_noise", "inverted", "constant", "scaled")
        ),
    }
    table = pd.read_csv("plots/detectors.csv")
    assert len(table) == len(SPACES) * len(kinds)
    assert Path("plots/roc_curves.png").exists() and Path("plots/score_histograms.png").exists()


def test_headline_has_the_same_keys_without_a_source_task() -> None:
    from trackflow.stages.anomaly import headline

    per_kind = {k: {"auroc": v} for k, v in [("all", 0.9), ("scaled", 0.8), ("constant", 1.0)]}
    assert headline({"knn": per_kind}, "knn") == {
        "detector": "knn",
        "auroc": 0.9,
        "auroc_real": None,
        "auroc_worst_corruption": 0.8,
    }


def test_knn_shifted_is_left_out_of_tables_that_are_not_square_images(caplog) -> None:
    from trackflow.config import AnomalyConfig
    from trackflow.errors import ConfigError
    from trackflow.learn.anomaly import readable_detectors

    config = AnomalyConfig()
    assert "knn_shifted" in readable_detectors(config, 64)
    assert "knn_shifted" not in readable_detectors(config, 30)
    assert "knn_shifted left out" in caplog.text
    with pytest.raises(ConfigError, match="30 features are not"):
        readable_detectors(AnomalyConfig(detectors=("knn_shifted",), detector="knn_shifted"), 30)
