"""The MLflow model registry: registering versions under aliases, resolving model URIs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trackflow.errors import ConfigError
from trackflow.tracking import Tracking

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Resolved:
    """Where a ``models:/`` or ``runs:/`` URI points: local files and their provenance."""

    path: Path
    uri: str
    run_id: str | None
    version: str | None = None


def register_version(
    tracking: Tracking, name: str, run_id: str, artifact_path: str, tags: dict[str, str]
) -> str:
    """Register a run's artifact folder as a new version of ``name``, with ``tags``; no alias.

    Returns:
        The new version number.
    """
    from mlflow.exceptions import MlflowException

    client = tracking.client
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id, tags=tags
    ).version
    return str(version)


def resolve(tracking: Tracking, uri: str, destination: str | Path) -> Resolved:
    """Download what ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/ID/PATH`` names.

    Raises:
        ConfigError: The URI is malformed or names nothing in the tracking store.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        version = None
        if match := _MODELS_URI.match(uri):
            name, alias = match["name"], match["alias"]
            model = (
                tracking.client.get_model_version_by_alias(name, alias)
                if alias
                else tracking.client.get_model_version(name, match["version"])
            )
            run_id, version = model.run_id, str(model.version)
        elif uri.startswith("runs:/") and len(uri.split("/")) >= 3:
            run_id = uri.split("/")[1]
        else:
            raise ConfigError(
                f"{uri!r} is not 'models:/NAME@ALIAS', 'models:/NAME/VERSION' or "
                "'runs:/RUN_ID/PATH'"
            )
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(destination), tracking_uri=tracking.tracking_uri
        )
    except MlflowException as exc:
        raise ConfigError(
            f"{uri!r} cannot be resolved in {tracking.tracking_uri}: {exc.message}"
        ) from None
    return Resolved(path=Path(path), uri=uri, run_id=run_id, version=version)
