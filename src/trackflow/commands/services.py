"""Start or stop the team services on this machine: PostgreSQL, MLflow and Prefect servers, workers.

``up`` starts what is not running (a second ``up`` reports what runs) and prints the environment a
client exports; ``down`` stops exactly what ``up`` started and keeps the data; ``status`` exits 1
when something is down; ``env`` prints the ``export`` lines, secrets included, for ``eval``.
Everything lives under ``.services/`` (``--dir``, or TRACKFLOW_SERVICES_DIR), which git ignores.
See docs/scale-out.md.
"""

from __future__ import annotations

import argparse

from trackflow.errors import TrackflowError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("up", "down", "status", "env"))
    parser.add_argument("--dir", help="the services' folder (default: .services)")
    parser.add_argument("--workers", type=int, help="Prefect workers to run (default: 2)")
    parser.add_argument("--postgres-port", type=int, help="default: 54329")
    parser.add_argument("--mlflow-port", type=int, help="default: 5000")
    parser.add_argument("--prefect-port", type=int, help="default: 4200")
    parser.add_argument(
        "--no-auth",
        dest="auth",
        action="store_false",
        default=None,
        help="servers without authentication (set when the services are first created)",
    )


class ServicesDown(TrackflowError):
    """``status`` found a service not running."""


def run(args: argparse.Namespace) -> None:
    from trackflow.services.stack import Stack

    stack = Stack(
        args.dir,
        workers=args.workers,
        postgres_port=args.postgres_port,
        mlflow_port=args.mlflow_port,
        prefect_port=args.prefect_port,
        auth=args.auth,
    )
    if args.action == "env":
        print(stack.env_script(), end="")
        return
    if args.action == "down":
        for line in stack.down():
            print(f"services: {line}")
        print(f"services: the data stays in {stack.folder} for the next `make services`")
        return
    if args.action == "status":
        states = stack.status()
        for state in states:
            print(f"services: {state.name:<11} {'running' if state.running else 'stopped':<8} "
                  f"{state.detail}")  # fmt: skip
        if not all(state.running for state in states):
            raise ServicesDown("some services are not running: start them with `make services`")
        return
    for line in stack.up():
        print(f"services: {line}", flush=True)
    print(f"services: logs in {stack.folder / 'logs'}; `make services-down` stops them\n")
    print(f"Use them from a shell: source {stack.folder / 'env.sh'}\nwhich sets:")
    for line in stack.shown_env():
        print(f"  {line}")
