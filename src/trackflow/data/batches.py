"""Labelled batches added to the dataset after the first model, and where each row came from.

``trackflow add-batch FILE`` stores a batch of new labelled rows under ``data.batches`` (tracked by
DVC); ingest appends every batch, in the order they were added, to the source's rows. Each row's
*origin* is :data:`ORIGINAL` (the source's rows) or the name of the batch it came from; ingest and
split write it beside their tables (:data:`ORIGINS_FILE`, one row per row id), so the stages
after them can tell the original rows from the new ones: the gate scores both separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

ORIGINAL = "original"
ORIGINS_FILE = "origins.parquet"
ORIGIN_COLUMN = "origin"


def read_origins(folder: Path) -> pd.Series | None:
    """Each row id's origin in ingest's or split's output folder; None if it has no record.

    Returns:
        A string series indexed by row id, named :data:`ORIGIN_COLUMN`: :data:`ORIGINAL` or the
        name of a batch. None for a folder written before batches existed (every row original).
    """
    from trackflow.io import read_table

    path = folder / ORIGINS_FILE
    if not path.is_file():
        return None
    return read_table(path)[ORIGIN_COLUMN]
