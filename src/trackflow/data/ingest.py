"""Reading a dataset into the canonical table, checking it, and describing it.

The canonical table has one float64 column per feature, in the source's order and with the source's
names, followed by the label column; its index holds row ids that later stages keep.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trackflow.config import BUILTIN_DATASETS, DataConfig
from trackflow.errors import DataError, plain, preview, shorten

log = logging.getLogger(__name__)

BUILTIN_LABEL_COLUMN = "target"
SEPARATORS = (",", ";", "\t", "|")
# pandas names a column with a blank header cell "Unnamed: <position>" ("Unnamed: 0.1" if taken)
_UNNAMED_FIRST = re.compile(r"(Unnamed: 0(\.\d+)?)?")


def load_bundled(name: str) -> pd.DataFrame:
    """One of scikit-learn's bundled datasets as a table; its label column is ``target``."""
    if name not in BUILTIN_DATASETS:
        raise DataError(
            f"unknown bundled dataset {name!r}; use one of {', '.join(BUILTIN_DATASETS)}"
        )
    from sklearn import datasets

    return getattr(datasets, f"load_{name}")(as_frame=True).frame


def read_source(source: str, separator: str = ",") -> pd.DataFrame:
    """Read ``sklearn:<name>`` or a CSV/Parquet file into a table.

    Args:
        source: ``sklearn:<name>`` or the path of a ``.csv`` or ``.parquet`` file.
        separator: Field separator of a CSV file.

    Raises:
        DataError: The file is missing, empty, not UTF-8, malformed, has duplicate column names, or
            is a CSV whose header is one column holding another separator.
    """
    if source.startswith("sklearn:"):
        return load_bundled(source.removeprefix("sklearn:"))
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"data file {source!r} does not exist. Put your table under data/raw/, track it with "
            "`dvc add`, and set data.source in params.yaml to its path"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {source!r} is empty (0 bytes)")
    header = _header(path, separator)
    _refuse_wrong_separator(header, separator, source)
    _refuse_duplicates(header, f"{source!r} has")
    try:
        return _read_file(path, separator)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{source!r} is not UTF-8 text ({exc.reason}); re-encode it as UTF-8"
        ) from None


