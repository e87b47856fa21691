"""Pretrain: train backbone + head on the source task; save and register the backbone.

Writes the backbone to ``--backbone-out`` (weights with their architecture and input width),
``--metrics``, and ``--run-out`` (the MLflow run id and registered version); logs the run to MLflow
and registers the backbone as ``<model.name>-backbone`` with the alias ``champion``. Without a
source task (``data.source_classes: null``) it records that no backbone exists and trains nothing;
the train stage then needs ``train.mode: scratch`` or a registered backbone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.stages import add_params_argument, stage_main

log = logging.getLogger(__name__)

BACKBONE_ALIAS = "champion"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--data", type=Path, required=True, help="folder written by preprocess")
    parser.add_argument("--backbone-out", type=Path, required=True, help="backbone file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--run-out", type=Path, required=True, help="run/registry JSON file")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.io import atomic_outputs, write_json
    from trackflow.models import save_network
    from trackflow.registry import register_version
    from trackflow.stages.training_run import TrainingRun

    params = load_params(args.params)
    training = TrainingRun(params, params.pretrain, "source", args.data, "pretrain")
    if not training.has_task():
        reason = "there is no source task: data.source_classes is null"
        log.warning("pretrain: nothing to train, %s", reason)
        outputs = (args.backbone_out, args.metrics, args.run_out)
        with atomic_outputs(*outputs) as (backbone, metrics, run_file):
            save_network(backbone, None, params.model, 0, reason=reason)
            write_json({}, metrics)
            write_json({"run_id": None, "reason": reason}, run_file)
        return
    with training:
        training.fit(training.new_backbone(), 1.0, callbacks=[], tags={"backbone_source": "new"})
        if not training.is_writer:
            return
        network = training.log_network(args.backbone_out.name, with_head=False)
        name = f"{params.model.name}-backbone"
        version = register_version(
            training.tracking, name, training.run_id, "pretrain", alias=BACKBONE_ALIAS
        )
        training.write_outputs(
            network,
            args.backbone_out,
            args.metrics,
            args.run_out,
            registered_model=name,
            version=version,
            alias=BACKBONE_ALIAS,
        )
        log.info("registered backbone %s version %s as @%s", name, version, BACKBONE_ALIAS)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
