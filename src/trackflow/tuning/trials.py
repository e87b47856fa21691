"""One sweep trial: its params trained through the train stage's code, as an MLflow child run.

The trial's run is nested under the sweep's parent run (``mlflow.parentRunId``), named
``sweep-<study>-trial-007``, holds every param (as the train stage logs them), the per-epoch
curves, and tags saying which values were searched, how the trial ended (``complete``,
``pruned``, ``failed``) and why it failed. Its MLflow status follows: FINISHED, KILLED (pruned or
interrupted) or FAILED.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback

from trackflow.config import Params, set_dotted, validate_params
from trackflow.errors import shorten
from trackflow.tracking import TAG_PREFIX, Tracking, set_tags, source_tags, yaml_text
from trackflow.tuning.space import suggest

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import optuna

SWEEP_TAG = TAG_PREFIX + "sweep."
#: The objective's value per metric: the best checkpoint's numbers, on validation rows only.
OBJECTIVES = {"val/acc": "train/best_val_acc", "val/loss": "train/best_val_loss"}
#: The trial's MLflow status per final state.
RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


class SweepInterrupted(BaseException):
    """Ctrl-C (SIGINT) during a trial: not an ``Exception``, so no code on the way swallows it.

    Nor a ``KeyboardInterrupt``, which Lightning turns into ``sys.exit(1)``.
    """


class TrialInterrupted(KeyboardInterrupt):
    """What the objective raises to Optuna after Ctrl-C: Optuna then marks the trial FAIL."""


#: Set by the sweep's SIGINT handler; the running trial stops at its next batch.
INTERRUPTED = threading.Event()


class StopOnInterrupt(Callback):
    """Raise :class:`SweepInterrupted` at the first batch after Ctrl-C.

    Raising from the signal handler itself could abort a storage write halfway (and leave a SQLite
    lock behind); a batch boundary is a safe place.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop here if Ctrl-C was pressed."""
        if INTERRUPTED.is_set():
            raise SweepInterrupted()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop here if Ctrl-C was pressed."""
        if INTERRUPTED.is_set():
            raise SweepInterrupted()


class NonFiniteLoss(RuntimeError):
    """The training or validation loss became NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    """Fail the fit as soon as an epoch's loss is not finite (early stopping would only stop)."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise :class:`NonFiniteLoss` naming the epoch."""
        for name in ("train/loss", "val/loss"):
            value = trainer.callback_metrics.get(name)
            if value is not None and not math.isfinite(float(value)):
                raise NonFiniteLoss(f"loss became NaN at epoch {trainer.current_epoch + 1}")


@dataclass(frozen=True)
class SweepSetup:
    """What every worker process of a sweep needs (picklable).

    Attributes:
        params: The validated params; ``params.sweep`` is the sweep's settings.
        data_dir: The preprocess stage's output folder.
        backbone: The pretrain stage's backbone file.
        storage_url: The Optuna storage.
        study_name: The study.
        parent_run_id: The sweep's MLflow parent run.
        worker: This worker's index (0 for the first), added to ``base.seed`` for its sampler.
        threads: Torch threads of this worker; 0 = torch's default.
    """

    params: Params
    data_dir: Path
    backbone: Path
    storage_url: str
    study_name: str
    parent_run_id: str
    worker: int = 0
    threads: int = 0


def trial_params(params: Params, values: Mapping[str, Any]) -> Params:
    """``params`` with a trial's values set, validated (a bad combination raises ConfigError)."""
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value)
    return validate_params(raw, source="the trial's params")


def trial_run_name(study_name: str, number: int) -> str:
    """``sweep-<study>-trial-007``: trials sort by number in MLflow's runs table."""
    return f"sweep-{study_name}-trial-{number:03d}"


def run_trial(setup: SweepSetup, tracking: Tracking, trial: optuna.Trial) -> float:
    """Optuna's objective: train the trial's params, return the sweep's metric.

    Raises:
        optuna.TrialPruned: The pruner stopped the trial (its run is KILLED).
        SweepInterrupted: Ctrl-C; the trial is marked ``interrupted`` so a resumed sweep
            runs it again.
        Exception: Anything else fails the trial, with its reason in the run and the trial.
    """
    import optuna

    start = time.perf_counter()
    _claim(trial)
    values = suggest(trial, setup.params.sweep.space)
    outcome = TrialOutcome(tracking, setup, trial, values)
    try:
        value = outcome.train()
    except optuna.TrialPruned as pruned:
        outcome.finish("pruned", str(pruned), time.perf_counter() - start)
        raise
    except SweepInterrupted:
        outcome.finish("failed", "interrupted (Ctrl-C); a resumed sweep runs it again", None)
        raise
    except Exception as error:
        reason = _reason(error)
        trial.set_user_attr("fail_reason", reason)
        outcome.finish("failed", reason, time.perf_counter() - start)
        raise
    outcome.finish("complete", "", time.perf_counter() - start)
    return value


def _claim(trial: optuna.Trial) -> None:
    """Which process runs the trial: a resumed sweep fails trials whose process is gone."""
    import psutil

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("pid_started", psutil.Process().create_time())
    trial.set_user_attr("interrupted", False)  # a retried trial inherits its original's attrs


