"""Detectors of inputs unlike the healthy training data, and the anomalies they are tested on.

Detectors follow scikit-learn's outlier-detector contract: ``fit(X)`` on healthy rows only returns
``self``; ``score_samples(X)`` is higher for more normal rows; ``predict(X)`` is ``1`` for inliers
and ``-1`` for outliers; learned state ends in ``_``. The threshold is set apart from fitting, on
validation rows, at a target false-positive rate (:func:`calibrate_threshold`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from trackflow.errors import ConfigError

log = logging.getLogger(__name__)

#: Which representation of a row each detector reads: the network's ``embedding``; the ``scaled``
#: features (the preprocessor without its PCA step: a reconstruction error needs the directions
#: that PCA drops); or the ``raw`` features (only imputed, where the preprocessor imputes):
#: standardizing gives near-constant features (an image's border pixels) as much weight as the
#: informative ones, which blurs distances between rows.
SPACES = {
    "knn": "embedding",
    "mahalanobis": "embedding",
    "pca_reconstruction": "scaled",
    "isolation_forest": "scaled",
    "knn_raw": "raw",
    "knn_shifted": "raw",
    "gaussian_mixture": "raw",
}


def represent(raw: pd.DataFrame, space: str, preprocessor: Any, network: Any) -> np.ndarray:
    """Raw rows, shape (n_rows, n_features), in a detector's space, shape (n_rows, n_dims).

    Args:
        raw: Rows with the raw feature columns.
        space: ``"raw"``, ``"scaled"`` or ``"embedding"``.
        preprocessor: The fitted preprocessing pipeline ([impute], scale, PCA or passthrough).
        network: The classifier, ``nn.Sequential(backbone, head)``.
    """
    if space == "raw":
        imputer = preprocessor.named_steps.get("impute")
        return np.asarray(raw if imputer is None else imputer.transform(raw), dtype=float)
    if space == "scaled":
        return np.asarray(preprocessor[:-1].transform(raw), dtype=float)
    from trackflow.learn.networks import embed

    return embed(network, np.asarray(preprocessor.transform(raw), dtype=float))


class _ThresholdMixin(OutlierMixin):
    """``predict`` from ``score_samples`` and a ``threshold_`` (rows scoring below are outliers)."""

    def predict(self, X: np.ndarray) -> np.ndarray:
        """1 for inliers, -1 for outliers, shape (n_rows,)."""
        check_is_fitted(self, "threshold_")
        return np.where(self.score_samples(X) < self.threshold_, -1, 1)


class KNNDetector(_ThresholdMixin, BaseEstimator):
    """Mean distance to the ``n_neighbors`` nearest training rows, negated (higher: normal)."""

    def __init__(self, n_neighbors: int = 5) -> None:
        self.n_neighbors = n_neighbors

    def fit(self, X: np.ndarray, y: None = None) -> KNNDetector:
        """Remember the healthy rows, shape (n_rows, n_dims)."""
        from sklearn.neighbors import NearestNeighbors

        X = validate_data(self, X)
        self.neighbors_ = NearestNeighbors(n_neighbors=min(self.n_neighbors, len(X))).fit(X)
        self.threshold_ = -np.inf
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Negated mean distance to the nearest training rows, shape (n_rows,)."""
        check_is_fitted(self, "neighbors_")
        X = validate_data(self, X, reset=False)
        distances, _ = self.neighbors_.kneighbors(X)
        return -distances.mean(axis=1)


