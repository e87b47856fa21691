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
    table: pd.DataFrame, label_column: str, data: DataConfig, split: SplitConfig, seed: int
) -> dict[str, pd.DataFrame]:
    """Split a canonical table into ``{task}_{split}`` parts (``"target_train"``, ...).

    Args:
        table: Canonical table, shape (n_rows, n_features + 1), index = row ids.
        label_column: Name of the class column.
        data: Task definition (source/target classes, fraction of target training rows kept).
        split: Validation and test fractions.
        seed: Seed of every random choice, so the same inputs give the same parts.

    Returns:
        One table per task and split, keeping the row ids of ``table``.
    """
    from sklearn.model_selection import train_test_split

    tasks = resolve_tasks(table[label_column], data)
    in_use = table[table[label_column].isin([c for classes in tasks.values() for c in classes])]
    check_split_size(in_use[label_column], split)
    try:
        rest, test = train_test_split(
            in_use, test_size=split.test_fraction, stratify=in_use[label_column], random_state=seed
        )
        train, val = train_test_split(
            rest,
            test_size=split.val_fraction / (1 - split.test_fraction),
            stratify=rest[label_column],
            random_state=seed,
        )
    except ValueError as exc:  # a case check_split_size did not foresee: still the data's fault
        raise DataError(f"the data cannot be split as asked: {exc}") from None
    parts = {
        f"{task}_{name}": part[part[label_column].isin(classes)].sort_index()
        for task, classes in tasks.items()
        for name, part in zip(SPLITS, (train, val, test), strict=True)
    }
    if data.target_train_fraction < 1:
        parts["target_train"] = _subsample(
            parts["target_train"], label_column, data.target_train_fraction, seed
        )
    return parts


def summarize(parts: dict[str, pd.DataFrame], label_column: str) -> dict[str, Any]:
    """Row and class counts per part, as written next to the split."""
    return {
        name: {
            "rows": len(part),
            "class_counts": {str(k): int(v) for k, v in part[label_column].value_counts().items()},
        }
        for name, part in parts.items()
    }


def _subsample(part: pd.DataFrame, label_column: str, fraction: float, seed: int) -> pd.DataFrame:
    """Keep ``fraction`` of each class's rows (at least one), chosen with ``seed``."""
    kept = [
        rows.sample(n=max(1, round(fraction * len(rows))), random_state=seed)
        for _, rows in part.groupby(label_column, sort=True)
    ]
    return pd.concat(kept).sort_index()
