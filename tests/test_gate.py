"""The promotion gate's decisions, on predictions whose outcome is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trackflow.config import PromotionConfig, validate_params
from trackflow.errors import ConfigError
from trackflow.registry.gate import (
    Evaluation,
    GateSet,
    SeenRows,
    bootstrap_delta,
    comparable_rows,
    decide,
    evaluate,
    mcnemar,
    row_digests,
)

N = 200
LABELS = np.array([str(i % 5) for i in range(N)])


def scored(wrong: int, auroc: float = 0.95, f1: float | None = None) -> Evaluation:
    """An evaluation that gets the first ``wrong`` rows wrong."""
    predicted = LABELS.copy()
    predicted[:wrong] = "x"
    accuracy = 1 - wrong / N
    metrics = {"accuracy": accuracy, "macro_f1": f1 or accuracy, "anomaly_auroc": auroc}
    return Evaluation(metrics, predicted, LABELS)


CONFIG = PromotionConfig()


def test_the_first_model_passing_the_floors_becomes_champion() -> None:
    decision = decide(scored(wrong=10), None, CONFIG)
    assert decision.promote and decision.reason.startswith("first model passing the floors")


@pytest.mark.parametrize(
    ("wrong", "auroc", "named"),
    [(40, 0.95, "accuracy 0.8000 < min_accuracy 0.9"), (10, 0.7, "anomaly_auroc")],
)
def test_a_model_below_a_floor_is_never_promoted(wrong, auroc, named) -> None:
    for champion in (None, scored(wrong=60)):
        decision = decide(scored(wrong, auroc), champion, CONFIG)
        assert not decision.promote
        assert decision.reason.startswith("below the floor") and named in decision.reason


def test_a_significantly_better_challenger_is_promoted() -> None:
    decision = decide(scored(wrong=2), scored(wrong=15), CONFIG)
    assert decision.promote and decision.reason.startswith("better:")
    assert decision.support["rows_fixed"] == 13 and decision.support["rows_broken"] == 0
    assert decision.support["p_value"] == pytest.approx(0.5**13)
    assert decision.delta == pytest.approx(13 / N)


def test_a_worse_or_equal_challenger_is_not_promoted() -> None:
    for wrong in (12, 10):
        decision = decide(scored(wrong), scored(wrong=10), CONFIG)
        assert not decision.promote and decision.reason.startswith("not better")


def test_better_but_not_significant_is_not_promoted() -> None:
    decision = decide(scored(wrong=8), scored(wrong=10), CONFIG)  # 2 rows fixed: p = 0.25
    assert not decision.promote
    assert decision.reason.startswith("better but not significantly")
    assert "McNemar p=0.2500 >= 0.05" in decision.reason


def test_min_delta_is_required_even_when_significant() -> None:
    config = PromotionConfig(min_delta=0.1)
    decision = decide(scored(wrong=2), scored(wrong=15), config)
    assert not decision.promote and "min_delta 0.1" in decision.reason


def test_the_champion_that_cannot_be_scored_blocks_promotion() -> None:
    decision = decide(scored(wrong=2), None, CONFIG, champion_problem="its columns differ")
    assert not decision.promote and decision.reason == "not compared: its columns differ"


def test_mcnemar_counts_discordant_rows_only() -> None:
    challenger = np.array([True, True, True, False, True])
    champion = np.array([False, False, True, True, True])
    fixed, broken, p = mcnemar(challenger, champion)
    assert (fixed, broken) == (2, 1) and p == pytest.approx(0.5)
    assert mcnemar(champion, champion) == (0, 0, 1.0)


def test_bootstrap_support() -> None:
    config = PromotionConfig(test="bootstrap", bootstrap_samples=500)
    assert decide(scored(wrong=2), scored(wrong=15), config, seed=1).promote
    weak = decide(scored(wrong=9), scored(wrong=10), config, seed=1)
    assert not weak.promote and "lower bound" in weak.reason and weak.support["ci_low"] <= 0
    deltas = bootstrap_delta(scored(wrong=2), scored(wrong=15), "accuracy", 300, seed=0)
    assert deltas.shape == (300,) and deltas.mean() == pytest.approx(13 / N, abs=0.01)
    f1 = bootstrap_delta(scored(wrong=2), scored(wrong=15), "macro_f1", 50, seed=0)
    assert (f1 > 0).all()


def test_mcnemar_needs_accuracy_as_the_primary_metric() -> None:
    with pytest.raises(ConfigError, match="use test: bootstrap"):
        validate_params({"promotion": {"primary_metric": "macro_f1"}})
    validate_params({"promotion": {"primary_metric": "macro_f1", "test": "bootstrap"}})


def test_evaluate_scores_labels_on_healthy_rows_and_anomalies_on_all() -> None:
    rows = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0]})
    gate_set = GateSet(rows, np.array([1, 2]), np.array([False, False, True, True]), "d")

    def predict(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"label": [1, 3, 1, 1], "anomaly_score": frame["a"]})

    evaluation = evaluate(predict, gate_set)
    assert evaluation.metrics["accuracy"] == 0.5
    assert evaluation.metrics["anomaly_auroc"] == 1.0
    assert evaluation.correct.tolist() == [True, False]


def test_every_outcome_logs_the_same_metric_keys() -> None:
    """MLflow's side-by-side charts need every key on every run: NaN where not computed."""
    decisions = [
        decide(scored(wrong=40), None, CONFIG),  # below the floor
        decide(scored(wrong=2), None, CONFIG, champion_problem="other columns"),
        decide(scored(wrong=10), None, CONFIG),  # first model
        decide(scored(wrong=12), scored(wrong=10), CONFIG),  # not better
        decide(scored(wrong=2), scored(wrong=15), CONFIG),  # better, McNemar
        decide(scored(wrong=2), scored(wrong=15), PromotionConfig(test="bootstrap"), seed=1),
    ]
    keys = [set(d.metrics()) for d in decisions]
    assert all(k == keys[0] for k in keys)
    assert {"gate/champion/accuracy", "gate/delta", "gate/p_value", "gate/ci_low"} <= keys[0]
    assert {"gate/rows_compared", "gate/rows_excluded"} <= keys[0]
    first, mcnemar_win, bootstrap_win = decisions[2], decisions[4], decisions[5]
    assert np.isnan(first.metrics()["gate/champion/accuracy"])
    assert np.isnan(first.metrics()["gate/delta"]) and first.metrics()["gate/promoted"] == 1.0
    assert mcnemar_win.metrics()["gate/p_value"] < 0.05
    assert np.isnan(mcnemar_win.metrics()["gate/ci_low"])
    assert np.isnan(bootstrap_win.metrics()["gate/p_value"])
    assert all(isinstance(v, float) for v in bootstrap_win.metrics().values())


