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
from pathlib import Path
from typing import Any

from trackflow.cli_support import add_params_argument
from trackflow.errors import TrackflowError


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
    from trackflow.tuning.runner import apply_best, run_study

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
    result = run_study(params, args.data, args.backbone)
    _print_summary(result.summary, params.sweep.metric)
    if result.interrupted:
        name = result.summary["study"]
        raise SweepStopped(
            f"sweep interrupted; study {name!r} is intact in {result.storage_url}: resume with "
            f"`trackflow sweep --study {name}`"
        )
    if args.apply:
        apply_best(args.params, params, args.data, args.top)
        print(f"wrote the best values into {args.params}")
        print("next: `dvc repro` trains, evaluates and registers the candidate (through the gate)")


def _print_summary(summary: dict[str, Any], metric: str) -> None:
    if "n_complete" not in summary:  # interrupted before the study was summed up
        return
    counts = (
        f"{summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed, {summary['n_interrupted']} interrupted (run again)"
    )
    print(f"study {summary['study']}: {counts}")
    if summary["best_params"] is not None:
        print(f"best trial {summary['best_trial']}: {metric} = {summary['best_value']:.4f}")
        for key, value in summary["best_params"].items():
            print(f"  {key}: {value}")
