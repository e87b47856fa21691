"""Batch scoring: a CSV or Parquet table of new rows in, predictions and a drift report out.

For ``new.csv`` (or ``new.parquet``) the outputs go next to it, written all together or not at all:

- ``new.scored.csv``: the input rows, every input column kept (ids pass through), plus the packaged
  model's ``label``, ``proba_<class>``, ``anomaly_score`` and ``is_anomaly``;
- ``new.drift.json``: the batch against the model's training profile
  (:func:`trackflow.data.drift.compare_to_profile`): which drift rules fired, and the batch's
  counts.

A scored batch is recorded as a run of its own experiment, ``<experiment>-scoring``
(:func:`log_batch_run`), named ``batch-score-<file>-v<version>``.

A table the model cannot score (missing feature columns, non-numeric values, infinities, missing
values unless the model imputes them, no rows, not a table) is refused with an
:class:`~trackflow.data.inputs.InputError` before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from trackflow.config import BatchConfig
from trackflow.data.drift import AnomalyCount, DriftReport, compare_to_profile
from trackflow.data.inputs import InputError
from trackflow.errors import ConfigError
from trackflow.io import atomic_outputs, write_json

if TYPE_CHECKING:
    from trackflow.registry.loading import LoadedVersion
    from trackflow.tracking import Tracking

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class BatchResult:
    """A scored batch: the rows with their scores, the drift report and the counts."""

    scored: pd.DataFrame
    drift: DriftReport
    counts: dict[str, Any]

    def report(self) -> dict[str, Any]:
        """What ``<name>.drift.json`` holds: counts, then the drift report."""
        return {"counts": self.counts, "drift": self.drift.to_dict()}


def output_paths(batch: str | Path) -> tuple[Path, Path]:
    """Outputs of scoring ``batch``, beside it: ``<stem>.scored<suffix>``, ``<stem>.drift.json``."""
    batch = Path(batch)
    scored = batch.with_name(f"{batch.stem}.scored{batch.suffix}")
    return scored, batch.with_name(f"{batch.stem}.drift.json")


def read_batch(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet table of rows to score.

    Raises:
        InputError: The file is missing, has another suffix, is empty or cannot be parsed.
    """
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(f"cannot read {str(path)!r}: use a .csv or .parquet file")
    if not path.is_file():
        raise InputError(f"batch file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise InputError(f"batch file {str(path)!r} is empty: no header, no rows") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise InputError(f"batch file {str(path)!r} cannot be read as a table: {exc}") from None


def score_batch(
    frame: pd.DataFrame, model: LoadedVersion, config: BatchConfig | None = None
) -> BatchResult:
    """Score a batch and compare it with the model's training profile.

    Args:
        frame: Rows, shape (n_rows, n_columns): the model's feature columns plus any others
            (ids, a label), which are passed through to the output unchanged.
        model: The model to score with.
        config: The drift rules' thresholds (``params.batch``); default
            :class:`~trackflow.config.BatchConfig`'s. The anomaly-rate rule compares with the
            false-positive rate the model's detector was calibrated at.

    Raises:
        InputError: Feature columns are missing, non-numeric, infinite or (unless the model
            imputes) missing, there are no rows, or an input column has the name of an output
            column.
    """
    features = [str(c) for c in frame.columns if str(c) in set(model.scorer.columns)]
    rows = model.scorer.check(frame[features] if features else frame)
    scores = model.scorer.score(rows)
    clash = sorted(set(map(str, frame.columns)) & set(scores.columns))
    if clash:
        raise InputError(
            f"input columns {clash} have the names of output columns; rename them to score "
            "this batch"
        )
    n_anomalies = int(scores["is_anomaly"].sum())
    expected = model.scorer.detector.get("target_fpr")
    anomalies = None if expected is None else AnomalyCount(n_anomalies, float(expected))
    drift = compare_to_profile(model.profile, rows, config, anomalies)
    counts = {
        "n_rows": len(scores),
        "n_anomalies": n_anomalies,
        "anomaly_rate": float(scores["is_anomaly"].mean()),
        "labels": {str(k): int(v) for k, v in scores["label"].value_counts().sort_index().items()},
    }
    scored = frame.copy()
    for column in scores.columns:  # positional: the index may repeat row ids
        scored[column] = scores[column].to_numpy()
    return BatchResult(scored, drift, counts)


def write_batch_outputs(result: BatchResult, batch: str | Path) -> tuple[Path, Path]:
    """Write the scored rows and the drift report next to ``batch``, both or neither.

    Returns:
        The scored table's path and the report's path.
    """
    scored_path, report_path = output_paths(batch)
    with atomic_outputs(scored_path, report_path) as (scored_tmp, report_tmp):
        scored = result.scored
        if scored_path.suffix.lower() == ".csv":  # a read CSV has a plain range index: not kept
            scored.to_csv(scored_tmp, index=not isinstance(scored.index, pd.RangeIndex))
        else:
            scored.to_parquet(scored_tmp)
        write_json(result.report(), report_tmp)
    return scored_path, report_path


def load_model(tracking: Tracking, uri: str) -> LoadedVersion:
    """Load a packaged model to score with (:func:`~trackflow.registry.loading.load_version`).

    An alias is resolved to its version first: the version logged with the scores is the one that
    scored, even if the alias moves meanwhile.

    Raises:
        ConfigError: The URI names nothing in the registry, or not a trackflow packaged model
            packaged with its training profile.
    """
    from mlflow.exceptions import MlflowException

    from trackflow.registry.loading import NotPackagedModel, UnloadableVersion, load_version

    try:
        model = load_version(tracking, uri)
    except MlflowException as exc:
        raise ConfigError(f"cannot load model {uri!r}: {exc.message}") from None
    except UnloadableVersion as exc:
        if not isinstance(exc.error, MlflowException):
            raise exc.error from None  # corrupt files: the error itself
        raise ConfigError(f"cannot load model {uri!r}: {exc.error.message}") from None
    except NotPackagedModel:
        model = None
    if model is None or model.profile is None:
        raise ConfigError(f"model {uri!r} is not a trackflow packaged model (no scorer/profile)")
    return model


def log_batch_run(
    tracking: Tracking,
    result: BatchResult,
    model: LoadedVersion,
    batch: str | Path,
    outputs: tuple[Path, Path],
    tags: dict[str, str] | None = None,
    source: str | None = None,
) -> str:
    """Record a scored batch as an MLflow run: counts, anomaly rate, drift; the report attached.

    Args:
        tracking: The store, set up for the scoring experiment
            (:func:`~trackflow.tracking.scoring_experiment`), not the candidates'.
        result: The scored batch.
        model: The model that scored it.
        batch: The batch's file.
        outputs: The scored table and the drift report written beside it.
        tags: More tags (e.g. an orchestrator's run id).
        source: Entry point recorded as ``mlflow.source.name`` (e.g. ``trackflow score``).

    Returns:
        The run's id.
    """
    from trackflow.tracking import NOTE_TAG, TAG_PREFIX, log_metrics, tracked_run

    counts, drift = result.counts, result.drift
    run_tags = {
        TAG_PREFIX + "stage": "batch_score",
        TAG_PREFIX + "model_uri": model.uri,
        TAG_PREFIX + "model_version": str(model.version),
        TAG_PREFIX + "batch": str(Path(batch).absolute()),
        TAG_PREFIX + "scored": str(outputs[0].absolute()),
        TAG_PREFIX + "drift_detected": str(drift.detected).lower(),
        TAG_PREFIX + "drift_rules": ",".join(rule.name for rule in drift.fired) or "none",
        NOTE_TAG: batch_summary(result, model),
    } | (tags or {})
    metrics = {
        "batch/n_rows": counts["n_rows"],
        "batch/n_anomalies": counts["n_anomalies"],
        "batch/anomaly_rate": counts["anomaly_rate"],
        "drift/detected": float(drift.detected),
        "drift/share_drifted": drift.share,
        "drift/max_psi": drift.max_psi,
    }
    metrics |= {f"drift/rule/{rule.name}": float(rule.fired) for rule in drift.rules}
    metrics |= {f"batch/label_count/{_key(k)}": v for k, v in counts["labels"].items()}
    metrics |= {f"drift/psi/{_key(name)}": f.psi for name, f in drift.features.items()}
    with tracked_run(tracking, batch_run_name(batch, model), run_tags, source) as run_id:
        log_metrics(tracking, run_id, metrics)
        tracking.client.log_artifact(run_id, str(outputs[1]), "batch")
    return run_id


def batch_run_name(batch: str | Path, model: LoadedVersion) -> str:
    """``batch-score-<file stem>[-v<version>]``: what was scored, with which version."""
    version = f"-v{model.version}" if model.version is not None else ""
    return f"batch-score-{Path(batch).stem}{version}"


def batch_summary(result: BatchResult, model: LoadedVersion) -> str:
    """The headline numbers of a scored batch in one line: rows, anomaly rate, drift verdict."""
    counts = result.counts
    version = f" (version {model.version})" if model.version is not None else ""
    return (
        f"{counts['n_rows']} rows scored by {model.uri}{version}: "
        f"{counts['n_anomalies']} anomalies ({counts['anomaly_rate']:.1%}); "
        f"drift {result.drift.summary()}."
    )


def _key(name: str) -> str:
    """A column name as part of an MLflow metric key (letters, digits, ``_-. /`` only)."""
    return re.sub(r"[^\w\-. /]", "_", name)
