"""Checking a table of raw rows against the feature columns a model was trained on.

Shared by everything that scores rows (the packaged model, batch scoring, the REST service), so a
bad table gets the same message wherever it arrives. Only pandas and numpy: no model needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from trackflow.errors import DataError, preview


class InputError(DataError):
    """Rows to score do not match the model's input schema."""


#: Accepted range of a raw value, in units of the fitted scaler: at most this far from the training
#: data's centre once scaled (a billion standard deviations for the standard scaler). Far beyond
#: any real measurement, and leaves the float32 network and detector a wide margin before overflow.
MAX_SCALED = 1e9


def check_rows(
    frame: pd.DataFrame,
    columns: Sequence[str],
    allow_nan: bool = False,
    limits: tuple[np.ndarray, np.ndarray] | None = None,
) -> pd.DataFrame:
    """The rows as float64 in the model's column order, or an error naming everything wrong.

    Args:
        frame: Rows to score, shape (n_rows, n_columns), with the raw feature columns by name.
        columns: The feature columns the model was trained on, in order.
        allow_nan: Let NaN (a missing value) through, for a model that imputes; infinities are
            refused either way.
        limits: Lowest and highest value each column takes, shape (n_features,) each
            (:func:`check_range`); None: any finite value.

    Raises:
        InputError: The frame is not a table, is empty, misses or adds columns, has non-numeric
            columns, or holds NaN/inf or values out of ``limits``.
    """
    if not isinstance(frame, pd.DataFrame):
        raise InputError(f"expected a table (pandas DataFrame) of rows, got {type(frame).__name__}")
    names = [str(c) for c in frame.columns]
    expected = list(columns)
    missing = [c for c in expected if c not in set(names)]
    extra = [c for c in names if c not in set(expected)]
    problems = []
    if missing:
        problems.append(f"missing columns: {preview(missing)}")
    if extra:
        problems.append(f"unexpected columns: {preview(extra)}")
    if len(set(names)) != len(names):
        problems.append("duplicate column names")
    if problems:
        raise InputError(
            "; ".join(problems) + f". The model takes exactly these {len(expected)} columns: "
            f"{preview(expected)}"
        )
    if frame.empty:
        raise InputError("no rows to score: the table is empty")
    if names != expected:
        frame = frame.set_axis(names, axis=1)[expected]
    # A column of nothing but missing values (JSON nulls) is a number column of missing values:
    # taken if the model imputes, else refused below as missing values, naming rows.
    empty = [c for c in expected if frame[c].dtype == object and frame[c].isna().all()]
    frame = frame.astype(dict.fromkeys(empty, np.float64)) if empty else frame
    wrong = [
        f"{column} ({dtype})"
        for column, dtype in zip(expected, frame.dtypes, strict=True)
        if getattr(dtype, "kind", "O") not in "iuf"  # ints and floats; not bool, text, dates
    ]
    if wrong:
        raise InputError(f"non-numeric columns: {preview(wrong)}; every feature must be a number")
    values = frame.to_numpy(dtype=np.float64)
    bad = np.isinf(values) if allow_nan else ~np.isfinite(values)
    if bad.any():
        rows, cols = np.nonzero(bad)
        cells = [
            f"row {frame.index[r]!s} column {expected[c]}" for r, c in zip(rows, cols, strict=True)
        ]
        what = "infinite values" if allow_nan else "NaN or infinite values"
        raise InputError(f"{what} at {preview(cells, limit=4)}")
    if limits is not None:
        check_range(values, expected, limits, frame.index)
    return pd.DataFrame(values, columns=expected, index=frame.index)


def check_range(
    values: np.ndarray,
    columns: Sequence[str],
    limits: tuple[np.ndarray, np.ndarray],
    index: Sequence[object] | None = None,
) -> None:
    """Refuse values out of the range the model takes, naming each row and column.

    Args:
        values: Rows as float64, shape (n_rows, n_features), columns in the model's order; NaN
            (a missing value) passes.
        columns: The model's feature columns, in order.
        limits: Lowest and highest value of each column, shape (n_features,) each.
        index: Row labels for the message; default: positions.

    Raises:
        InputError: A value is below its column's lowest or above its highest.
    """
    low, high = limits
    bad = (values < low) | (values > high)
    if not bad.any():
        return
    rows, cols = np.nonzero(bad)
    cells = [
        f"row {r if index is None else index[r]!s} column {columns[c]} "
        f"({values[r, c]:.6g}, not in {low[c]:.6g} to {high[c]:.6g})"
        for r, c in zip(rows, cols, strict=True)
    ]
    raise InputError(
        f"values out of the model's range at {preview(cells, limit=4, width=100)}; it takes "
        f"values up to {MAX_SCALED:g} times the training data's spread from its centre: check "
        "the units of these columns"
    )
