"""What both flows share: Prefect's retry condition and backoff."""

from __future__ import annotations

from typing import Any

from trackflow.pipeline.driver import StageFailed
from trackflow.tracking import is_transient


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only a failure with a sign of a passing fault."""
    error = state.data  # the exception the task raised
    if not isinstance(error, BaseException):
        error = state.result(raise_on_failure=False)
    if isinstance(error, StageFailed):
        return error.transient
    return isinstance(error, Exception) and is_transient(error)


def backoff(retries: int, first_delay_s: float) -> list[float] | float:
    """Retry delays doubling from ``first_delay_s``, one per retry."""
    return [first_delay_s * 2**i for i in range(retries)] or 0
