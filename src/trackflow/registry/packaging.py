"""The packaged model: preprocessor, network and anomaly detector as one MLflow pyfunc model.

What is registered scores **raw rows** on its own. Input: a table with the raw feature columns,
named as in the ingested data. Output, one row per input row:

- ``label``: the predicted class;
- ``proba_<class>``: the probability of each class (in the model's class order);
- ``anomaly_score``: higher for rows less like the target training data;
- ``is_anomaly``: whether ``anomaly_score`` is above the detector's threshold (set at
  ``anomaly.target_fpr`` on healthy validation rows).

It loads with nothing but ``mlflow.pyfunc.load_model(uri)`` in a process where trackflow is
installed, and answers through ``mlflow models serve``.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from trackflow.data.inputs import MAX_SCALED, InputError, check_rows
from trackflow.errors import preview

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo

    from trackflow.tracking import Tracking

#: Name of the packaged model inside its run (``runs:/<id>/model``) and of its logged-model entity.
MODEL_NAME = "model"


@dataclass
class Scorer:
    """Raw rows in, labels, probabilities and anomaly scores out: the packaged model's work.

    Attributes:
        preprocessor: Fitted scikit-learn pipeline (impute, scale, PCA or passthrough).
        network: ``nn.Sequential(backbone, head)`` in eval mode.
        detector: Bundle saved by the anomaly stage (``name``, ``space``, ``detector``); the
            space is ``raw`` (imputed only), ``scaled`` (before PCA) or ``embedding``.
        columns: Raw feature columns, in training order.
        classes: Class labels, in the network's output order.
    """

    preprocessor: Any
    network: Any
    detector: dict[str, Any]
    columns: list[str]
    classes: list[Any]

    def __post_init__(self) -> None:
        #: Whether the pipeline fills missing values (``data.non_finite: impute``): NaN is allowed.
        self.imputes = "impute" in self.preprocessor.named_steps
        steps = [_array_step(step) for _, step in self.preprocessor.steps]
        self._scale = [step for step in steps[:-1] if step is not None]
        self._reduce = steps[-1]
        #: Lowest and highest raw value of each column the model takes (:func:`accepted_range`).
        self.limits = accepted_range(self._scale, len(self.columns))

    @classmethod
    def from_files(
        cls, preprocessor: str | Path, network: str | Path, detector: str | Path
    ) -> Scorer:
        """Load the three fitted parts the pipeline wrote."""
        import joblib

        from trackflow.learn.networks import load_classifier

        pipeline = joblib.load(preprocessor)
        model, meta = load_classifier(network)
        return cls(
            preprocessor=pipeline,
            network=model,
            detector=joblib.load(detector),
            columns=[str(c) for c in pipeline.feature_names_in_],
            classes=list(meta["classes"]),
        )

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Check a table of raw rows against the model's columns, then :meth:`score` it.

        Raises:
            InputError: The table does not fit the model (message names what is wrong).
        """
        return self.score(self.check(frame))

    def check(self, frame: pd.DataFrame) -> pd.DataFrame:
        """:func:`~trackflow.data.inputs.check_rows` for this model (NaN allowed if it imputes)."""
        return check_rows(frame, self.columns, allow_nan=self.imputes, limits=self.limits)

    def score(self, rows: pd.DataFrame) -> pd.DataFrame:
        """Score rows already checked by :func:`~trackflow.data.inputs.check_rows`.

        Args:
            rows: Raw features, shape (n_rows, n_features), columns in training order.

        Returns:
            ``label``, ``proba_<class>`` per class, ``anomaly_score`` and ``is_anomaly`` per row,
            indexed like ``rows``.
        """
        import torch

        raw, steps = rows.to_numpy(dtype=np.float64), self._scale
        if self.imputes:  # the imputer comes first; a "raw"-space detector reads imputed rows
            raw, steps = steps[0].transform(raw), steps[1:]
        scaled = raw
        for step in steps:
            scaled = step.transform(scaled)
        features = scaled if self._reduce is None else self._reduce.transform(scaled)
        backbone, head = self.network[0], self.network[1]
        with torch.inference_mode():
            embedding = backbone(torch.from_numpy(np.asarray(features, dtype=np.float32)))
            proba = torch.softmax(head(embedding), dim=1).numpy()
        space = {"raw": raw, "scaled": scaled, "embedding": embedding.numpy()}[
            self.detector["space"]
        ]
        detector = self.detector["detector"]
        normality = detector.score_samples(space)
        _require_finite(rows.index, proba, normality)
        out = {"label": np.asarray(self.classes)[proba.argmax(axis=1)]}
        out |= {f"proba_{c}": proba[:, i].astype(np.float64) for i, c in enumerate(self.classes)}
        out["anomaly_score"] = -normality.astype(np.float64)
        out["is_anomaly"] = normality < detector.threshold_
        return pd.DataFrame(out, index=rows.index)


