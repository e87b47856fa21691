"""Preprocess: fit scaling + PCA on training rows, transform every split, record the spectrum.

Only the original data's training rows are fitted on (the split's ``origins.parquet``): rows of
added batches are transformed, never learned from, so adding a batch leaves the fitted pipeline as
it was. Writes the transformed parts, ``meta.json`` (dataset digest, raw feature columns) and
``row_digests.parquet`` (each row id's raw content digest) to ``<out>/``,
the fitted pipeline to ``--preprocessor`` (joblib), the explained variance and the number of
components to ``--metrics`` (what ``dvc metrics show`` prints), and every number
(``all_metrics.json``: also the input width, rows fitted on, values imputed) and the spectrum
(``explained_variance.csv``, ``scree.png``) to ``--plots``; logs
params, metrics and plots to an MLflow run tagged with the data digest. Outputs appear all
together or not at all, and a failure marks the run FAILED.
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

HEADLINE = ("explained_variance", "n_components")  # in --metrics

LOGGED_SECTIONS = ("base.", "data.", "split.", "preprocess.")


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
    from trackflow.data.batches import read_origins
    from trackflow.data.preprocessing import (
        ROW_DIGESTS_FILE,
        plot_spectrum,
        preprocess,
        row_digest_table,
    )
    from trackflow.io import atomic_outputs, read_json, read_table, write_json, write_table
    from trackflow.tracking import TAG_PREFIX, log_metrics, log_params, setup_tracking, tracked_run

    params = load_params(args.params)
    label = params.data.label_column
    require_inputs(args.splits / "summary.json", made_by="split")
    summary = read_json(args.splits / "summary.json")
    parts = {name: read_table(args.splits / f"{name}.parquet") for name in summary["parts"]}
    impute = params.data.non_finite == "impute"
    origins = read_origins(args.splits)
    result = preprocess(parts, params.preprocess, label, impute, params.base.seed, origins)
    metrics = result.metrics
    tracking = setup_tracking(params.base.mlflow)
    tags = {
        TAG_PREFIX + "stage": "preprocess",
        TAG_PREFIX + "data_digest": summary["dataset_digest"],
    }
    outputs = (args.out, args.preprocessor, args.metrics, args.plots)
    with (
        tracked_run(tracking, "preprocess", tags) as run_id,
        atomic_outputs(*outputs) as (
            out,
            model,
            metrics_file,
            plots,
        ),
    ):
        out.mkdir()
        plots.mkdir()
        for name, part in result.parts.items():
            write_table(part, out / f"{name}.parquet")
        write_table(row_digest_table(parts, label), out / ROW_DIGESTS_FILE)
        write_json(
            {
                "dataset_digest": summary["dataset_digest"],
                "raw_feature_columns": [c for c in parts["target_train"].columns if c != label],
                "label_column": label,
                "run_id": run_id,
                "batches": summary.get("batches", []),  # the added batches in these rows
            },
            out / "meta.json",
        )
        joblib.dump(result.preprocessor, model)
        write_json({k: metrics[k] for k in HEADLINE}, metrics_file)
        write_json(metrics, plots / "all_metrics.json")
        result.spectrum.to_csv(plots / "explained_variance.csv", index=False)
        plot_spectrum(result.spectrum, metrics["n_components"], plots / "scree.png")
        flat = flatten_params(params)
        log_params(
            tracking, run_id, {k: v for k, v in flat.items() if k.startswith(LOGGED_SECTIONS)}
        )
        log_metrics(tracking, run_id, {f"preprocess/{k}": v for k, v in metrics.items()})
        tracking.client.log_artifacts(run_id, str(plots), artifact_path="preprocess")
    log.info(
        "preprocessor fitted on %d original training rows (%s): %d features -> %d components "
        "(%.1f%% of variance); MLflow run %s",
        metrics["n_fit_rows"],
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