def to_canonical(
    frame: pd.DataFrame, label_column: str, non_finite: str = "fail", min_classes: int = 2
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Check a raw table and return it in canonical form.

    Args:
        frame: Raw table, shape (n_rows, n_features + 1).
        label_column: Name of the class column.
        non_finite: ``"fail"`` to refuse NaN/inf in features, ``"impute"`` to keep them as NaN
            for the preprocessor to impute from training rows.
        min_classes: Fewest classes the labels must hold (a dataset 2; a batch added to one 1).

    Returns:
        The canonical table and, per feature, the number of NaN/inf values it held.

    Raises:
        DataError: Naming what is wrong with the table and how to fix it.
    """
    frame = frame.rename(columns=str).reset_index(drop=True)
    _refuse_duplicates(list(frame.columns), "the table has")
    if frame.empty:
        raise DataError("the table has no rows")
    features = _numeric_features(_features(frame, label_column))
    labels = _labels(frame[label_column], label_column, min_classes)
    counts = _non_finite_counts(features)
    _handle_non_finite(counts, non_finite)
    features = features.replace([np.inf, -np.inf], np.nan)
    canonical = features.assign(**{label_column: labels})
    canonical.index = pd.RangeIndex(len(canonical), name="row_id")
    return canonical, counts


def profile(
    table: pd.DataFrame, label_column: str, source: str, non_finite: dict[str, int]
) -> dict[str, Any]:
    """Schema and statistics of a canonical table: what later stages and drift checks compare to."""
    features = table.drop(columns=label_column)
    stats = features.describe().T
    return {
        "source": source,
        "digest": table_digest(table),
        "n_rows": len(table),
        "n_features": features.shape[1],
        "label_column": label_column,
        "label_dtype": str(table[label_column].dtype),
        "class_counts": {str(k): int(v) for k, v in table[label_column].value_counts().items()},
        "non_finite_values": non_finite,
        "features": [
            {
                "name": name,
                "dtype": str(features[name].dtype),
                "mean": _finite_or_none(stats.at[name, "mean"]),
                "std": _finite_or_none(stats.at[name, "std"]),
                "min": _finite_or_none(stats.at[name, "min"]),
                "max": _finite_or_none(stats.at[name, "max"]),
                "missing": int(features[name].isna().sum()),
            }
            for name in features.columns
        ],
    }


def table_digest(table: pd.DataFrame) -> str:
    """Content digest of a table (names, dtypes, values, row ids), stable across file formats."""
    digest = hashlib.sha256()
    digest.update(repr([(str(c), str(t)) for c, t in table.dtypes.items()]).encode())
    digest.update(pd.util.hash_pandas_object(table, index=True).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def handle_index_column(frame: pd.DataFrame, label_column: str, policy: str) -> pd.DataFrame:
    """Drop, keep or refuse a first column that is a saved row index, not a feature.

    Such a column has no name in the file (pandas writes its index under a blank header unless
    ``index=False``, and reads it back as ``Unnamed: 0``) or is named ``index`` and holds the row
    numbers (what ``reset_index()`` adds).

    Args:
        frame: Raw table as read from the source.
        label_column: Name of the class column (never taken for an index).
        policy: ``"drop"`` it with a warning, ``"keep"`` it as a feature, or ``"fail"``.

    Raises:
        DataError: ``policy`` is ``"fail"`` and the table has such a column.
    """
    name = _index_column(frame, label_column)
    if name is None or policy == "keep":
        return frame
    why = (
        "looks like a saved row index, not a feature (pandas writes its index there unless "
        "`to_csv(..., index=False)`)"
    )
    if policy == "fail":
        raise DataError(
            f"the first column {name!r} {why}. Save the table with index=False, or set "
            "data.index_column to drop (ignore it) or keep (use it as a feature)"
        )
    log.warning(
        "dropped the first column %r: it %s; set data.index_column: keep to use it as a feature",
        name,
        why,
    )
    return frame.drop(columns=name)


def ingest(config: DataConfig) -> tuple[pd.DataFrame, dict[str, Any], pd.Series]:
    """Read, check and profile the configured source and every added batch.

    Returns:
        The canonical table (the source's rows, ids 0..N-1, then each batch's rows in the order
        the batches were added), its profile (with ``batches``: name, rows and digest of each,
        when there are any), and each row's origin (:mod:`trackflow.data.batches`).
    """
    from trackflow.data.batches import ORIGIN_COLUMN, ORIGINAL

    source, non_finite = read_canonical(config)
    batches = read_batches(config, source)
    table = pd.concat([source, *batches.values()], ignore_index=True)
    table.index = pd.RangeIndex(len(table), name="row_id")
    origins = pd.Series(
        np.repeat([ORIGINAL, *batches], [len(source), *map(len, batches.values())]),
        index=table.index,
        name=ORIGIN_COLUMN,
    )
    described = profile(table, config.label_column, config.source, non_finite)
    if batches:
        described["batches"] = batch_records(table, origins)
    return table, described, origins


def read_canonical(config: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """The configured source alone, read and checked: the canonical table and its NaN/inf counts."""
    raw = read_source(config.source, config.separator)
    return to_canonical(
        handle_index_column(raw, config.label_column, config.index_column),
        config.label_column,
        config.non_finite,
    )


# --- batches of labelled rows added later (`trackflow add-batch`) --------------------------------


def batch_files(folder: str | Path | None) -> list[Path]:
    """The batch files of ``folder`` in the order they were added (their ``NNN-`` name order).

    Raises:
        DataError: A batch's ``.dvc`` file is there but its data is not (not pulled).
    """
    if folder is None or not Path(folder).is_dir():
        return []
    folder = Path(folder)
    absent = sorted(p.name for p in folder.glob("*.parquet.dvc") if not p.with_suffix("").is_file())
    if absent:
        raise DataError(
            f"batches {preview(absent)} in {str(folder)!r} are tracked by DVC but their data is "
            "not in the workspace: run `dvc pull` (or `dvc checkout`), or delete the .dvc file "
            "to drop the batch"
        )
    return sorted(folder.glob("*.parquet"))


def read_batches(config: DataConfig, reference: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every batch under ``config.batches``, by name (file stem), checked against ``reference``.

    Each is read and checked as the source is (:func:`to_canonical`), then against the
    reference's columns and classes (:func:`check_batch`); each keeps its own row ids 0..n-1.

    Raises:
        DataError: Naming the batch file and what is wrong with it.
    """
    batches = {}
    for path in batch_files(config.batches):
        try:
            frame, _ = to_canonical(
                pd.read_parquet(path), config.label_column, config.non_finite, min_classes=1
            )
            batches[path.stem] = check_batch(frame, reference, config.label_column)
        except DataError as exc:
            raise DataError(f"batch {str(path)!r}: {exc}") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"batch {str(path)!r} is not a readable Parquet file: {exc}") from None
    return batches


