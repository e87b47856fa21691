"""Errors a user can act on: each message says what is wrong and how to fix it.

Entry points turn these into a one-line message and a non-zero exit status instead of a traceback;
anything else escaping a stage is a bug and keeps its traceback.
"""

from collections.abc import Iterable
from typing import Any


class TrackflowError(Exception):
    """Base class for errors caused by the user's input rather than by trackflow."""

    exit_code = 1


class ConfigError(TrackflowError):
    """The params file (or an override of it) is invalid."""

    exit_code = 2


class DataError(TrackflowError):
    """The data cannot be used as it is (missing, empty, malformed, too small)."""

    exit_code = 3


class TrackingUnavailable(TrackflowError):
    """The tracking store is busy or out of reach: trying again later may succeed."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): orchestrators retry on it


def preview(items: Iterable[object], limit: int = 8, width: int = 40) -> str:
    """A list for an error message: the first ``limit`` items, then how many there are in all.

    Items are shown as plain text (``5``, not ``np.int64(5)``), each cut to ``width`` characters.
    """
    names = [shorten(str(plain(item)), width) for item in items]
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def why(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {shorten(lines[0] if lines else '(no message)', 160)}"


def shorten(text: str, width: int = 40) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` when it was cut."""
    return text if len(text) <= width else f"{text[: width - 3]}..."


def plain(value: Any) -> Any:
    """A NumPy scalar as the Python value it holds (``np.int64(5)`` -> ``5``); others unchanged.

    For messages: ``f"{plain(value)!r}"`` reads ``5`` or ``'abc'`` whatever library made the value.
    """
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else value