def _require_finite(index: pd.Index, proba: np.ndarray, normality: np.ndarray) -> None:
    """Refuse rows whose probabilities or anomaly score came out NaN or infinite.

    A safety net behind :func:`accepted_range`: no such row is answered with a null score.
    """
    finite = np.isfinite(proba).all(axis=1) & np.isfinite(normality)
    if not finite.all():
        rows = preview(index[~finite], limit=4)
        raise InputError(
            f"the model's output for row {rows} is not finite: the values are too far from the "
            "training data to score; check their units"
        )


def accepted_range(scale: list[Any], width: int) -> tuple[np.ndarray, np.ndarray]:
    """The raw values whose scaled magnitude is at most :data:`~trackflow.data.inputs.MAX_SCALED`.

    Every scaler of the pipeline (standard, min-max, none; an imputer before it changes no
    finite value) maps each column by ``offset + slope * x``, read off here from the fitted steps
    on rows of zeros and ones.

    Args:
        scale: The fitted array steps before the reduction (:func:`_array_step`).
        width: Number of raw feature columns.

    Returns:
        Lowest and highest accepted value per column, shape (width,) each.
    """
    probe = np.array([np.zeros(width), np.ones(width)])
    for step in scale:
        probe = step.transform(probe)
    offset, slope = probe[0], probe[1] - probe[0]
    with np.errstate(divide="ignore", invalid="ignore"):  # slope 0: the value does not matter
        ends = np.sort([(-MAX_SCALED - offset) / slope, (MAX_SCALED - offset) / slope], axis=0)
    ends[:, slope == 0] = [[-np.inf], [np.inf]]
    return ends[0], ends[1]


def _array_step(step: Any) -> Any:
    """A fitted preprocessing step that takes and returns plain arrays (None for passthrough).

    The pipeline was fitted on named columns and outputs tables; scoring goes through arrays in
    the fitted column order, which :func:`~trackflow.data.inputs.check_rows` guarantees, and skips
    pandas on every call (about 3 ms of the 4 ms a one-row call took). The fitted arrays are
    shared, not copied.
    """
    if step == "passthrough" or step is None:
        return None
    step = copy.deepcopy(step)  # small fitted arrays; a shallow copy would share output config
    step.set_output(transform="default")
    if hasattr(step, "feature_names_in_"):
        del step.feature_names_in_
    return step