def check_batch(batch: pd.DataFrame, reference: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """A canonical batch in the reference's column order, with the reference's label values.

    Args:
        batch: Canonical table of new labelled rows (:func:`to_canonical`).
        reference: The dataset the batch is added to (canonical): its columns and classes.
        label_column: Name of the class column.

    Raises:
        DataError: The batch lacks a column of the reference or has one it lacks, or holds a
            label outside the reference's classes (a new class needs training from scratch).
    """
    columns = list(reference.columns)
    missing = [c for c in columns if c not in batch.columns]
    extra = [c for c in batch.columns if c not in columns]
    if missing or extra:
        found = "; ".join(
            f"{what} {preview(names)}"
            for what, names in (("missing columns", missing), ("extra columns", extra))
            if names
        )
        raise DataError(
            f"the batch's columns differ from the dataset's: {found}. A batch needs exactly the "
            f"dataset's {len(columns) - 1} feature columns and its label {label_column!r}"
        )
    known = {str(label): label for label in reference[label_column].unique()}
    labels = batch[label_column]
    unknown = sorted({str(label) for label in labels} - known.keys(), key=str)
    if unknown:
        raise DataError(
            f"the batch holds classes {preview(unknown)} that the dataset does not (its classes: "
            f"{preview(sorted(known, key=str))}). Adding a class needs a model trained from "
            "scratch: add those rows to data.source instead, or drop them from the batch"
        )
    mapped = labels.map(lambda label: known[str(label)]).astype(reference[label_column].dtype)
    return batch[columns].assign(**{label_column: mapped})


def batch_records(table: pd.DataFrame, origins: pd.Series | None) -> list[dict[str, Any]]:
    """Name, rows and content digest of each added batch in ``table``, in the order added.

    A batch's digest is :func:`table_digest` of its rows numbered from 0, as ``trackflow
    add-batch`` stored them: the same whichever rows came before it.
    """
    from trackflow.data.batches import ORIGINAL

    if origins is None:
        return []
    origins = origins.reindex(table.index)
    return [
        {"name": str(name), "rows": len(rows), "digest": table_digest(rows.reset_index(drop=True))}
        for name in origins[origins != ORIGINAL].unique()
        for rows in [table[origins == name]]
    ]


def row_keys(table: pd.DataFrame, label_column: str) -> pd.Series:
    """A content hash per row of a canonical table (features and label, not the row id).

    Equal rows give equal keys whatever their row ids and however their label was typed.
    """
    features = table.drop(columns=label_column).astype("float64") + 0.0  # -0.0 as 0.0
    keyed = features.assign(**{label_column: table[label_column].astype(str)})
    return pd.util.hash_pandas_object(keyed, index=False)


def _refuse_duplicates(columns: list[str], owner: str) -> None:
    duplicates = sorted({name for name in columns if columns.count(name) > 1})
    if duplicates:
        raise DataError(
            f"{owner} duplicate column names {duplicates}; rename them so each is unique"
        )


def _features(frame: pd.DataFrame, label_column: str) -> pd.DataFrame:
    if label_column not in frame.columns:
        hint = difflib.get_close_matches(label_column, list(frame.columns), n=1)
        guess = f" Did you mean {hint[0]!r}?" if hint else ""
        raise DataError(
            f"label column {label_column!r} is not in the table (columns: "
            f"{preview(frame.columns)}).{guess} Set data.label_column in params.yaml"
        )
    features = frame.drop(columns=label_column)
    if features.shape[1] == 0:
        raise DataError(f"the table has no feature columns besides the label {label_column!r}")
    return features


def _index_column(frame: pd.DataFrame, label_column: str) -> str | None:
    """The first column's name if it is a saved row index (see :func:`handle_index_column`)."""
    if frame.shape[1] == 0:
        return None
    first = frame.columns[0]
    if not isinstance(first, str) or first == label_column:
        return None
    if _UNNAMED_FIRST.fullmatch(first):
        return first
    return first if first == "index" and _holds_row_numbers(frame[first]) else None


def _holds_row_numbers(column: pd.Series) -> bool:
    """Whether ``column`` is 0, 1, ..., n-1 (or 1, ..., n) in order."""
    if not pd.api.types.is_integer_dtype(column):
        return False
    values = column.to_numpy()
    start = np.arange(len(values))
    return bool(np.array_equal(values, start) or np.array_equal(values, start + 1))


def _refuse_wrong_separator(header: list[str], separator: str, source: str) -> None:
    """Refuse a CSV header read as one column whose name holds another separator."""
    if len(header) != 1:
        return
    found = [sep for sep in SEPARATORS if sep != separator and sep in header[0]]
    if found:
        likely = max(found, key=header[0].count)
        raise DataError(
            f"{source!r} has a single column {shorten(header[0])!r}: its fields look separated "
            f"by {json.dumps(likely)}, not {json.dumps(separator)}. Set data.separator: "
            f"{json.dumps(likely)} in params.yaml"
        )


def _handle_non_finite(counts: dict[str, int], policy: str) -> None:
    if counts and policy == "fail":
        raise DataError(
            f"{sum(counts.values())} NaN/inf values in features {preview(counts)}. "
            "Clean the data, or set data.non_finite: impute to fill them with the training rows' "
            "median"
        )
    if counts:
        log.warning(
            "%d NaN/inf feature values in %d columns will be imputed from training rows: %s",
            sum(counts.values()),
            len(counts),
            preview(f"{name} ({n})" for name, n in counts.items()),
        )


def _header(path: Path, separator: str) -> list[str]:
    if path.suffix.lower() == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                return next(csv.reader(handle, delimiter=separator), [])
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{str(path)!r} is not UTF-8 text ({exc.reason}); re-encode it as UTF-8"
            ) from None
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:
        raise DataError(f"{str(path)!r} is not a readable Parquet file: {exc}") from None


