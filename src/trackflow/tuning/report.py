"""What a sweep shows: progress while it runs, and the study's summary on its MLflow parent run.

The parent run gets the best trial (number, value, params as tags and ``best_params.json``), the
count of complete, pruned and failed trials, the trials table (``trials.csv``), the optimization
history and the parameter importances as figures, and a description a person reads first.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from trackflow.tracking import Tracking, log_metrics, set_tags, update_note, yaml_text
from trackflow.tuning.space import decode
from trackflow.tuning.trials import SWEEP_TAG

if TYPE_CHECKING:
    import optuna

    from trackflow.config import SweepConfig


def best_values(study: optuna.Study, sweep: SweepConfig) -> dict[str, Any] | None:
    """The best complete trial's values as params values; None before any trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return decode(study.best_trial.params, sweep.space)


def ranked_values(study: optuna.Study, sweep: SweepConfig, top: int) -> list[dict[str, Any]]:
    """The ``top`` best complete trials' values, best first."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    reverse = sweep.direction == "maximize"
    ranked = sorted(complete, key=lambda t: t.value, reverse=reverse)[:top]
    return [decode(t.params, sweep.space) for t in ranked]


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, lower-case: complete, pruned, fail, interrupted, running, waiting.

    ``interrupted``: failed because the sweep was stopped or killed (they run again on resume).
    """
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        name = trial.state.name.lower()
        if name == "fail" and trial.user_attrs.get("interrupted"):
            name = "interrupted"
        counts[name] = counts.get(name, 0) + 1
    return counts


class Progress:
    """Trials done and best so far: one updating line on a terminal, one line per trial else."""

    def __init__(self, sweep: SweepConfig, stream: TextIO | None = None) -> None:
        self.sweep = sweep
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, study: optuna.Study, trial: Any) -> None:
        """Report one finished trial."""
        from trackflow.tuning.study import counted_trials

        best = self._best(study)
        done = f"{counted_trials(study)}/{self.sweep.n_trials}"
        value = "" if trial.value is None else f" {self.sweep.metric}={trial.value:.4f}"
        seconds = trial.duration.total_seconds() if trial.duration else math.nan
        if self.tty:
            line = f"\rsweep: {done} trials, best {best}   "
        else:
            state = trial.state.name.lower()
            reason = trial.user_attrs.get("fail_reason", "")
            why = f" ({reason})" if state == "fail" and reason else ""
            line = (
                f"trial {trial.number}: {state}{value}{why}, best {best}, {seconds:.1f} s "
                f"[{done}]\n"
            )
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        """End the updating line."""
        if self.tty:
            self.stream.write("\n")

    def _best(self, study: optuna.Study) -> str:
        from optuna.trial import TrialState

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return "none yet"
        best = study.best_trial
        return f"{self.sweep.metric}={best.value:.4f} (trial {best.number})"


def log_study(
    tracking: Tracking, run_id: str, study: optuna.Study, sweep: SweepConfig, seconds: float
) -> dict[str, Any]:
    """Write the study's summary to the parent run; return it."""
    counts = state_counts(study)
    best = best_values(study, sweep)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "n_complete": counts.get("complete", 0),
        "n_pruned": counts.get("pruned", 0),
        "n_failed": counts.get("fail", 0),
        "n_interrupted": counts.get("interrupted", 0),
        "best_trial": study.best_trial.number if best is not None else None,
        "best_value": study.best_trial.value if best is not None else None,
        "best_params": best,
    }
    counted = ("n_complete", "n_pruned", "n_failed", "n_interrupted")
    metrics = {f"sweep/{k}": summary[k] for k in counted}
    if best is not None:
        metrics |= {f"sweep/{k}": summary[k] for k in ("best_trial", "best_value")}
        tags = {SWEEP_TAG + "best." + key: yaml_text(value) for key, value in best.items()}
        set_tags(tracking, run_id, tags | {SWEEP_TAG + "best_trial": str(summary["best_trial"])})
    log_metrics(tracking, run_id, metrics | {"sweep/seconds_this_run": seconds})
    with tempfile.TemporaryDirectory(prefix="trackflow-sweep-") as folder:
        root = Path(folder)
        (root / "best_params.json").write_text(json.dumps(summary, indent=2, default=str))
        study.trials_dataframe().to_csv(root / "trials.csv", index=False)
        _draw_history(study, sweep, root / "optimization_history.png")
        _draw_importances(study, root / "param_importances.png")
        tracking.client.log_artifacts(run_id, folder, "sweep")
    update_note(tracking, run_id, "sweep", describe(summary, sweep))
    return summary


def describe(summary: dict[str, Any], sweep: SweepConfig) -> str:
    """The parent run's description: counts, the best trial, how to resume and apply."""
    counts = (
        f"{summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed, {summary['n_interrupted']} interrupted"
    )
    text = f"study `{summary['study']}`: {counts} (of {sweep.n_trials})."
    if summary["best_params"] is not None:
        values = ", ".join(f"{k}={yaml_text(v)}" for k, v in summary["best_params"].items())
        text += (
            f" Best {sweep.metric} {summary['best_value']:.4f} in trial {summary['best_trial']}: "
            f"{values}."
        )
    return text + (
        f" Resume: `trackflow sweep --study {summary['study']}`; apply the best: "
        "`trackflow sweep --apply`, then `dvc repro`."
    )


def _draw_history(study: optuna.Study, sweep: SweepConfig, path: Path) -> None:
    from optuna.trial import TrialState

    from trackflow.plotting import pyplot

    plt = pyplot()
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    figure, axes = plt.subplots(figsize=(7, 4))
    if trials:
        numbers = [t.number for t in trials]
        values = [t.value for t in trials]
        pick = max if sweep.direction == "maximize" else min
        best = [pick(values[: i + 1]) for i in range(len(values))]
        axes.scatter(numbers, values, s=14, label="complete trial")
        axes.step(numbers, best, where="post", color="C3", label="best so far")
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no complete trial yet", ha="center", transform=axes.transAxes)
    axes.set(xlabel="trial", ylabel=sweep.metric, title=f"Optimization history: {study.study_name}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _draw_importances(study: optuna.Study, path: Path) -> None:
    """FANOVA importances of the searched keys (needs two complete trials that differ)."""
    import optuna

    from trackflow.plotting import pyplot

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    try:
        with warnings.catch_warnings():  # "too few trials": the figure says so instead
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:  # too few trials, or no variation
        importances, reason = {}, str(exc)
    else:
        reason = "no searched key varied among complete trials"
    if importances:
        names = list(importances)[::-1]
        axes.barh(names, [importances[n] for n in names])
        axes.set(xlabel="importance (Optuna's default evaluator)")
    else:
        axes.text(0.5, 0.5, f"no importances: {reason}"[:90], ha="center", transform=axes.transAxes)
    axes.set(title="Parameter importances")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
