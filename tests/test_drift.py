"""Drift of new rows against a training profile: PSI over its bins, KS against its quantiles.

A batch is flagged when any rule fires (share of drifted features, one severe PSI, an anomaly rate
far above the validation rate), each with a limit raised to what chance reaches in a small batch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from trackflow.config import BatchConfig
from trackflow.data.drift import (
    AnomalyCount,
    anomaly_rate_limit,
    bin_shares,
    build_profile,
    compare_to_profile,
    ks_statistic,
    population_stability_index,
)


def normal_rows(n: int, shift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    values = np.random.default_rng(seed).normal(size=(n, 4)) + shift
    return pd.DataFrame(values, columns=["a", "b", "c", "d"])


@pytest.fixture(scope="module")
def profile() -> dict:
    return build_profile(normal_rows(3000, seed=1))


def test_rows_like_the_training_rows_do_not_drift(profile) -> None:
    report = compare_to_profile(profile, normal_rows(500, seed=2))
    assert not report.detected and report.drifted_features == []
    for feature in report.features.values():
        assert feature.psi < 0.05 and feature.ks < 0.08


def test_a_shifted_batch_drifts_and_the_statistics_grow_with_the_shift(profile) -> None:
    reports = [compare_to_profile(profile, normal_rows(500, shift, seed=3)) for shift in (0.5, 1)]
    assert all(report.detected and report.share == 1 for report in reports)
    small, large = (report.features["a"] for report in reports)
    assert 0.2 < small.psi < large.psi and 0.15 < small.ks < large.ks
    # N(1, 1) against N(0, 1): the largest CDF gap is 2 * Phi(0.5) - 1 = 0.383
    assert large.ks == pytest.approx(0.383, abs=0.05)
    assert large.batch_mean == pytest.approx(1, abs=0.15) and large.train_mean == pytest.approx(
        0, abs=0.1
    )


def test_one_drifted_feature_is_reported_but_flags_the_batch_only_above_the_share(profile) -> None:
    rows = normal_rows(500, seed=4)
    rows["c"] += 1  # PSI about 0.9: drifted, not severe
    report = compare_to_profile(profile, rows, BatchConfig(psi_threshold=0.2, drift_share=0.3))
    assert report.drifted_features == ["c"] and report.share == 0.25 and not report.detected
    assert compare_to_profile(profile, rows, BatchConfig(drift_share=0.25)).detected
    as_json = report.to_dict()
    assert as_json["drifted_features"] == ["c"] and as_json["n_features"] == 4
    assert as_json["max_psi"] == report.features["c"].psi
    assert as_json["rules_fired"] == [] and [r["name"] for r in as_json["rules"]] == [
        "drift_share",
        "severe_psi",
    ]
    assert set(as_json["features"]["c"]) == {"psi", "ks", "train_mean", "batch_mean", "drifted"}


def test_one_severely_drifted_feature_flags_the_batch_and_says_so(profile) -> None:
    rows = normal_rows(500, seed=4)
    rows["c"] += 2  # PSI about 3.5 on one feature of four
    report = compare_to_profile(profile, rows)
    assert report.share == 0.25 and [rule.name for rule in report.fired] == ["severe_psi"]
    assert report.to_dict()["rules_fired"] == ["severe_psi"]
    assert report.summary().startswith("DETECTED by severe_psi: largest PSI 3.")
    assert "(c)" in report.summary()
    assert not compare_to_profile(profile, rows, BatchConfig(psi_severe=5)).detected


def test_psi_is_zero_for_equal_shares_and_finite_for_an_empty_bin() -> None:
    shares = np.array([0.25, 0.25, 0.5])
    assert population_stability_index(shares, shares) == 0
    psi = population_stability_index(np.array([0.5, 0.5, 0.0]), np.array([0.4, 0.4, 0.2]))
    # (0.2 - 1e-4) ln(0.2 / 1e-4) + 2 (-0.1) ln(0.8)
    assert psi == pytest.approx(0.1999 * np.log(2000) - 0.2 * np.log(0.8), rel=1e-6)


def test_a_feature_constant_in_training_drifts_when_new_rows_leave_the_constant() -> None:
    training = pd.DataFrame({"pixel": np.zeros(200), "other": np.arange(200.0)})
    profile = build_profile(training)
    expected, actual = bin_shares(profile["features"]["pixel"], np.array([0.0, 0, 0, 5]))
    assert expected.tolist() == [0, 0, 1, 0] and actual.tolist() == [0, 0, 0.75, 0.25]
    same = compare_to_profile(profile, training.iloc[:50])
    assert same.features["pixel"].psi == 0 and same.features["pixel"].ks == 0
    lit = training.iloc[:50].assign(pixel=np.r_[np.zeros(40), np.full(10, 3.0)])
    assert lit.pixel.gt(0).mean() == 0.2
    drifted = compare_to_profile(profile, lit)
    assert drifted.features["pixel"].drifted and drifted.features["pixel"].ks == pytest.approx(0.2)


def test_values_out_of_the_training_range_fall_in_bins_of_their_own() -> None:
    profile = build_profile(pd.DataFrame({"x": np.arange(100.0)}))["features"]["x"]
    expected, actual = bin_shares(profile, np.array([-1.0, 0, 50, 99, 100]))
    assert expected[0] == expected[-1] == 0 and expected.sum() == pytest.approx(1)
    assert actual[0] == actual[-1] == 0.2 and actual.sum() == pytest.approx(1)


def test_ks_handles_ties_of_a_discrete_feature() -> None:
    quantiles = np.quantile(np.repeat([0.0, 1.0], [70, 30]), np.linspace(0, 1, 101))
    assert ks_statistic(quantiles, np.repeat([0.0, 1.0], [70, 30])) <= 0.011
    assert ks_statistic(quantiles, np.repeat([0.0, 1.0], [40, 60])) == pytest.approx(0.3, abs=0.011)


def test_bad_arguments_are_refused(profile) -> None:
    with pytest.raises(ValueError, match="no rows"):
        compare_to_profile(profile, normal_rows(0))
    with pytest.raises(ValidationError, match="drift_share"):
        BatchConfig(drift_share=0)
    with pytest.raises(ValidationError, match=r"psi_severe .* must be above psi_threshold"):
        BatchConfig(psi_threshold=0.5, psi_severe=0.5)


def test_missing_values_are_not_drift(profile) -> None:
    rows = normal_rows(500, seed=2)
    complete = compare_to_profile(profile, rows)
    rows.loc[::4, "a"] = np.nan  # a quarter of one feature missing (a model that imputes)
    rows["d"] = np.nan  # all of another
    report = compare_to_profile(profile, rows)
    assert not report.detected and report.n_rows == 500
    for feature in report.features.values():
        assert np.isfinite([feature.psi, feature.ks]).all() and not feature.drifted
    assert report.features["a"].psi < 0.05
    assert report.features["a"].batch_mean == pytest.approx(rows["a"].mean())
    assert report.features["b"] == complete.features["b"]
    assert report.features["d"].psi == report.features["d"].ks == 0


# The batch of the report: digits + N(0, 3) noise, clipped to 0..16 ----------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[dict, pd.DataFrame]:
    """A profile of 70% of the digits 5-9 and the other 30% (healthy rows it did not see)."""
    from sklearn.datasets import load_digits

    frame = load_digits(as_frame=True).frame
    rows = frame[frame["target"] >= 5].drop(columns="target")
    order = np.random.default_rng(0).permutation(len(rows))
    cut = int(0.7 * len(rows))
    return build_profile(rows.iloc[order[:cut]]), rows.iloc[order[cut:]]


def test_noisy_digits_drift_on_few_features_but_severely_and_are_flagged(digits) -> None:
    profile, healthy = digits
    noisy = (healthy + np.random.default_rng(6).normal(0, 3, healthy.shape)).clip(0, 16)
    report = compare_to_profile(profile, noisy)
    # What the report saw: 19 of 64 features drifted (0.297 < 0.3), but one PSI is over 5.
    assert len(report.drifted_features) == 19 and report.share < report.drift_share == 0.3
    assert report.max_psi > 5
    assert [rule.name for rule in report.fired] == ["severe_psi"] and report.detected
    assert report.to_dict()["detected"] and report.to_dict()["rules_fired"] == ["severe_psi"]
    assert not compare_to_profile(profile, healthy).detected  # the same rows without noise


@pytest.mark.parametrize("n_rows", [5, 10, 20])
def test_a_small_healthy_batch_is_not_flagged_for_what_chance_does_to_it(digits, n_rows) -> None:
    profile, healthy = digits
    report = compare_to_profile(profile, healthy.head(n_rows))
    # A few rows leave whole bins empty: large PSIs and many "drifted" features by chance alone.
    assert report.max_psi > 1 and report.share > 0.3
    assert report.psi_by_chance > report.max_psi and report.share_by_chance >= report.share
    assert not report.detected, report.summary()


def test_an_anomaly_rate_far_above_the_validation_rate_flags_the_batch(profile) -> None:
    rows = normal_rows(300, seed=2)
    healthy = compare_to_profile(profile, rows, anomalies=AnomalyCount(20, 0.05))
    assert not healthy.detected and healthy.rules[-1].name == "anomaly_rate"
    report = compare_to_profile(profile, rows, anomalies=AnomalyCount(300, 0.05))
    (rule,) = report.fired
    assert rule.name == "anomaly_rate" and rule.value == 1 and rule.limit == pytest.approx(0.15)
    assert "100.0% of 300 rows are anomalies, 5.0% expected" in rule.reason
    assert report.to_dict()["expected_anomaly_rate"] == 0.05
    assert compare_to_profile(profile, rows).rules[-1].name == "severe_psi"  # no count: no rule


def test_the_anomaly_rate_limit_rises_for_small_batches() -> None:
    config = BatchConfig()  # 3 x the validation rate, and the 99.9% binomial quantile
    assert anomaly_rate_limit(10_000, 0.05, config) == pytest.approx(0.15)
    # 10 healthy rows at a 5% false-positive rate: 4 flagged in 0.1% of batches, 5 in 0.006%.
    assert anomaly_rate_limit(10, 0.05, config) == pytest.approx(0.4)
    small = normal_rows(10, seed=5)
    profile = build_profile(normal_rows(3000, seed=1))
    assert not compare_to_profile(profile, small, anomalies=AnomalyCount(4, 0.05)).detected
    assert compare_to_profile(profile, small, anomalies=AnomalyCount(5, 0.05)).detected
