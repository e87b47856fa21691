"""What the evaluate and anomaly stages share: reading labelled rows, appending to the train run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trackflow.config import flatten
from trackflow.io import read_table
from trackflow.tracking import TAG_PREFIX, Tracking, log_metrics, set_tags


def labelled_arrays(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Features (n_rows, n_features) and class indices (n_rows,) in the model's class order."""
    table = read_table(path)
    label = meta["label_column"]
    index = {str(c): i for i, c in enumerate(meta["classes"])}
    y = table[label].astype(str).map(index)
    return table.drop(columns=label).to_numpy(dtype=np.float32), y.to_numpy(dtype=np.int64)


def log_to_run(
    tracking: Tracking,
    run_id: str,
    metrics: dict[str, Any],
    tags: dict[str, str],
    folder: Path,
    artifact_path: str,
) -> None:
    """Append metrics (nested ones as ``a/b/c`` keys), tags and a folder of artifacts to a run."""
    log_metrics(tracking, run_id, flatten(metrics, "/"))
    set_tags(tracking, run_id, {TAG_PREFIX + k: v for k, v in tags.items()})
    tracking.client.log_artifacts(run_id, str(folder), artifact_path)
