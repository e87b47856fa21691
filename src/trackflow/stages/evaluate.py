"""Evaluate: held-out metrics, figures, curve diagnosis and baselines, logged to the train run.

Scores the target model on the target test rows: accuracy, macro-F1, per-class precision and
recall, log loss, one-vs-rest ROC-AUC, expected calibration error; for an ensemble, each member's
accuracy and the ensemble's gain over the best member. Writes the headline (test accuracy,
macro-F1, an ensemble's gain) to ``--metrics`` (what ``dvc metrics show`` prints), every number
to ``all_metrics.json`` in ``--plots`` beside the figures and their data, and logs everything to
the training candidate's MLflow run (``--run``), with the diagnosis of its loss curves as a tag.
scikit-learn baselines fitted on the same features and split are logged beside the model's accuracy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.cli_support import add_params_argument, stage_main
from trackflow.io import require_inputs

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "macro_f1", "ensemble_gain")  # of the test rows, in --metrics, if any
HISTORY_COLUMNS = {
    "train/loss": "train_loss",
    "val/loss": "val_loss",
    "train/acc": "train_acc",
    "val/acc": "val_acc",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--data", type=Path, required=True, help="folder written by preprocess")
    parser.add_argument("--model", type=Path, required=True, help="target model (train stage)")
    parser.add_argument("--run", type=Path, required=True, help="train stage's run JSON file")
    parser.add_argument("--history", type=Path, required=True, help="train stage's epoch CSV")
    parser.add_argument("--metrics", type=Path, required=True, help="headline metrics JSON file")
    parser.add_argument(
        "--plots", type=Path, required=True, help="folder for figures, data and all_metrics.json"
    )


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    from trackflow.config import load_params
    from trackflow.io import atomic_outputs, read_json, write_json
    from trackflow.learn import evaluation as ev
    from trackflow.learn.networks import (
        load_classifier,
        member_count,
        member_probas,
        predict_proba,
    )
    from trackflow.stages.scoring import labelled_arrays, log_to_run
    from trackflow.tracking import setup_tracking, update_note

    params = load_params(args.params)
    require_inputs(args.model, args.run, args.history, made_by="train")
    network, meta = load_classifier(args.model)
    classes = meta["classes"]
    x_test, y_test = labelled_arrays(args.data / "target_test.parquet", meta)
    proba = predict_proba(network, x_test)
    metrics = {
        "test": ev.classification_metrics(y_test, proba, classes, params.evaluate.calibration_bins)
    }
    if member_count(network) > 1:
        metrics["test"] |= ev.ensemble_gain(y_test, proba, member_probas(network, x_test))
    if params.evaluate.baselines:
        x_train, y_train = labelled_arrays(args.data / "target_train.parquet", meta)
        metrics["baseline"] = ev.baseline_accuracies(
            x_train, y_train, x_test, y_test, params.base.seed
        )
    tracking = setup_tracking(params.base.mlflow)
    run_id = read_json(args.run)["run_id"]
    history = pd.read_csv(args.history).rename(columns=HISTORY_COLUMNS)
    history = history[["epoch", *HISTORY_COLUMNS.values()]]
    diagnosis = ev.diagnose(history["train_loss"], history["val_loss"], params.evaluate.diagnosis)
    pred = proba.argmax(axis=1)
    reliability = ev.reliability_table(y_test, proba, params.evaluate.calibration_bins)
    per_class = pd.DataFrame(metrics["test"]["per_class"]).T.rename_axis("class").reset_index()
    with atomic_outputs(args.metrics, args.plots) as (metrics_file, plots):
        plots.mkdir()
        headline = {k: metrics["test"][k] for k in HEADLINE if k in metrics["test"]}
        write_json({"test": headline}, metrics_file)
        write_json(metrics, plots / "all_metrics.json")
        ev.confusion_table(y_test, pred, classes).to_csv(plots / "confusion.csv", index=False)
        history.to_csv(plots / "history.csv", index=False)
        per_class.to_csv(plots / "per_class.csv", index=False)
        reliability.to_csv(plots / "reliability.csv", index=False)
        ev.plot_confusion(y_test, pred, classes, plots / "confusion_matrix.png")
        ev.plot_curves(history, diagnosis, plots / "curves.png")
        ev.plot_per_class(metrics["test"]["per_class"], plots / "per_class.png")
        ev.plot_reliability(reliability, metrics["test"]["ece"], plots / "reliability.png")
        tags = {"diagnosis": diagnosis.state, "diagnosis_reason": diagnosis.reason}
        log_to_run(tracking, run_id, metrics, tags, plots, "evaluate")
        update_note(tracking, run_id, "evaluate", _summary(metrics["test"], diagnosis.state))
    log.info(
        "test accuracy %.4f, macro-F1 %.4f, ECE %.4f; baselines %s; diagnosis: %s (%s)",
        metrics["test"]["accuracy"],
        metrics["test"]["macro_f1"],
        metrics["test"]["ece"],
        metrics.get("baseline", {}),
        diagnosis.state,
        diagnosis.reason,
    )


def _summary(test: dict[str, float], diagnosis: str) -> str:
    """The headline numbers, the evaluate stage's part of the run's description."""
    return (
        f"test acc {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}, "
        f"ECE {test['ece']:.3f}; curves: {diagnosis}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
