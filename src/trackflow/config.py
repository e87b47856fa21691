"""Typed configuration: ``params.yaml`` validated once, at the entry point, into frozen models.

Every section forbids unknown keys, so a typo fails loudly with the key's name and the keys that are
allowed in its place, instead of silently falling back to a default.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

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
        "mlruns/artifacts",
        description="Artifact root for experiments trackflow creates; a local folder is used "
        "with a local store only (a tracking server keeps them where it is told to).",
    )
    experiment_name: str = Field("trackflow", min_length=1)


class BaseSection(_Section):
    """Settings shared by every stage."""

    seed: int = Field(
        42, ge=0, le=2**32 - 1, description="Seed for every random choice: splits, PCA, training."
    )
    mlflow: MlflowConfig = MlflowConfig()


class DataConfig(_Section):
    """What the data is: where it comes from, its label, and which classes form which task."""

    source: str = Field(
        "sklearn:digits",
        description="'sklearn:<name>' for a dataset bundled with scikit-learn "
        f"({', '.join(BUILTIN_DATASETS)}), or a path to a .csv or .parquet file.",
    )
    label_column: str = Field("target", min_length=1, description="Column holding the class.")
    separator: Literal[",", ";", "\t", "|"] = Field(
        ",", description='Field separator of a CSV source (a tab is written "\\t" in YAML).'
    )
    index_column: Literal["drop", "keep", "fail"] = Field(
        "drop",
        description="A first column with no name (pandas' row index, saved by `to_csv` without "
        "`index=False`): 'drop' it with a warning, 'keep' it as a feature, or 'fail'.",
    )
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
        description="Fraction of each target class's training rows kept (at least one), to "
        "simulate few labels.",
    )
    batches: str | None = Field(
        "data/batches",
        description="Folder of labelled batches added with `trackflow add-batch`; the dataset is "
        "the source's rows followed by every batch's, in the order they were added. null = none.",
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
        for key in ("source_classes", "target_classes"):
            classes = getattr(self, key)
            if classes is None:
                continue
            texts = [str(c) for c in classes]
            if len(set(texts)) != len(texts):
                raise ValueError(f"{key} lists a class twice: {list(classes)}")
            if len(texts) < 2:
                raise ValueError(f"{key} needs at least two classes, or null; got {list(classes)}")
        # Labels match by their text (0 matches "0"), so overlaps are checked the same way.
        overlap = {str(c) for c in self.source_classes or ()} & {
            str(c) for c in self.target_classes or ()
        }
        if overlap:
            raise ValueError(
                f"classes {sorted(overlap)} are in both source_classes and target_classes"
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

    @model_validator(mode="after")
    def _check(self) -> PcaConfig:
        if self.whiten and self.n_components is None:
            raise ValueError("whiten: true needs PCA; set n_components or whiten: false")
        return self


class PreprocessConfig(_Section):
    """Scaling then PCA, fitted on training rows only."""

    scaler: Literal["standard", "minmax", "none"] = "standard"
    pca: PcaConfig = PcaConfig()
    fit_on: Literal["source", "target", "both"] = Field(
        "both",
        description="Training rows the preprocessor is fitted on; validation and test rows never.",
    )


class ModelConfig(_Section):
    """The network: a backbone (transferred between tasks) and a new head per task."""

    name: str = Field(
        "trackflow",
        min_length=1,
        description="Registered model name; the pretrained backbone is '<name>-backbone'.",
    )
    backbone: Literal["mlp", "cnn"] = Field(
        "mlp", description="'mlp' over feature vectors; 'cnn' over image-shaped rows (PCA off)."
    )
    widths: tuple[PositiveInt, ...] = Field((256, 128), min_length=1, description="MLP widths.")
    channels: tuple[PositiveInt, ...] = Field(
        (32, 64), min_length=1, description="CNN channels, one depthwise-separable block each."
    )
    image_shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = Field(
        None, description="CNN input [channels, height, width]; null = one square channel."
    )
    norm: Literal["batch", "layer", "group", "none"] = "batch"
    activation: Literal["relu", "gelu", "silu", "tanh", "leaky_relu"] = "relu"
    dropout: float = Field(0.3, ge=0, lt=1)
    init: Literal["xavier", "he", "normal", "default"] = Field(
        "he", description="Initialization of new layers (a transferred backbone keeps its weights)."
    )


class ScheduleConfig(_Section):
    """Learning-rate schedule, as a factor of the initial rate per epoch."""

    kind: Literal["step", "exponential", "inverse_time", "cosine", "none"] = "cosine"
    step_size: PositiveInt = Field(10, description="step: epochs between decays.")
    gamma: float = Field(0.5, gt=0, description="step/exponential: decay factor.")
    decay_rate: float = Field(0.1, ge=0, description="inverse_time: lr / (1 + decay_rate * epoch).")


class TrainerConfig(_Section):
    """Passed to Lightning's ``Trainer``: where and how to scale out."""

    accelerator: str = Field("cpu", description="cpu | gpu | auto | ...")
    devices: PositiveInt | Literal["auto"] = 1
    strategy: str = Field("auto", description="auto | ddp | ddp_spawn | ...")
    num_nodes: PositiveInt = 1


