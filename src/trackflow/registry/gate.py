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
interval. When the compared rows include held-out rows of labelled batches added to the data
(``trackflow add-batch``; :func:`~trackflow.data.batches.read_origins`), that comparison is made
on those *new* rows, where the challenger is asked to improve, and on the *old* rows (the original
data's) it may lose at most ``max_forgetting`` of the primary metric against the champion. No
registry and no model loading: :func:`build_gate_set` and :func:`seen_rows` read a split folder,
the rest is numpy/scipy.
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
from trackflow.data.batches import ORIGINAL
from trackflow.errors import preview

#: Hex characters kept of each row's SHA-1 (64 bits: no collision among billions of rows).
DIGEST_CHARS = 16
#: Format of the :class:`SeenRows` record, bumped if the digest ever changes.
SEEN_ROWS_FORMAT = 1
#: Every key :meth:`Decision.metrics` returns, so that runs compare side by side in MLflow.
METRICS = ("accuracy", "macro_f1", "anomaly_auroc")
#: The metrics also reported on the old and the new rows apart (those of the labelled rows).
PART_METRICS = ("accuracy", "macro_f1")
SUPPORT = ("p_value", "rows_fixed", "rows_broken", "ci_low")
#: Labelled row counts: compared, left out as seen by a model, and of the compared: old and new.
ROWS = ("compared", "excluded", "old", "new")
#: Slack on ``max_forgetting``: one row of 100 lost must pass 0.01 (0.98 - 0.97 is a hair more).
FORGETTING_SLACK = 1e-9


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
        batches: Where each labelled row comes from: ``"original"`` (the source's data) or the
            name of the batch that added it, shape (n_healthy,); None when all are original.
    """

    rows: pd.DataFrame
    labels: np.ndarray
    anomalous: np.ndarray
    digest: str
    origins: pd.DataFrame | None = field(default=None, repr=False)
    batches: np.ndarray | None = field(default=None, repr=False)

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
        labelled = keep[~self.anomalous]
        batches = None if self.batches is None else self.batches[labelled]
        return GateSet(
            rows, self.labels[labelled], self.anomalous[keep], self.digest, origins, batches
        )


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
    labelled = keep[~gate_set.anomalous]
    if gate_set.batches is not None and not (gate_set.batches[labelled] == ORIGINAL).any():
        return keep, (
            f"none of the original data's labelled test rows are held out from both models "
            f"(all {left} left come from added batches), so the gate cannot tell whether the "
            "challenger forgot the original data (promotion.max_forgetting)"
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
    """One model's scores on a :class:`GateSet`.

    Attributes:
        metrics: Accuracy and macro-F1 on the healthy rows, anomaly AUROC on all.
        predicted: Predicted label of each healthy row, shape (n_healthy,).
        labels: True label of each healthy row, shape (n_healthy,).
        batches: Each healthy row's origin as :attr:`GateSet.batches`; None when all original.
    """

    metrics: dict[str, float]
    predicted: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    batches: np.ndarray | None = field(default=None, repr=False)

    @property
    def correct(self) -> np.ndarray:
        """Whether each healthy row is classified right, shape (n_healthy,)."""
        return self.predicted == self.labels

    @property
    def new_rows(self) -> np.ndarray:
        """Whether each healthy row comes from an added batch, shape (n_healthy,)."""
        if self.batches is None:
            return np.zeros(len(self.labels), bool)
        return self.batches != ORIGINAL

    def part(self, rows: np.ndarray) -> Evaluation:
        """The scores on the healthy rows where ``rows`` (shape (n_healthy,)) is true.

        Only the labels' metrics (:data:`PART_METRICS`, NaN on no rows): the anomaly AUROC
        is a number of all the rows.
        """
        predicted, labels = self.predicted[rows], self.labels[rows]
        batches = None if self.batches is None else self.batches[rows]
        return Evaluation(label_metrics(labels, predicted), predicted, labels, batches)


def label_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of ``predicted`` against ``labels`` (shape (n,)); NaN when n is 0."""
    from sklearn.metrics import f1_score

    if len(labels) == 0:
        return dict.fromkeys(PART_METRICS, np.nan)
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def evaluate(predict: Callable[[pd.DataFrame], pd.DataFrame], gate_set: GateSet) -> Evaluation:
    """Score a model (a packaged model's ``predict``) on the gate set.

    Returns:
        Accuracy and macro-F1 on the healthy rows and anomaly AUROC on all rows, with each
        healthy row's origin (:attr:`GateSet.batches`).
    """
    from sklearn.metrics import roc_auc_score

    scored = predict(gate_set.rows)
    healthy = ~gate_set.anomalous
    labels = np.asarray([str(v) for v in gate_set.labels])
    predicted = np.asarray([str(v) for v in np.asarray(scored["label"])[healthy]])
    metrics = label_metrics(labels, predicted)
    metrics["anomaly_auroc"] = float(roc_auc_score(gate_set.anomalous, scored["anomaly_score"]))
    return Evaluation(metrics, predicted, labels, gate_set.batches)


@dataclass(frozen=True)
class Decision:
    """What the gate decided, why, and the numbers behind it.

    Attributes:
        promote: Whether ``champion`` moves to the challenger.
        reason: One line: the outcome and the numbers behind it.
        challenger: The challenger's :data:`METRICS` on every compared row.
        champion: The champion's on the same rows; None when not compared.
        delta: Challenger minus champion on the primary metric, on the rows where the challenger
            must improve (the new rows when batches were added, else every compared row).
        support: The statistical test's numbers (:data:`SUPPORT`).
        rows: Labelled rows ``compared`` and ``excluded`` (a model saw them); with batches also
            ``old`` and ``new``: the compared rows of the original data and of the batches.
        old: With batches, each model's :data:`PART_METRICS` on the old rows, by role.
        new: The same on the new rows.
        forgetting: Champion minus challenger on the primary metric on the old rows (positive:
            the challenger is worse there); None when not computed.
    """

    promote: bool
    reason: str
    challenger: dict[str, float]
    champion: dict[str, float] | None = None
    delta: float | None = None
    support: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    old: dict[str, dict[str, float]] = field(default_factory=dict)
    new: dict[str, dict[str, float]] = field(default_factory=dict)
    forgetting: float | None = None

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow, the same keys whatever the outcome (NaN: not computed).

        ``gate/challenger/<metric>``, ``gate/champion/<metric>``, on the old and the new rows
        apart ``gate/<role>/old/<metric>`` and ``gate/<role>/new/<metric>`` (accuracy and
        macro_f1), ``gate/delta``, ``gate/forgetting``, ``gate/p_value``, ``gate/rows_fixed``,
        ``gate/rows_broken``, ``gate/ci_low``, ``gate/rows_compared``, ``gate/rows_excluded``,
        ``gate/rows_old``, ``gate/rows_new`` and ``gate/promoted``.
        """
        champion = self.champion or {}
        flat = {f"gate/challenger/{k}": self.challenger.get(k, np.nan) for k in METRICS}
        flat |= {f"gate/champion/{k}": champion.get(k, np.nan) for k in METRICS}
        for part, by_role in (("old", self.old), ("new", self.new)):
            for role in ("challenger", "champion"):
                scores = by_role.get(role, {})
                flat |= {f"gate/{role}/{part}/{k}": scores.get(k, np.nan) for k in PART_METRICS}
        flat["gate/delta"] = np.nan if self.delta is None else self.delta
        flat["gate/forgetting"] = np.nan if self.forgetting is None else self.forgetting
        flat |= {f"gate/{k}": self.support.get(k, np.nan) for k in SUPPORT}
        flat |= {f"gate/rows_{k}": self.rows.get(k, np.nan) for k in ROWS}
        flat["gate/promoted"] = float(self.promote)
        return {k: float(v) for k, v in flat.items()}

    def scores(self) -> dict[str, float]:
        """The challenger's numbers as the ledger and the version's tags keep them.

        Its :data:`METRICS` on every compared row; with batches also ``old_<metric>`` and
        ``new_<metric>`` (:data:`PART_METRICS`), and ``forgetting`` once compared.
        """
        numbers = dict(self.challenger)
        for part, by_role in (("old", self.old), ("new", self.new)):
            numbers |= {f"{part}_{k}": v for k, v in by_role.get("challenger", {}).items()}
        if self.forgetting is not None:
            numbers["forgetting"] = self.forgetting
        return numbers


@dataclass(frozen=True)
class OriginParts:
    """The compared labelled rows split by origin, each model scored on both parts.

    Attributes:
        old: Scores on the original data's rows, by role (``challenger``, ``champion``).
        new: Scores on the added batches' rows, by role.
    """

    old: dict[str, Evaluation]
    new: dict[str, Evaluation]

    @classmethod
    def of(cls, challenger: Evaluation, champion: Evaluation | None) -> OriginParts | None:
        """The two parts of the challenger's rows; None when none comes from a batch."""
        new = challenger.new_rows
        if not new.any():
            return None
        models = {"challenger": challenger} | ({"champion": champion} if champion else {})
        return cls(
            {role: e.part(~new) for role, e in models.items()},
            {role: e.part(new) for role, e in models.items()},
        )

    @property
    def n_new(self) -> int:
        """Labelled rows from batches."""
        return len(self.new["challenger"].labels)

    def report(self) -> dict[str, Any]:
        """The numbers a :class:`Decision` carries: ``old``, ``new`` and their ``rows``."""
        return {
            "old": {role: e.metrics for role, e in self.old.items()},
            "new": {role: e.metrics for role, e in self.new.items()},
            "rows": {"old": len(self.old["challenger"].labels), "new": self.n_new},
        }


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    config: PromotionConfig,
    seed: int = 0,
    champion_problem: str | None = None,
) -> Decision:
    """Apply the floors, then the comparison with the champion.

    When no compared row comes from an added batch (``challenger.batches``), the challenger must
    beat the champion on all of them. When some do, it must beat it on those new rows (on all
    rows if fewer than ``min_gate_rows`` are new) and may lose at most ``max_forgetting`` on the
    old ones; the accuracy floor then applies to the old rows.

    Args:
        challenger: The candidate's scores.
        champion: The current champion's scores on the same rows; None if there is no champion.
        config: Floors, primary metric, ``min_delta``, ``max_forgetting``, test and level.
        seed: Seed of the bootstrap.
        champion_problem: Why the champion could not be scored, if it could not.
    """
    parts = OriginParts.of(challenger, champion)
    report = parts.report() if parts else {}
    scores = challenger.metrics
    if below := _below_floors(challenger, parts, config):
        return Decision(False, "below the floor: " + "; ".join(below), scores, **report)
    if champion_problem is not None:
        return Decision(False, f"not compared: {champion_problem}", scores, **report)
    if champion is None:
        summary = ", ".join(f"{k} {scores[k]:.4f}" for k in ("accuracy", "anomaly_auroc"))
        if parts:
            old, new = (p["challenger"].metrics["accuracy"] for p in (parts.old, parts.new))
            summary += f"; accuracy on the original rows {old:.4f}, on the new rows {new:.4f}"
        return Decision(True, f"first model passing the floors ({summary})", scores, **report)
    if parts is None:
        return _compare(challenger, champion, None, config, seed)
    return _compare_by_origin(challenger, champion, parts, config, seed)


def _below_floors(
    challenger: Evaluation, parts: OriginParts | None, config: PromotionConfig
) -> list[str]:
    """The floors missed: accuracy on the old rows when batches were added, AUROC on all rows."""
    accuracy, where = challenger.metrics["accuracy"], ""
    if parts is not None and len(parts.old["challenger"].labels):
        accuracy, where = parts.old["challenger"].metrics["accuracy"], " on the original rows"
    auroc = challenger.metrics["anomaly_auroc"]
    checks = [
        ("accuracy", where, accuracy, config.min_accuracy),
        ("anomaly_auroc", "", auroc, config.min_anomaly_auroc),
    ]
    return [
        f"{k}{at} {value:.4f} < min_{k} {floor:g}"
        for k, at, value, floor in checks
        if value < floor
    ]


def _compare(
    challenger: Evaluation,
    champion: Evaluation,
    asked: np.ndarray | None,
    config: PromotionConfig,
    seed: int,
    where: str = "",
    after: str = "",
    **report: Any,
) -> Decision:
    """Does the challenger beat the champion on the rows where ``asked`` is true (all if None)?

    ``where`` names those rows in the reason, ``after`` ends it; ``report`` goes to the decision.
    """
    metric = config.primary_metric
    ours, theirs = (e if asked is None else e.part(asked) for e in (challenger, champion))
    delta = ours.metrics[metric] - theirs.metrics[metric]
    versus = f"{metric}{where} {ours.metrics[metric]:.4f} vs champion {theirs.metrics[metric]:.4f}"
    common = {"challenger": challenger.metrics, "champion": champion.metrics, "delta": delta}
    common |= report
    if delta <= 0 or delta < config.min_delta:
        need = f"needs > 0 and >= min_delta {config.min_delta:g}"
        return Decision(
            False, f"not better: {versus} (delta {delta:+.4f}; {need}){after}", **common
        )
    support, significant, evidence = _support(ours, theirs, config, seed)
    if not significant:
        return Decision(
            False,
            f"better but not significantly: {versus} (delta {delta:+.4f}; {evidence}){after}",
            **common,
            support=support,
        )
    return Decision(
        True, f"better: {versus} (delta {delta:+.4f}; {evidence}){after}", **common, support=support
    )


def _compare_by_origin(
    challenger: Evaluation,
    champion: Evaluation,
    parts: OriginParts,
    config: PromotionConfig,
    seed: int,
) -> Decision:
    """The comparison when batches were added: better on the new rows, not forgetting the old."""
    metric, limit = config.primary_metric, config.max_forgetting
    old = {role: e.metrics[metric] for role, e in parts.old.items()}
    new = {role: e.metrics[metric] for role, e in parts.new.items()}
    forgetting = old["champion"] - old["challenger"]
    on_old = (
        f"{metric} on the original rows {old['challenger']:.4f} vs champion "
        f"{old['champion']:.4f} ({old['challenger'] - old['champion']:+.4f}"
    )
    on_new = f"{metric} on the new rows {new['challenger']:.4f} vs champion {new['champion']:.4f}"
    report = parts.report() | {"forgetting": forgetting}
    if parts.n_new >= config.min_gate_rows:
        asked, where, note = challenger.new_rows, " on the new rows", ""
        delta = new["challenger"] - new["champion"]
    else:
        asked, where = None, " on all rows"
        delta = challenger.metrics[metric] - champion.metrics[metric]
        note = (
            f"; {on_new}, only {parts.n_new} new rows, fewer than promotion.min_gate_rows "
            f"{config.min_gate_rows}: compared on all rows"
        )
    if not forgetting <= limit + FORGETTING_SLACK:  # NaN (no old rows) forgets too
        reason = f"forgets: {on_old} > max_forgetting {limit:g}); {on_new}"
        return Decision(False, reason, challenger.metrics, champion.metrics, delta, **report)
    after = f"; {on_old}, within max_forgetting {limit:g}){note}"
    return _compare(challenger, champion, asked, config, seed, where, after, **report)


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
    is the test row it was made from), so rows a model saw can be left out of its comparison, and
    each labelled row the batch it came from (``origins.parquet`` of the split), so the gate can
    score the original data's rows and the added batches' apart.
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
    batches = labelled_batches(splits, raw["target_test"].index)
    return GateSet(rows, labels, anomalous, table_digest(rows), origins, batches)


