"""Stratified, seeded train/val/test split, and the source/target partition for transfer learning.

Rows are first split three ways, stratified by class over every class in use; each part is then
partitioned by class into the *source* task (pretraining) and the *target* task. The same row
therefore never appears in two splits, and both tasks keep the class balance of the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import pandas as pd

from trackflow.config import DataConfig, SplitConfig
from trackflow.errors import DataError, preview

SPLITS = ("train", "val", "test")
TASKS = ("source", "target")
#: An added batch with fewer rows than this goes to training whole (too few to hold out).
MIN_BATCH_SPLIT_ROWS = 10


def resolve_tasks(labels: pd.Series, config: DataConfig) -> dict[str, list[Hashable]]:
    """Map each task to its class labels, as they appear in the data.

    With no source classes there is a single, target task. Without target classes, the target task
    is every class that is not a source class. Classes listed as ints match string labels and vice
    versa.

    Raises:
        DataError: A listed class is absent from the data, or a task has fewer than two classes.
    """
    present = sorted(labels.unique().tolist(), key=str)
    by_text = {str(label): label for label in present}

    def find(listed: Sequence[Any], key: str) -> list[Hashable]:
        missing = [c for c in listed if str(c) not in by_text]
        if missing:
            raise DataError(
                f"data.{key} lists {missing}, absent from the data; its classes are {present}"
            )
        return [by_text[str(c)] for c in listed]

    source = find(config.source_classes, "source_classes") if config.source_classes else []
    if config.target_classes is not None:
        target = find(config.target_classes, "target_classes")
    else:
        target = [label for label in present if label not in source]
    tasks = {"source": source, "target": target} if source else {"target": target}
    for task, classes in tasks.items():
        if len(classes) < 2:
            raise DataError(
                f"the {task} task has {len(classes)} class(es) {classes}; it needs at least two. "
                f"Adjust data.source_classes / data.target_classes (data classes: {present})"
            )
    return tasks


def check_split_size(labels: pd.Series, config: SplitConfig) -> None:
    """Refuse data too small for a stratified three-way split, saying how many rows it needs.

    Every class needs a row in each split, and each split at least one row per class; the sizes are
    computed as scikit-learn's ``train_test_split`` does: test first, then validation from the rest.
    """
    counts = labels.value_counts()
    n_rows, n_classes = len(labels), len(counts)
    scarce = counts[counts < len(SPLITS)]
    if not scarce.empty:
        listed = preview([f"{label} ({count} rows)" for label, count in scarce.items()])
        raise DataError(
            f"classes {listed} have fewer than {len(SPLITS)} rows; a stratified "
            "train/val/test split needs at least one row of every class in each split"
        )
    sizes = _split_sizes(n_rows, config)
    if min(sizes.values()) < n_classes:
        needed = next(
            n
            for n in range(n_rows, 100 * n_rows + 1000)
            if min(_split_sizes(n, config).values()) >= n_classes
        )
        raise DataError(
            f"{n_rows} rows are too few for split fractions val={config.val_fraction}, "
            f"test={config.test_fraction} with {n_classes} classes: the split would give "
            f"{sizes} rows, and each needs at least {n_classes}. Provide at least {needed} rows "
            "or raise the fractions"
        )


def _split_sizes(n_rows: int, config: SplitConfig) -> dict[str, int]:
    n_test = math.ceil(config.test_fraction * n_rows)
    rest = n_rows - n_test
    n_val = math.ceil(config.val_fraction / (1 - config.test_fraction) * rest)
    return {"train": rest - n_val, "val": n_val, "test": n_test}


def split_table(
    table: pd.DataFrame,
    label_column: str,
    data: DataConfig,
    split: SplitConfig,
    seed: int,
    origins: pd.Series | None = None,
) -> dict[str, pd.DataFrame]:
    """Split a canonical table into ``{task}_{split}`` parts (``"target_train"``, ...).

    The original rows are split as if there were no batches, so adding a batch never moves an
    original row to another part; each batch is split on its own (:func:`split_batch`) and
    appended to the parts.

    Args:
        table: Canonical table, shape (n_rows, n_features + 1), index = row ids.
        label_column: Name of the class column.
        data: Task definition (source/target classes, fraction of target training rows kept).
        split: Validation and test fractions.
        seed: Seed of every random choice, so the same inputs give the same parts.
        origins: Each row id's origin (:mod:`trackflow.data.batches`); None: all original.

    Returns:
        One table per task and split, keeping the row ids of ``table``.
    """
    from trackflow.data.batches import ORIGINAL

    if origins is None:
        origins = pd.Series(ORIGINAL, index=table.index)
    is_original = origins.reindex(table.index) == ORIGINAL
    original = table if is_original.all() else table[is_original]
    tasks = resolve_tasks(original[label_column], data)
    parts = _split_original(original, label_column, data, split, seed, tasks)
    for name in origins[origins != ORIGINAL].unique():
        batch = table[origins.reindex(table.index) == name]
        added = split_batch(batch, label_column, tasks, split, seed)
        parts = {key: pd.concat([part, added[key]]) for key, part in parts.items()}
    return parts


def _split_original(
    table: pd.DataFrame,
    label_column: str,
    data: DataConfig,
    split: SplitConfig,
    seed: int,
    tasks: dict[str, list[Hashable]],
) -> dict[str, pd.DataFrame]:
    """The stratified three-way split of the original rows, partitioned by task."""
    in_use = _in_use(table, label_column, tasks)
    check_split_size(in_use[label_column], split)
    try:
        train, val, test = _three_way(in_use, label_column, split, seed, stratify=True)
    except ValueError as exc:  # a case check_split_size did not foresee: still the data's fault
        raise DataError(f"the data cannot be split as asked: {exc}") from None
    parts = _by_task((train, val, test), label_column, tasks)
    if data.target_train_fraction < 1:
        parts["target_train"] = _subsample(
            parts["target_train"], label_column, data.target_train_fraction, seed
        )
    return parts


def split_batch(
    batch: pd.DataFrame,
    label_column: str,
    tasks: dict[str, list[Hashable]],
    split: SplitConfig,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """Split one added batch with the same fractions as the original rows, on its own.

    Stratified by class when the batch can be (:func:`check_split_size` passes), else a plain
    seeded shuffle; a batch of fewer than :data:`MIN_BATCH_SPLIT_ROWS` rows (in use) goes to
    training whole, as too few to hold any out. Rows of classes in no task are dropped, as the
    original rows' are. ``data.target_train_fraction`` does not apply: the batch's labels were
    added to be learnt. The result depends only on the batch and ``seed``, so a batch added
    later never moves an earlier one's rows.

    Returns:
        One table per task and split, as :func:`split_table`'s, some possibly empty.
    """
    in_use = _in_use(batch, label_column, tasks)
    if len(in_use) < MIN_BATCH_SPLIT_ROWS:
        empty = in_use.iloc[:0]
        return _by_task((in_use, empty, empty), label_column, tasks)
    try:
        check_split_size(in_use[label_column], split)
        parts = _three_way(in_use, label_column, split, seed, stratify=True)
    except (DataError, ValueError):  # too few rows of some class to stratify
        parts = _three_way(in_use, label_column, split, seed, stratify=False)
    return _by_task(parts, label_column, tasks)


def _in_use(
    table: pd.DataFrame, label_column: str, tasks: dict[str, list[Hashable]]
) -> pd.DataFrame:
    """The rows of a class of some task."""
    return table[table[label_column].isin([c for classes in tasks.values() for c in classes])]


def _three_way(
    rows: pd.DataFrame, label_column: str, split: SplitConfig, seed: int, stratify: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Train, validation and test rows: test first, then validation from the rest, seeded.

    Raises:
        ValueError: ``stratify`` and a class has too few rows for it (scikit-learn's error).
    """
    from sklearn.model_selection import train_test_split

    rest, test = train_test_split(
        rows,
        test_size=split.test_fraction,
        stratify=rows[label_column] if stratify else None,
        random_state=seed,
    )
    train, val = train_test_split(
        rest,
        test_size=split.val_fraction / (1 - split.test_fraction),
        stratify=rest[label_column] if stratify else None,
        random_state=seed,
    )
    return train, val, test


