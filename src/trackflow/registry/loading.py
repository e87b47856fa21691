"""Loading a packaged model from the registry: the one loader of the service, batch and the gate.

:func:`load_version` resolves an alias to its version first (so what is reported is what was
loaded, even if the alias moves meanwhile), loads the pyfunc model and checks that it is a
trackflow packaged model. Each caller turns its two errors into its own: the service refuses the
version or retries it, batch scoring exits with a config error, promotion refuses in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trackflow.errors import TrackflowError, why
from trackflow.registry.uris import model_uri, registered_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.pyfunc import PyFuncModel

    from trackflow.registry.packaging import Scorer
    from trackflow.tracking import Tracking


class UnloadableVersion(TrackflowError):
    """A model whose files cannot be loaded (missing, corrupt, or an import they need fails).

    Attributes:
        uri: The URI asked for.
        registered: The registered version it resolved to; None for a URI of no version.
        error: What loading raised: the version's own fault, or a passing one (a locked store).
    """

    def __init__(self, uri: str, registered: ModelVersion | None, error: BaseException) -> None:
        self.uri, self.registered, self.error = uri, registered, error
        super().__init__(f"{uri} cannot be loaded from {self.source} ({self.problem})")

    @property
    def source(self) -> str:
        """Where its files come from (``models:/m-<id>`` for a logged model)."""
        return self.registered.source if self.registered is not None else self.uri

    @property
    def problem(self) -> str:
        """What the failure means, for a person: missing files, corrupt files, and the error."""
        text = why(self.error)
        if "No such artifact" in text or isinstance(self.error, FileNotFoundError):
            return f"its files are missing: {text}"
        return f"its files are corrupt or unreadable: {text}"


class NotPackagedModel(TrackflowError):
    """A model that loads but is not a trackflow packaged model: it holds no Scorer."""

    def __init__(self, uri: str, registered: ModelVersion | None) -> None:
        self.uri, self.registered = uri, registered
        super().__init__(f"{uri} is not a trackflow packaged model (it holds no Scorer)")


@dataclass(frozen=True)
class LoadedVersion:
    """A trackflow packaged model, loaded by the version its URI names or its alias resolved to.

    Attributes:
        uri: The URI asked for, e.g. ``models:/trackflow@champion``.
        version: The registered version loaded; None for a URI of no registered version
            (``runs:/...``, ``models:/m-<id>``).
        registered: The registry's record of that version (``run_id``, ``source``, ``tags``);
            None likewise.
        model: The pyfunc model (``predict``: raw rows in; ``input_example``).
        scorer: The packaged model's :class:`~trackflow.registry.packaging.Scorer`.
        profile: The training rows' profile (:func:`trackflow.data.drift.build_profile`), if
            the model was packaged with one.
    """

    uri: str
    version: str | None
    registered: ModelVersion | None = field(repr=False)
    model: PyFuncModel = field(repr=False)
    scorer: Scorer = field(repr=False)
    profile: dict[str, Any] | None = field(repr=False)


def load_version(tracking: Tracking, uri: str, dst_path: str | None = None) -> LoadedVersion:
    """Load a packaged model by URI; a ``models:/NAME@ALIAS`` is resolved to its version first.

    Args:
        tracking: The store holding the registry.
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or any other MLflow model URI.
        dst_path: Folder to download the files into; default: a temporary one of MLflow's.

    Raises:
        MlflowException: The registry has no such model, alias or version, or cannot be read.
        UnloadableVersion: Its files cannot be loaded.
        NotPackagedModel: It loads, but is not a trackflow packaged model.
    """
    import mlflow.pyfunc

    from trackflow.registry.packaging import Scorer
    from trackflow.tracking import fluent_tracking

    registered = registered_version(tracking, uri)
    version = None if registered is None else str(registered.version)
    try:  # MLflow finds a version's logged model (models:/m-<id>) through the process-wide URI
        with fluent_tracking(tracking):
            model = mlflow.pyfunc.load_model(
                uri if registered is None else model_uri(registered.name, version=version),
                dst_path=dst_path,
            )
    except Exception as exc:  # corrupt or missing files raise anything from pickle to OSError
        raise UnloadableVersion(uri, registered, exc) from exc
    python_model = _python_model(model)
    scorer = getattr(python_model, "scorer", None)
    if not isinstance(scorer, Scorer):
        raise NotPackagedModel(uri, registered)
    profile = getattr(python_model, "profile", None)
    return LoadedVersion(uri, version, registered, model, scorer, profile)


def _python_model(model: PyFuncModel) -> Any:
    """The Python object behind a loaded pyfunc model, or None for other flavours."""
    try:
        return model.unwrap_python_model()
    except Exception:  # MLflow raises for every flavour that is not a PythonModel
        return None