class AugmentConfig(_Section):
    """Random changes to training rows, drawn anew for every batch; validation and test rows never.

    ``shift``, ``rotate`` and ``scale`` move image-shaped rows (PCA off); ``noise`` and ``mixup``
    apply to any rows. All zero: no augmentation.
    """

    shift: NonNegativeInt = Field(0, description="Largest shift of an image, in pixels each way.")
    rotate: float = Field(0.0, ge=0, le=180, description="Largest rotation of an image, degrees.")
    scale: float = Field(
        0.0, ge=0, lt=1, description="Largest zoom of an image in or out (0.1: 10%)."
    )
    noise: float = Field(
        0.0,
        ge=0,
        description="Gaussian noise added to the scaled features: its standard deviation.",
    )
    mixup: float = Field(
        0.0, ge=0, description="Mixup: alpha of the Beta(alpha, alpha) mixing weight; 0 = off."
    )

    @property
    def geometric(self) -> bool:
        """Whether rows are moved as images (shift, rotation or zoom)."""
        return bool(self.shift or self.rotate or self.scale)


class OptimizationConfig(_Section):
    """How a model is fitted; shared by the pretrain and train sections.

    The defaults are the train section's, the best trial of a sweep of its keys (``trackflow
    sweep`` on the default data; docs/tuning.md); :class:`PretrainConfig` states the ones it
    changes.
    """

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(0.005132, gt=0, description="Learning rate of the head (and of a new model).")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only.")
    weight_decay: float = Field(0.001647, ge=0, description="L2 penalty.")
    schedule: ScheduleConfig = ScheduleConfig()
    batch_size: PositiveInt = 32
    max_epochs: PositiveInt = 100
    early_stopping_patience: PositiveInt | None = Field(
        10, description="Epochs without a lower val/loss before stopping; null = off."
    )
    gradient_clip_val: float | None = Field(
        None, gt=0, description="Clip gradient norm; null = off."
    )
    deterministic: bool = Field(True, description="Same params + same data => same metrics.")
    augment: AugmentConfig = AugmentConfig(noise=0.2373)
    trainer: TrainerConfig = TrainerConfig()


class PretrainConfig(OptimizationConfig):
    """Training of backbone + head on the source task."""

    lr: float = Field(1e-3, gt=0, description="Learning rate of backbone and head.")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty.")
    batch_size: PositiveInt = 64
    max_epochs: PositiveInt = 20
    augment: AugmentConfig = AugmentConfig()