class ShiftedKNNDetector(KNNDetector):
    """:class:`KNNDetector` whose training rows are also remembered shifted by a pixel or more.

    Rows are read as square one-channel images (64 features: 8 x 8). A healthy row drawn a pixel
    off from every training row is then still near one, while a row of another class is not:
    distances measure shape more than position.
    """

    def __init__(self, n_neighbors: int = 5, shift: int = 1) -> None:
        super().__init__(n_neighbors=n_neighbors)
        self.shift = shift

    def fit(self, X: np.ndarray, y: None = None) -> ShiftedKNNDetector:
        """Remember the healthy rows, shape (n_rows, side * side), and their shifted copies."""
        from sklearn.neighbors import NearestNeighbors

        X = validate_data(self, X)
        rows = shifted_images(X, self.shift)
        self.neighbors_ = NearestNeighbors(n_neighbors=min(self.n_neighbors, len(rows))).fit(rows)
        self.threshold_ = -np.inf
        return self


def is_square(width: int) -> bool:
    """Whether rows of ``width`` features can be read as one square image."""
    side = round(np.sqrt(width))
    return side * side == width


def readable_detectors(config: Any, width: int) -> list[str]:
    """The configured detectors that can read rows of ``width`` raw features.

    ``knn_shifted`` reads rows as square images: on other tables it is left out with a warning
    (it is among the defaults), unless ``anomaly.detector`` names it.

    Raises:
        ConfigError: ``anomaly.detector`` names a detector that cannot read the rows, or none can.
    """
    names = list(config.detectors)
    if "knn_shifted" in names and not is_square(width):
        if config.detector == "knn_shifted":
            raise ConfigError(
                f"anomaly.detector knn_shifted reads rows as square images; {width} features "
                "are not: choose another detector"
            )
        log.warning("anomaly: knn_shifted left out: %d features are not a square image", width)
        names.remove("knn_shifted")
    if not names:
        raise ConfigError("anomaly.detectors: none of them can read these rows; add knn or knn_raw")
    return names


def shifted_images(X: np.ndarray, shift: int) -> np.ndarray:
    """Rows of square images and their copies moved ``shift`` pixels each way.

    Args:
        X: Rows, shape (n_rows, side * side).
        shift: Pixels moved up, down, left and right (uncovered pixels are 0).

    Returns:
        The rows, then the four moved copies, shape (5 * n_rows, side * side).

    Raises:
        ValueError: The rows' width is not a square number.
    """
    side = round(np.sqrt(X.shape[1]))
    if not is_square(X.shape[1]):
        raise ValueError(
            f"knn_shifted reads rows as square images; {X.shape[1]} features are not; "
            "leave knn_shifted out of anomaly.detectors"
        )
    images = X.reshape(len(X), side, side)
    copies = [X]
    for axis in (1, 2):
        for step in (shift, -shift):
            moved = np.roll(images, step, axis=axis)
            edge = slice(0, step) if step > 0 else slice(step, None)
            moved[(slice(None),) * axis + (edge,)] = 0
            copies.append(moved.reshape(len(X), -1))
    return np.concatenate(copies)


class MahalanobisDetector(_ThresholdMixin, BaseEstimator):
    """Squared Mahalanobis distance to the training rows' mean, with a shrunk covariance."""

    def fit(self, X: np.ndarray, y: None = None) -> MahalanobisDetector:
        """Estimate mean and (Ledoit-Wolf) precision of the healthy rows, shape (n_rows, n_dims)."""
        from sklearn.covariance import LedoitWolf

        X = validate_data(self, X)
        estimate = LedoitWolf().fit(X)
        self.location_ = estimate.location_
        self.precision_ = estimate.precision_
        self.threshold_ = -np.inf
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Negated squared Mahalanobis distance, shape (n_rows,)."""
        check_is_fitted(self, "precision_")
        centered = validate_data(self, X, reset=False) - self.location_
        return -np.einsum("ij,jk,ik->i", centered, self.precision_, centered)


class PCAReconstructionDetector(_ThresholdMixin, BaseEstimator):
    """Error of reconstructing a row from the healthy rows' principal components."""

    def __init__(self, variance: float = 0.9, random_state: int | None = None) -> None:
        self.variance = variance
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: None = None) -> PCAReconstructionDetector:
        """Fit a PCA keeping ``variance`` of the healthy rows, shape (n_rows, n_dims)."""
        from sklearn.decomposition import PCA

        X = validate_data(self, X)
        self.pca_ = PCA(n_components=self.variance, random_state=self.random_state).fit(X)
        self.threshold_ = -np.inf
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Negated squared reconstruction error, shape (n_rows,)."""
        check_is_fitted(self, "pca_")
        X = validate_data(self, X, reset=False)
        restored = self.pca_.inverse_transform(self.pca_.transform(X))
        return -((X - restored) ** 2).sum(axis=1)


class IsolationForestDetector(_ThresholdMixin, BaseEstimator):
    """scikit-learn's IsolationForest, with the threshold set like the other detectors'."""

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: None = None) -> IsolationForestDetector:
        """Grow the forest on the healthy rows, shape (n_rows, n_dims)."""
        from sklearn.ensemble import IsolationForest

        X = validate_data(self, X)
        self.forest_ = IsolationForest(random_state=self.random_state).fit(X)
        self.threshold_ = -np.inf
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """The forest's score: lower for rows isolated in fewer splits, shape (n_rows,)."""
        check_is_fitted(self, "forest_")
        return self.forest_.score_samples(validate_data(self, X, reset=False))


