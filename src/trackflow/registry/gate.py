"""The promotion gate: does a challenger beat the champion on the same test rows, with support?

Both models are scored on one pinned evaluation set (healthy labelled test rows plus held-out
anomalies), restricted to the rows **neither model saw**: every registered version records the
digests of its training and validation rows (:class:`SeenRows`), and a gate row whose raw row
(or, for a corrupted anomaly, the row it was made from) is among them is left out
(:func:`comparable_rows`). Too few rows left, or models that take different columns, and the gate
refuses to compare. The challenger must pass absolute floors; the first model that does becomes
champion; after that it must beat the champion on the primary metric by at least ``min_delta``,
and the difference must be statistically supported at the configured one-sided level: McNemar's
exact test on the rows one model gets right and the other wrong, or a paired bootstrap confidence
interval. No registry and no model loading: :func:`build_gate_set` and :func:`seen_rows` read a
split folder, the rest is numpy/scipy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trackflow.config import Params, PromotionConfig
from trackflow.errors import preview

#: Hex characters kept of each row's SHA-1 (64 bits: no collision among billions of rows).
DIGEST_CHARS = 16
#: Format of the :class:`SeenRows` record, bumped if the digest ever changes.
SEEN_ROWS_FORMAT = 1
#: Every key :meth:`Decision.metrics` returns, so that runs compare side by side in MLflow.
METRICS = ("accuracy", "macro_f1", "anomaly_auroc")
SUPPORT = ("p_value", "rows_fixed", "rows_broken", "ci_low")


def row_digests(rows: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """A digest per raw row: SHA-1 of its float64 values in ``columns`` order, shape (n_rows,).

    Integer and float copies of a row get the same digest; ``-0.0`` is taken as ``0.0`` and every
    NaN as the same NaN.
    """
    values = np.ascontiguousarray(rows[list(columns)].to_numpy(dtype=np.float64) + 0.0)
    values[np.isnan(values)] = np.nan
    return np.array(
        [hashlib.sha1(row.tobytes()).hexdigest()[:DIGEST_CHARS] for row in values], dtype=object
    )


@dataclass(frozen=True)
class SeenRows:
    """The raw rows a model was fitted or early-stopped on, as row digests.

    Attributes:
        columns: The model's raw feature columns, in the order the digests were taken.
        digests: Digest of every training and validation row (:func:`row_digests`).
        parts: Rows per split part recorded (``target_train``: 891, ...).
    """

    columns: list[str]
    digests: frozenset[str]
    parts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_tables(cls, tables: dict[str, pd.DataFrame], columns: Sequence[str]) -> SeenRows:
        """Record the rows of ``tables`` (split parts by name, feature columns at least)."""
        digests = {d for table in tables.values() for d in row_digests(table, columns)}
        parts = {name: len(table) for name, table in tables.items()}
        return cls(list(columns), frozenset(digests), parts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (digests sorted, so the same rows give the same file)."""
        return {
            "format": SEEN_ROWS_FORMAT,
            "hash": f"sha1 of the float64 row in 'columns' order, first {DIGEST_CHARS} hex",
            "columns": self.columns,
            "parts": self.parts,
            "digests": sorted(self.digests),
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> SeenRows:
        """Read back :meth:`to_json`; a record of another format is refused."""
        if record.get("format") != SEEN_ROWS_FORMAT:
            raise ValueError(f"seen-rows record of format {record.get('format')!r}, not 1")
        return cls(list(record["columns"]), frozenset(record["digests"]), record["parts"])


@dataclass(frozen=True)
class GateSet:
    """The pinned rows both models are scored on.

    Attributes:
        rows: Raw features, shape (n_rows, n_features): healthy test rows, then anomalies.
        labels: True class of each healthy row, shape (n_healthy,).
        anomalous: Whether each row of ``rows`` is an anomaly, shape (n_rows,).
        digest: Content digest of ``rows``, recorded with every decision.
        origins: The raw row each row was made from (itself, or the healthy row an anomaly is a
            corruption of), shape like ``rows``; None when every row is its own origin.
    """

    rows: pd.DataFrame
    labels: np.ndarray
    anomalous: np.ndarray
    digest: str
    origins: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def n_labelled(self) -> int:
        """Healthy, labelled rows: those accuracy and the paired tests are computed on."""
        return len(self.labels)

    def unseen_by(self, seen: SeenRows) -> np.ndarray:
        """Whether each row (by its origin) is outside ``seen``, shape (n_rows,)."""
        origins = self.rows if self.origins is None else self.origins
        digests = row_digests(origins, seen.columns)
        return np.fromiter((d not in seen.digests for d in digests), bool, len(digests))

    def subset(self, keep: np.ndarray) -> GateSet:
        """The rows where ``keep`` (shape (n_rows,)) is true, with their labels and origins."""
        origins = None if self.origins is None else self.origins[keep].reset_index(drop=True)
        rows = self.rows[keep].reset_index(drop=True)
        labels = self.labels[keep[~self.anomalous]]
        return GateSet(rows, labels, self.anomalous[keep], self.digest, origins)


def comparable_rows(
    gate_set: GateSet,
    seen: dict[str, SeenRows | None],
    columns: dict[str, Sequence[str]],
    min_rows: int,
) -> tuple[np.ndarray, str | None]:
    """The gate rows no model in ``seen`` trained on, or why the models cannot be compared.

    Args:
        gate_set: The pinned rows.
        seen: Each model's recorded training and validation rows by name (``"challenger"``,
            ``"champion version 3"``); None where a model has no record.
        columns: Each model's raw feature columns, by the same names.
        min_rows: The fewest labelled rows a comparison needs (``promotion.min_gate_rows``).

    Returns:
        A mask over the gate rows, shape (n_rows,), and None; or the mask and a one-line problem.
    """
    keep = np.ones(len(gate_set.rows), bool)
    if problem := _column_mismatch(columns):
        return keep, problem
    unknown = [name for name, record in seen.items() if record is None]
    if unknown:
        return keep, (
            f"{' and '.join(unknown)} recorded no training rows (registered before trackflow "
            "recorded them), so the gate cannot tell whether it trained on these test rows"
        )
    for record in seen.values():
        keep &= gate_set.unseen_by(record)
    left = int(keep[~gate_set.anomalous].sum())
    if left < min_rows:
        return keep, (
            f"only {left} of {gate_set.n_labelled} labelled test rows are held out from both "
            f"models (the others were training/validation rows), fewer than "
            f"promotion.min_gate_rows {min_rows}"
        )
    return keep, None


def _column_mismatch(columns: dict[str, Sequence[str]]) -> str | None:
    """Why models taking these raw columns cannot be scored on the same rows, or None."""
    (first, mine), *others = columns.items()
    for name, theirs in others:
        if set(mine) != set(theirs):
            only_first = [c for c in mine if c not in set(theirs)]
            only_other = [c for c in theirs if c not in set(mine)]
            return (
                f"{first} takes {len(mine)} columns and {name} {len(theirs)} (only the "
                f"{first}: {preview(only_first, 3) or 'none'}; only the {name}: "
                f"{preview(only_other, 3) or 'none'}): they do not score the same rows"
            )
    return None


@dataclass(frozen=True)
class Evaluation:
    """One model's scores on a :class:`GateSet`."""

    metrics: dict[str, float]
    predicted: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)

    @property
    def correct(self) -> np.ndarray:
        """Whether each healthy row is classified right, shape (n_healthy,)."""
        return self.predicted == self.labels