class EnsembleConfig(_Section):
    """Several networks trained for the target task and packaged as one model that votes."""

    size: PositiveInt = Field(
        1,
        description="Networks trained, with seeds base.seed, base.seed + 1, ...; 1 = one network.",
    )
    vote: Literal["soft", "hard"] = Field(
        "soft",
        description="soft: the mean of the members' probabilities; hard: the members' majority "
        "label (probabilities = the share of votes).",
    )
    members: list[dict[str, Any]] = Field(
        [],
        description="Per-member overrides of train.* keys (and base.seed), dotted "
        "({train.lr: 0.002}); when given, size = the number of members.",
    )

    @model_validator(mode="before")
    @classmethod
    def _size_from_members(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping) or not raw.get("members"):
            return raw
        members, size = raw["members"], raw.get("size", 1)
        if isinstance(members, list) and size not in (1, len(members)):
            raise ValueError(
                f"size is {size} but {len(members)} members are listed; drop size or make "
                "them agree"
            )
        return {**raw, "size": len(members) if isinstance(members, list) else size}

    @property
    def votes(self) -> bool:
        """Whether the target model is an ensemble (several networks, or listed members)."""
        return self.size > 1 or bool(self.members)

    @model_validator(mode="after")
    def _check_members(self) -> EnsembleConfig:
        for i, overrides in enumerate(self.members):
            for key, value in overrides.items():
                _check_member_override(f"members[{i}]", str(key), value)
        return self


def _check_member_override(where: str, key: str, value: Any) -> None:
    """Refuse a member override outside ``train.*`` / ``base.seed``, or a bad value for its key."""
    from pydantic import TypeAdapter

    section, _, rest = key.partition(".")
    roots: dict[str, type[BaseModel]] = {"train": TrainConfig, "base": BaseSection}
    if section not in roots or not rest or (section == "base" and rest != "seed"):
        raise ValueError(
            f"{where}: {key!r} cannot differ between members; a member overrides train.* keys "
            "(dotted, e.g. train.lr) or base.seed"
        )
    if rest.split(".")[0] == "ensemble":
        raise ValueError(f"{where}: {key!r}: a member cannot hold an ensemble")
    model, parts = roots[section], rest.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            allowed = ", ".join(sorted(model.model_fields.keys() - {"ensemble"}))
            raise ValueError(f"{where}: unknown key {key!r}; allowed here: {allowed}")
        annotation = field.annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ValueError(f"{where}: {key!r}: {part!r} is a value, not a section")
            model = annotation
    try:
        checked = Annotated[(annotation, *field.metadata)] if field.metadata else annotation
        TypeAdapter(checked).validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}: {key}: {reason} (got {value!r})") from None


class TrainConfig(OptimizationConfig):
    """Adaptation to the target task."""

    mode: Literal["finetune", "feature_extraction", "scratch", "continue"] = Field(
        "finetune",
        description="finetune: the backbone keeps training at backbone_lr_ratio x lr; "
        "feature_extraction: the backbone is frozen, only the new head trains; "
        "scratch: a new backbone, trained from random weights (the baseline); "
        "continue: the champion's network keeps training, on the rows it has not seen mixed "
        "with a replay of those it has (replay_fraction), at continue_lr.",
    )
    backbone: str | None = Field(
        "pretrained",
        description="'pretrained' (the pretrain stage's output), 'models:/NAME@ALIAS', "
        "'models:/NAME/VERSION', 'runs:/RUN_ID/PATH', or null (only with mode: scratch).",
    )
    backbone_lr_ratio: float = Field(0.8908, gt=0, le=1)
    unfreeze_at_epoch: NonNegativeInt = Field(
        0, description="finetune: epoch at which the backbone starts training (frozen before)."
    )
    replay_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="continue: share of the champion's training rows replayed beside the new "
        "rows (stratified by class, seeded), so that it does not forget them.",
    )
    continue_lr: float = Field(
        0.001, gt=0, description="continue: learning rate of the whole network."
    )
    ensemble: EnsembleConfig = EnsembleConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        backbone = self.backbone
        if backbone is None and self.mode != "scratch":
            raise ValueError(f"mode {self.mode!r} needs a backbone; set backbone or mode: scratch")
        if backbone not in (None, "pretrained") and not backbone.startswith(("models:/", "runs:/")):
            raise ValueError(
                f"backbone {backbone!r} is not 'pretrained', null, 'models:/...' or 'runs:/...'"
            )
        return self


class DiagnosisConfig(_Section):
    """Thresholds of the training-curve diagnosis."""

    flat_tolerance: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Training loss whose best value is less than this fraction below its first "
        "value: not learning (underfitting).",
    )
    rise_tolerance: float = Field(
        0.1,
        gt=0,
        description="Validation loss ending more than this fraction above its minimum while "
        "training loss keeps falling: overfitting.",
    )


