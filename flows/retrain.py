"""The retrain flow: what a drifted batch starts (the ``retrain`` deployment's trigger).

    python -m flows.retrain                              # train.mode continue on new labelled rows
    python -m flows.retrain --set train.mode=scratch     # or retrain from scratch on the union

Asks first whether there is anything new to learn: it brings the data stages up to date (ingest
and split, through the training flow, so every labelled batch added with ``trackflow add-batch``
is in the split) and compares the target training rows with the rows the champion recorded
(``trackflow.learn.continual.unseen_training_rows``). None new: it says so and stops, registering
nothing. Otherwise it runs the whole pipeline with the overrides (``train.mode: continue`` by
default); the register stage's gate decides whether the new version replaces the champion, and
``trackflow serve`` follows the alias. The drift event that started it, if any, is named in the
run's log and its report (``trackflow-retrain``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.common import backoff, retry_if_transient
from flows.training import training_flow
from trackflow.config import MlflowConfig, load_params
from trackflow.errors import TrackflowError
from trackflow.pipeline.driver import parse_overrides, repo_tracking_config
from trackflow.pipeline.schedule import RETRAIN_OVERRIDES

ARTIFACT_KEY = "trackflow-retrain"
#: The split stage's output (dvc.yaml), and the part a continued fit learns from.
SPLIT_FOLDER = "data/split"
TRAIN_PART = "target_train.parquet"
#: The stage that must be up to date before the rows can be compared.
DATA_STAGE = "split"


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=3,
    retry_delay_seconds=backoff(3, 3.0),
    retry_condition_fn=retry_if_transient,
)
def champion_rows(config: MlflowConfig, name: str) -> tuple[str, Any]:
    """The champion's version and its record of the rows it saw (``SeenRows``)."""
    from trackflow.learn.continual import champion_seen_rows
    from trackflow.tracking import setup_tracking

    return champion_seen_rows(setup_tracking(config), name)


@task(cache_policy=NO_CACHE, persist_result=False)
def count_new_rows(split: Path, seen: Any) -> int:
    """Target training rows of the split that the champion did not see (compared by content)."""
    from trackflow.io import read_table
    from trackflow.learn.continual import unseen_training_rows

    return len(unseen_training_rows(read_table(split / TRAIN_PART), seen))


@flow(name="trackflow-retrain")
def retrain_flow(
    repo: str = ".",
    params: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    drifted_batch: str | None = None,
    drift_event_id: str | None = None,
) -> dict[str, Any]:
    """Retrain on the labelled rows the champion has not seen; stop if there are none.

    Args:
        repo: The DVC repository.
        params: Params file the run uses (relative to ``repo``).
        overrides: Dotted keys to values on top of it; default ``{"train.mode": "continue"}``
            (:data:`trackflow.pipeline.schedule.RETRAIN_OVERRIDES`); ``{}`` for params as they are.
        drifted_batch: The batch whose drift started this run (the trigger fills it in).
        drift_event_id: The id of that drift event (the trigger fills it in).

    Returns:
        ``state`` (``no new rows`` or the training flow's ``completed``), the champion it started
        from, how many new training rows there were and, if it trained, the training flow's
        summary (``training``); also published as the markdown artifact ``trackflow-retrain``.
    """
    logger = get_run_logger()
    start = time.perf_counter()
    root = Path(repo).resolve()
    overrides = dict(RETRAIN_OVERRIDES if overrides is None else overrides)
    validated = load_params(root / params, overrides)  # bad keys fail here, before any stage
    name = validated.model.name
    if drifted_batch or drift_event_id:
        logger.info("started by drift of %s (event %s)", drifted_batch, drift_event_id)
    version, seen = champion_rows(repo_tracking_config(root, validated), name)
    training_flow(params=params, overrides=overrides, repo=str(root), until=DATA_STAGE)
    new_rows = count_new_rows(root / SPLIT_FOLDER, seen)
    summary: dict[str, Any] = {
        "model_name": name,
        "champion_version": version,
        "new_rows": new_rows,
        "overrides": overrides,
        "drifted_batch": drifted_batch,
        "drift_event_id": drift_event_id,
    }
    if not new_rows:
        message = (
            f"no new labelled rows since champion v{version} of {name!r}: add them with "
            "`trackflow add-batch FILE`; nothing trained or registered"
        )
        logger.warning(message)
        summary |= {"state": "no new rows", "message": message}
    else:
        logger.info("%d new training rows since champion v%s: retraining", new_rows, version)
        training = training_flow(params=params, overrides=overrides, repo=str(root))
        registered = training.get("registered") or {}
        summary |= {
            "state": training["state"],
            "training": training,
            "registered_version": registered.get("version"),
            "registered_by_this_run": training["registered_by_this_run"],
            "message": f"retrained on {new_rows} new rows since champion v{version}",
        }
    summary["seconds"] = time.perf_counter() - start
    create_markdown_artifact(
        key=ARTIFACT_KEY, markdown=render(summary), description="What a retraining did and why"
    )
    return summary


def render(summary: dict[str, Any]) -> str:
    """The run's report: why it ran, what it found, what it trained and registered."""
    lines = [f"# trackflow retrain: {summary['state']}", ""]
    if summary.get("drifted_batch") or summary.get("drift_event_id"):
        lines.append(
            f"Started by drift of `{summary['drifted_batch']}` "
            f"(event `{summary['drift_event_id']}`)."
        )
    lines += [
        f"Champion: `{summary['model_name']}` version {summary['champion_version']}; "
        f"new training rows: {summary['new_rows']}.",
        "",
        summary["message"],
    ]
    if "training" in summary:
        version = summary.get("registered_version")
        lines += ["", f"Registered: version {version}" if version else "Registered: nothing"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.retrain``: run the flow once and print its report."""
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__)
    parser.add_argument("--repo", default=".", help="DVC repository (default: %(default)s)")
    parser.add_argument("--params", default="params.yaml", help="params file, in the repo")
    parser.add_argument(
        "--set",
        nargs="*",
        default=None,
        metavar="KEY=VALUE",
        help="params overrides (default: train.mode=continue)",
    )
    args = parser.parse_args(argv)
    try:
        overrides = None if args.set is None else parse_overrides(args.set)
        summary = retrain_flow(repo=args.repo, params=args.params, overrides=overrides)
    except TrackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(render(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
