"""Preprocess: fit scaling + PCA on training rows, transform every split, record the spectrum.

Writes the transformed parts to ``<out>/``, the fitted pipeline to ``--preprocessor`` (joblib), the
``explained_variance`` metrics to ``--metrics`` and the spectrum (``explained_variance.csv``,
``scree.png``) to ``--plots``; logs params, metrics and plots to an MLflow run tagged with the data
digest. Outputs appear all together or not at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.stages import add_params_argument, stage_main

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--splits", type=Path, required=True, help="folder written by split")
    parser.add_argument("--out", type=Path, required=True, help="folder for transformed parts")
    parser.add_argument("--preprocessor", type=Path, required=True, help="fitted pipeline file")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--plots", type=Path, required=True, help="folder for plot data/images")


def run(args: argparse.Namespace) -> None:
    import joblib

    from trackflow.config import flatten_params, load_params
    from trackflow.io import atomic_outputs, read_json, read_table, write_json, write_table
    from trackflow.preprocessing import (
        fit_preprocessor,
        plot_spectrum,
        training_features,
        transform_table,
        variance_metrics,
        variance_spectrum,
    )
    from trackflow.tracking import TAG_PREFIX, log_metrics, log_params, setup_tracking, tracked_run

    params = load_params(args.params)
    label = params.data.label_column
    summary = read_json(args.splits / "summary.json")
    parts = {name: read_table(args.splits / f"{name}.parquet") for name in summary["parts"]}
    features = training_features(parts, params.preprocess.fit_on, label)
    preprocessor = fit_preprocessor(
        features, params.preprocess, params.data.non_finite == "impute", params.base.seed
    )
    spectrum = variance_spectrum(preprocessor, features)
    metrics = variance_metrics(preprocessor) | {"n_fit_rows": len(features)}
    tracking = setup_tracking(params.base.mlflow)
    tags = {
        TAG_PREFIX + "stage": "preprocess",
        TAG_PREFIX + "data_digest": summary["dataset_digest"],
    }
    outputs = (args.out, args.preprocessor, args.metrics, args.plots)
    with (
        atomic_outputs(*outputs) as (out, model, metrics_file, plots),
        tracked_run(tracking, "preprocess", tags) as run_id,
    ):
        out.mkdir()
        plots.mkdir()
        for name, part in parts.items():
            write_table(transform_table(preprocessor, part, label), out / f"{name}.parquet")
        joblib.dump(preprocessor, model)
        write_json(metrics, metrics_file)
        spectrum.to_csv(plots / "explained_variance.csv", index=False)
        plot_spectrum(spectrum, metrics["n_components"], plots / "scree.png")
        log_params(tracking, run_id, flatten_params(params))
        log_metrics(tracking, run_id, {f"preprocess/{k}": v for k, v in metrics.items()})
        tracking.client.log_artifacts(run_id, str(plots), artifact_path="preprocess")
    log.info(
        "preprocessor fitted on %d training rows (%s): %d features -> %d components "
        "(%.1f%% of variance); MLflow run %s",
        len(features),
        params.preprocess.fit_on,
        metrics["n_features_in"],
        metrics["n_components"],
        100 * metrics["explained_variance"],
        run_id,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
