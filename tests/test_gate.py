"""The promotion gate's decisions, on predictions whose outcome is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from trackflow.config import PromotionConfig, validate_params
from trackflow.data.batches import ORIGIN_COLUMN, ORIGINAL, ORIGINS_FILE
from trackflow.errors import ConfigError, DataError
from trackflow.registry.gate import (
    Evaluation,
    GateSet,
    SeenRows,
    bootstrap_delta,
    comparable_rows,
    decide,
    evaluate,
    label_metrics,
    labelled_batches,
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


# --- added batches: better where asked (the new rows), not forgetting the old ones --------------

BATCH = "001-shifted"


def by_origin(old_wrong: int, new_wrong: int, n_old: int = 100, n_new: int = 100) -> Evaluation:
    """An evaluation of ``n_old`` original rows, then ``n_new`` rows of a batch, getting the first
    ``old_wrong`` of the original rows and the first ``new_wrong`` of the batch's wrong."""
    labels = np.array([str(i % 5) for i in range(n_old + n_new)])
    predicted = labels.copy()
    predicted[:old_wrong] = "x"
    predicted[n_old : n_old + new_wrong] = "x"
    batches = np.array([ORIGINAL] * n_old + [BATCH] * n_new)
    metrics = label_metrics(labels, predicted) | {"anomaly_auroc": 0.95}
    return Evaluation(metrics, predicted, labels, batches)


def test_better_on_the_new_rows_and_forgetting_within_the_limit_is_promoted() -> None:
    champion, challenger = by_origin(old_wrong=2, new_wrong=40), by_origin(3, 5)
    decision = decide(challenger, champion, CONFIG)  # loses 1 old row of 100: exactly 0.01
    assert decision.promote
    assert decision.reason == (
        "better: accuracy on the new rows 0.9500 vs champion 0.6000 (delta +0.3500; McNemar "
        "p=0.0000 < 0.05: 35 rows fixed, 0 broken); accuracy on the original rows 0.9700 vs "
        "champion 0.9800 (-0.0100, within max_forgetting 0.01)"
    )
    assert decision.delta == pytest.approx(0.35) and decision.forgetting == pytest.approx(0.01)
    same = decide(by_origin(2, 5), champion, CONFIG)
    assert same.reason.endswith("vs champion 0.9800 (+0.0000, within max_forgetting 0.01)")
    assert decision.support["rows_broken"] == 0  # the test is on the new rows only
    metrics = decision.metrics()
    assert metrics["gate/challenger/old/accuracy"] == pytest.approx(0.97)
    assert metrics["gate/challenger/new/accuracy"] == pytest.approx(0.95)
    assert metrics["gate/champion/old/accuracy"] == pytest.approx(0.98)
    assert metrics["gate/champion/new/accuracy"] == pytest.approx(0.60)
    assert metrics["gate/forgetting"] == pytest.approx(0.01)
    assert metrics["gate/challenger/accuracy"] == pytest.approx(0.96)  # all rows, as before
    assert (metrics["gate/rows_old"], metrics["gate/rows_new"]) == (100, 100)
    assert decision.scores() == pytest.approx(
        challenger.metrics
        | {"old_accuracy": 0.97, "old_macro_f1": metrics["gate/challenger/old/macro_f1"]}
        | {"new_accuracy": 0.95, "new_macro_f1": metrics["gate/challenger/new/macro_f1"]}
        | {"forgetting": 0.01}
    )


def test_forgetting_too_much_is_refused_though_better_on_the_new_rows_and_on_all() -> None:
    champion, challenger = by_origin(old_wrong=0, new_wrong=40), by_origin(5, 5)
    assert challenger.metrics["accuracy"] > champion.metrics["accuracy"]
    decision = decide(challenger, champion, CONFIG)
    assert not decision.promote
    assert decision.reason == (
        "forgets: accuracy on the original rows 0.9500 vs champion 1.0000 (-0.0500 > "
        "max_forgetting 0.01); accuracy on the new rows 0.9500 vs champion 0.6000"
    )
    assert decision.forgetting == pytest.approx(0.05) and decision.delta == pytest.approx(0.35)
    assert decision.metrics()["gate/forgetting"] == pytest.approx(0.05)
    assert decide(challenger, champion, PromotionConfig(max_forgetting=0.05)).promote


def test_not_better_on_the_new_rows_is_refused_though_better_on_all() -> None:
    champion, challenger = by_origin(old_wrong=10, new_wrong=10), by_origin(0, 12)
    assert challenger.metrics["accuracy"] > champion.metrics["accuracy"]
    decision = decide(challenger, champion, CONFIG)
    assert not decision.promote
    assert decision.reason == (
        "not better: accuracy on the new rows 0.8800 vs champion 0.9000 (delta -0.0200; needs > 0 "
        "and >= min_delta 0); accuracy on the original rows 1.0000 vs champion 0.9000 (+0.1000, "
        "within max_forgetting 0.01)"
    )
    weak = decide(by_origin(0, 8), champion, CONFIG)  # 2 rows fixed on the new rows: p = 0.25
    assert not weak.promote and weak.reason.startswith(
        "better but not significantly: accuracy on the new rows 0.9200 vs champion 0.9000"
    )


