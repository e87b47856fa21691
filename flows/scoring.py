"""The batch scoring flow: a table of new rows scored by the served version, with a drift report.

    python -m flows.scoring data/new_rows.csv            # models:/<model.name>@<serve.alias>
    python -m flows.scoring batch.parquet --model models:/trackflow/3 --psi-threshold 0.25

Loading the model and recording the MLflow run are retried on transient faults (a locked SQLite
store, an unreachable server); a bad batch fails at once, before anything is written. The run goes
to the ``<experiment>-scoring`` experiment, beside the candidates'; the report names the drift
rules that fired. A batch found drifted emits the Prefect event ``trackflow.batch.drifted`` about
the model (resource ``trackflow.model.<model.name>``): the ``retrain`` deployment of
``prefect.yaml`` is triggered by it (docs/online-learning.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.common import backoff, retry_if_transient
from trackflow.config import BatchConfig, MlflowConfig, load_params
from trackflow.errors import TrackflowError
from trackflow.pipeline.driver import repo_tracking_config
from trackflow.pipeline.report import render_batch_markdown
from trackflow.pipeline.schedule import DRIFT_EVENT, model_resource
from trackflow.registry.loading import LoadedVersion
from trackflow.registry.uris import served_model_uri
from trackflow.serving.batch import (
    BatchResult,
    load_model,
    log_batch_run,
    read_batch,
    score_batch,
    write_batch_outputs,
)
from trackflow.tracking import TAG_PREFIX, scoring_experiment, setup_tracking

ARTIFACT_KEY = "trackflow-batch-scoring"
RETRYING = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": 3,
    "retry_delay_seconds": backoff(3, 5.0),
    "retry_condition_fn": retry_if_transient,
}


@task(**RETRYING)
def load(config: MlflowConfig, uri: str) -> LoadedVersion:
    """Load the model to score with (its alias resolved to a version)."""
    return load_model(setup_tracking(config), uri)


@task(cache_policy=NO_CACHE, persist_result=False)
def score(batch: Path, model: LoadedVersion, config: BatchConfig) -> Any:
    """Check, score and compare the batch; write both outputs or none."""
    result = score_batch(read_batch(batch), model, config)
    return result, write_batch_outputs(result, batch)


@task(**RETRYING)
def record(
    config: MlflowConfig,
    result: BatchResult,
    model: LoadedVersion,
    batch: Path,
    outputs: tuple[Path, Path],
) -> str:
    """Record the scored batch in the scoring experiment, tagged with this flow run's id."""
    tags = {TAG_PREFIX + "prefect_flow_run_id": str(flow_run.id)}
    tracking = setup_tracking(config, scoring_experiment(config))
    return log_batch_run(tracking, result, model, batch, outputs, tags, source="flows.scoring")


def emit_drift(model_name: str, batch: Path, summary: dict[str, Any]) -> Any:
    """Emit ``trackflow.batch.drifted`` about registered model ``model_name``; the event sent.

    The resource is ``trackflow.model.<model_name>`` (what the ``retrain`` deployment's trigger
    matches); the payload names the batch, the version that scored it, the rules that fired and
    the anomaly rate. Inside a flow run Prefect relates the event to the run and its flow. None
    when Prefect emits no events (no API to send them to).

    Args:
        model_name: The registered model whose version scored the batch.
        batch: The batch's file.
        summary: :func:`batch_scoring_flow`'s summary of the batch.
    """
    from prefect.events import emit_event

    drift, counts = summary["drift"], summary["counts"]
    payload = {
        "batch": str(batch),
        "model_name": model_name,
        "model_uri": summary["model_uri"],
        "model_version": str(summary["model_version"]),
        "rules_fired": list(drift["rules_fired"]),
        "n_rows": counts["n_rows"],
        "anomaly_rate": counts["anomaly_rate"],
        "expected_anomaly_rate": drift.get("expected_anomaly_rate"),
        "share_drifted": drift["share_drifted"],
        "max_psi": drift["max_psi"],
        "mlflow_run_id": summary["mlflow_run_id"],
    }
    return emit_event(DRIFT_EVENT, resource=model_resource(model_name), payload=payload)


@flow(name="trackflow-batch-scoring")
def batch_scoring_flow(
    batch: str,
    model_uri: str | None = None,
    params: str = "params.yaml",
    psi_threshold: float | None = None,
    drift_share: float | None = None,
) -> dict[str, Any]:
    """Score a CSV/Parquet batch; write predictions and a drift report next to it.

    Args:
        batch: Table of new rows with the model's raw feature columns (others pass through).
        model_uri: Model to score with; default ``models:/<model.name>@<serve.alias>``, the
            version the service serves.
        params: Params file: the model name and the MLflow store (relative paths in it are
            relative to its folder).
        psi_threshold: A feature drifted when its PSI against the training profile is above
            this; default ``batch.psi_threshold``.
        drift_share: The batch drifted when at least this share of features drifted; default
            ``batch.drift_share``.

    Returns:
        Counts, anomaly rate, drift summary, output paths, the MLflow run id and the id of the
        drift event emitted (``drift_event``, None when the batch did not drift); also published
        as the markdown artifact ``trackflow-batch-scoring``.
    """
    path = Path(batch).resolve()
    params_path = Path(params).resolve()
    options = {"psi_threshold": psi_threshold, "drift_share": drift_share}
    overrides = {f"batch.{k}": v for k, v in options.items() if v is not None}
    validated = load_params(params_path, overrides)  # bad thresholds fail before the model loads
    read_batch(path)  # a missing or unreadable file fails before the model loads
    config = repo_tracking_config(params_path.parent, validated)
    model = load(config, model_uri or served_model_uri(validated))
    result, outputs = score(path, model, validated.batch)
    run_id = record(config, result, model, path, outputs)
    drift = result.drift
    summary = {
        "model_uri": model.uri,
        "model_version": model.version,
        "counts": result.counts,
        "drift": {key: value for key, value in drift.to_dict().items() if key != "features"},
        "top_features": [
            {"feature": name, **vars(feature)}
            for name, feature in sorted(drift.features.items(), key=lambda item: -item[1].psi)[:10]
        ],
        "outputs": [str(p) for p in outputs],
        "mlflow_run_id": run_id,
    }
    name = model.registered.name if model.registered else validated.model.name
    event = emit_drift(name, path, summary) if drift.detected else None
    summary["drift_event"] = str(event.id) if event else None
    if event:
        get_run_logger().info(
            "batch %s drifted (%s): emitted %s about %s (event %s)",
            path.name, ", ".join(summary["drift"]["rules_fired"]), DRIFT_EVENT, name, event.id,
        )  # fmt: skip
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=render_batch_markdown(summary),
        description="Counts, anomaly rate and drift of a scored batch",
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.scoring``: score one batch and print the summary."""
    parser = argparse.ArgumentParser(prog="python -m flows.scoring", description=__doc__)
    parser.add_argument("batch", help="table of new rows (.csv or .parquet)")
    parser.add_argument("--model", help="model URI (default: models:/<model.name>@<serve.alias>)")
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--psi-threshold", type=float, help="default: params batch.psi_threshold")
    parser.add_argument("--drift-share", type=float, help="default: params batch.drift_share")
    args = parser.parse_args(argv)
    try:
        summary = batch_scoring_flow(
            args.batch, args.model, args.params, args.psi_threshold, args.drift_share
        )
    except TrackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render_batch_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
