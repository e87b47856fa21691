"""Serve the training flow on a cron schedule: a Prefect deployment whose runs this process runs.

Creates the deployment ``trackflow-training/<name>`` in the Prefect API that ``PREFECT_API_URL``
points at (start one with ``prefect server start``) and runs its flow runs in this process until
stopped; Ctrl-C pauses the schedule. Run it from the trackflow checkout: flow runs import
``flows.training`` from the working folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CRON = "0 3 * * *"  # flows.training.DEFAULT_CRON; not imported here (Prefect is heavy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule (default: %(default)s)")
    parser.add_argument("--name", default="served", help="deployment name (default: %(default)s)")
    parser.add_argument("--repo", default=".", help="DVC repository the runs use (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params file, in the repo")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides of every run"
    )


def run(args: argparse.Namespace) -> None:
    from trackflow.errors import ConfigError

    if not Path("flows", "training.py").is_file():
        raise ConfigError(
            f"no flows/training.py in {Path.cwd()}: run `trackflow schedule` from the trackflow "
            "checkout (flow runs import flows.training from the working folder)"
        )
    sys.path.insert(0, str(Path.cwd()))
    try:
        from flows.training import serve
        from trackflow.pipeline.driver import parse_overrides
    except ImportError as exc:
        raise ConfigError(f"{exc}: install the flows extra (pip install -e '.[flows]')") from None
    parameters = {"params": args.params, "overrides": parse_overrides(args.set)}
    serve(args.repo, cron=args.cron, name=args.name, parameters=parameters)
