"""Pretrain: train backbone + head on the source task; save and register the backbone.

Writes the backbone to ``--backbone-out`` (weights with their architecture and input width),
``--metrics``, and ``--run-out`` (the MLflow run id, and the registered version as ``model_uri``);
logs the run to MLflow and registers the backbone as a new version of ``<model.name>-backbone``,
tagged with what it was trained on (params digest, dataset digest, input width, digest of the
preprocessed training table). It moves **no alias**: nothing gates backbones, and a moving alias
would go stale whenever DVC restores an earlier backbone from its run cache without running this
stage. The backbone that goes with the workspace is ``--backbone-out``, and its registered version
is the ``model_uri`` in ``--run-out`` (both DVC outputs, so they travel together). Without a source
task (``data.source_classes: null``) it records that no backbone exists and trains nothing; the
train stage then needs ``train.mode: scratch`` or a registered backbone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from trackflow.cli_support import add_params_argument, stage_main

if TYPE_CHECKING:
    from trackflow.learn.training_run import TrainingRun

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--data", type=Path, required=True, help="folder written by preprocess")
    parser.add_argument("--backbone-out", type=Path, required=True, help="backbone file to write")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON file")
    parser.add_argument("--run-out", type=Path, required=True, help="run/registry JSON file")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.io import atomic_outputs, write_json
    from trackflow.learn.networks import save_network
    from trackflow.learn.training_run import TrainingRun
    from trackflow.registry.uris import register_version

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
        tags = backbone_tags(training)
        version = register_version(training.tracking, name, training.run_id, "pretrain", tags)
        training.write_outputs(
            network,
            args.backbone_out,
            args.metrics,
            args.run_out,
            registered_model=name,
            version=version,
            model_uri=f"models:/{name}/{version}",
        )
        log.info("registered backbone %s version %s (no alias moved)", name, version)
        _warn_of_stale_alias(training, name, version)


def _warn_of_stale_alias(training: TrainingRun, name: str, version: str) -> None:
    """Say so when ``@champion`` is set: earlier trackflow moved it on every pretrain run."""
    from trackflow.registry.promotion import CHAMPION, alias_version

    chosen = alias_version(training.tracking.client, name, CHAMPION)
    if chosen is not None:
        log.warning(
            "%s@%s is version %s, set by hand or by an earlier trackflow; pretrain no longer "
            "moves it: this workspace's backbone is models:/%s/%s",
            name,
            CHAMPION,
            chosen,
            name,
            version,
        )


def backbone_tags(training: TrainingRun) -> dict[str, str]:
    """What a backbone version was trained on: params, dataset, input width, training table."""
    from trackflow.data.ingest import table_digest
    from trackflow.tracking import TAG_PREFIX

    run_tags = training.tracking.client.get_run(training.run_id).data.tags
    keep = ("params_hash", "data_digest", "git_commit", "preprocess_run_id")
    tags = {TAG_PREFIX + k: run_tags[TAG_PREFIX + k] for k in keep if TAG_PREFIX + k in run_tags}
    return tags | {
        TAG_PREFIX + "backbone.in_features": str(training.data.n_features),
        TAG_PREFIX + "backbone.train_digest": table_digest(training.data.tables["train"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
