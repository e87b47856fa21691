"""Score a CSV/Parquet batch with a registered model: predictions, anomaly flags, drift report.

Writes ``<batch>.scored.<csv|parquet>`` (the input rows plus ``label``, ``proba_<class>``,
``anomaly_score``, ``is_anomaly``) and ``<batch>.drift.json`` next to the batch, both or neither,
and records counts, the anomaly rate and drift as a run of the ``<experiment>-scoring`` MLflow
experiment. The batch is flagged as drifted when any rule of ``params.batch`` fires (share of
drifted features, one severe PSI, an anomaly rate far above the validation rate); the output names
the rules that fired.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trackflow.cli_support import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("batch", type=Path, help="table of new rows (.csv or .parquet)")
    add_params_argument(parser)
    parser.add_argument(
        "--model",
        help="model URI (default: models:/<params model.name>@<serve.alias>, the served version)",
    )
    parser.add_argument(
        "--psi-threshold", type=float, help="a feature drifted above this PSI (params: batch.)"
    )
    parser.add_argument(
        "--drift-share", type=float, help="the batch drifted when this share of features did"
    )
    parser.add_argument("--no-log", action="store_true", help="do not record an MLflow run")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.registry.uris import served_model_uri
    from trackflow.serving.batch import (
        load_model,
        log_batch_run,
        read_batch,
        score_batch,
        write_batch_outputs,
    )
    from trackflow.tracking import scoring_experiment, setup_tracking

    options = {"psi_threshold": args.psi_threshold, "drift_share": args.drift_share}
    overrides = {f"batch.{k}": v for k, v in options.items() if v is not None}
    params = load_params(args.params, overrides)  # a bad option fails like a bad param
    frame = read_batch(args.batch)  # a bad file fails before the model loads
    tracking = setup_tracking(params.base.mlflow)
    model = load_model(tracking, args.model or served_model_uri(params))
    result = score_batch(frame, model, params.batch)
    outputs = write_batch_outputs(result, args.batch)
    counts, drift = result.counts, result.drift
    print(f"scored {counts['n_rows']} rows with {model.uri} (version {model.version})")
    print(f"anomalies: {counts['n_anomalies']} ({counts['anomaly_rate']:.1%})")
    fired = drift.fired
    print(f"drift: {'DETECTED by ' + ', '.join(r.name for r in fired) if fired else 'none'}")
    for rule in drift.rules:
        print(f"  {rule.name}: {'FIRED' if rule.fired else 'no'}: {rule.reason}")
    if drift.drifted_features:
        print(f"most drifted features: {', '.join(drift.drifted_features[:5])}")
    print(f"wrote {outputs[0]} and {outputs[1]}")
    if not args.no_log:
        experiment = scoring_experiment(params.base.mlflow)
        scoring = setup_tracking(params.base.mlflow, experiment)
        run_id = log_batch_run(
            scoring, result, model, args.batch, outputs, source="trackflow score"
        )
        print(f"MLflow run {run_id} (experiment {experiment!r})")