def evaluate(predict: Callable[[pd.DataFrame], pd.DataFrame], gate_set: GateSet) -> Evaluation:
    """Score a model (a packaged model's ``predict``) on the gate set.

    Returns:
        Accuracy and macro-F1 on the healthy rows and anomaly AUROC on all rows.
    """
    from sklearn.metrics import f1_score, roc_auc_score

    scored = predict(gate_set.rows)
    healthy = ~gate_set.anomalous
    labels = np.asarray([str(v) for v in gate_set.labels])
    predicted = np.asarray([str(v) for v in np.asarray(scored["label"])[healthy]])
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "anomaly_auroc": float(roc_auc_score(gate_set.anomalous, scored["anomaly_score"])),
    }
    return Evaluation(metrics, predicted, labels)


@dataclass(frozen=True)
class Decision:
    """What the gate decided, why, and the numbers behind it."""

    promote: bool
    reason: str
    challenger: dict[str, float]
    champion: dict[str, float] | None = None
    delta: float | None = None
    support: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow, the same keys whatever the outcome (NaN: not computed).

        ``gate/challenger/<metric>``, ``gate/champion/<metric>``, ``gate/delta``,
        ``gate/p_value``, ``gate/rows_fixed``, ``gate/rows_broken``, ``gate/ci_low``,
        ``gate/rows_compared``, ``gate/rows_excluded`` and ``gate/promoted``.
        """
        champion = self.champion or {}
        flat = {f"gate/challenger/{k}": self.challenger.get(k, np.nan) for k in METRICS}
        flat |= {f"gate/champion/{k}": champion.get(k, np.nan) for k in METRICS}
        flat["gate/delta"] = np.nan if self.delta is None else self.delta
        flat |= {f"gate/{k}": self.support.get(k, np.nan) for k in SUPPORT}
        flat |= {f"gate/rows_{k}": self.rows.get(k, np.nan) for k in ("compared", "excluded")}
        flat["gate/promoted"] = float(self.promote)
        return {k: float(v) for k, v in flat.items()}


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    config: PromotionConfig,
    seed: int = 0,
    champion_problem: str | None = None,
) -> Decision:
    """Apply the floors, then the comparison with the champion.

    Args:
        challenger: The candidate's scores.
        champion: The current champion's scores on the same rows; None if there is no champion.
        config: Floors, primary metric, ``min_delta``, test and level.
        seed: Seed of the bootstrap.
        champion_problem: Why the champion could not be scored, if it could not.
    """
    scores = challenger.metrics
    floors = {"accuracy": config.min_accuracy, "anomaly_auroc": config.min_anomaly_auroc}
    below = [
        f"{k} {scores[k]:.4f} < min_{k} {floor:g}"
        for k, floor in floors.items()
        if scores[k] < floor
    ]
    if below:
        return Decision(False, "below the floor: " + "; ".join(below), scores)
    if champion_problem is not None:
        return Decision(False, f"not compared: {champion_problem}", scores)
    if champion is None:
        summary = ", ".join(f"{k} {scores[k]:.4f}" for k in floors)
        return Decision(True, f"first model passing the floors ({summary})", scores)
    metric = config.primary_metric
    delta = scores[metric] - champion.metrics[metric]
    versus = f"{metric} {scores[metric]:.4f} vs champion {champion.metrics[metric]:.4f}"
    common = {"challenger": scores, "champion": champion.metrics, "delta": delta}
    if delta <= 0 or delta < config.min_delta:
        need = f"needs > 0 and >= min_delta {config.min_delta:g}"
        return Decision(False, f"not better: {versus} (delta {delta:+.4f}; {need})", **common)
    support, significant, evidence = _support(challenger, champion, config, seed)
    if not significant:
        return Decision(
            False,
            f"better but not significantly: {versus} (delta {delta:+.4f}; {evidence})",
            **common,
            support=support,
        )
    return Decision(
        True, f"better: {versus} (delta {delta:+.4f}; {evidence})", **common, support=support
    )


def mcnemar(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact one-sided test that the challenger is right more often.

    Returns:
        Rows fixed (champion wrong, challenger right), rows broken (the reverse), and the p-value
        of seeing at least that many fixed rows among the discordant ones if both were as good.
    """
    from scipy.stats import binomtest

    fixed = int((challenger_correct & ~champion_correct).sum())
    broken = int((~challenger_correct & champion_correct).sum())
    if fixed + broken == 0:
        return fixed, broken, 1.0
    return fixed, broken, float(binomtest(fixed, fixed + broken, 0.5, alternative="greater").pvalue)


