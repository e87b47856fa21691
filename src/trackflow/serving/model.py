"""The served model: one registered version, loaded, smoke-tested on its input, warmed up."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pandas as pd

from trackflow.serving.rows import prediction_rows
from trackflow.tracking import TAG_PREFIX

if TYPE_CHECKING:
    from trackflow.registry.packaging import Scorer
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)

_WARM_UP_CALLS = 5
NOT_PACKAGED = "it is not a trackflow packaged model (it holds no Scorer)"


class RefusedVersion(Exception):
    """A registered version that cannot be served (says why)."""


@dataclass(frozen=True)
class ServedModel:
    """One registered version, loaded, smoke-tested and warmed up: what answers requests.

    Attributes:
        name: Registered model name.
        version: Registered version number.
        run_id: The MLflow run the version was logged from.
        source: Where the version's files come from (``models:/m-<id>`` for a logged model).
        scorer: The packaged model's scorer (raw rows in).
        lineage: ``version_tags`` and ``run_tags``: the version's and its run's ``trackflow.*``
            tags.
        loaded_at: When it was loaded (ISO 8601, UTC).
    """

    name: str
    version: str
    run_id: str | None
    source: str
    scorer: Scorer
    lineage: dict[str, dict[str, str]]
    loaded_at: str

    @cached_property
    def columns(self) -> list[str]:
        """Raw feature columns, in the order the model takes them."""
        return [str(c) for c in self.scorer.columns]

    @cached_property
    def _frame_columns(self) -> pd.Index:
        return pd.Index(self.columns, dtype=object)  # builds frames faster than string columns

    @cached_property
    def _probabilities(self) -> list[tuple[str, str]]:
        return [(str(c), f"proba_{c}") for c in self.scorer.classes]

    def score(self, values: np.ndarray) -> list[dict[str, Any]]:
        """Score checked rows, shape (n_rows, n_features).

        Returns:
            One record per row with the packaged model's output columns (``label``,
            ``proba_<class>``..., ``anomaly_score``, ``is_anomaly``), as plain Python values.
        """
        frame = self.scorer.score(pd.DataFrame(values, columns=self._frame_columns))
        names = [str(c) for c in frame.columns]
        columns = [frame[name].tolist() for name in frame.columns]
        return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]

    def predictions(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Records of :meth:`score` as the service's predictions (probabilities by class)."""
        return [
            {
                "label": record["label"],
                "probabilities": {label: record[key] for label, key in self._probabilities},
                "anomaly_score": record["anomaly_score"],
                "is_anomaly": record["is_anomaly"],
            }
            for record in records
        ]

    def smoke_test(self, example: Any) -> None:
        """Answer the version's input example the way requests are answered, a few times.

        This is both the check (any exception, or insane output, refuses the version) and the
        warm-up: first-call costs are paid here, not by the first request.

        Raises:
            RefusedVersion: No example to test on, or answers that are not probabilities.
        """
        if not isinstance(example, pd.DataFrame) or example.empty:
            raise RefusedVersion("it has no input example (a table of rows) to smoke-test it on")
        rows = self.scorer.check(example)
        bodies = [
            orjson.dumps({"rows": rows.head(n).to_dict(orient="records")}) for n in (1, len(rows))
        ]
        for _ in range(_WARM_UP_CALLS):
            for body in bodies:
                values = prediction_rows(body, self.scorer, len(rows))
                records = self.score(values)
                orjson.dumps({"predictions": self.predictions(records)})
        proba = np.array([[r[key] for _, key in self._probabilities] for r in records])
        anomaly = np.array([r["anomaly_score"] for r in records], dtype=np.float64)
        if (
            len(records) != len(rows)
            or not np.isfinite(proba).all()
            or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-3)
            or not np.isfinite(anomaly).all()
        ):
            raise RefusedVersion(
                "its smoke prediction on its input example is not sane (probabilities that are "
                "not finite or do not sum to 1, or non-finite anomaly scores)"
            )


def load_version(tracking: Tracking, name: str, version: str) -> ServedModel:
    """Download, load and smoke-test (which warms up) one registered version.

    Raises:
        RefusedVersion: It is not a trackflow packaged model, or its smoke test gives answers
            that are not probabilities.
        Exception: Anything else that stops it: the version's own fault (it does not unpickle,
            its smoke prediction fails), or a transient one (a locked store, an artifact store
            out of reach; see :func:`~trackflow.serving.follower.is_transient_failure`).
    """
    from trackflow.registry import loading
    from trackflow.registry.uris import model_uri

    with tempfile.TemporaryDirectory(prefix="trackflow-") as folder:
        try:
            loaded = loading.load_version(tracking, model_uri(name, version=version), folder)
        except loading.UnloadableVersion as exc:  # the follower tells its fault from a passing one
            raise exc.error from None
        except loading.NotPackagedModel:
            raise RefusedVersion(NOT_PACKAGED) from None
    registered = loaded.registered
    run_tags = tracking.client.get_run(registered.run_id).data.tags if registered.run_id else {}
    served = ServedModel(
        name=name,
        version=str(version),
        run_id=registered.run_id,
        source=registered.source,
        scorer=loaded.scorer,
        lineage={"version_tags": _lineage(registered.tags), "run_tags": _lineage(run_tags)},
        loaded_at=utc_now(),
    )
    served.smoke_test(loaded.model.input_example)
    return served


def _lineage(tags: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in sorted(tags.items()) if key.startswith(TAG_PREFIX)}


def utc_now() -> str:
    """The time now in UTC, to the second, in ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")
