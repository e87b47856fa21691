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


def check_rows(
    frame: pd.DataFrame, columns: Sequence[str], allow_nan: bool = False
) -> pd.DataFrame:
    """The rows as float64 in the model's column order, or an error naming everything wrong.

    Args:
        frame: Rows to score, shape (n_rows, n_columns), with the raw feature columns by name.
        columns: The feature columns the model was trained on, in order.
        allow_nan: Let NaN (a missing value) through, for a model that imputes; infinities are
            refused either way.

    Raises:
        InputError: The frame is not a table, is empty, misses or adds columns, has non-numeric
            columns, or holds NaN/inf.
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
    if allow_nan:  # a column of nothing but missing values (JSON nulls) is an empty number column
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
    return pd.DataFrame(values, columns=expected, index=frame.index)