def _read_file(path: Path, separator: str) -> pd.DataFrame:
    if path.suffix.lower() != ".csv":
        return pd.read_parquet(path)
    try:
        return pd.read_csv(path, sep=separator)
    except pd.errors.EmptyDataError:
        raise DataError(f"{str(path)!r} holds no header and no rows") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{str(path)!r} is not a well-formed CSV file: {exc}") from None


def _numeric_features(features: pd.DataFrame) -> pd.DataFrame:
    bad = [
        name
        for name, dtype in features.dtypes.items()
        if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))
    ]
    if bad:
        examples = "; ".join(_first_non_number(features[name]) for name in bad[:3])
        raise DataError(
            f"{len(bad)} feature columns are not numeric: {preview(bad)} ({examples}). "
            "Encode them as numbers, or drop them before ingesting"
        )
    return features.astype("float64")


def _first_non_number(column: pd.Series) -> str:
    """Where a non-numeric column first holds something that is not a number, for a message.

    Rows are counted from 1, below the header.
    """
    name = shorten(str(column.name))
    if not (pd.api.types.is_object_dtype(column) or pd.api.types.is_string_dtype(column)):
        return f"{name} is of type {column.dtype}"
    for position, value in enumerate(column):
        if not _reads_as_number(value):
            return f"{name} holds {shorten(str(plain(value)))!r} in data row {position + 1}"
    return f"{name} holds numbers stored as text"


def _reads_as_number(value: Any) -> bool:
    """Whether a cell is missing or reads as a number (``"10.0"`` does, ``"abc"`` does not)."""
    if value is None or value is pd.NA:
        return True
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _labels(labels: pd.Series, label_column: str, min_classes: int = 2) -> pd.Series:
    missing = int(labels.isna().sum())
    if missing:
        raise DataError(f"{missing} rows have no label in {label_column!r}; drop or label them")
    if pd.api.types.is_float_dtype(labels) and (labels == labels.round()).all():
        labels = labels.astype("int64")
    n_classes = labels.nunique()
    if n_classes < min_classes:
        raise DataError(
            f"label column {label_column!r} holds a single class ({plain(labels.iloc[0])!r}); "
            "a classifier needs at least two"
        )
    return labels


def _non_finite_counts(features: pd.DataFrame) -> dict[str, int]:
    mask = ~np.isfinite(features.to_numpy())
    counts = mask.sum(axis=0)
    return {name: int(n) for name, n in zip(features.columns, counts, strict=True) if n}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
