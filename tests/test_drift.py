"""Drift of new rows against a training profile: PSI over its bins, KS against its quantiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trackflow.drift import (
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
    rows["c"] += 2
    report = compare_to_profile(profile, rows, psi_threshold=0.2, drift_share=0.3)
    assert report.drifted_features == ["c"] and report.share == 0.25 and not report.detected
    assert compare_to_profile(profile, rows, drift_share=0.25).detected
    as_json = report.to_dict()
    assert as_json["drifted_features"] == ["c"] and as_json["n_features"] == 4
    assert as_json["max_psi"] == report.features["c"].psi
    assert set(as_json["features"]["c"]) == {"psi", "ks", "train_mean", "batch_mean", "drifted"}


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
    with pytest.raises(ValueError, match="drift_share"):
        compare_to_profile(profile, normal_rows(10), drift_share=0)


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
