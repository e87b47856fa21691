"""The command line's plumbing: the ``--params`` option, logging, one-line errors, exit statuses.

Shared by ``trackflow`` (:mod:`trackflow.cli`), its commands (:mod:`trackflow.commands`) and the
stage entry points (``python -m trackflow.stages.<name>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trackflow.errors import TrackflowError


def add_params_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--params`` option every stage takes."""
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )


def configure_logging(verbose: bool = False) -> None:
    """Plain, timestamped lines on stderr: readable under DVC, CI and a terminal alike."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def execute(
    run: Callable[[argparse.Namespace], None], args: argparse.Namespace, has_outputs: bool = False
) -> int:
    """Run a stage; a user-caused error becomes one message on stderr and a non-zero status.

    Args:
        run: The stage or command.
        args: Its parsed arguments.
        has_outputs: It writes outputs, which DVC deletes before running it: under DVC, the
            message then also says so and how to bring the last good ones back.
    """
    try:
        run(args)
    except Exception as exc:
        error = exc if isinstance(exc, TrackflowError) else _tracking_error(exc)
        if error is None:
            raise  # a bug: its traceback is kept
        note = dvc_outputs_note() if has_outputs else ""
        message = f"{str(error).rstrip('.')}. {note}" if note else str(error)
        print(f"error: {message}", file=sys.stderr)
        return error.exit_code
    return 0


def _tracking_error(exc: Exception) -> TrackflowError | None:
    """MLflow's errors a user acts on, as one line; None for the rest (bugs: traced).

    A tracking server's refusal mid-command (a user whose permission stops at reading): exit 2.
    A server gone away for good (MLflow's client retries for about two minutes first): exit 75.
    """
    from trackflow.errors import ConfigError, TrackingUnavailable, why
    from trackflow.tracking import is_transient, redact, refusal

    if not type(exc).__module__.startswith("mlflow"):
        return None
    refused = refusal(exc)
    if refused:
        return ConfigError(f"the MLflow tracking server {refused}: {redact(why(exc))}")
    if not is_transient(exc):
        return None
    return TrackingUnavailable(
        f"the MLflow tracking server went away and did not come back in time, try again: "
        f"{redact(why(exc))}"
    )


def dvc_outputs_note() -> str:
    """What became of the stage's outputs when DVC runs it (``DVC_STAGE`` set); else ``""``.

    ``dvc repro`` and ``dvc exp run`` delete a stage's declared outputs before running its command,
    and record new ones only when it succeeds: a refused stage leaves none in the workspace, while
    ``dvc.lock`` still names the last good ones, which ``dvc checkout <stage>`` restores from the
    cache.
    """
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    deleted = f"DVC deleted stage {stage}'s outputs before running it and nothing new was written"
    if _locked_outputs(stage.rpartition(":")[2]) is False:
        return f"{deleted}; dvc.lock records no successful run of it to restore"
    return f"{deleted}: `dvc checkout {stage}` restores its last good outputs from DVC's cache"


def _locked_outputs(name: str) -> bool | None:
    """Whether ``dvc.lock`` records outputs of stage ``name``; ``None`` when it cannot be read.

    DVC runs a stage's command in its ``wdir``, by default the folder of its ``dvc.yaml`` and
    ``dvc.lock``.
    """
    import yaml

    try:
        lock = yaml.safe_load(Path("dvc.lock").read_text(encoding="utf-8"))
        return bool(lock["stages"].get(name, {}).get("outs"))
    except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError):
        return None


def stage_main(
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None = None,
) -> int:
    """``main`` of a stage module run as ``python -m trackflow.stages.<name>``."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    configure_logging()
    return execute(run, parser.parse_args(argv), has_outputs=True)