class GaussianMixtureDetector(_ThresholdMixin, BaseEstimator):
    """Log-density under a mixture of Gaussians fitted to the healthy rows (higher: normal).

    ``reg_covar`` is added to every component's covariance diagonal, in squared feature units: a
    large value keeps near-constant features (an image's border pixels) from making the density
    needle-sharp, so that healthy rows unlike any training row in one pixel still score well.
    """

    def __init__(
        self, n_components: int = 20, reg_covar: float = 8.0, random_state: int | None = None
    ) -> None:
        self.n_components = n_components
        self.reg_covar = reg_covar
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: None = None) -> GaussianMixtureDetector:
        """Fit the mixture to the healthy rows, shape (n_rows, n_dims)."""
        from sklearn.mixture import GaussianMixture

        X = validate_data(self, X)
        self.mixture_ = GaussianMixture(
            n_components=min(self.n_components, len(X)),
            reg_covar=self.reg_covar,
            random_state=self.random_state,
        ).fit(X)
        self.threshold_ = -np.inf
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Log-density of each row, shape (n_rows,)."""
        check_is_fitted(self, "mixture_")
        return self.mixture_.score_samples(validate_data(self, X, reset=False))


def build_detector(name: str, config: Any, seed: int) -> _ThresholdMixin:
    """An unfitted detector named as in ``anomaly.detectors``."""
    if name in ("knn", "knn_raw"):
        return KNNDetector(n_neighbors=config.knn_neighbors)
    if name == "knn_shifted":
        return ShiftedKNNDetector(n_neighbors=config.knn_neighbors, shift=config.knn_shift)
    if name == "mahalanobis":
        return MahalanobisDetector()
    if name == "gaussian_mixture":
        return GaussianMixtureDetector(
            n_components=config.mixture_components, reg_covar=config.mixture_reg, random_state=seed
        )
    if name == "pca_reconstruction":
        return PCAReconstructionDetector(variance=config.pca_variance, random_state=seed)
    return IsolationForestDetector(random_state=seed)


def calibrate_threshold(detector: _ThresholdMixin, X_val: np.ndarray, target_fpr: float) -> float:
    """Set ``threshold_`` so that a ``target_fpr`` share of healthy validation rows is flagged."""
    detector.threshold_ = float(np.quantile(detector.score_samples(X_val), target_fpr))
    return detector.threshold_


def corrupt(
    raw: pd.DataFrame, reference: pd.DataFrame, noise_scale: float, feature_scale: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Corrupted copies of healthy raw rows, one table per kind of corruption.

    Args:
        raw: Healthy rows' raw features, shape (n_rows, n_features).
        reference: Training rows' raw features, for per-feature scale, range and mean.
        noise_scale: Gaussian noise's standard deviation, in training standard deviations.
        feature_scale: Factor every feature is multiplied by.
        seed: Seed of the noise and of the constant rows' values.

    Returns:
        ``gaussian_noise``, ``inverted``, ``constant`` and ``scaled`` tables, shaped like ``raw``.
    """
    rng = np.random.default_rng(seed)
    std = reference.std().replace(0, 1).to_numpy()
    low, high = reference.min().to_numpy(), reference.max().to_numpy()
    values = raw.to_numpy()
    constants = rng.uniform(reference.mean().min(), reference.mean().max(), size=(len(raw), 1))
    corrupted = {
        "gaussian_noise": values + rng.normal(size=values.shape) * std * noise_scale,
        "inverted": low + high - values,
        "constant": np.repeat(constants, values.shape[1], axis=1),
        "scaled": values * feature_scale,
    }
    return {
        name: pd.DataFrame(v, columns=raw.columns, index=raw.index) for name, v in corrupted.items()
    }