class EvaluateConfig(_Section):
    """Held-out evaluation of the trained candidate."""

    calibration_bins: PositiveInt = Field(10, ge=2, description="Bins of the reliability diagram.")
    diagnosis: DiagnosisConfig = DiagnosisConfig()
    baselines: bool = Field(
        True, description="Also fit scikit-learn baselines on the same features and split."
    )


DetectorName = Literal[
    "knn",
    "mahalanobis",
    "pca_reconstruction",
    "isolation_forest",
    "knn_raw",
    "knn_shifted",
    "gaussian_mixture",
]


class AnomalyConfig(_Section):
    """Detectors of inputs unlike the target training data, fitted on its training rows only."""

    detectors: tuple[DetectorName, ...] = Field(
        get_args(DetectorName),  # every detector, in the order above
        min_length=1,
        description="Detectors fitted and compared; knn_shifted needs image rows (square width).",
    )
    detector: DetectorName | Literal["best"] = Field(
        "best",
        description="Detector saved with the model; 'best' = highest validation AUROC on the "
        "anomaly kind it detects worst.",
    )
    target_fpr: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="False-positive rate on validation rows that sets the threshold.",
    )
    knn_neighbors: PositiveInt = 5
    knn_shift: PositiveInt = Field(
        1, description="knn_shifted: training images also remembered moved this many pixels."
    )
    mixture_components: PositiveInt = Field(20, description="gaussian_mixture: components.")
    mixture_reg: float = Field(
        8.0, gt=0, description="gaussian_mixture: added to covariance diagonals (raw units^2)."
    )
    pca_variance: float = Field(
        0.9, gt=0, lt=1, description="Variance kept by the reconstruction detector's PCA."
    )
    noise_scale: float = Field(
        1.0, gt=0, description="Gaussian noise corruption, in training standard deviations."
    )
    feature_scale: float = Field(3.0, gt=0, description="Feature-scaling corruption factor.")

    @model_validator(mode="after")
    def _check(self) -> AnomalyConfig:
        if self.detector != "best" and self.detector not in self.detectors:
            raise ValueError(
                f"detector {self.detector!r} is not among detectors {list(self.detectors)}"
            )
        return self


class PromotionConfig(_Section):
    """The promotion gate: when a registered challenger becomes the ``champion``."""

    primary_metric: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="Metric the challenger must beat the champion on."
    )
    min_delta: float = Field(
        0.0, ge=0, lt=1, description="Challenger minus champion on the primary metric, at least."
    )
    test: Literal["mcnemar", "bootstrap"] = Field(
        "mcnemar",
        description="Statistical support for 'better' on the same test rows: McNemar's exact test "
        "(accuracy only) or a paired bootstrap confidence interval of the difference.",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="One-sided level of that support (0.95: p < 0.05)."
    )
    bootstrap_samples: PositiveInt = Field(2000, ge=100)
    min_accuracy: float = Field(
        0.9, ge=0, le=1, description="Floor: a challenger below it is never promoted."
    )
    min_anomaly_auroc: float = Field(
        0.8, ge=0, le=1, description="Floor on the anomaly detector's test AUROC."
    )
    min_gate_rows: PositiveInt = Field(
        30,
        description="Fewest labelled test rows held out from both models (neither trained nor "
        "early-stopped on them) that a comparison with the champion needs; fewer and the gate "
        "refuses to compare.",
    )
    lock_timeout_s: float = Field(
        300.0, gt=0, description="How long a promotion waits for another one to finish."
    )
    max_forgetting: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="With added batches, the challenger must beat the champion on the batches' "
        "held-out rows and may lose at most this much of the primary metric on the original "
        "data's held-out rows.",
    )

    @model_validator(mode="after")
    def _check(self) -> PromotionConfig:
        if self.test == "mcnemar" and self.primary_metric != "accuracy":
            raise ValueError(
                f"test 'mcnemar' compares per-row correctness, i.e. accuracy; with primary_metric "
                f"{self.primary_metric!r} use test: bootstrap"
            )
        return self


