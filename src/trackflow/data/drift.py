"""Profiles of training data, for telling when new rows no longer look like it (data drift).

A profile is plain JSON, small enough to travel inside the packaged model: per feature, its mean,
standard deviation, quantiles and quantile-bin edges with the share of training rows in each bin.
:func:`compare_to_profile` measures how far new rows moved from it: the population stability index
(PSI) over those bins and a Kolmogorov-Smirnov statistic against those quantiles, per feature. The
batch is flagged when any rule fires, and the report names the rules that did:

- ``drift_share``: at least ``batch.drift_share`` of the features drifted (PSI above
  ``batch.psi_threshold``), more than rows drawn from the training profile show by chance in a
  batch of this size (at ``batch.confidence``);
- ``severe_psi``: some feature's PSI is above ``batch.psi_severe``, however few moved, and above
  the largest PSI that rows drawn from the training profile reach in a batch of this size (at
  ``batch.confidence``): a handful of rows has a large PSI by chance alone;
- ``anomaly_rate``: the detector flags far more rows than the share of healthy validation rows its
  threshold was set to flag (``anomaly.target_fpr``): more than ``batch.anomaly_rate_factor``
  times that share, and more than a healthy batch of this size would show but once in a while
  (the binomial quantile at ``batch.confidence``), so a small batch does not false-alarm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from trackflow.config import BatchConfig

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
class AnomalyCount:
    """How many rows of a batch the model's detector flagged, and the share it should flag.

    Attributes:
        n_anomalies: Rows flagged.
        expected_rate: Share of healthy rows the detector flags: the false-positive rate its
            threshold was set at on validation rows (``anomaly.target_fpr``).
    """

    n_anomalies: int
    expected_rate: float


@dataclass(frozen=True)
class DriftRule:
    """One rule that flags a batch, evaluated on it.

    Attributes:
        name: ``drift_share``, ``severe_psi`` or ``anomaly_rate``.
        fired: Whether it flags the batch.
        value: What it measured: share of drifted features, largest PSI, or anomaly rate.
        limit: The value it fires at (``drift_share``) or above (the others).
        reason: One line saying what was measured against what.
    """

    name: str
    fired: bool
    value: float
    limit: float
    reason: str


@dataclass(frozen=True)
class DriftReport:
    """Per-feature drift of a batch against a training profile, and the rules that flag it.

    Attributes:
        n_rows: Rows in the batch.
        config: The thresholds of the rules (``params.batch``).
        features: Each feature's :class:`FeatureDrift`, in profile order.
        anomalies: The detector's count in the batch; ``None`` leaves out the ``anomaly_rate``
            rule (a model that does not record its ``target_fpr``).
        psi_by_chance: The largest PSI over features that a batch of ``n_rows`` drawn from the
            training profile stays below with probability ``config.confidence``
            (:func:`chance_bounds`); the ``severe_psi`` rule fires only above it.
        share_by_chance: The same for the share of drifted features; the ``drift_share`` rule
            fires only above it.
    """

    n_rows: int
    config: BatchConfig
    features: dict[str, FeatureDrift]
    anomalies: AnomalyCount | None = None
    psi_by_chance: float = 0.0
    share_by_chance: float = 0.0

    @property
    def psi_threshold(self) -> float:
        """A feature drifted when its PSI is above this."""
        return self.config.psi_threshold

    @property
    def drift_share(self) -> float:
        """The ``drift_share`` rule fires when at least this share of features drifted."""
        return self.config.drift_share

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
    def max_psi(self) -> float:
        """The largest PSI of any feature."""
        return max(feature.psi for feature in self.features.values())

    @property
    def rules(self) -> list[DriftRule]:
        """Every rule, evaluated: ``drift_share``, ``severe_psi``, then ``anomaly_rate``."""
        rules = [self._share_rule(), self._severe_rule()]
        if self.anomalies is not None:
            rules.append(anomaly_rate_rule(self.n_rows, self.anomalies, self.config))
        return rules

    @property
    def fired(self) -> list[DriftRule]:
        """The rules that flag the batch."""
        return [rule for rule in self.rules if rule.fired]

    @property
    def detected(self) -> bool:
        """Whether the batch is flagged: any rule fired."""
        return bool(self.fired)

    def _share_rule(self) -> DriftRule:
        drifted, share = self.drifted_features, self.share
        reason = (
            f"{len(drifted)} of {len(self.features)} features above PSI {self.psi_threshold:g} "
            f"(share {share:.3f}; fires at {self.drift_share:g}"
            + (
                f" and above {self.share_by_chance:.3g}, reached by chance in {self.n_rows} rows)"
                if self.share_by_chance >= self.drift_share
                else ")"
            )
        )
        fired = bool(drifted) and share >= self.drift_share and share > self.share_by_chance
        return DriftRule("drift_share", fired, share, self.drift_share, reason)

    def _severe_rule(self) -> DriftRule:
        name = max(self.features, key=lambda n: self.features[n].psi)
        psi, limit = self.features[name].psi, max(self.config.psi_severe, self.psi_by_chance)
        reason = (
            f"largest PSI {psi:.3g} ({name}); fires above {limit:.3g} (psi_severe "
            f"{self.config.psi_severe:g}; chance alone reaches {self.psi_by_chance:.3g} "
            f"in {self.n_rows} rows)"
        )
        return DriftRule("severe_psi", psi > limit, psi, limit, reason)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: the flag, the rules that fired, thresholds, every feature's statistics."""
        anomalies = self.anomalies
        return {
            "detected": self.detected,
            "rules_fired": [rule.name for rule in self.fired],
            "rules": [asdict(rule) for rule in self.rules],
            "n_rows": self.n_rows,
            "n_features": len(self.features),
            "psi_threshold": self.psi_threshold,
            "drift_share": self.drift_share,
            "psi_severe": self.config.psi_severe,
            "psi_by_chance": self.psi_by_chance,
            "share_by_chance": self.share_by_chance,
            "share_drifted": self.share,
            "drifted_features": self.drifted_features,
            "max_psi": self.max_psi,
            "max_ks": max(feature.ks for feature in self.features.values()),
            "expected_anomaly_rate": anomalies.expected_rate if anomalies else None,
            "features": {name: asdict(feature) for name, feature in self.features.items()},
        }

    def summary(self) -> str:
        """One line: the verdict and the reasons of the rules that fired."""
        if not self.detected:
            return f"none ({self._share_rule().reason})"
        return "DETECTED by " + "; ".join(f"{r.name}: {r.reason}" for r in self.fired)


