"""Rows in: a request body (JSON rows, MLflow's scoring formats, CSV) to a checked float array.

Plain JSON numbers under exactly the model's columns go straight to an array, range-checked;
anything else goes through the model's :meth:`~trackflow.registry.packaging.Scorer.check`, which
accepts or refuses it with its message (:func:`~trackflow.data.inputs.check_rows`).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd

from trackflow.data.inputs import InputError, check_range
from trackflow.errors import preview

if TYPE_CHECKING:
    from trackflow.registry.packaging import Scorer

log = logging.getLogger(__name__)

#: JSON keys of MLflow's scoring contract (``POST /invocations``), one per request.
INVOCATION_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_NUMBER_TYPES = frozenset((int, float))
_NUMBER_OR_NULL_TYPES = frozenset((int, float, type(None)))
_EXACT_INT = 2**53  # integers up to this are exact in float64


class RequestError(Exception):
    """A request the service refuses, with its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def parse_json(body: bytes) -> Any:
    """The body as JSON. ``NaN`` and ``Infinity`` literals are read, to be refused as values."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # the standard parser reads NaN/Infinity, which Python clients send and orjson refuses
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "malformed request: the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    try:  # it also reads lone surrogate escapes ("\ud800"), which are not text: orjson says so
        orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise RequestError(
            400,
            "malformed JSON: a string holds a lone surrogate escape (\\ud800-\\udfff), "
            "which is not Unicode text",
        ) from None
    return payload


def prediction_rows(body: bytes, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows of ``POST /models/NAME/predictions``: ``{"rows": [{column: number, ...}, ...]}``.

    Returns:
        The rows as ``scorer`` checks them: float64 of shape (n_rows, n_features), in the model's
        column order.

    Raises:
        RequestError: Malformed JSON (400) or more than ``max_rows`` rows (413).
        InputError: Anything else that does not fit the model (422), with ``Scorer.check``'s
            message.
    """
    payload = parse_json(body)
    if not isinstance(payload, dict) or set(payload) != {"rows"}:
        raise InputError(
            'the body must be a JSON object {"rows": [{column: number, ...}, ...]} and nothing '
            f"else, got {_describe_json(payload)}"
        )
    return records_rows(payload["rows"], scorer, max_rows)


