"""Running a sweep: an Optuna study on a shared storage, its trials in one or several processes.

``n_trials`` counts the study's trials in all: a rerun of the same sweep resumes the study and runs
only what is left. Trials that were running when a sweep was killed are failed on resume (at once
when their process on this machine is gone, else by Optuna's heartbeat after its grace period),
are not counted, and run again with the same values (``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.config import MlflowConfig, Params, SweepConfig
from trackflow.errors import ConfigError, TrackingUnavailable, shorten
from trackflow.io import read_json
from trackflow.tracking import (
    Tracking,
    is_transient,
    log_params,
    redact,
    resolve_tracking_uri,
    setup_tracking,
    source_tags,
)

if TYPE_CHECKING:
    import optuna

    from trackflow.tuning.trials import SweepSetup

#: Optuna's heartbeat: a running trial writes one every HEARTBEAT_S; one silent for GRACE_S has
#: lost its process (a trial on another machine of a killed sweep) and is failed and retried.
HEARTBEAT_S = 10
GRACE_S = 60
#: Seconds a SQLite writer waits for another one (parallel workers share the file).
SQLITE_TIMEOUT_S = 60
#: Tries to open a storage whose tables another sweep is creating at the same moment.
SCHEMA_ATTEMPTS = 3
POLL_S = 1.0

TrialHook = Callable[[Any, Any], None]


#: The study storage of a shared set-up (``make services`` exports it); before ``sweep.storage``.
STORAGE_ENV = "TRACKFLOW_SWEEP_STORAGE"


def storage_url(config: SweepConfig, mlflow: MlflowConfig) -> str:
    """``TRACKFLOW_SWEEP_STORAGE``, else ``sweep.storage``, else optuna.db by a SQLite store."""
    if os.environ.get(STORAGE_ENV) or config.storage:
        return os.environ.get(STORAGE_ENV) or config.storage
    tracking = resolve_tracking_uri(mlflow)
    folder = Path("mlruns")
    if tracking.startswith("sqlite:///"):
        folder = Path(tracking.removeprefix("sqlite:///")).parent
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def study_name(params: Params, data_dir: Path) -> str:
    """The configured name, or ``<model.name>-<digest of space, metric and data>``."""
    if params.sweep.study:
        return params.sweep.study
    meta = read_json(data_dir / "meta.json")
    searched = {
        "space": params.sweep.space,
        "metric": params.sweep.metric,
        "data": meta.get("dataset_digest"),
    }
    digest = hashlib.sha256(json.dumps(searched, sort_keys=True).encode()).hexdigest()
    return f"{params.model.name}-{digest[:8]}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with a heartbeat, retries of lost trials and a patient SQLite."""
    import optuna
    from optuna.storages import RDBStorage

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trackflow prints its own lines
    with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(1, SCHEMA_ATTEMPTS + 1):
            try:
                return RDBStorage(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=_retry(),
                )
            except Exception as exc:  # SQLAlchemy's and the driver's errors, by their text
                kind, text = type(exc).__name__, " ".join(str(exc).split())
            # Sweeps starting together on a new database all create Optuna's tables; on
            # PostgreSQL the losers meet the winner's types ("already exists"): they exist now.
            if "already exists" not in text:
                break
            time.sleep(0.5 * attempt)
    if is_transient(text):
        raise TrackingUnavailable(
            f"the sweep's study storage {redact(url)} is unreachable, try again "
            f"(is its database server running? make services starts the local one): "
            f"{redact(text)[:300]}"
        )
    raise ConfigError(
        f"cannot open the sweep's study storage {redact(url)} (TRACKFLOW_SWEEP_STORAGE "
        f"or sweep.storage): {kind}: {redact(text)[:300]}"
    )