def detection_metrics(
    normal_scores: np.ndarray, anomaly_scores: np.ndarray, threshold: float
) -> dict[str, float]:
    """AUROC, AUPRC (anomaly = positive) and recall at the threshold, from ``score_samples``."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomaly_scores))]
    anomaly_score = -np.r_[normal_scores, anomaly_scores]
    return {
        "auroc": float(roc_auc_score(y, anomaly_score)),
        "auprc": float(average_precision_score(y, anomaly_score)),
        "recall_at_fpr": float((anomaly_scores < threshold).mean()),
    }


@dataclass(frozen=True)
class AnomalySets:
    """Raw healthy target rows to fit, calibrate and test on, and held-out raw anomalies."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    val_anomalies: dict[str, pd.DataFrame]
    test_anomalies: dict[str, pd.DataFrame]


def anomaly_sets(
    raw: dict[str, pd.DataFrame], label_column: str, config: Any, seed: int
) -> AnomalySets:
    """Assemble healthy target rows and anomalies for validation and test, in raw feature space.

    Args:
        raw: Split parts by name (``"target_train"``, ``"source_test"``, ...), as split.
        label_column: Class column to drop.
        config: ``params.anomaly``.
        seed: Seed of the corruptions (the test's differ from the validation's).
    """

    def features(name: str) -> pd.DataFrame:
        return raw[name].drop(columns=label_column)

    anomalies: dict[str, dict[str, pd.DataFrame]] = {}
    for offset, split in enumerate(("val", "test")):
        found = {"source_classes": features(f"source_{split}")} if f"source_{split}" in raw else {}
        found |= corrupt(
            features(f"target_{split}"),
            features("target_train"),
            config.noise_scale,
            config.feature_scale,
            seed + offset,
        )
        anomalies[split] = found
    return AnomalySets(
        *(features(f"target_{split}") for split in ("train", "val", "test")),
        val_anomalies=anomalies["val"],
        test_anomalies=anomalies["test"],
    )


@dataclass
class DetectorReport:
    """Fitted detectors, validation AUROC (worst kind), test metrics and scores, the chosen one."""

    detectors: dict[str, Any]
    val_auroc: dict[str, float]
    metrics: dict[str, dict[str, dict[str, float]]]
    scores: dict[str, dict[str, np.ndarray]]
    selected: str
    target_fpr: float

    def selected_bundle(self) -> dict[str, Any]:
        """What the packaged model needs: the fitted detector, its input space, its name."""
        return {
            "name": self.selected,
            "space": SPACES[self.selected],
            "detector": self.detectors[self.selected],
            "target_fpr": self.target_fpr,
        }

    def table(self) -> pd.DataFrame:
        """One row per detector and anomaly type."""
        return pd.DataFrame(
            [
                {"detector": name, "anomaly": kind, **values, "val_auroc": self.val_auroc[name]}
                for name, per_kind in self.metrics.items()
                for kind, values in per_kind.items()
            ]
        )


