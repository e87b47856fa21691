"""Held-out metrics, diagnosis, baselines, and the evaluate stage on a real MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import FAST_TRAINING
from trackflow.config import DiagnosisConfig, load_params
from trackflow.io import read_json
from trackflow.learn.evaluation import classification_metrics, diagnose, expected_calibration_error
from trackflow.stages.evaluate import main as evaluate
from trackflow.tracking import set_tags, setup_tracking

RULES = DiagnosisConfig(flat_tolerance=0.1, rise_tolerance=0.1)
EPOCHS = np.arange(20)


def test_flat_high_losses_are_underfitting() -> None:
    flat = 2.3 - 0.001 * EPOCHS
    diagnosis = diagnose(flat, flat + 0.05, RULES)
    assert diagnosis.state == "underfitting" and "not learning" in diagnosis.reason


def test_validation_rising_after_its_minimum_is_overfitting_from_that_epoch() -> None:
    train_loss = 2.0 * np.exp(-0.3 * EPOCHS)
    val_loss = np.r_[2.0 * np.exp(-0.3 * EPOCHS[:8]), 2.0 * np.exp(-0.3 * 7) + 0.05 * EPOCHS[1:13]]
    diagnosis = diagnose(train_loss, val_loss, RULES)
    assert diagnosis.state == "overfitting" and diagnosis.epoch == 8


def test_losses_falling_together_are_healthy() -> None:
    curve = 2.0 * np.exp(-0.3 * EPOCHS)
    assert diagnose(curve, curve * 1.1, RULES).state == "healthy"


def test_a_small_rise_within_tolerance_is_still_healthy() -> None:
    train_loss = 2.0 * np.exp(-0.3 * EPOCHS)
    val_loss = np.r_[train_loss[:15], train_loss[14] * np.array([1.01, 1.02, 1.03, 1.04, 1.05])]
    assert diagnose(train_loss, val_loss, RULES).state == "healthy"


def test_metrics_on_a_known_example() -> None:
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    metrics = classification_metrics(y, proba, ["a", "b"], n_bins=10)
    assert metrics["accuracy"] == 0.75
    assert metrics["per_class"] == {
        "a": {"precision": pytest.approx(2 / 3), "recall": 1.0},
        "b": {"precision": 1.0, "recall": 0.5},
    }
    # bins: 0.9 (right), 0.6 (right), 0.7 (right), 0.8 (wrong) -> |1-.9|+|1-.6|+|1-.7|+|0-.8| / 4
    assert expected_calibration_error(y, proba, 10) == pytest.approx((0.1 + 0.4 + 0.3 + 0.8) / 4)
    assert metrics["roc_auc_ovr"] == pytest.approx(0.75)


@pytest.mark.slow
def test_evaluate_stage_writes_metrics_plots_and_appends_to_the_train_run(
    processed, trained_model
) -> None:
    from mlflow import MlflowClient

    params = trained_model
    argv = ["--params", str(params), "--data", str(processed), "--model", "model.pt"]
    argv += ["--run", "train_run.json", "--history", "train_history.csv"]
    argv += ["--metrics", "evaluate.json", "--plots", "plots"]
    assert evaluate(argv) == 0
    metrics = read_json("plots/all_metrics.json")  # every number; evaluate.json: the headline
    assert read_json("evaluate.json") == {
        "test": {k: metrics["test"][k] for k in ("accuracy", "macro_f1")}
    }
    assert set(metrics) == {"test", "baseline"}
    assert set(metrics["test"]) == {
        "accuracy",
        "macro_f1",
        "log_loss",
        "roc_auc_ovr",
        "ece",
        "per_class",
    }
    assert set(metrics["test"]["per_class"]) == {"5", "6", "7", "8", "9"}
    assert set(metrics["baseline"]) == {"logistic_regression", "svc", "mlp"}
    assert all(0.5 < v <= 1 for v in metrics["baseline"].values())
    for name in (
        "confusion.csv",
        "history.csv",
        "reliability.csv",
        "per_class.csv",
        "curves.png",
        "confusion_matrix.png",
        "per_class.png",
        "reliability.png",
    ):
        assert (Path("plots") / name).stat().st_size > 0, name
    run = MlflowClient().get_run(read_json("train_run.json")["run_id"])
    assert run.data.metrics["test/accuracy"] == metrics["test"]["accuracy"]
    assert run.data.metrics["baseline/svc"] == metrics["baseline"]["svc"]
    assert (
        run.data.metrics["test/per_class/7/recall"] == metrics["test"]["per_class"]["7"]["recall"]
    )
    history = pd.read_csv("train_history.csv")
    expected = diagnose(history["train/loss"], history["val/loss"], DiagnosisConfig())
    assert run.data.tags["trackflow.diagnosis"] == expected.state
    epochs = FAST_TRAINING["train.max_epochs"]
    assert list(history["epoch"]) == list(range(1, epochs + 1))
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluate")}
    assert "evaluate/curves.png" in artifacts
    # The run's description: the train stage's headline numbers, then the test accuracy.
    note = run.data.tags["mlflow.note.content"]
    train_part, evaluate_part = note.split("\n\n")
    assert train_part.startswith(f"**train**: scratch, {epochs} epochs, best val loss ")
    assert evaluate_part.startswith(
        f"**evaluate**: test acc {metrics['test']['accuracy']:.4f}, macro-F1 "
    )
    set_note = {"mlflow.note.content": note + "\n\nChecked by hand."}
    set_tags(setup_tracking(load_params(params).base.mlflow), run.info.run_id, set_note)
    assert evaluate(argv) == 0  # evaluated again: its paragraph is replaced, not added
    again = MlflowClient().get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert again == note + "\n\nChecked by hand."


def test_evaluate_needs_a_trained_model(processed, write_params, capsys) -> None:
    code = evaluate(
        [
            "--params",
            str(write_params()),
            "--data",
            str(processed),
            "--model",
            "no.pt",
            "--run",
            "no.json",
            "--history",
            "no.csv",
            "--metrics",
            "e.json",
            "--plots",
            "plots",
        ]
    )
    assert code == 3 and "run the train stage first" in capsys.readouterr().err
    assert not Path("e.json").exists()
