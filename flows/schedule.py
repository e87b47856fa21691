"""The training flow on a cron schedule: what ``trackflow schedule`` runs in the checkout.

    python -m flows.schedule                       # trackflow-training/served, daily at 03:00 UTC
    python -m flows.schedule --cron "30 2 * * 1-5" --name weekdays --set train.mode=scratch

Creates the deployment ``trackflow-training/<name>`` in the Prefect API that ``PREFECT_API_URL``
points at and runs its flow runs in this process until stopped; Ctrl-C pauses the schedule. The
options are ``trackflow schedule``'s; the default cron is the library's
(:data:`trackflow.pipeline.schedule.DEFAULT_CRON`), as in ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.training import training_flow
from trackflow.commands.schedule import add_arguments
from trackflow.errors import TrackflowError
from trackflow.pipeline.driver import parse_overrides
from trackflow.pipeline.schedule import DEFAULT_CRON, DEPLOYMENT_NAME


def serve(
    repo: str,
    cron: str = DEFAULT_CRON,
    name: str = DEPLOYMENT_NAME,
    parameters: dict[str, Any] | None = None,
) -> None:
    """Create the deployment ``trackflow-training/<name>`` on a cron schedule and run its runs.

    Blocks until stopped (Ctrl-C pauses the schedule). Flow runs start in subprocesses that
    import ``flows.training`` by module path, so the working folder must hold ``flows/``.
    """
    from prefect.types.entrypoint import EntrypointType

    training_flow.serve(
        name=name,
        cron=cron,
        parameters={"repo": str(Path(repo).resolve())} | (parameters or {}),
        description="The trackflow DVC pipeline, stage by stage (flows/training.py).",
        tags=["trackflow"],
        limit=1,  # one run at a time: two would share the repository's params.yaml and dvc lock
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.schedule``: serve the deployment until stopped."""
    parser = argparse.ArgumentParser(prog="python -m flows.schedule", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except TrackflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    serve(args.repo, args.cron, args.name, {"params": args.params, "overrides": overrides})
    return 0


if __name__ == "__main__":
    sys.exit(main())