class BatchConfig(_Section):
    """Batch scoring with the champion: when a batch's data has drifted from the training data."""

    psi_threshold: float = Field(
        0.2,
        gt=0,
        description="A feature drifted when its PSI against the training profile is above this.",
    )
    drift_share: float = Field(
        0.3, gt=0, le=1, description="The batch drifted when at least this share of features did."
    )
    psi_severe: float = Field(
        1.0,
        gt=0,
        description="The batch drifted when any feature's PSI is above this (and above what "
        "sampling alone reaches in a batch of its size), however few features moved.",
    )
    anomaly_rate_factor: float = Field(
        3.0,
        ge=1,
        description="The batch drifted when its anomaly rate is above this x the validation "
        "false-positive rate the detector was calibrated at (anomaly.target_fpr), and above "
        "what sampling alone reaches in a batch of its size.",
    )
    confidence: float = Field(
        0.999,
        gt=0.5,
        lt=1,
        description="A batch like the training data passes each drift rule with at least this "
        "probability: the rules' limits rise to what chance reaches in a small batch.",
    )

    @model_validator(mode="after")
    def _check(self) -> BatchConfig:
        if self.psi_severe <= self.psi_threshold:
            raise ValueError(
                f"psi_severe ({self.psi_severe:g}) must be above psi_threshold "
                f"({self.psi_threshold:g}): it flags a batch on one feature alone"
            )
        return self


class ServeConfig(_Section):
    """``trackflow serve``: the REST service that follows a registry alias."""

    alias: str = Field("champion", min_length=1, description="Alias of model.name to serve.")
    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 for every interface.")
    port: int = Field(8000, ge=0, le=65535)
    poll_interval_s: float = Field(10.0, gt=0, description="Seconds between reads of the alias.")
    max_rows: PositiveInt = Field(1000, description="Most rows in one request (413 above).")
    max_body_mb: float = Field(16.0, gt=0, description="Largest request body, MiB (413 above).")
    access_log: bool = Field(False, description="One log line per request.")


SWEEP_SECTIONS = ("model", "pretrain", "train")
SWEEP_DISTRIBUTIONS = ("log_uniform", "uniform", "int", "choice")
SWEEP_METRICS = {"val/acc": "maximize", "val/loss": "minimize"}


class SweepConfig(_Section):
    """``trackflow sweep``: a hyper-parameter search with Optuna, each trial an MLflow child run.

    Trials train on the preprocessed data through the train stage's code, and are scored on the
    validation rows only (never on test rows).
    """

    space: dict[str, dict[str, Any]] = Field(
        {
            "train.lr": {"log_uniform": [3e-4, 1e-2]},
            "train.backbone_lr_ratio": {"log_uniform": [0.1, 1.0]},
            "train.weight_decay": {"log_uniform": [1e-6, 1e-2]},
            "train.batch_size": {"choice": [32, 64, 128]},
            "train.max_epochs": {"choice": [60, 100]},
            "train.augment.noise": {"uniform": [0.0, 0.3]},
            "train.augment.mixup": {"choice": [0.0, 0.2]},
        },
        description="Dotted keys of model.*, pretrain.* or train.* to a distribution: "
        "{log_uniform: [lo, hi]}, {uniform: [lo, hi]}, {int: [lo, hi]} (optional step: N), "
        "or {choice: [v1, v2, ...]}.",
    )
    n_trials: PositiveInt = Field(
        40, description="Trials of the study in all: a resumed sweep runs what is left."
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Stop starting trials after this many seconds; null = no limit."
    )
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe | random | grid (grid: choice and int distributions only)."
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops unpromising trials early, on the metric of each epoch."
    )
    metric: Literal["val/acc", "val/loss"] = Field(
        "val/acc", description="Validation metric the sweep optimizes (never a test metric)."
    )
    direction: Literal["maximize", "minimize"] = Field(
        "maximize", description="maximize for val/acc, minimize for val/loss."
    )
    parallel: PositiveInt = Field(
        1, description="Trials at once: worker processes sharing the study storage."
    )
    storage: str | None = Field(
        None,
        description="Optuna storage, a SQLAlchemy URL; TRACKFLOW_SWEEP_STORAGE overrides it. "
        "null = optuna.db beside a SQLite MLflow store (sqlite:///mlruns/optuna.db), else "
        "sqlite:///mlruns/optuna.db.",
    )
    study: str | None = Field(
        None,
        description="Study name; null = '<model.name>-<digest of space, metric and data>', so "
        "running the same sweep again resumes it.",
    )

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        expected = SWEEP_METRICS[self.metric]
        if self.direction != expected:
            raise ValueError(
                f"metric {self.metric!r} is to {expected[:-1]}e, but direction is "
                f"{self.direction!r}; set direction: {expected}"
            )
        return self


