"""The MLflow model registry: registering versions under aliases, resolving model URIs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.errors import ConfigError
from trackflow.tracking import Tracking, fluent_tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from trackflow.config import Params

#: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: a registered model's alias or version.
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def model_uri(name: str, alias: str | None = None, version: str | int | None = None) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (one of alias and version)."""
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


def served_model_uri(params: Params) -> str:
    """``models:/<model.name>@<serve.alias>``: the served version, batch scoring's default too."""
    return model_uri(params.model.name, alias=params.serve.alias)


def registered_version(tracking: Tracking, uri: str) -> ModelVersion | None:
    """The registered version a ``models:/`` URI names, its alias resolved; None for other URIs.

    Raises:
        MlflowException: The registry has no such model, alias or version.
    """
    match = MODELS_URI.match(uri)
    if match is None:
        return None
    if match["alias"]:
        return tracking.client.get_model_version_by_alias(match["name"], match["alias"])
    return tracking.client.get_model_version(match["name"], match["version"])


def create_registered_model(client: MlflowClient, name: str, **fields: Any) -> bool:
    """Create the registered model ``name`` (with ``tags``, ``description``) unless it exists.

    Returns:
        Whether this call created it: creation is atomic in every MLflow store, so of callers
        racing to create one name exactly one gets True.
    """
    from mlflow.exceptions import MlflowException

    attempt = 0
    while True:
        attempt += 1
        try:
            client.create_registered_model(name, **fields)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            # A database store whose insert meets the name re-reads the model to say it exists;
            # if its holder deleted it in between, the read says it does not (a tracking server
            # on PostgreSQL: about 1 in 100 of the creates that race a delete). The name was
            # taken a moment ago and is free now: try again.
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST" or attempt == _CREATE_ATTEMPTS:
                raise
        else:
            return True


#: Tries of :func:`create_registered_model` when the name vanishes while the store checks it.
_CREATE_ATTEMPTS = 5


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
    client = tracking.client
    create_registered_model(client, name)
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
        if (model := registered_version(tracking, uri)) is not None:
            run_id, version = model.run_id, str(model.version)
        elif uri.startswith("runs:/") and len(uri.split("/")) >= 3:
            run_id = uri.split("/")[1]
        else:
            raise ConfigError(
                f"{uri!r} is not 'models:/NAME@ALIAS', 'models:/NAME/VERSION' or "
                "'runs:/RUN_ID/PATH'"
            )
        # models:/ is resolved through the process-wide registry URI, not tracking_uri=: without
        # MLFLOW_TRACKING_URI it would look in ./mlflow.db, MLflow's default, and find nothing
        with fluent_tracking(tracking):
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=tracking.tracking_uri
            )
    except MlflowException as exc:
        raise ConfigError(
            f"{uri!r} cannot be resolved in {tracking.tracking_uri}: {exc.message}"
        ) from None
    return Resolved(path=Path(path), uri=uri, run_id=run_id, version=version)
