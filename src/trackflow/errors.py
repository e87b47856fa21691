"""Errors a user can act on: each message says what is wrong and how to fix it.

Entry points turn these into a one-line message and a non-zero exit status instead of a traceback;
anything else escaping a stage is a bug and keeps its traceback.
"""

from collections.abc import Iterable


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


def preview(items: Iterable[object], limit: int = 8) -> str:
    """A list for an error message: the first ``limit`` items, then how many there are in all."""
    names = [str(item) for item in items]
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown
