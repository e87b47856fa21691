"""Serve the training flow on a cron schedule: a Prefect deployment whose runs this process runs.

Creates the deployment ``trackflow-training/<name>`` in the Prefect API that ``PREFECT_API_URL``
points at (start one with ``prefect server start``) and runs its flow runs in this process until
stopped; Ctrl-C pauses the schedule. Run it from the trackflow checkout: the flows are wiring above
the library, not part of it, so this command becomes ``python -m flows.schedule`` there (same
options), and flow runs import ``flows.training`` from the working folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trackflow.pipeline.schedule import DEFAULT_CRON, DEPLOYMENT_NAME

FLOW_MODULE = "flows.schedule"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule (default: %(default)s)")
    parser.add_argument(
        "--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)"
    )
    parser.add_argument("--repo", default=".", help="DVC repository the runs use (default: .)")
    parser.add_argument("--params", default="params.yaml", help="params file, in the repo")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides of every run"
    )


def run(args: argparse.Namespace) -> None:
    """Replace this process with ``python -m flows.schedule`` and the same options."""
    import importlib.util
    import os
    import sys

    from trackflow.errors import ConfigError

    if not Path(*FLOW_MODULE.split(".")).with_suffix(".py").is_file():
        raise ConfigError(
            f"no flows/schedule.py in {Path.cwd()}: run `trackflow schedule` from the trackflow "
            "checkout (flow runs import flows.training from the working folder)"
        )
    if importlib.util.find_spec("prefect") is None:
        raise ConfigError("prefect is not installed: pip install -e '.[flows]' (the flows extra)")
    options = ["--cron", args.cron, "--name", args.name, "--repo", args.repo]
    options += ["--params", args.params, "--set", *args.set]
    sys.stdout.flush()
    sys.stderr.flush()
    # The same process (exec, not a child): Ctrl-C and a supervisor's SIGTERM reach Prefect.
    os.execv(sys.executable, [sys.executable, "-m", FLOW_MODULE, *options])
