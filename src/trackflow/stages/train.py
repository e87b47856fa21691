"""Train: adapt a backbone to the target task by fine-tuning or feature extraction, or from scratch.

The backbone comes from ``train.backbone``: the pretrain stage's output (``--backbone``), a
registered ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``, or a ``runs:/`` URI; ``train.mode:
scratch`` ignores it and starts from random weights; ``train.mode: continue`` keeps training the
champion's whole network on the rows it has not seen plus a replay of those it has
(:mod:`trackflow.learn.transfer` decides all of it: nothing here branches on the mode).
Writes the target model to ``--model-out``, ``--metrics``, ``--run-out`` (the MLflow run id the
evaluation stages append to) and ``--history`` (per-epoch metrics). ``--resume`` continues from
a Lightning checkpoint (the run's ``checkpoints/last.ckpt`` artifact) in a new run, freeze state
and schedule included.
``train.ensemble`` trains several networks, each in a child run of the stage's run, and writes
one model that votes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.cli_support import add_params_argument, stage_main
from trackflow.io import require_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--data", type=Path, required=True, help="folder written by preprocess")
    parser.add_argument("--backbone", type=Path, required=True, help="pretrain stage's backbone")
    parser.add_argument("--model-out", type=Path, required=True, help="target model file")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--run-out", type=Path, required=True, help="run JSON file")
    parser.add_argument("--history", type=Path, required=True, help="per-epoch metrics CSV")
    parser.add_argument("--resume", type=Path, help="Lightning checkpoint to resume from")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.errors import ConfigError
    from trackflow.learn.ensemble import member_params, train_target
    from trackflow.learn.training_run import TrainingRun
    from trackflow.learn.transfer import transfer_plan

    params = load_params(args.params)
    plans = [transfer_plan(member.train) for member in member_params(params)]
    plan = plans[0]
    if any(member.needs_pretrain_output for member in plans):
        require_inputs(args.backbone, made_by="pretrain")
    if args.resume is not None and not args.resume.is_file():
        raise ConfigError(f"--resume {args.resume}: no such checkpoint file")
    with TrainingRun(params, params.train, "target", args.data, "train", plan.mode) as training:
        origin = train_target(training, args.backbone, resume_from=args.resume)
        if not training.is_writer:
            return
        network = training.log_network(args.model_out.name, with_head=True)
        training.write_outputs(
            network,
            args.model_out,
            args.metrics,
            args.run_out,
            args.history,
            mode=plan.mode,
            **origin,
        )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
