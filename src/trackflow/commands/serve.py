"""Serve the registry's champion over REST and follow its alias to each new version.

``trackflow serve`` answers with ``models:/NAME@ALIAS`` (``model.name`` of the params and
``champion`` by default) from the tracking store of ``base.mlflow`` (or ``MLFLOW_TRACKING_URI``),
reads the alias every ``--poll-interval`` seconds and swaps in a newly promoted version once it has
loaded and passed a smoke prediction. Set ``TRACKFLOW_API_TOKEN`` to require
``Authorization: Bearer <token>`` on every route but ``/health``, ``/ready`` and ``/ping``.
Routes and formats: ``trackflow.serving``.
"""

from __future__ import annotations

import argparse
import os

from trackflow.errors import ConfigError
from trackflow.stages import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``trackflow serve``."""
    add_params_argument(parser)
    parser.add_argument(
        "--model-name", help="registered model to serve (default: the params' model.name)"
    )
    parser.add_argument(
        "--alias", default="champion", help="alias to follow (default: %(default)s)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=10.0,
        help="seconds between two reads of the alias (default: %(default)s)",
    )
    parser.add_argument(
        "--max-rows", type=int, default=1000, help="most rows in one request (default: %(default)s)"
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=16.0,
        help="largest request body in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per request: status, version that answered, time",
    )


def run(args: argparse.Namespace) -> None:
    """Validate the settings, point at the tracking store, and serve until interrupted."""
    from trackflow.config import load_params
    from trackflow.serving import TOKEN_VARIABLE, ServeSettings, serve
    from trackflow.tracking import setup_tracking

    params = load_params(args.params)
    for option, value in (
        ("--poll-interval", args.poll_interval),
        ("--max-rows", args.max_rows),
        ("--max-body-mb", args.max_body_mb),
    ):
        if value <= 0:
            raise ConfigError(f"{option} must be positive, got {value}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    settings = ServeSettings(
        name=args.model_name or params.model.name,
        alias=args.alias,
        poll_interval_s=args.poll_interval,
        max_rows=args.max_rows,
        max_body_bytes=int(args.max_body_mb * 2**20),
        token=os.environ.get(TOKEN_VARIABLE) or None,
        access_log=args.access_log,
    )
    _use_one_thread()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log, not a terminal
    serve(setup_tracking(params.base.mlflow), settings, args.host, args.port)


def _use_one_thread() -> None:
    """One torch thread for the whole service.

    For models this small, intra-op threads cost more than they save and compete with the event
    loop for the CPU.
    """
    import torch

    torch.set_num_threads(1)