def anomaly_rate_limit(n_rows: int, expected_rate: float, config: BatchConfig) -> float:
    """The anomaly rate above which a batch of ``n_rows`` is flagged.

    The larger of ``config.anomaly_rate_factor`` x ``expected_rate`` and the share of anomalies
    a batch of healthy rows exceeds with probability at most ``1 - config.confidence`` (the
    binomial quantile): the second keeps a small batch, where a few flagged rows are already a
    large share, from false alarms.
    """
    from scipy.stats import binom

    quantile = float(binom.ppf(config.confidence, n_rows, expected_rate))
    return max(config.anomaly_rate_factor * expected_rate, quantile / n_rows)


def anomaly_rate_rule(n_rows: int, anomalies: AnomalyCount, config: BatchConfig) -> DriftRule:
    """The ``anomaly_rate`` rule: far more rows flagged than healthy rows would be."""
    rate = anomalies.n_anomalies / n_rows
    limit = anomaly_rate_limit(n_rows, anomalies.expected_rate, config)
    reason = (
        f"{rate:.1%} of {n_rows} rows are anomalies, {anomalies.expected_rate:.1%} expected of "
        f"healthy rows; fires above {limit:.1%}"
    )
    return DriftRule("anomaly_rate", rate > limit, rate, limit, reason)


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


def chance_bounds(
    profile: Mapping[str, Any],
    n_rows: int,
    psi_threshold: float,
    confidence: float,
    samples: int = 2000,
) -> tuple[float, float]:
    """What healthy batches of ``n_rows`` reach by chance: the largest PSI, the share drifted.

    Draws ``samples`` batches of ``n_rows`` from the profile's bin shares (features drawn
    independently, seeded, so the bounds are the same for the same profile and size) and returns
    the ``confidence`` quantiles of each batch's largest PSI and of its share of features with a
    PSI above ``psi_threshold``. A few rows leave whole bins empty, so a small batch reaches a
    large PSI by chance alone: 10 digit rows, a PSI of about 5 and two thirds of the features.

    Args:
        profile: The training rows' profile (:func:`build_profile`).
        n_rows: Rows in the batch.
        psi_threshold: A feature drifted when its PSI is above this.
        confidence: Quantile level, e.g. 0.999.
        samples: Batches drawn.

    Returns:
        ``(largest PSI, share of drifted features)``.
    """
    rng = np.random.default_rng(0)
    largest, drifted = np.zeros(samples), np.zeros(samples)
    for feature in profile["features"].values():
        expected = np.asarray(feature["bin_fractions"], dtype=np.float64)
        actual = rng.multinomial(n_rows, expected / expected.sum(), size=samples) / n_rows
        expected, actual = np.maximum(expected, PSI_FLOOR), np.maximum(actual, PSI_FLOOR)
        psi = np.sum((actual - expected) * np.log(actual / expected), axis=1)
        largest, drifted = np.maximum(largest, psi), drifted + (psi > psi_threshold)
    share = drifted / len(profile["features"])
    return float(np.quantile(largest, confidence)), float(np.quantile(share, confidence))


def compare_to_profile(
    profile: Mapping[str, Any],
    rows: pd.DataFrame,
    config: BatchConfig | None = None,
    anomalies: AnomalyCount | None = None,
) -> DriftReport:
    """Compare new rows with a training profile from :func:`build_profile`, feature by feature.

    Args:
        profile: The training rows' profile.
        rows: New rows, shape (n_rows, n_features), with (at least) the profile's features;
            checked (numeric, no infinities) beforehand, e.g. by :meth:`Scorer.check
            <trackflow.registry.packaging.Scorer.check>`. A missing value (NaN) is not drift: each
            feature is compared on its present values; one with none shows no drift.
        config: The rules' thresholds; default :class:`~trackflow.config.BatchConfig`'s.
        anomalies: The detector's count in these rows, for the ``anomaly_rate`` rule.

    Raises:
        ValueError: No rows.
    """
    if rows.empty:
        raise ValueError("no rows to compare with the profile")
    config = config or BatchConfig()
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
            drifted=psi > config.psi_threshold,
        )
    bounds = chance_bounds(profile, len(rows), config.psi_threshold, config.confidence)
    return DriftReport(len(rows), config, features, anomalies, *bounds)
