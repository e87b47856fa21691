"""The promotion gate: does a challenger beat the champion on the same test rows, with support?

Both models are scored on one pinned evaluation set (healthy labelled test rows plus held-out
anomalies). The challenger must pass absolute floors; the first model that does becomes champion;
after that it must beat the champion on the primary metric by at least ``min_delta``, and the
difference must be statistically supported at the configured one-sided level: McNemar's exact test
on the rows one model gets right and the other wrong, or a paired bootstrap confidence interval.
Pure numpy/scipy: no registry, no model loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from trackflow.config import PromotionConfig


@dataclass(frozen=True)
class GateSet:
    """The pinned rows both models are scored on.

    Attributes:
        rows: Raw features, shape (n_rows, n_features): healthy test rows, then anomalies.
        labels: True class of each healthy row, shape (n_healthy,).
        anomalous: Whether each row of ``rows`` is an anomaly, shape (n_rows,).
        digest: Content digest of ``rows``, recorded with every decision.
    """

    rows: pd.DataFrame
    labels: np.ndarray
    anomalous: np.ndarray
    digest: str


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

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow: ``gate/challenger/accuracy``, ``gate/delta``, ..."""
        flat = {f"gate/challenger/{k}": v for k, v in self.challenger.items()}
        flat |= {f"gate/champion/{k}": v for k, v in (self.champion or {}).items()}
        flat |= {f"gate/{k}": v for k, v in self.support.items()}
        if self.delta is not None:
            flat["gate/delta"] = self.delta
        flat["gate/promoted"] = float(self.promote)
        return flat


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
