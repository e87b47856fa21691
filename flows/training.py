"""The training flow: the DVC pipeline's stages as Prefect tasks, in the order ``dvc repro`` uses.

    python -m flows.training                                   # params.yaml as it is
    python -m flows.training --set train.mode=feature_extraction --set train.lr=0.001
    python -m flows.training --until evaluate                  # that stage and what it needs

Each task asks DVC whether its stage is stale and, if so, reproduces it with
``dvc repro --single-item``; nothing is cached on Prefect's side. Transient failures (a locked
SQLite store, an unreachable tracking server) are retried with exponential backoff, deterministic
ones (bad params, bad data, a crash) are not.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from flows.common import backoff, retry_if_transient
from trackflow.config import MlflowConfig, Params, load_params
from trackflow.errors import TrackflowError
from trackflow.pipeline.driver import (
    StageFailed,
    StageOutcome,
    applied_params,
    exclusive_repo,
    parse_overrides,
    repo_tracking_config,
    reproduce_stage,
    stage_env,
    stage_order,
    stage_status,
)
from trackflow.pipeline.report import pipeline_results, render_markdown

ARTIFACT_KEY = "trackflow-training"


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_if_transient)
def reproduce(root: Path, stage: str, flow_run_id: str | None) -> StageOutcome:
    """Reproduce one stage through DVC if DVC finds it stale; say what happened and why."""
    logger = get_run_logger()
    start = time.perf_counter()
    attempt = task_run.run_count
    reason = stage_status(root, stage)
    if reason is None:
        seconds = time.perf_counter() - start
        return StageOutcome(stage, "skipped", "up to date", seconds, attempts=attempt)
    logger.info("%s is stale: %s", stage, reason)
    try:
        outcome = reproduce_stage(root, stage, reason, stage_env(flow_run_id), logger.info)
    except StageFailed as failure:
        failure.attempts = attempt
        action = "retrying" if failure.transient else "not retrying"
        logger.error("%s failed, %s (%s failure, attempt %d)", stage, action, failure.kind, attempt)
        raise
    return replace(outcome, seconds=time.perf_counter() - start, attempts=attempt)


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=backoff(3, 2.0),
    retry_condition_fn=retry_if_transient,
)
def fail_candidate(config: MlflowConfig, run_id: str, stage: str) -> None:
    """Mark the candidate this flow run trained FAILED: a later stage failed."""
    from trackflow.tracking import set_tags, setup_tracking

    tracking = setup_tracking(config)
    set_tags(tracking, run_id, {"trackflow.failed_stage": stage})
    tracking.client.set_terminated(run_id, status="FAILED")


@flow(name="trackflow-training")
def training_flow(
    params: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    repo: str = ".",
    until: str | None = None,
    retries: int = 3,
    retry_delay_s: float = 10.0,
) -> dict[str, Any]:
    """Run the DVC pipeline stage by stage; publish a report of what ran and what it produced.

    Args:
        params: Params file the run uses (relative to ``repo``); the default is the pipeline's.
        overrides: Dotted keys to values on top of it, e.g. ``{"train.mode": "scratch"}``.
        repo: The DVC repository.
        until: Last stage to reproduce (with what it needs); default: the whole pipeline.
        retries: Retries of a stage after a transient failure.
        retry_delay_s: Delay before the first retry; it doubles for each next one.

    Returns:
        The run's summary: stages (status, reason, seconds, attempts), metrics, MLflow run id,
        registration; also published as the markdown artifact ``trackflow-training``.
    """
    start = time.perf_counter()
    root = Path(repo).resolve()
    params_path = root / params
    overrides = dict(overrides or {})
    validated = load_params(params_path, overrides)  # bad keys fail here, before any stage
    run_id = str(flow_run.id) if flow_run.id else None
    stages = stage_order(root, until)
    step = reproduce.with_options(
        retries=retries, retry_delay_seconds=backoff(retries, retry_delay_s)
    )
    outcomes: list[StageOutcome] = []
    with exclusive_repo(root):
        stage_start = time.perf_counter()
        try:
            with applied_params(root, params_path, overrides):
                for name in stages:
                    stage_start = time.perf_counter()
                    outcomes.append(step.with_options(task_run_name=name)(root, name, run_id))
        except Exception as error:  # whatever failed, the run publishes its report
            attempted = stages[len(outcomes)] if len(outcomes) < len(stages) else "(flow)"
            outcomes.append(_failed(error, attempted, time.perf_counter() - stage_start))
            try:
                _finish(root, validated, outcomes, overrides, run_id, start, failed=True)
            except Exception as unreported:  # the stage's failure is the one to raise
                get_run_logger().error("could not report the failed run: %s", unreported)
            raise
    return _finish(root, validated, outcomes, overrides, run_id, start, failed=False)


def _failed(error: Exception, stage: str, seconds: float) -> StageOutcome:
    """The report's row for the stage a failure stopped (``stage``, unless the error names one)."""
    if isinstance(error, StageFailed):
        reason = f"{error.kind}: {error.detail}"
        return StageOutcome(error.stage, "failed", reason, error.seconds, 0, error.attempts)
    return StageOutcome(stage, "failed", f"{type(error).__name__}: {error}", seconds)


def _finish(
    root: Path,
    params: Params,
    outcomes: list[StageOutcome],
    overrides: dict[str, Any],
    flow_run_id: str | None,
    start: float,
    failed: bool,
) -> dict[str, Any]:
    """Fail this run's candidate if a stage failed; publish the report artifact; the summary.

    The stages themselves tag their MLflow runs with the flow run id (``TRACKFLOW_FLOW_RUN_ID``)
    and log the params with the overrides, so a successful run needs no MLflow call here.
    """
    status = {outcome.stage: outcome.status for outcome in outcomes}
    results = pipeline_results(root)
    if failed and status.get("train") == "ran" and results["mlflow_run_id"]:
        config = repo_tracking_config(root, params)
        fail_candidate(config, results["mlflow_run_id"], outcomes[-1].stage)
    summary = {
        "state": "failed" if failed else "completed",
        "flow_run_id": flow_run_id,
        "overrides": overrides,
        "stages": [outcome.to_dict() for outcome in outcomes],
        "seconds": time.perf_counter() - start,
        "registered_by_this_run": status.get("register") == "ran",
    } | results
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=render_markdown(summary),
        description="Stages run/skipped, metrics, promotion decision, MLflow run and version",
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.training``: run the flow once and print its report."""
    parser = argparse.ArgumentParser(prog="python -m flows.training", description=__doc__)
    parser.add_argument("--repo", default=".", help="DVC repository (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="params file, in the repo")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides (YAML values)"
    )
    parser.add_argument("--until", help="last stage to reproduce (default: all)")
    parser.add_argument("--retries", type=int, default=3, help="retries of a transient failure")
    parser.add_argument("--retry-delay", type=float, default=10.0, help="first retry delay, s")
    args = parser.parse_args(argv)
    try:
        summary = training_flow(
            params=args.params,
            overrides=parse_overrides(args.set),
            repo=args.repo,
            until=args.until,
            retries=args.retries,
            retry_delay_s=args.retry_delay,
        )
    except TrackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render_markdown(summary), end="")  # the report the flow run published
    return 0


if __name__ == "__main__":
    sys.exit(main())
