"""The promotion gate's decisions, on predictions whose outcome is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trackflow.config import PromotionConfig, validate_params
from trackflow.errors import ConfigError
from trackflow.gate import Evaluation, GateSet, bootstrap_delta, decide, evaluate, mcnemar

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