def bootstrap_delta(
    challenger: Evaluation, champion: Evaluation, metric: str, samples: int, seed: int
) -> np.ndarray:
    """Paired bootstrap of challenger minus champion on ``metric``, shape (samples,).

    Rows are resampled with replacement, the same rows for both models.
    """
    rng = np.random.default_rng(seed)
    n = len(challenger.labels)
    index = rng.integers(0, n, size=(samples, n))
    if metric == "accuracy":
        diff = challenger.correct.astype(float) - champion.correct.astype(float)
        return diff[index].mean(axis=1)
    from sklearn.metrics import f1_score

    def f1(evaluation: Evaluation, rows: np.ndarray) -> float:
        labels, predicted = evaluation.labels[rows], evaluation.predicted[rows]
        return f1_score(labels, predicted, average="macro", zero_division=0)

    return np.array([f1(challenger, rows) - f1(champion, rows) for rows in index])


def _support(
    challenger: Evaluation, champion: Evaluation, config: PromotionConfig, seed: int
) -> tuple[dict[str, float], bool, str]:
    alpha = 1 - config.confidence
    if config.test == "mcnemar":
        fixed, broken, p = mcnemar(challenger.correct, champion.correct)
        sign = "<" if p < alpha else ">="
        evidence = f"McNemar p={p:.4f} {sign} {alpha:g}: {fixed} rows fixed, {broken} broken"
        return {"p_value": p, "rows_fixed": fixed, "rows_broken": broken}, p < alpha, evidence
    deltas = bootstrap_delta(
        challenger, champion, config.primary_metric, config.bootstrap_samples, seed
    )
    low = float(np.quantile(deltas, alpha))
    level = f"{config.confidence:.0%}"
    evidence = f"bootstrap {level} lower bound {low:+.4f} {'>' if low > 0 else '<='} 0"
    return {"ci_low": low}, low > 0, evidence