def invocation_rows(body: bytes, media_type: str, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows of ``POST /invocations`` in any of MLflow's formats: JSON or CSV.

    JSON holds exactly one of ``dataframe_split`` (``{"columns", "data"}``),
    ``dataframe_records``, ``instances`` or ``inputs`` (a list of row objects, or an object of
    columns), and no other key (``params`` neither: the model takes none, as MLflow says too).
    """
    if media_type == "text/csv":
        return csv_rows(body, scorer, max_rows)
    if media_type != "application/json":
        raise RequestError(
            415, f"send JSON (Content-Type: application/json) or CSV (text/csv), got {media_type}"
        )
    payload = parse_json(body)
    keys = [key for key in INVOCATION_KEYS if isinstance(payload, dict) and key in payload]
    if len(keys) != 1 or len(payload) != 1:
        raise InputError(
            f"the body must be a JSON object with exactly one of {', '.join(INVOCATION_KEYS)} "
            f"and no other key; got {_describe_json(payload)}"
        )
    data = payload[keys[0]]
    if keys[0] == "dataframe_split":
        return split_rows(data, scorer, max_rows)
    if isinstance(data, dict):  # {column: [values]}
        return _checked(_frame(data, None, keys[0]), scorer, max_rows)
    return records_rows(data, scorer, max_rows)


def records_rows(records: Any, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as a list of objects ``{column: number}``, checked, in the model's order."""
    if not isinstance(records, list):
        raise InputError(f"rows must be a list of objects, got {_describe_json(records)}")
    _require_rows(len(records), max_rows)
    columns, expected = scorer.columns, set(scorer.columns)
    if all(type(row) is dict and row.keys() == expected for row in records):
        values = _plain_numbers([[row[c] for c in columns] for row in records], scorer.imputes)
        if values is not None:
            return _in_range(values, scorer)
    for number, row in enumerate(records):
        if not isinstance(row, dict):
            raise InputError(
                f"row {number} is {_describe_json(row)}; each row must be an object mapping "
                "column names to numbers"
            )
        if row.keys() != records[0].keys():
            raise InputError(
                f"row {number} does not have the columns of row 0 (missing: "
                f"{preview(c for c in records[0] if c not in row) or 'none'}; unexpected: "
                f"{preview(c for c in row if c not in records[0]) or 'none'}); every row must "
                "have the same columns"
            )
    return _checked(pd.DataFrame(records), scorer, max_rows)


def split_rows(split: Any, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as ``{"columns": [...], "data": [[...], ...]}`` (pandas' ``orient="split"``)."""
    if (
        not isinstance(split, dict)
        or not isinstance(split.get("data"), list)
        or not set(split) <= {"columns", "data", "index"}
        or not isinstance(split.get("index"), list | None)
    ):
        raise InputError(
            'dataframe_split must be an object {"columns": [...], "data": [[...], ...]} (and '
            f'optionally "index": [...]), got {_describe_json(split)}'
        )
    data = split["data"]
    _require_rows(len(data), max_rows)
    width = len(scorer.columns)
    if split.get("columns") == list(scorer.columns) and all(
        type(row) is list and len(row) == width for row in data
    ):
        values = _plain_numbers(data, scorer.imputes)
        if values is not None:
            return _in_range(values, scorer)
    frame = _frame(data, split.get("columns"), "dataframe_split")
    return _checked(frame, scorer, max_rows)


def csv_rows(body: bytes, scorer: Scorer, max_rows: int) -> np.ndarray:
    """Rows given as CSV with a header line."""
    try:
        frame = pd.read_csv(io.BytesIO(body))
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise RequestError(400, f"malformed CSV: {exc}") from None
    return _checked(frame, scorer, max_rows)


def _plain_numbers(table: list[list[Any]], allow_missing: bool) -> np.ndarray | None:
    """``table`` as float64 if it holds finite JSON numbers only, else None.

    With ``allow_missing`` (a model that imputes), ``null`` and NaN are taken too, as NaN, unless
    a column holds nothing but ``null`` (pandas makes that a column of objects, for
    ``check_rows`` to judge). Such a table is one ``check_rows`` takes as it is; anything else
    goes to ``check_rows``, which decides and words the refusal.
    """
    kinds = set(map(type, itertools.chain.from_iterable(table)))
    if not kinds <= (_NUMBER_OR_NULL_TYPES if allow_missing else _NUMBER_TYPES):
        return None
    if int in kinds and not all(  # huge integers: let pandas and check_rows judge them
        abs(v) <= _EXACT_INT for v in itertools.chain.from_iterable(table) if type(v) is int
    ):
        return None
    try:
        values = np.array(table, dtype=np.float64)  # null -> NaN
    except ValueError:  # ragged rows
        return None
    if not allow_missing:
        return values if np.isfinite(values).all() else None
    if np.isinf(values).any() or (type(None) in kinds and _null_column(table, values)):
        return None
    return values


def _in_range(values: np.ndarray, scorer: Scorer) -> np.ndarray:
    """``values`` of the fast path, once ``check_rows``' range check has passed them."""
    check_range(values, scorer.columns, scorer.limits)
    return values


def _null_column(table: list[list[Any]], values: np.ndarray) -> bool:
    """Whether a column of ``table`` (``values`` as floats) holds nothing but ``null``."""
    empty = np.flatnonzero(np.isnan(values).all(axis=0))
    return any(all(row[column] is None for row in table) for column in empty)


def _checked(frame: pd.DataFrame, scorer: Scorer, max_rows: int) -> np.ndarray:
    _require_rows(len(frame), max_rows)
    return scorer.check(frame).to_numpy()


def _frame(data: Any, names: Any, source: str) -> pd.DataFrame:
    try:
        return pd.DataFrame(data, columns=names)
    except (ValueError, TypeError) as exc:  # ragged or mismatched lists
        raise InputError(f"{source} does not make a table: {exc}") from None


def _require_rows(count: int, max_rows: int) -> None:
    if count == 0:
        raise InputError("no rows to score: the request holds an empty list of rows")
    if count > max_rows:
        raise RequestError(
            413,
            f"{count} rows in one request; this service takes at most {max_rows} (serve.max_rows)",
        )


def _describe_json(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {preview(value)}" if value else "an empty object"
    names = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