def _retry() -> Any:
    """Optuna's callback queueing a lost trial again with the same values (3 times at most)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=3)


def load_study(setup: SweepSetup, storage: Any | None = None) -> optuna.Study:
    """Create the study, or load it when it exists; the sampler is seeded per worker."""
    import optuna

    sweep = setup.params.sweep
    return optuna.create_study(
        storage=storage or open_storage(setup.storage_url),
        study_name=setup.study_name,
        direction=sweep.direction,
        sampler=_sampler(sweep, setup.params.base.seed + setup.worker),
        pruner=_pruner(sweep.pruner),
        load_if_exists=True,
    )


def _sampler(sweep: SweepConfig, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    from trackflow.tuning.space import grid

    if sweep.sampler == "grid":
        return optuna.samplers.GridSampler(grid(sweep.space), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(name: str) -> optuna.pruners.BasePruner:
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2)
    return optuna.pruners.NopPruner()


# --- counting and recovering trials ---------------------------------------------------------------


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``.

    Complete, pruned, and failed for a reason of their own: a trial interrupted by a killed or
    stopped sweep is not counted (it runs again instead).
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (
            t.state == TrialState.FAIL
            and t.number not in retried
            and not t.user_attrs.get("interrupted")
        )
        for t in trials
    )


def pending_trials(study: optuna.Study) -> int:
    """Trials running now (in any process); queued ones (``WAITING``) run in the next slots."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def recover_interrupted(study: optuna.Study, tracking: Tracking) -> list[int]:
    """Fail the trials whose process on this machine is gone; queue interrupted ones again.

    Returns:
        The numbers of the interrupted trials queued again (each once).
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from trackflow.tuning.trials import end_trial_runs

    storage = study._storage
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != socket.gethostname() or _alive(attrs):
            continue
        reason = f"interrupted: its process (pid {attrs.get('pid')}) ended while it ran"
        try:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # it finished, or another process failed it first
        end_trial_runs(tracking, study.study_name, trial.number, reason)
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for trial in trials:
        interrupted = trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted")
        if interrupted and trial.number not in retried:
            _retry()(study, trial)
            queued.append(trial.number)
            # A trial whose tracking server went away could not end its run: end it now.
            reason = f"interrupted: {trial.user_attrs.get('fail_reason', 'its sweep stopped')}"
            end_trial_runs(tracking, study.study_name, trial.number, reason)
    return queued


def _alive(attrs: dict[str, Any]) -> bool:
    import psutil

    try:
        process = psutil.Process(int(attrs.get("pid", -1)))
        return abs(process.create_time() - float(attrs.get("pid_started", 0))) < 1
    except (psutil.Error, ValueError):
        return False


# --- the parent run -------------------------------------------------------------------------------


def parent_run(tracking: Tracking, params: Params, name: str, storage: str) -> str:
    """The sweep's MLflow run: found by its study tag (a resumed sweep), else created.

    Sweeps of one study started at the same moment (on several machines) may each find none and
    create one: each then keeps the study's first parent run (:func:`_first_parent`).
    """
    from trackflow.config import flatten_params
    from trackflow.tuning.trials import SWEEP_TAG

    query = f"tags.`{SWEEP_TAG}study` = '{name}' and tags.`{SWEEP_TAG}role` = 'parent'"
    found = tracking.client.search_runs(
        [tracking.experiment_id], query, max_results=1, order_by=_FIRST_RUN
    )
    if found:
        run_id = found[0].info.run_id
        tracking.client.update_run(run_id, status="RUNNING")
        return run_id
    tags = source_tags("trackflow.tuning") | {
        SWEEP_TAG + "role": "parent",
        SWEEP_TAG + "study": name,
        SWEEP_TAG + "storage": redact(storage),
        SWEEP_TAG + "metric": params.sweep.metric,
    }
    run = tracking.client.create_run(tracking.experiment_id, run_name=f"sweep-{name}", tags=tags)
    run_id = _first_parent(tracking, query, run.info.run_id)
    if run_id == run.info.run_id:
        log_params(tracking, run_id, flatten_params(params))
    return run_id


#: The earliest run first; the id breaks a tie of start times (both in milliseconds).
_FIRST_RUN = ["attributes.start_time ASC", "attributes.run_id ASC"]


def _first_parent(tracking: Tracking, query: str, created: str) -> str:
    """The study's first parent run; ``created`` (this sweep's) is deleted if it is not that one.

    Every sweep that created a parent run asks after creating it, so all agree on the first.
    """
    first = tracking.client.search_runs(
        [tracking.experiment_id], query, max_results=1, order_by=_FIRST_RUN
    )
    if not first or first[0].info.run_id == created:
        return created
    tracking.client.delete_run(created)
    return first[0].info.run_id


# --- running the trials ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """How a sweep run ended."""

    study_name: str
    storage_url: str
    parent_run_id: str
    interrupted: bool
    counted: int


def run_sweep(
    setup: SweepSetup, tracking: Tracking, on_trial: TrialHook | None = None
) -> SweepResult:
    """Run or resume the study until ``n_trials`` count, ``timeout_s`` passes or Ctrl-C.

    With ``sweep.parallel`` > 1, that many worker processes (spawned) share the storage and this
    process follows their trials; each gets ``cores // parallel`` torch threads.

    Args:
        setup: The sweep (its ``parent_run_id`` already made by :func:`parent_run`).
        tracking: The MLflow store of the trials.
        on_trial: Called with the study and each finished trial (``FrozenTrial``): progress.
    """
    storage = open_storage(setup.storage_url)
    study = load_study(setup, storage)
    recover_interrupted(study, tracking)
    parallel = setup.params.sweep.parallel
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)
    try:
        if parallel == 1:
            signal.signal(signal.SIGINT, _raise_interrupted)
            interrupted = _optimize(study, setup, tracking, on_trial)
        else:
            interrupted = _run_workers(study, setup, on_trial)
    finally:
        signal.signal(signal.SIGINT, previous)
    return SweepResult(
        setup.study_name,
        setup.storage_url,
        setup.parent_run_id,
        interrupted,
        counted_trials(study),
    )


def _raise_interrupted(signum: int, frame: Any) -> None:
    """SIGINT: ask the running trial to stop at its next batch (never inside a storage write)."""
    from trackflow.tuning.trials import INTERRUPTED

    INTERRUPTED.set()


def _optimize(
    study: optuna.Study,
    setup: SweepSetup,
    tracking: Tracking,
    on_trial: TrialHook | None = None,
) -> bool:
    """Run trials in this process until the study's total is reached; True if interrupted."""
    from trackflow.tuning.trials import INTERRUPTED, SweepInterrupted, TrialInterrupted, run_trial

    total = setup.params.sweep.n_trials
    INTERRUPTED.clear()
    lost: list[BaseException] = []  # the tracking store went away: the sweep stops, resumable
    if counted_trials(study) >= total:
        return False
    # One line per trial, not one per epoch of every trial: the curves are in each trial's run.
    logging.getLogger("trackflow.learn.training").setLevel(logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        try:
            if INTERRUPTED.is_set():
                raise SweepInterrupted()
            return run_trial(setup, tracking, trial)
        except SweepInterrupted:
            trial.set_user_attr("interrupted", True)  # not counted; queued again on resume
            raise TrialInterrupted() from None  # Optuna fails a trial on KeyboardInterrupt
        except Exception as error:
            if not (isinstance(error, TrackingUnavailable) or is_transient(error)):
                raise  # the trial's own failure: counted, the sweep goes on
            # Not the trial's fault: every later trial would fail the same way and be counted.
            trial.set_user_attr("interrupted", True)
            lost.append(error)
            raise TrialInterrupted() from None

    def stop_at_total(study: optuna.Study, trial: Any) -> None:
        if on_trial is not None:
            on_trial(study, trial)
        if INTERRUPTED.is_set() or counted_trials(study) + pending_trials(study) >= total:
            study.stop()

    try:
        study.optimize(
            objective,
            timeout=setup.params.sweep.timeout_s,
            catch=(Exception,),
            callbacks=[stop_at_total],
        )
    except (SweepInterrupted, TrialInterrupted):
        if lost:
            raise _tracking_lost(setup, lost[0]) from None
        return True
    return INTERRUPTED.is_set()


def _tracking_lost(setup: SweepSetup, error: BaseException) -> TrackingUnavailable:
    """The sweep stopped because the tracking store (or the study's) went away mid-trial."""
    text = redact(" ".join(str(error).split()))
    return TrackingUnavailable(
        f"sweep stopped: a trial lost its tracking server or study storage "
        f"({shorten(text, 240)}); study "
        f"{setup.study_name!r} is intact in {redact(setup.storage_url)}: once the server is back, "
        f"resume with `trackflow sweep --study {setup.study_name}`"
    )


def worker_main(setup: SweepSetup) -> int:
    """A worker process of a parallel sweep: its torch threads, its trials; 130 if interrupted."""
    import torch

    if setup.threads:
        torch.set_num_threads(setup.threads)
    signal.signal(signal.SIGINT, _raise_interrupted)
    tracking = setup_tracking(setup.params.base.mlflow)
    study = load_study(setup)
    try:
        interrupted = _optimize(study, setup, tracking)
    except TrackingUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(TrackingUnavailable.exit_code)  # a spawned worker's status, for its parent
    return 130 if interrupted else 0


def _run_workers(study: optuna.Study, setup: SweepSetup, on_trial: TrialHook | None) -> bool:
    """Spawn the workers and report their trials as they finish; True if interrupted."""
    from optuna.trial import TrialState

    parallel = setup.params.sweep.parallel
    threads = max(1, (os.cpu_count() or 1) // parallel)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=worker_main,
            args=(replace(setup, worker=i, threads=threads),),
            name=f"sweep-worker-{i}",
        )
        for i in range(parallel)
    ]
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    interrupted = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    for worker in workers:
        worker.start()
    while True:
        running = any(worker.is_alive() for worker in workers)
        for trial in study.get_trials(deepcopy=False):
            if trial.state.is_finished() and trial.number not in seen:
                seen.add(trial.number)
                if on_trial is not None and trial.state != TrialState.WAITING:
                    on_trial(study, trial)
        if not running:
            break
        time.sleep(POLL_S)
    for worker in workers:
        worker.join()
    if any(worker.exitcode == TrackingUnavailable.exit_code for worker in workers):
        raise _tracking_lost(setup, TrackingUnavailable("a worker's tracking store went away"))
    return interrupted or any(worker.exitcode == 130 for worker in workers)
