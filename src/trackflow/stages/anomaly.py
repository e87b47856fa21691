"""Anomaly: detectors fitted on healthy target training rows, tested on anomalies none of them saw.

Each detector in ``anomaly.detectors`` is fitted on the target training rows (in the network's
embedding, the scaled features before PCA, or the raw features), and its threshold set on the
target validation rows at ``anomaly.target_fpr``. Held-out anomalies: the source task's classes,
and target rows corrupted by Gaussian noise, inverted intensities, constant rows and feature
scaling (corrupted in raw feature space, then preprocessed like any input). Validation anomalies
choose the detector saved to ``--detector-out`` (``anomaly.detector: best``: the highest AUROC on
the kind of validation anomaly it detects worst); test anomalies give AUROC, AUPRC and recall at
the threshold, per anomaly type and overall, for every detector: in ``all_metrics.json`` and
``detectors.csv`` in ``--plots`` beside the figures, and on the train run. ``--metrics`` (what
``dvc metrics show`` prints) holds the saved detector's test AUROC on all held-out anomalies, on
the real ones (classes of the source task) and on the corruption it catches worst.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trackflow.cli_support import add_params_argument, stage_main
from trackflow.io import require_inputs

log = logging.getLogger(__name__)

REAL = "source_classes"  # anomalies that are real rows: classes the target model never saw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--splits", type=Path, required=True, help="folder written by split")
    parser.add_argument("--preprocessor", type=Path, required=True, help="fitted preprocessor")
    parser.add_argument("--model", type=Path, required=True, help="target model (train stage)")
    parser.add_argument("--run", type=Path, required=True, help="train stage's run JSON file")
    parser.add_argument("--detector-out", type=Path, required=True, help="detector file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="headline metrics JSON file")
    parser.add_argument(
        "--plots", type=Path, required=True, help="folder for figures, data and all_metrics.json"
    )


def run(args: argparse.Namespace) -> None:
    import joblib

    from trackflow.config import load_params
    from trackflow.io import atomic_outputs, read_json, read_table, write_json
    from trackflow.learn import anomaly as an
    from trackflow.learn.networks import load_classifier
    from trackflow.stages.scoring import log_to_run
    from trackflow.tracking import setup_tracking, update_note

    params = load_params(args.params)
    config = params.anomaly
    require_inputs(args.model, args.run, made_by="train")
    network, _ = load_classifier(args.model)
    require_inputs(args.preprocessor, args.splits / "summary.json", made_by="preprocess")
    names = read_json(args.splits / "summary.json")["parts"]
    raw = {name: read_table(args.splits / f"{name}.parquet") for name in names}
    sets = an.anomaly_sets(raw, params.data.label_column, config, params.base.seed)
    preprocessor = joblib.load(args.preprocessor)
    report = an.evaluate_detectors(sets, preprocessor, network, config, params.base.seed)
    tracking = setup_tracking(params.base.mlflow)
    run_id = read_json(args.run)["run_id"]
    outputs = (args.detector_out, args.metrics, args.plots)
    with atomic_outputs(*outputs) as (detector_file, metrics_file, plots):
        plots.mkdir()
        joblib.dump(report.selected_bundle(), detector_file)
        write_json(headline(report.metrics, report.selected), metrics_file)
        write_json(report.metrics, plots / "all_metrics.json")
        report.table().to_csv(plots / "detectors.csv", index=False)
        an.plot_histograms(report, plots / "score_histograms.png")
        an.plot_roc(report, plots / "roc_curves.png")
        tags = {
            "anomaly_detector": report.selected,
            "anomaly_threshold": f"{report.detectors[report.selected].threshold_:.6g}",
        }
        log_to_run(tracking, run_id, {"anomaly": report.metrics}, tags, plots, "anomaly")
        auroc = report.metrics[report.selected]["all"]["auroc"]
        note = f"detector {report.selected}, test AUROC {auroc:.3f} (all held-out anomalies)."
        update_note(tracking, run_id, "anomaly", note)
    log.info(
        "anomaly detectors (test AUROC, all anomalies): %s; saved %s",
        {n: round(m["all"]["auroc"], 4) for n, m in report.metrics.items()},
        report.selected,
    )


def headline(metrics: dict[str, dict[str, dict[str, float]]], detector: str) -> dict[str, Any]:
    """The saved detector's test AUROC, the same keys whatever the data.

    On all held-out anomalies, on the real ones (null without a source task) and on the
    corruption it detects worst.
    """
    per_kind = metrics[detector]
    corruptions = {k: v["auroc"] for k, v in per_kind.items() if k not in (REAL, "all")}
    return {
        "detector": detector,
        "auroc": per_kind["all"]["auroc"],
        "auroc_real": per_kind[REAL]["auroc"] if REAL in per_kind else None,
        "auroc_worst_corruption": min(corruptions.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