def build_gate_set(splits: Path, params: Params) -> GateSet:
    """The pinned rows of the gate: target test rows, then the test anomalies of the anomaly stage.

    Anomalies are the source task's test rows and seeded corruptions of the target test rows, the
    same held-out anomalies the anomaly stage reports on. Each row keeps its origin (a corruption's
    is the test row it was made from), so rows a model saw can be left out of its comparison.
    """
    from trackflow.data.ingest import table_digest
    from trackflow.learn.anomaly import anomaly_sets

    label = params.data.label_column
    raw = read_parts(splits)
    sets = anomaly_sets(raw, label, params.anomaly, params.base.seed)
    anomalies = list(sets.test_anomalies.values())
    indexed = pd.concat([sets.test, *anomalies])
    pool = pd.concat([raw[name] for name in raw if name.endswith("_test")]).drop(columns=label)
    rows = indexed.reset_index(drop=True)
    anomalous = np.r_[np.zeros(len(sets.test), bool), np.ones(len(rows) - len(sets.test), bool)]
    labels = raw["target_test"][label].to_numpy()
    origins = pool.loc[indexed.index].reset_index(drop=True) if pool.index.is_unique else None
    return GateSet(rows, labels, anomalous, table_digest(rows), origins)


def seen_rows(splits: Path, label: str, columns: list[str]) -> SeenRows:
    """The rows a candidate trained on this split saw: every part but the test parts."""
    parts = {name: t for name, t in read_parts(splits).items() if not name.endswith("_test")}
    return SeenRows.from_tables(parts, columns)


def read_parts(splits: Path) -> dict[str, pd.DataFrame]:
    """The split's parts by name (``target_train``, ...), as ``summary.json`` lists them."""
    from trackflow.io import read_json, read_table

    names = read_json(splits / "summary.json")["parts"]
    return {name: read_table(splits / f"{name}.parquet") for name in names}