def _sweep_space_errors(params: Params) -> list[str]:
    """What is wrong with ``params.sweep.space``: one line per problem, empty when it is valid.

    Each bound and choice is applied as an override of the other sections and validated, so a
    value the key refuses fails here with the key's own message.
    """
    errors = []
    raw = params.model_dump(mode="json", exclude={"sweep"})
    raw["sweep"] = {"space": {}}  # the candidates' own space is not checked again
    for key, spec in params.sweep.space.items():
        where = f"sweep.space.{key}"
        try:
            values = _space_values(key, spec, params.sweep.sampler)
        except ValueError as exc:
            errors.append(f"{where}: {exc}")
            continue
        for value in values:
            candidate = copy.deepcopy(raw)
            set_dotted(candidate, key, value)
            try:
                Params.model_validate(candidate)
            except ValidationError as exc:
                reason = "; ".join(_describe_error(e) for e in exc.errors())
                errors.append(f"{where}: the value {value!r} is refused: {reason}")
    return errors


def _space_values(key: str, spec: Any, sampler: str) -> list[Any]:
    """The values of one distribution to validate against the key (bounds or choices)."""
    kind = _space_field_kind(key)
    if not isinstance(spec, dict) or not set(spec) & set(SWEEP_DISTRIBUTIONS):
        raise ValueError(
            f"give one distribution: {{log_uniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
            f"{{int: [lo, hi]}} or {{choice: [...]}}; got {spec!r}"
        )
    kinds = [k for k in spec if k in SWEEP_DISTRIBUTIONS]
    extra = sorted(set(spec) - {*SWEEP_DISTRIBUTIONS, "step"})
    if len(kinds) > 1 or extra:
        raise ValueError(f"one distribution and an optional step, got keys {sorted(spec)}")
    (dist,) = kinds
    value = spec[dist]
    if dist == "choice":
        if "step" in spec:
            raise ValueError("step goes with int or uniform, not choice")
        if not isinstance(value, list) or not value:
            raise ValueError(f"choice needs a non-empty list of values, got {value!r}")
        return value
    if not (isinstance(value, list) and len(value) == 2) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        texts = [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
        hint = (
            f"; YAML reads {texts[0]} as text: write it with a dot, e.g. 1.0e-6"
            if any("e" in t.lower() for t in texts)
            else ""
        )
        raise ValueError(f"{dist} needs [low, high], two numbers, got {value!r}{hint}")
    low, high = value
    if low > high:
        raise ValueError(f"{dist}: low {low} is above high {high}")
    if dist == "log_uniform" and low <= 0:
        raise ValueError(f"log_uniform needs low > 0 (a log scale), got {low}")
    step = spec.get("step")
    if step is not None and (dist == "log_uniform" or not isinstance(step, int | float)):
        raise ValueError(f"step goes with int or uniform, as a positive number; got {step!r}")
    if step is not None and step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    if dist == "int":
        if not all(isinstance(v, int) for v in (*value, step or 1)):
            raise ValueError(f"int needs integer bounds and step, got {spec!r}")
        if "int" not in kind:
            raise ValueError(f"int fits an integer key; {key} is {_kind_text(kind)}")
        if sampler == "grid":
            return list(range(low, high + 1, step or 1))
    else:
        if "float" not in kind:
            hint = "; use {int: [lo, hi]} or choice" if "int" in kind else "; use choice"
            raise ValueError(f"{dist} fits a float key; {key} is {_kind_text(kind)}{hint}")
        if sampler == "grid":
            raise ValueError(
                f"the grid sampler needs a finite set of values; {dist} is continuous: use "
                "choice (or int), or sampler: tpe / random"
            )
    return [low, high]


def _space_field_kind(key: str) -> set[str]:
    """The kinds of value a dotted params key takes: ``int``, ``float`` and/or ``other``."""
    parts = key.split(".")
    if parts[0] not in SWEEP_SECTIONS:
        raise ValueError(
            f"a sweep searches model.*, pretrain.* or train.* keys only: a trial retrains on the "
            f"preprocessed data, so {parts[0]}.* keys cannot change in it (search data keys with "
            "`dvc exp run --queue -S key=value` instead)"
        )
    if key == "model.name":
        raise ValueError("model.name is the registered model's name, not a hyper-parameter")
    model: type[BaseModel] = Params
    annotation: Any = Params
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            section = ".".join(parts[:i])
            hint = difflib.get_close_matches(part, list(fields), n=1)
            guess = f" (did you mean '{section}.{hint[0]}'?)" if hint else ""
            raise ValueError(f"unknown key{guess}; keys of {section}: {', '.join(sorted(fields))}")
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(parts) - 1:
            raise ValueError(f"{'.'.join(parts[: i + 1])} is a value, not a section")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise ValueError(
            f"{key} is a section; search one of its keys: {', '.join(model.model_fields)}"
        )
    return _annotation_kinds(annotation)


def _annotation_kinds(annotation: Any) -> set[str]:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _annotation_kinds(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_annotation_kinds(a) for a in get_args(annotation)))
    if annotation is bool:
        return {"other"}
    if annotation is int:
        return {"int"}
    if annotation is float:
        return {"float"}
    return {"other"}