def test_without_batch_rows_the_gate_decides_as_before() -> None:
    """No origins, or every row original: the same decision, and no old/new numbers."""
    originals = np.array([ORIGINAL] * N)
    for challenger, champion in [(2, 15), (12, 10), (8, 10), (40, 10)]:
        plain = decide(scored(challenger), scored(champion), CONFIG)
        ours, theirs = (replace(scored(w), batches=originals) for w in (challenger, champion))
        assert decide(ours, theirs, CONFIG) == plain
        metrics = plain.metrics()
        assert np.isnan(metrics["gate/forgetting"]) and np.isnan(metrics["gate/rows_new"])
        assert np.isnan(metrics["gate/challenger/old/accuracy"])
        assert plain.scores() == scored(challenger).metrics


def test_too_few_new_rows_compare_on_all_rows_and_still_guard_the_old_ones() -> None:
    champion, challenger = by_origin(20, 9, n_new=10), by_origin(2, 1, n_new=10)
    decision = decide(challenger, champion, CONFIG)  # 10 new rows < min_gate_rows 30
    assert decision.promote and decision.reason.startswith(
        "better: accuracy on all rows 0.9727 vs champion 0.7364 (delta +0.2364; McNemar"
    )
    assert decision.reason.endswith(
        "; accuracy on the original rows 0.9800 vs champion 0.8000 (+0.1800, within "
        "max_forgetting 0.01); accuracy on the new rows 0.9000 vs champion 0.1000, only 10 new "
        "rows, fewer than promotion.min_gate_rows 30: compared on all rows"
    )
    forgets = decide(by_origin(5, 0, n_new=10), by_origin(2, 9, n_new=10), CONFIG)
    assert not forgets.promote and forgets.reason.startswith("forgets: accuracy on the original")


def test_with_batches_the_accuracy_floor_is_on_the_original_rows() -> None:
    first = decide(by_origin(old_wrong=5, new_wrong=60), None, CONFIG)  # all rows: 0.675
    assert first.promote and first.reason == (
        "first model passing the floors (accuracy 0.6750, anomaly_auroc 0.9500; accuracy on the "
        "original rows 0.9500, on the new rows 0.4000)"
    )
    assert first.forgetting is None and np.isnan(first.metrics()["gate/champion/old/accuracy"])
    below = decide(by_origin(old_wrong=15, new_wrong=0), by_origin(20, 40), CONFIG)
    assert not below.promote
    assert (
        below.reason == "below the floor: accuracy on the original rows 0.8500 < min_accuracy 0.9"
    )
    assert below.metrics()["gate/challenger/new/accuracy"] == 1.0  # reported all the same


def test_every_outcome_with_batches_logs_the_same_metric_keys() -> None:
    keys = set(decide(scored(wrong=10), None, CONFIG).metrics())
    decisions = [
        decide(by_origin(5, 60), None, CONFIG),
        decide(by_origin(15, 0), by_origin(20, 40), CONFIG),
        decide(by_origin(3, 5), by_origin(2, 40), CONFIG),
        decide(by_origin(5, 5), by_origin(0, 40), CONFIG),
        decide(by_origin(0, 12), by_origin(10, 10), CONFIG),
        decide(by_origin(2, 1, n_new=10), by_origin(20, 9, n_new=10), CONFIG),
        decide(by_origin(3, 5), by_origin(2, 40), PromotionConfig(test="bootstrap"), seed=1),
    ]
    assert all(set(d.metrics()) == keys for d in decisions)
    assert {"gate/challenger/old/accuracy", "gate/champion/new/macro_f1"} <= keys
    assert {"gate/forgetting", "gate/rows_old", "gate/rows_new"} <= keys


def test_the_gate_set_keeps_each_labelled_rows_batch_and_needs_original_rows() -> None:
    gate_set = replace(small_gate_set(), batches=np.array([ORIGINAL, ORIGINAL, BATCH, BATCH]))
    columns = {"challenger": ["a", "b"], "champion": ["a", "b"]}
    keep, problem = comparable_rows(
        gate_set, {"challenger": seen(1.0), "champion": seen(9.0)}, columns, min_rows=2
    )
    assert problem is None and gate_set.subset(keep).batches.tolist() == [ORIGINAL, BATCH, BATCH]

    _, problem = comparable_rows(
        gate_set, {"challenger": seen(0.0, 1.0), "champion": seen(9.0)}, columns, min_rows=2
    )
    assert problem == (
        "none of the original data's labelled test rows are held out from both models (all 2 "
        "left come from added batches), so the gate cannot tell whether the challenger forgot "
        "the original data (promotion.max_forgetting)"
    )


def test_labelled_batches_reads_the_splits_origins(tmp_path) -> None:
    ids = pd.Index([3, 7, 9], name="row_id")
    assert labelled_batches(tmp_path, ids) is None  # a split written before batches existed
    origins = pd.DataFrame({ORIGIN_COLUMN: [ORIGINAL] * 10}, index=pd.RangeIndex(10, name="row_id"))
    origins.to_parquet(tmp_path / ORIGINS_FILE)
    assert labelled_batches(tmp_path, ids) is None  # all original: the gate as before
    origins.loc[9, ORIGIN_COLUMN] = BATCH
    origins.to_parquet(tmp_path / ORIGINS_FILE)
    assert labelled_batches(tmp_path, ids).tolist() == [ORIGINAL, ORIGINAL, BATCH]
    with pytest.raises(DataError, match=r"no origin for 2 target test rows \(row ids 12, 13\)"):
        labelled_batches(tmp_path, pd.Index([3, 12, 13]))