def _by_task(
    splits: tuple[pd.DataFrame, ...], label_column: str, tasks: dict[str, list[Hashable]]
) -> dict[str, pd.DataFrame]:
    """``{task}_{split}`` parts of the train, val and test rows, each sorted by row id."""
    return {
        f"{task}_{name}": part[part[label_column].isin(classes)].sort_index()
        for task, classes in tasks.items()
        for name, part in zip(SPLITS, splits, strict=True)
    }


def summarize(parts: dict[str, pd.DataFrame], label_column: str) -> dict[str, Any]:
    """Row and class counts per part, as written next to the split."""
    return {
        name: {
            "rows": len(part),
            "class_counts": {str(k): int(v) for k, v in part[label_column].value_counts().items()},
        }
        for name, part in parts.items()
    }


def part_origins(parts: dict[str, pd.DataFrame], origins: pd.Series | None) -> pd.Series:
    """The origin of every row id in ``parts``, sorted by row id (all original without a record)."""
    from trackflow.data.batches import ORIGIN_COLUMN, ORIGINAL

    ids = pd.Index(sorted(set().union(*(part.index for part in parts.values()))), name="row_id")
    if origins is None:
        return pd.Series(ORIGINAL, index=ids, name=ORIGIN_COLUMN)
    return origins.reindex(ids).rename(ORIGIN_COLUMN)


def origin_counts(parts: dict[str, pd.DataFrame], origins: pd.Series) -> dict[str, dict[str, int]]:
    """Rows per origin in each part: ``{"target_test": {"original": 270, "001-x": 45}}``."""
    counts = {
        name: origins.reindex(part.index).value_counts(sort=False) for name, part in parts.items()
    }
    return {name: {str(k): int(v) for k, v in found.items()} for name, found in counts.items()}


def _subsample(part: pd.DataFrame, label_column: str, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of each class's rows (at least one), chosen with ``seed``."""
    kept = [
        rows.sample(n=max(1, round(fraction * len(rows))), random_state=seed)
        for _, rows in part.groupby(label_column, sort=True)
    ]
    return pd.concat(kept).sort_index()
