"""Serve the registry's champion over REST and follow its alias to each new version.

``trackflow serve`` answers with ``models:/NAME@ALIAS`` (``model.name`` of the params and
``champion`` by default) from the tracking store of ``base.mlflow`` (or ``MLFLOW_TRACKING_URI``),
reads the alias every ``--poll-interval`` seconds and swaps in a newly promoted version once it has
loaded and passed a smoke prediction. Set ``TRACKFLOW_API_TOKEN`` to require
``Authorization: Bearer <token>`` on every route but ``/health``, ``/ready`` and ``/ping``.
Routes and formats: ``trackflow.serving.app``.
"""

from __future__ import annotations

import argparse
import os

from trackflow.cli_support import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``trackflow serve``; each defaults to the params' ``serve`` section."""
    add_params_argument(parser)
    parser.add_argument(
        "--model-name", help="registered model to serve (default: the params' model.name)"
    )
    parser.add_argument("--alias", help="alias to follow (default: serve.alias)")
    parser.add_argument("--host", help="address to bind (default: serve.host)")
    parser.add_argument("--port", type=int, help="port (default: serve.port)")
    parser.add_argument(
        "--poll-interval", type=float, help="seconds between reads of the alias (serve.)"
    )
    parser.add_argument("--max-rows", type=int, help="most rows in one request (serve.)")
    parser.add_argument("--max-body-mb", type=float, help="largest request body, MiB (serve.)")
    parser.add_argument(
        "--access-log",
        action="store_true",
        default=None,
        help="log one line per request: status, version that answered, time",
    )


def run(args: argparse.Namespace) -> None:
    """Validate the settings, point at the tracking store, and serve until interrupted."""
    from trackflow.config import load_params
    from trackflow.serving.app import TOKEN_VARIABLE, ServeSettings, serve
    from trackflow.tracking import setup_tracking

    options = {
        "alias": args.alias,
        "host": args.host,
        "port": args.port,
        "poll_interval_s": args.poll_interval,
        "max_rows": args.max_rows,
        "max_body_mb": args.max_body_mb,
        "access_log": args.access_log,
    }
    overrides = {f"serve.{k}": v for k, v in options.items() if v is not None}
    params = load_params(args.params, overrides)  # a bad option fails like a bad param
    name = args.model_name or params.model.name
    settings = ServeSettings.from_config(name, params.serve, os.environ.get(TOKEN_VARIABLE))
    _use_one_thread()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a log, not a terminal
    serve(setup_tracking(params.base.mlflow), settings, params.serve.host, params.serve.port)


def _use_one_thread() -> None:
    """One torch thread for the whole service.

    For models this small, intra-op threads cost more than they save and compete with the event
    loop for the CPU.
    """
    import torch

    torch.set_num_threads(1)
