"""Search hyper-parameters with Optuna: each trial an MLflow child run of one sweep run.

``trackflow sweep`` runs the study that the ``sweep`` params describe on the workspace's
preprocessed data and pretrained backbone (``dvc repro pretrain`` makes them), or resumes it: the
study is named after ``model.name`` and a digest of the space, metric and data (or ``--study``), and
``n_trials`` counts its trials in all. Trials are scored on validation rows only. ``--apply``
writes the best trial's values into the params file (comments kept); ``dvc repro`` then trains,
evaluates and registers that candidate through the usual gate: a sweep writes nothing to the
registry. Ctrl-C stops cleanly (exit status 130) and leaves the study to resume.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from trackflow.cli_support import add_params_argument
from trackflow.errors import TrackflowError

log = logging.getLogger(__name__)


class SweepStopped(TrackflowError):
    """The sweep was interrupted; its study is intact."""

    exit_code = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``trackflow sweep``; each defaults to the params' ``sweep`` section."""
    add_params_argument(parser)
    parser.add_argument("--study", help="study name: resume or start it (default: sweep.study)")
    parser.add_argument("--n-trials", type=int, help="trials of the study in all (sweep.)")
    parser.add_argument("--parallel", type=int, help="trials at once, in processes (sweep.)")
    parser.add_argument("--timeout", type=float, help="stop starting trials after s (sweep.)")
    parser.add_argument(
        "--apply",
        action="store_true",
        help="write the best trial's values into the params file (comments kept), then run "
        "`dvc repro`; with a complete study, only apply",
    )
    parser.add_argument(
        "--top",
        type=int,
        help="with --apply: also write the top K trials' train.* values as train.ensemble.members",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/processed"), help="preprocessed data folder"
    )
    parser.add_argument(
        "--backbone", type=Path, default=Path("models/backbone.pt"), help="pretrained backbone"
    )


def run(args: argparse.Namespace) -> None:
    """Run or resume the study, log its summary, and apply the best values if asked."""
    from trackflow.config import load_params
    from trackflow.errors import ConfigError
    from trackflow.tracking import setup_tracking
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

    options = {
        "study": args.study,
        "n_trials": args.n_trials,
        "parallel": args.parallel,
        "timeout_s": args.timeout,
    }
    overrides = {f"sweep.{k}": v for k, v in options.items() if v is not None}
    params = load_params(args.params, overrides)  # a bad option fails like a bad param
    if args.top is not None and (not args.apply or args.top < 1):
        raise ConfigError("--top K goes with --apply, and K must be at least 1")
    _require_workspace(args.data, args.backbone, params)
    tracking = setup_tracking(params.base.mlflow)
    name = study_name(params, args.data)
    url = storage_url(params.sweep, params.base.mlflow)
    setup = SweepSetup(params, args.data, args.backbone, url, name, "")
    study = load_study(setup)
    start = time.perf_counter()
    if counted_trials(study) >= params.sweep.n_trials:
        print(f"study {name!r} is complete: {params.sweep.n_trials} trials", file=sys.stderr)
        parent = parent_run(tracking, params, name, url)
        interrupted = False
    else:
        parent = parent_run(tracking, params, name, url)
        print(f"sweep {name!r}: storage {url}, MLflow run sweep-{name} ({parent})", file=sys.stderr)
        progress = Progress(params.sweep)
        try:
            result = run_sweep(_with_parent(setup, parent), tracking, progress)
        finally:
            progress.close()
        interrupted = result.interrupted
    summary = log_study(tracking, parent, study, params.sweep, time.perf_counter() - start)
    tracking.client.set_terminated(parent, status="KILLED" if interrupted else "FINISHED")
    _print_summary(summary, params.sweep.metric)
    if interrupted:
        raise SweepStopped(
            f"sweep interrupted; study {name!r} is intact in {url}: resume with "
            f"`trackflow sweep --study {name}`"
        )
    if args.apply:
        _apply(args.params, study, params, args.top)


def _require_workspace(data: Path, backbone: Path, params: object) -> None:
    from trackflow.errors import DataError
    from trackflow.learn.transfer import transfer_plan

    missing = [] if (data / "meta.json").is_file() else [str(data)]
    if transfer_plan(params.train).needs_pretrain_output and not backbone.is_file():
        missing.append(str(backbone))
    if missing:
        raise DataError(f"{' and '.join(missing)} missing: run dvc repro pretrain first")


def _with_parent(setup: object, parent: str) -> object:
    from dataclasses import replace

    return replace(setup, parent_run_id=parent)


def _print_summary(summary: dict, metric: str) -> None:
    counts = (
        f"{summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed"
    )
    print(f"study {summary['study']}: {counts}")
    if summary["best_params"] is not None:
        print(f"best trial {summary['best_trial']}: {metric} = {summary['best_value']:.4f}")
        for key, value in summary["best_params"].items():
            print(f"  {key}: {value}")


def _apply(path: str, study: object, params: object, top: int | None) -> None:
    from trackflow.errors import ConfigError
    from trackflow.params_file import update_params_file
    from trackflow.tuning.report import best_values, ranked_values

    values = best_values(study, params.sweep)
    if values is None:
        raise ConfigError(f"study {study.study_name!r} has no complete trial to apply")
    if top is not None:
        members = [
            {k: v for k, v in trial.items() if k.startswith("train.")}
            for trial in ranked_values(study, params.sweep, top)
        ]
        values = values | {"train.ensemble.members": members}
    update_params_file(path, values)
    print(f"wrote the best values into {path}")
    print("next: `dvc repro` trains, evaluates and registers the candidate (through the gate)")