def _kind_text(kind: set[str]) -> str:
    if "int" in kind:
        return "an integer"
    if "float" in kind:
        return "a float"
    return "not a number (search it with choice)"


class Params(_Section):
    """The whole ``params.yaml``."""

    base: BaseSection = BaseSection()
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    promotion: PromotionConfig = PromotionConfig()
    batch: BatchConfig = BatchConfig()
    serve: ServeConfig = ServeConfig()
    sweep: SweepConfig = SweepConfig()

    @model_validator(mode="after")
    def _check(self) -> Params:
        if (
            self.model.backbone == "cnn"
            and self.preprocess.pca.n_components is not None
            and self.model.image_shape is None
        ):
            raise ValueError(
                "model.backbone: cnn reads image-shaped rows, but PCA components are not pixels; "
                "set preprocess.pca.n_components: null, or model.image_shape explicitly"
            )
        for stage in ("pretrain", "train"):
            augment = getattr(self, stage).augment
            if augment.geometric and self.preprocess.pca.n_components is not None:
                raise ValueError(
                    f"{stage}.augment shift/rotate/scale move images, but PCA components are not "
                    "pixels; set preprocess.pca.n_components: null, or set "
                    f"{stage}.augment.shift, .rotate and .scale to 0"
                )
        errors = _sweep_space_errors(self)
        if errors:
            raise ValueError("\n  ".join(errors))
        return self


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
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"params file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"params file {str(path)!r} cannot be read: {exc}") from None
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


def flatten(data: Mapping[str, Any], separator: str = ".") -> dict[str, Any]:
    """Nested mappings as one flat mapping: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``.

    The inverse of :func:`set_dotted` with ``"."``; metrics use ``"/"`` (``test/accuracy``), the
    names MLflow gives them.
    """
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat |= {f"{key}{separator}{k}": v for k, v in flatten(value, separator).items()}
        else:
            flat[str(key)] = value
    return flat


def flatten_params(params: Params) -> dict[str, Any]:
    """Params as a flat mapping of dotted keys, as logged to MLflow.

    The sweep's space, whose own keys are dotted, stays one value: ``sweep.space``.
    """
    raw = params.model_dump(mode="json")
    space = raw["sweep"].pop("space")
    return flatten(raw) | {"sweep.space": space}


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
        message = error["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if loc else message
    return f"{where}: {error['msg']} (got {error['input']!r})"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model