def labelled_batches(splits: Path, row_ids: pd.Index) -> np.ndarray | None:
    """Where each target test row comes from, shape (n_rows,); None if all are original.

    Raises:
        DataError: The split's ``origins.parquet`` does not list some of the rows.
    """
    from trackflow.data.batches import ORIGINS_FILE, read_origins
    from trackflow.errors import DataError

    origins = read_origins(splits)
    if origins is None:
        return None
    batches = origins.reindex(row_ids)
    if missing := row_ids[batches.isna().to_numpy()].tolist():
        raise DataError(
            f"{splits / ORIGINS_FILE} has no origin for {len(missing)} target test rows (row ids "
            f"{preview(missing, 3)}): it was not written with these parts; run the split stage "
            "again (dvc repro split)"
        )
    batches = batches.astype(str).to_numpy()
    return None if (batches == ORIGINAL).all() else batches


def seen_rows(splits: Path, label: str, columns: list[str]) -> SeenRows:
    """The rows a candidate trained on this split saw: every part but the test parts."""
    parts = {name: t for name, t in read_parts(splits).items() if not name.endswith("_test")}
    return SeenRows.from_tables(parts, columns)


def read_parts(splits: Path) -> dict[str, pd.DataFrame]:
    """The split's parts by name (``target_train``, ...), as ``summary.json`` lists them."""
    from trackflow.io import read_json, read_table

    names = read_json(splits / "summary.json")["parts"]
    return {name: read_table(splits / f"{name}.parquet") for name in names}