def evaluate_detectors(
    sets: AnomalySets, preprocessor: Any, network: Any, config: Any, seed: int
) -> DetectorReport:
    """Fit every configured detector, calibrate it, score it; choose the one to keep.

    ``preprocessor`` and ``network`` (``nn.Sequential(backbone, head)``) map raw rows into each
    detector's space (:func:`represent`). A detector's validation AUROC is its worst over the
    kinds of validation anomalies (the source task's classes, when there is one, are the hardest
    to tell): ``best`` keeps the detector whose weakest spot is strongest. Test rows choose nothing.
    """

    def inputs(space: str, rows: pd.DataFrame) -> np.ndarray:
        return represent(rows, space, preprocessor, network)

    detectors, val_auroc, metrics, scores = {}, {}, {}, {}
    for name in readable_detectors(config, sets.train.shape[1]):
        space = SPACES[name]
        detector = build_detector(name, config, seed).fit(inputs(space, sets.train))
        calibrate_threshold(detector, inputs(space, sets.val), config.target_fpr)
        val_normal = detector.score_samples(inputs(space, sets.val))
        val_auroc[name] = min(
            detection_metrics(val_normal, detector.score_samples(inputs(space, x)), -np.inf)[
                "auroc"
            ]
            for x in sets.val_anomalies.values()
        )
        test_scores = {"normal": detector.score_samples(inputs(space, sets.test))}
        test_scores |= {
            k: detector.score_samples(inputs(space, x)) for k, x in sets.test_anomalies.items()
        }
        kinds = [k for k in test_scores if k != "normal"]
        metrics[name] = {
            kind: detection_metrics(test_scores["normal"], test_scores[kind], detector.threshold_)
            for kind in kinds
        }
        metrics[name]["all"] = detection_metrics(
            test_scores["normal"],
            np.concatenate([test_scores[k] for k in kinds]),
            detector.threshold_,
        )
        detectors[name], scores[name] = detector, test_scores
    selected = max(val_auroc, key=val_auroc.get) if config.detector == "best" else config.detector
    return DetectorReport(detectors, val_auroc, metrics, scores, selected, config.target_fpr)


def plot_histograms(report: DetectorReport, path: Any) -> None:
    """Per detector: anomaly-score histograms of healthy test rows and each anomaly type."""
    from trackflow.plotting import pyplot

    plt = pyplot()
    names = list(report.scores)
    fig, axes = plt.subplots(
        1, len(names), figsize=(4.5 * len(names), 3.8), constrained_layout=True, squeeze=False
    )
    for ax, name in zip(axes[0], names, strict=True):
        # Scores span orders of magnitude (constant rows are far out): log-spaced bins, on scores
        # shifted to start at 1.
        shift = 1 - min(-v.max() for v in report.scores[name].values())
        values = {kind: -v + shift for kind, v in report.scores[name].items()}
        everything = np.concatenate(list(values.values()))
        bins = np.geomspace(everything.min(), everything.max(), 40)
        for kind, scores in values.items():
            ax.hist(scores, bins=bins, alpha=0.5, label=kind)
        threshold = -report.detectors[name].threshold_ + shift
        ax.axvline(threshold, color="black", linestyle="--", label="threshold")
        ax.set(title=name, xlabel="anomaly score, shifted (log scale)", ylabel="rows", xscale="log")
    axes[0][0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(report: DetectorReport, path: Any) -> None:
    """ROC curves of every detector on all test anomalies against healthy test rows."""
    from sklearn.metrics import roc_curve

    from trackflow.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), constrained_layout=True)
    for name, scores in report.scores.items():
        normal = scores["normal"]
        anomalous = np.concatenate([v for k, v in scores.items() if k != "normal"])
        y = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
        fpr, tpr, _ = roc_curve(y, -np.r_[normal, anomalous])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {report.metrics[name]['all']['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title="Anomaly detection on test rows",
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