def _reason(error: BaseException) -> str:
    from trackflow.errors import TrackflowError

    if isinstance(error, TrackflowError | NonFiniteLoss):
        return str(error)
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {shorten(lines[0] if lines else '', 300)}"


class TrialOutcome:
    """A trial's MLflow run from its first tag to its final status."""

    def __init__(
        self, tracking: Tracking, setup: SweepSetup, trial: optuna.Trial, values: dict[str, Any]
    ) -> None:
        self.tracking, self.setup, self.trial, self.values = tracking, setup, trial, values
        self.run_id: str | None = None
        self.name = trial_run_name(setup.study_name, trial.number)
        self.tags = {
            SWEEP_TAG + "role": "trial",
            SWEEP_TAG + "study": setup.study_name,
            SWEEP_TAG + "trial": str(trial.number),
            SWEEP_TAG + "state": "running",
        } | {SWEEP_TAG + "value." + key: yaml_text(value) for key, value in values.items()}

    def train(self) -> float:
        """Fit the trial's candidate through :func:`train_candidate`; return the metric."""
        from trackflow.learn.training_run import TrainingRun
        from trackflow.learn.transfer import train_candidate, transfer_plan

        sweep = self.setup.params.sweep
        params = trial_params(self.setup.params, self.values)
        plan = transfer_plan(params.train)
        callbacks = [StopOnInterrupt(), StopOnNonFiniteLoss(), *self._pruning()]
        training = TrainingRun(
            params,
            params.train,
            "target",
            self.setup.data_dir,
            "train",
            plan.mode,
            parent_run_id=self.setup.parent_run_id,
            run_name=self.name,
            tags=self.tags,
        )
        with training, tempfile.TemporaryDirectory(prefix="trackflow-trial-") as folder:
            self.run_id = training.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)
            backbone = self._backbone(params, plan.needs_pretrain_output, Path(folder))
            train_candidate(training, plan, backbone, callbacks=callbacks)
        value = training.metrics[OBJECTIVES[sweep.metric]]
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{sweep.metric} is {value}: the loss became NaN")
        return value

    def _pruning(self) -> list[pl.Callback]:
        if self.setup.params.sweep.pruner == "none":
            return []
        from optuna_integration import PyTorchLightningPruningCallback

        return [PyTorchLightningPruningCallback(self.trial, self.setup.params.sweep.metric)]

    def _backbone(self, params: Params, needs_pretrained: bool, folder: Path) -> Path:
        """The workspace's backbone, or the trial's own when it searches model/pretrain keys."""
        searched = self.setup.params.sweep.space
        if not needs_pretrained or not any(
            key.startswith(("model.", "pretrain.")) for key in searched
        ):
            return self.setup.backbone
        from trackflow.learn.pretraining import pretrain_backbone

        out = folder / "backbone.pt"
        pretrain_backbone(
            params,
            self.setup.data_dir,
            out,
            parent_run_id=self.run_id,
            run_name=f"{self.name}-pretrain",
            tags={SWEEP_TAG + "role": "trial-pretrain", SWEEP_TAG + "study": self.setup.study_name},
        )
        return out

    def finish(self, state: str, reason: str, seconds: float | None) -> None:
        """Tag the trial's state and reason; set the run's status (a run is made if none was)."""
        client = self.tracking.client
        if self.run_id is None:  # failed before training began: a bad combination
            tags = source_tags("trackflow.tuning") | self.tags
            run = client.create_run(self.tracking.experiment_id, run_name=self.name, tags=tags)
            self.run_id = run.info.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)
            tags = {"mlflow.parentRunId": self.setup.parent_run_id}
            set_tags(self.tracking, self.run_id, tags)
        tags = {SWEEP_TAG + "state": state}
        if reason:
            tags[SWEEP_TAG + "fail_reason" if state == "failed" else SWEEP_TAG + "reason"] = reason
        if seconds is not None:
            tags[SWEEP_TAG + "seconds"] = f"{seconds:.1f}"
        set_tags(self.tracking, self.run_id, tags)
        status = "KILLED" if reason.startswith("interrupted") else RUN_STATUS[state]
        client.set_terminated(self.run_id, status=status)


def end_trial_runs(tracking: Tracking, study_name: str, number: int, reason: str) -> None:
    """Mark the runs of a trial whose process died (a killed sweep) as failed and KILLED.

    Found by their tags: the process may have died before the trial recorded its run's id. A run
    already FINISHED is marked too: the process died after ending it but before Optuna recorded
    the trial's value, so the study runs the trial again and this run's result does not count.
    """
    query = f"tags.`{SWEEP_TAG}study` = '{study_name}' and tags.`{SWEEP_TAG}trial` = '{number}'"
    tags = {SWEEP_TAG + "state": "failed", SWEEP_TAG + "fail_reason": reason}
    for run in tracking.client.search_runs([tracking.experiment_id], query):
        set_tags(tracking, run.info.run_id, tags)
        tracking.client.set_terminated(run.info.run_id, status="KILLED")
