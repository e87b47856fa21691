"""Profiles of training data, for telling when new rows no longer look like it (data drift).

A profile is plain JSON, small enough to travel inside the packaged model: per feature, its mean,
standard deviation, quantiles and quantile-bin edges with the share of training rows in each bin.
:func:`compare_to_profile` measures how far new rows moved from it: the population stability index
(PSI) over those bins and a Kolmogorov-Smirnov statistic against those quantiles, per feature, and
flags the batch when enough features moved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

QUANTILE_LEVELS = np.linspace(0, 1, 101)


def build_profile(rows: pd.DataFrame, bins: int = 10) -> dict[str, Any]:
    """Profile training rows, shape (n_rows, n_features), feature by feature.

    Returns:
        ``{"n_rows": n, "bins": bins, "features": {name: {"mean", "std", "quantiles",
        "bin_edges", "bin_fractions"}}}``. Bin edges are the training quantiles (duplicates
        dropped, so a constant feature has one bin); the outer bins are open-ended.
    """
    features = {}
    for name in rows.columns:
        values = rows[name].to_numpy(dtype=np.float64)
        values = values[~np.isnan(values)]  # missing values (a model that imputes) are not data
        if values.size == 0:
            values = np.zeros(1)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1))[1:-1])
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        features[str(name)] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "quantiles": np.quantile(values, QUANTILE_LEVELS).tolist(),
            "bin_edges": edges.tolist(),
            "bin_fractions": (counts / len(values)).tolist(),
        }
    return {"n_rows": len(rows), "bins": bins, "features": features}


# --- Comparing new rows with a profile ------------------------------------------------------------

#: Shares below this count as this much in the PSI, so an empty bin does not make it infinite.
PSI_FLOOR = 1e-4


@dataclass(frozen=True)
class FeatureDrift:
    """How far one feature of new rows moved from its training profile.

    Attributes:
        psi: Population stability index over the profile's bins (0 = same shares; 0.1 is a
            moderate shift, above 0.2 a large one by the usual rule of thumb).
        ks: Kolmogorov-Smirnov statistic: the largest gap between the training CDF (read from the
            profile's 101 quantiles, so good to about 0.01) and the new rows' empirical CDF.
        train_mean: Mean of the training rows.
        batch_mean: Mean of the new rows' present values (NaN when all are missing).
        drifted: ``psi`` is above the threshold.
    """

    psi: float
    ks: float
    train_mean: float
    batch_mean: float
    drifted: bool


@dataclass(frozen=True)
class DriftReport:
    """Per-feature drift of a batch against a training profile, and the batch-level flag.

    Attributes:
        n_rows: Rows in the batch.
        psi_threshold: A feature drifted when its PSI is above this.
        drift_share: The batch drifted when at least this share of features drifted.
        features: Each feature's :class:`FeatureDrift`, in profile order.
    """

    n_rows: int
    psi_threshold: float
    drift_share: float
    features: dict[str, FeatureDrift]

    @property
    def drifted_features(self) -> list[str]:
        """Features whose PSI is above the threshold, largest PSI first."""
        drifted = [name for name, feature in self.features.items() if feature.drifted]
        return sorted(drifted, key=lambda name: -self.features[name].psi)

    @property
    def share(self) -> float:
        """Share of features that drifted."""
        return len(self.drifted_features) / len(self.features)

    @property
    def detected(self) -> bool:
        """Whether the batch as a whole drifted: some feature did, and ``share >= drift_share``."""
        return bool(self.drifted_features) and self.share >= self.drift_share

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the flag, thresholds, summary numbers and every feature's statistics."""
        return {
            "detected": self.detected,
            "n_rows": self.n_rows,
            "n_features": len(self.features),
            "psi_threshold": self.psi_threshold,
            "drift_share": self.drift_share,
            "share_drifted": self.share,
            "drifted_features": self.drifted_features,
            "max_psi": max(feature.psi for feature in self.features.values()),
            "max_ks": max(feature.ks for feature in self.features.values()),
            "features": {name: asdict(feature) for name, feature in self.features.items()},
        }


def bin_shares(feature: Mapping[str, Any], values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training and new shares of rows per bin of one profiled feature.

    The profile's bins, plus one below the training minimum and one above the training maximum
    (no training row there): a feature constant in training, or new values out of the training
    range, show as drift even where the profile's open-ended outer bins would hide them.

    Args:
        feature: One entry of a profile's ``features``.
        values: The new rows' values of that feature, shape (n_rows,).

    Returns:
        ``(expected, actual)``: shares per bin, each summing to 1.
    """
    low, high = feature["quantiles"][0], feature["quantiles"][-1]
    edges = np.concatenate([[low], feature["bin_edges"], [np.nextafter(high, np.inf)]])
    expected = np.concatenate([[0.0], feature["bin_fractions"], [0.0]])
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
    return expected, counts / values.size


def population_stability_index(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI = sum over bins of (actual - expected) * ln(actual / expected), shares floored."""
    expected = np.maximum(expected, PSI_FLOOR)
    actual = np.maximum(actual, PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_statistic(quantiles: Sequence[float], values: np.ndarray) -> float:
    """Largest gap between the CDF the training quantiles describe and the values' empirical CDF.

    Both CDFs are step functions; the gap is checked at every step of either, from the right
    and from the left, so ties (discrete features) are handled.

    Args:
        quantiles: Training quantiles at :data:`QUANTILE_LEVELS`, shape (101,), non-decreasing.
        values: New values, shape (n_rows,).
    """
    levels = np.concatenate([[0.0], QUANTILE_LEVELS])
    reference = np.asarray(quantiles, dtype=np.float64)
    observed = np.sort(values)
    points = np.union1d(reference, observed)
    gap = 0.0
    for side in ("right", "left"):  # F(t) = P(X <= t), then F(t-) = P(X < t)
        train = levels[np.searchsorted(reference, points, side=side)]
        batch = np.searchsorted(observed, points, side=side) / observed.size
        gap = max(gap, float(np.max(np.abs(train - batch))))
    return gap


def compare_to_profile(
    profile: Mapping[str, Any],
    rows: pd.DataFrame,
    psi_threshold: float = 0.2,
    drift_share: float = 0.3,
) -> DriftReport:
    """Compare new rows with a training profile from :func:`build_profile`, feature by feature.

    Args:
        profile: The training rows' profile.
        rows: New rows, shape (n_rows, n_features), with (at least) the profile's features;
            checked (numeric, no infinities) beforehand, e.g. by :meth:`Scorer.check
            <trackflow.packaging.Scorer.check>`. A missing value (NaN) is not drift: each
            feature is compared on its present values; one with none shows no drift.
        psi_threshold: A feature drifted when its PSI is above this.
        drift_share: The batch drifted when at least this share of features drifted.

    Raises:
        ValueError: No rows, or a threshold out of range.
    """
    if rows.empty:
        raise ValueError("no rows to compare with the profile")
    if psi_threshold <= 0 or not 0 < drift_share <= 1:
        raise ValueError(
            f"psi_threshold must be > 0 and drift_share in (0, 1], got {psi_threshold}, "
            f"{drift_share}"
        )
    features = {}
    for name, feature in profile["features"].items():
        values = rows[name].to_numpy(dtype=np.float64)
        values = values[~np.isnan(values)]  # missing values (a model that imputes) are not data
        if values.size == 0:  # nothing to compare
            features[name] = FeatureDrift(0.0, 0.0, float(feature["mean"]), float("nan"), False)
            continue
        psi = population_stability_index(*bin_shares(feature, values))
        features[name] = FeatureDrift(
            psi=psi,
            ks=ks_statistic(feature["quantiles"], values),
            train_mean=float(feature["mean"]),
            batch_mean=float(values.mean()),
            drifted=psi > psi_threshold,
        )
    return DriftReport(len(rows), psi_threshold, drift_share, features)
