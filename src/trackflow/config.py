"""Typed configuration: ``params.yaml`` validated once, at the entry point, into frozen models.

Every section forbids unknown keys, so a typo fails loudly with the key's name and the keys that are
allowed in its place, instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from trackflow.errors import ConfigError

BUILTIN_DATASETS = ("digits", "breast_cancer", "wine", "iris")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_class_label(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"a class label must be an int or a string, got {value!r}")
    return value


ClassLabel = Annotated[int | str, BeforeValidator(_check_class_label)]


class MlflowConfig(_Section):
    """Where runs are tracked; ``MLFLOW_TRACKING_URI`` in the environment overrides the URI."""

    tracking_uri: str = Field(
        "sqlite:///mlruns/mlflow.db",
        description="MLflow tracking URI; the default is a SQLite store inside mlruns/.",
    )
    artifact_location: str = Field(
        "mlruns/artifacts", description="Artifact root for experiments trackflow creates."
    )
    experiment_name: str = Field("trackflow", min_length=1)


class BaseSection(_Section):
    """Settings shared by every stage."""

    seed: int = Field(42, description="Seed for every random choice: splits, PCA, training.")
    mlflow: MlflowConfig = MlflowConfig()


class DataConfig(_Section):
    """What the data is: where it comes from, its label, and which classes form which task."""

    source: str = Field(
        "sklearn:digits",
        description="'sklearn:<name>' for a dataset bundled with scikit-learn "
        f"({', '.join(BUILTIN_DATASETS)}), or a path to a .csv or .parquet file.",
    )
    label_column: str = Field("target", min_length=1, description="Column holding the class.")
    non_finite: Literal["fail", "impute"] = Field(
        "fail",
        description="NaN/inf in features: 'fail' stops ingest; 'impute' replaces them with the "
        "median of the training rows (fitted in the preprocess stage).",
    )
    source_classes: tuple[ClassLabel, ...] | None = Field(
        (0, 1, 2, 3, 4),
        description="Classes of the source task used for pretraining; null = no source task.",
    )
    target_classes: tuple[ClassLabel, ...] | None = Field(
        (5, 6, 7, 8, 9),
        description="Classes of the target task; null = every class not in source_classes.",
    )
    target_train_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of target training rows kept (stratified), to simulate few labels.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        source = self.source
        if source.startswith("sklearn:"):
            if source.removeprefix("sklearn:") not in BUILTIN_DATASETS:
                raise ValueError(
                    f"unknown bundled dataset {source!r}; use one of "
                    + ", ".join(f"'sklearn:{name}'" for name in BUILTIN_DATASETS)
                )
        elif Path(source).suffix.lower() not in TABLE_SUFFIXES:
            raise ValueError(
                f"source {source!r} is neither 'sklearn:<name>' nor a file ending in "
                + ", ".join(TABLE_SUFFIXES)
            )
        if self.source_classes is not None and not self.source_classes:
            raise ValueError("source_classes is empty; list at least two classes or use null")
        overlap = set(self.source_classes or ()) & set(self.target_classes or ())
        if overlap:
            raise ValueError(
                f"classes {sorted(overlap, key=str)} are in both source_classes and target_classes"
            )
        return self


class SplitConfig(_Section):
    """How rows are held out: stratified by class and seeded with ``base.seed``."""

    val_fraction: float = Field(0.15, gt=0, lt=1, description="Fraction of rows for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=1, description="Fraction of rows for the test set.")

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} "
                "leaves no training rows; keep their sum below 1"
            )
        return self


def _check_n_components(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"n_components must be an int (components kept), a float in (0, 1) (fraction of "
            f"variance kept) or null (PCA off), got {value!r}"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"n_components as an int must be at least 1, got {value}")
    if isinstance(value, float) and not 0 < value < 1:
        raise ValueError(
            f"n_components as a float is the fraction of variance kept and must lie in (0, 1), "
            f"got {value}; write an int to keep a number of components"
        )
    return value


class PcaConfig(_Section):
    """Principal component analysis applied after scaling."""

    n_components: Annotated[int | float | None, BeforeValidator(_check_n_components)] = Field(
        0.95,
        description="int = components kept, float in (0, 1) = fraction of variance kept, "
        "null = PCA off.",
    )
    whiten: bool = Field(False, description="Scale components to unit variance.")


class PreprocessConfig(_Section):
    """Scaling then PCA, fitted on training rows only."""

    scaler: Literal["standard", "minmax", "none"] = "standard"
    pca: PcaConfig = PcaConfig()
    fit_on: Literal["source", "target", "both"] = Field(
        "both",
        description="Training rows the preprocessor is fitted on; validation and test rows never.",
    )


class Params(_Section):
    """The whole ``params.yaml``."""

    base: BaseSection = BaseSection()
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()


def load_params(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate a params file.

    Args:
        path: YAML file with one section per stage.
        overrides: Dotted keys to values (``{"preprocess.pca.n_components": 16}``), applied on top
            of the file before validation.

    Raises:
        ConfigError: The file is missing or not YAML, or a key is unknown or has a bad value.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate_params(raw, source=str(path))


def validate_params(raw: Mapping[str, Any], source: str = "params") -> Params:
    """Validate a mapping into :class:`Params`, turning pydantic's errors into one clear message."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(error) for error in exc.errors()]
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def flatten_params(params: Params) -> dict[str, Any]:
    """Params as a flat mapping of dotted keys, as logged to MLflow."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value

    walk("", params.model_dump(mode="json"))
    return flat


def params_schema() -> dict[str, Any]:
    """JSON schema of the params file."""
    return Params.model_json_schema()


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``key="a.b"``, creating sections on the way."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _describe_error(error: Mapping[str, Any]) -> str:
    loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    where = where.removeprefix(".") or "(top level)"
    if error["type"] == "extra_forbidden":
        allowed = sorted(_model_at(loc[:-1]).model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        guess = f" (did you mean {hint[0]!r}?)" if hint else ""
        section = ".".join(str(part) for part in loc[:-1]) or "the top level"
        return f"unknown key {where!r}{guess}; allowed keys in {section}: {', '.join(allowed)}"
    if error["type"] == "value_error":  # our own validators' messages already quote the value
        return f"{where}: {error['msg'].removeprefix('Value error, ')}"
    return f"{where}: {error['msg']} (got {error['input']!r})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model