def test_row_digests_are_per_row_and_ignore_the_number_type() -> None:
    floats = pd.DataFrame({"a": [1.0, 2.0, -0.0], "b": [3.0, 4.0, np.nan]})
    ints = pd.DataFrame({"b": [3, 4], "a": [1, 2]})  # other column order, integers
    digests = row_digests(floats, ["a", "b"])
    assert digests.shape == (3,) and len(set(digests)) == 3 and len(digests[0]) == 16
    assert list(row_digests(ints, ["a", "b"])) == list(digests[:2])
    assert row_digests(pd.DataFrame({"a": [0.0], "b": [float("nan")]}), ["a", "b"])[0] == digests[2]
    assert row_digests(floats, ["b", "a"])[0] != digests[0]  # the order is the model's


def test_seen_rows_round_trip_through_json() -> None:
    seen = SeenRows.from_tables({"target_train": pd.DataFrame({"a": [1.0, 2.0]})}, ["a"])
    assert SeenRows.from_json(seen.to_json()) == seen and seen.parts == {"target_train": 2}
    with pytest.raises(ValueError, match="format"):
        SeenRows.from_json(seen.to_json() | {"format": 99})


def small_gate_set() -> GateSet:
    """Four labelled rows (values 0-3) and two anomalies made from rows 0 and 3."""
    healthy = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "b": [0.0] * 4})
    rows = pd.concat([healthy, healthy.iloc[[0, 3]] * 10], ignore_index=True)
    origins = pd.concat([healthy, healthy.iloc[[0, 3]]], ignore_index=True)
    anomalous = np.array([False] * 4 + [True] * 2)
    return GateSet(rows, np.array([0, 1, 2, 3]), anomalous, "d", origins)


def seen(*values: float) -> SeenRows:
    return SeenRows.from_tables({"train": pd.DataFrame({"a": values, "b": 0.0})}, ["a", "b"])


def test_rows_either_model_saw_are_left_out_with_the_anomalies_made_from_them() -> None:
    gate_set = small_gate_set()
    columns = {"challenger": ["a", "b"], "champion": ["b", "a"]}
    keep, problem = comparable_rows(
        gate_set, {"challenger": seen(9.0), "champion": seen(0.0, 2.0)}, columns, min_rows=2
    )
    assert problem is None
    assert keep.tolist() == [False, True, False, True, False, True]
    kept = gate_set.subset(keep)
    assert kept.labels.tolist() == [1, 3] and kept.n_labelled == 2
    assert kept.rows["a"].tolist() == [1.0, 3.0, 30.0]

    _, problem = comparable_rows(
        gate_set, {"challenger": seen(1.0), "champion": seen(0.0, 2.0)}, columns, min_rows=2
    )
    assert problem.startswith("only 1 of 4 labelled test rows are held out from both models")
    assert "promotion.min_gate_rows 2" in problem


def test_models_without_a_record_or_with_other_columns_are_not_compared() -> None:
    gate_set = small_gate_set()
    two = {"challenger": ["a", "b"], "champion version 3": ["a", "b"]}
    _, problem = comparable_rows(
        gate_set, {"challenger": seen(9.0), "champion version 3": None}, two, min_rows=1
    )
    assert problem.startswith("champion version 3 recorded no training rows")
    other = {"challenger": ["a", "b", "c"], "champion version 3": ["a", "b"]}
    _, problem = comparable_rows(
        gate_set, {"challenger": seen(9.0), "champion version 3": seen(9.0)}, other, min_rows=1
    )
    assert problem == (
        "challenger takes 3 columns and champion version 3 2 (only the challenger: c; only the "
        "champion version 3: none): they do not score the same rows"
    )
