"""What both flows share: the retry condition, MLflow settings for a repository, overrides."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.dvc_stages import StageFailed, is_transient
from trackflow.config import MlflowConfig, Params
from trackflow.errors import ConfigError


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only a failure with a sign of a passing fault."""
    error = state.data  # the exception the task raised
    if not isinstance(error, BaseException):
        error = state.result(raise_on_failure=False)
    if isinstance(error, StageFailed):
        return error.transient
    return isinstance(error, Exception) and is_transient(str(error))


def backoff(retries: int, first_delay_s: float) -> list[float] | float:
    """Retry delays doubling from ``first_delay_s``, one per retry."""
    return [first_delay_s * 2**i for i in range(retries)] or 0


def tracking_config(root: Path, params: Params) -> MlflowConfig:
    """The params' MLflow settings with local paths made absolute against ``root``.

    The stages run inside the repository; a flow may run anywhere.
    """
    config = params.base.mlflow
    uri, artifacts = config.tracking_uri, config.artifact_location
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_absolute():
        uri = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    if "://" not in artifacts and not Path(artifacts).is_absolute():
        artifacts = str(root / artifacts)
    return config.model_copy(update={"tracking_uri": uri, "artifact_location": artifacts})


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as overrides, values read as YAML (``8`` is an int, ``null`` None)."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: write KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides
