"""The sweep flow: ``trackflow sweep`` as a Prefect flow, for scheduled or remote sweeps.

    python -m flows.sweep                               # the sweep params.yaml describes
    python -m flows.sweep --pretrain --apply            # dvc repro pretrain first; apply the best
    python -m flows.sweep --set sweep.n_trials=80 --set sweep.parallel=2

A transient failure (a locked SQLite store, an unreachable tracking server) retries the sweep
task, which resumes the same study; a bad space or missing data fails at once. ``--apply`` writes
the best values into the params file; ``dvc repro`` (or ``flows.training``) then trains,
evaluates and registers that candidate through the gate.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import backoff, retry_if_transient
from trackflow.config import Params, load_params
from trackflow.errors import TrackflowError
from trackflow.pipeline.driver import exclusive_repo, parse_overrides, repo_tracking_config
from trackflow.tuning.runner import apply_best, run_study

ARTIFACT_KEY = "trackflow-sweep"
DATA_DIR = Path("data/processed")  # the preprocess stage's output (dvc.yaml)
BACKBONE = Path("models/backbone.pt")  # the pretrain stage's output (dvc.yaml)


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_if_transient)
def reproduce_pretrain(root: Path) -> None:
    """``dvc repro pretrain``: the preprocessed data and backbone the trials read."""
    with exclusive_repo(root):
        done = subprocess.run(
            ["dvc", "repro", "pretrain"], cwd=root, capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro pretrain failed: {(done.stderr or done.stdout)[-2000:]}")
    get_run_logger().info("dvc repro pretrain: done")


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_if_transient)
def sweep(root: Path, params: Params) -> dict[str, Any]:
    """Run or resume the study; its summary (also on the MLflow parent run)."""
    result = run_study(params, root / DATA_DIR, root / BACKBONE)
    if result.interrupted:
        raise TrackflowError(f"sweep {result.summary['study']!r} interrupted; run again to resume")
    return result.summary | {"storage": result.storage_url, "mlflow_run_id": result.parent_run_id}


@task(cache_policy=NO_CACHE, persist_result=False)
def apply(root: Path, params_file: Path, params: Params, top: int | None) -> dict[str, Any]:
    """Write the best values into the params file (comments kept)."""
    return apply_best(params_file, params, root / DATA_DIR, top)


@flow(name="trackflow-sweep")
def sweep_flow(
    params: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    repo: str = ".",
    pretrain: bool = False,
    apply_best_values: bool = False,
    top: int | None = None,
    retries: int = 2,
    retry_delay_s: float = 10.0,
) -> dict[str, Any]:
    """Run the sweep of ``params`` (with ``overrides``) in ``repo``; publish its summary.

    Args:
        params: Params file (relative to ``repo``).
        overrides: Dotted keys to values on top of it, e.g. ``{"sweep.n_trials": 80}``.
        repo: The DVC repository whose data and backbone the trials read.
        pretrain: Run ``dvc repro pretrain`` first.
        apply_best_values: Write the best values into the params file.
        top: With ``apply_best_values``, also the top K trials as ``train.ensemble.members``.
        retries: Retries of the sweep after a transient failure (each resumes the study).
        retry_delay_s: Delay before the first retry; it doubles for each next one.
    """
    root = Path(repo).resolve()
    validated = load_params(root / params, overrides)  # a bad space fails here
    mlflow = repo_tracking_config(root, validated)
    validated = validated.model_copy(
        update={"base": validated.base.model_copy(update={"mlflow": mlflow})}
    )
    if pretrain:
        reproduce_pretrain.with_options(retries=retries)(root)
    step = sweep.with_options(retries=retries, retry_delay_seconds=backoff(retries, retry_delay_s))
    summary = step(root, validated)
    if apply_best_values:
        summary["applied"] = apply(root, root / params, validated, top)
    create_markdown_artifact(
        key=ARTIFACT_KEY, markdown=_markdown(summary), description="Sweep: trials, best params"
    )
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Sweep `{summary['study']}`",
        "",
        f"{summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed; MLflow run `{summary['mlflow_run_id']}`.",
    ]
    if summary["best_params"] is not None:
        lines += ["", f"Best trial {summary['best_trial']}: {summary['best_value']:.4f}", ""]
        lines += [f"- `{key}`: `{value}`" for key, value in summary["best_params"].items()]
    if summary.get("applied"):
        lines += ["", "Applied to the params file: run `dvc repro` next."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.sweep``: run the flow once and print its summary."""
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__)
    parser.add_argument("--repo", default=".", help="DVC repository (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="params file, in the repo")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides (YAML values)"
    )
    parser.add_argument("--pretrain", action="store_true", help="dvc repro pretrain first")
    parser.add_argument("--apply", action="store_true", help="write the best values")
    parser.add_argument("--top", type=int, help="with --apply: top K as ensemble members")
    args = parser.parse_args(argv)
    try:
        summary = sweep_flow(
            params=args.params,
            overrides=parse_overrides(args.set),
            repo=args.repo,
            pretrain=args.pretrain,
            apply_best_values=args.apply,
            top=args.top,
        )
    except TrackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(_markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