class PackagedModel(mlflow.pyfunc.PythonModel):
    """The MLflow pyfunc wrapper around a :class:`Scorer` built from the model's artifacts.

    ``profile`` is the training rows' :func:`~trackflow.data.drift.build_profile`, for drift checks
    (``mlflow.pyfunc.load_model(uri).unwrap_python_model().profile``).
    """

    def load_context(self, context: Any) -> None:
        """Load the preprocessor, network and detector logged as the model's artifacts."""
        paths = context.artifacts
        self.scorer = Scorer.from_files(paths["preprocessor"], paths["network"], paths["detector"])
        self.profile = json.loads(Path(paths["profile"]).read_text())

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Score raw rows; a table that does not fit the model is refused with a clear message."""
        from mlflow.exceptions import MlflowException

        try:
            return self.scorer.predict(_as_table(model_input))
        except InputError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None


def _as_table(data: Any) -> Any:
    """MLflow's other shapes of rows as a table; anything else unchanged, for the check to judge.

    With no input schema, ``mlflow models serve`` hands ``instances`` and ``inputs`` over as
    ``{column: array}`` or as ``[{column: 0-d array}, ...]``.

    Raises:
        InputError: Columns of different lengths.
    """
    if isinstance(data, dict):
        try:
            return pd.DataFrame({name: np.ravel(values) for name, values in data.items()})
        except ValueError as exc:  # ragged columns
            raise InputError(f"the columns do not make a table: {exc}") from None
    if isinstance(data, list) and data and all(isinstance(row, dict) for row in data):
        return pd.DataFrame([{name: _scalar(value) for name, value in row.items()} for row in data])
    return data


def _scalar(value: Any) -> Any:
    return np.asarray(value).item() if np.ndim(value) == 0 else value


def pip_requirements() -> list[str]:
    """What the packaged model needs at load time, pinned to the versions it was logged with.

    trackflow itself is not listed: it is not on PyPI, and a requirement of that name would let
    an environment builder install whatever a stranger publishes under it. The model loads where
    trackflow is installed (``--env-manager local``).
    """
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}"
        for name in ("mlflow", "torch", "scikit-learn", "pandas", "numpy", "joblib")
    ]


def log_packaged_model(
    tracking: Tracking,
    run_id: str,
    preprocessor: Path,
    network: Path,
    detector: Path,
    example: pd.DataFrame,
    reference: pd.DataFrame,
) -> ModelInfo:
    """Log preprocessor + network + detector to ``run_id`` as one pyfunc model named ``model``.

    The signature declares the outputs, inferred from the model's own output on ``example`` (raw
    rows), which also checks that the three parts fit together before anything is logged. It
    declares no inputs: MLflow would refuse int64 columns for ``double`` ones and drop extra
    columns without a word. The model checks its input itself (:meth:`Scorer.check`: any integer
    or float columns, clear messages); its columns are in the input example and in the MLmodel
    file's ``metadata`` (``input_columns``). ``reference`` (the raw training rows) is profiled
    into the model's ``profile`` artifact.

    Returns:
        MLflow's ``ModelInfo``; ``model_uri`` is the logged model's ``models:/m-<id>`` URI.
    """
    from mlflow.models import Model, ModelSignature, infer_signature

    from trackflow.data.drift import build_profile
    from trackflow.tracking import fluent_tracking

    scorer = Scorer.from_files(preprocessor, network, detector)
    example = scorer.check(example)
    with warnings.catch_warnings():  # MLflow's hint that int columns cannot hold NaN: labels
        warnings.simplefilter("ignore", UserWarning)
        outputs = infer_signature(example, scorer.score(example)).outputs
    # Created here, in the run's experiment: Model.log alone would file it under the process's
    # active experiment (Default, with artifacts relative to the working directory).
    logged = tracking.client.create_logged_model(
        tracking.experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="trackflow"
    )
    with fluent_tracking(tracking), tempfile.TemporaryDirectory() as folder:
        profile = Path(folder) / "profile.json"
        profile.write_text(json.dumps(build_profile(scorer.check(reference))))
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            flavor_name="pyfunc.ModelFromCode",
            run_id=None,  # linked to the run below, in two requests
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={
                "preprocessor": str(preprocessor),
                "network": str(network),
                "detector": str(detector),
                "profile": str(profile),
            },
            signature=ModelSignature(outputs=outputs),
            input_example=example,
            metadata={"input_columns": scorer.columns, "input_type": "number"},
            pip_requirements=pip_requirements(),
            model_id=logged.model_id,
        )
    _link_to_run(tracking, run_id, logged.model_id)
    return info


def _link_to_run(tracking: Tracking, run_id: str, model_id: str) -> None:
    """Record the model as the run's output and give it the run's metrics (their last values).

    What ``Model.log(run_id=...)`` does itself, but it reads the history of every metric of the
    run, one request each: with the evaluate and anomaly stages' ~150 metrics, about a minute
    against a tracking server, for two requests' worth of work.
    """
    from mlflow.entities import LoggedModelOutput, Metric

    client = tracking.client
    client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
    # The Metric objects (with step and timestamp): re-logged as they are, they add no history.
    latest = client.get_run(run_id).data._metric_objs
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=model_id)
        for m in latest
    ]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
