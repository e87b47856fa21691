"""A sweep from start to summary, as the command and the Prefect flow run it.

:func:`run_study` checks the workspace, runs or resumes the study (a complete one is left as it
is), writes its summary to the parent run and ends that run (KILLED when interrupted);
:func:`apply_best` writes the best values into the params file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trackflow.config import Params
from trackflow.errors import ConfigError, DataError


@dataclass(frozen=True)
class SweepRun:
    """What one run of a sweep did.

    Attributes:
        summary: The study's summary (:func:`trackflow.tuning.report.log_study`); only its
            ``study`` when Ctrl-C came while it was being summed up.
        storage_url: The Optuna storage.
        parent_run_id: The sweep's MLflow run.
        interrupted: Ctrl-C stopped it; the study is intact and resumes.
    """

    summary: dict[str, Any]
    storage_url: str
    parent_run_id: str
    interrupted: bool


def require_workspace(params: Params, data_dir: Path, backbone: Path) -> None:
    """Refuse to start without the preprocessed data (and the backbone the plan needs).

    Trials that search ``model.*`` or ``pretrain.*`` keys pretrain their own backbone.
    """
    from trackflow.learn.transfer import transfer_plan

    missing = [] if (data_dir / "meta.json").is_file() else [str(data_dir)]
    own = any(key.startswith(("model.", "pretrain.")) for key in params.sweep.space)
    if transfer_plan(params.train).needs_pretrain_output and not own and not backbone.is_file():
        missing.append(str(backbone))
    if missing:
        raise DataError(f"{' and '.join(missing)} missing: run dvc repro pretrain first")


def run_study(params: Params, data_dir: Path, backbone: Path, progress: bool = True) -> SweepRun:
    """Run or resume the study ``params.sweep`` describes; log its summary to the parent run.

    Args:
        params: The validated params.
        data_dir: The preprocess stage's output folder.
        backbone: The pretrain stage's backbone file.
        progress: Print progress on stderr (one updating line on a terminal, else one per trial).
    """
    from trackflow.tracking import redact, setup_tracking
    from trackflow.tuning.report import Progress, log_study
    from trackflow.tuning.study import (
        counted_trials,
        load_study,
        parent_run,
        run_sweep,
        storage_url,
        study_name,
    )
    from trackflow.tuning.trials import SweepSetup

    require_workspace(params, data_dir, backbone)
    name = study_name(params, data_dir)
    url = storage_url(params.sweep, params.base.mlflow)
    setup = SweepSetup(params, data_dir, backbone, url, name, "")
    study = load_study(setup)  # first: an absent study server fails at once, naming it
    tracking = setup_tracking(params.base.mlflow)
    parent = parent_run(tracking, params, name, url)
    start = time.perf_counter()
    interrupted = False
    if counted_trials(study) >= params.sweep.n_trials:
        print(f"study {name!r} is complete: {params.sweep.n_trials} trials", file=sys.stderr)
    else:
        print(f"sweep {name!r}: storage {redact(url)}, MLflow run sweep-{name}", file=sys.stderr)
        reporter = Progress(params.sweep) if progress else None
        try:
            result = run_sweep(replace(setup, parent_run_id=parent), tracking, reporter)
        finally:
            if reporter is not None:
                reporter.close()
        interrupted = result.interrupted
    try:
        summary = log_study(tracking, parent, study, params.sweep, time.perf_counter() - start)
    except KeyboardInterrupt:  # Ctrl-C after the last trial: a resumed sweep logs the summary
        interrupted, summary = True, {"study": name}
    tracking.client.set_terminated(parent, status="KILLED" if interrupted else "FINISHED")
    return SweepRun(summary, url, parent, interrupted)


def apply_best(
    path: str | Path, params: Params, data_dir: Path, top: int | None = None
) -> dict[str, Any]:
    """Write the best trial's values (and the top ``top`` as ensemble members) into ``path``.

    Returns:
        The dotted keys and values written.
    """
    from trackflow.params_file import update_params_file
    from trackflow.tuning.report import best_values, ranked_values
    from trackflow.tuning.study import load_study, storage_url, study_name
    from trackflow.tuning.trials import SweepSetup

    name = study_name(params, data_dir)
    url = storage_url(params.sweep, params.base.mlflow)
    study = load_study(SweepSetup(params, data_dir, Path(), url, name, ""))
    values = best_values(study, params.sweep)
    if values is None:
        raise ConfigError(f"study {name!r} has no complete trial to apply")
    if top is not None:
        members = [
            {k: v for k, v in trial.items() if k.startswith("train.")}
            for trial in ranked_values(study, params.sweep, top)
        ]
        values = values | {"train.ensemble.members": members}
    update_params_file(path, values)
    return values
