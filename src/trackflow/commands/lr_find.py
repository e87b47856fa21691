"""Learning-rate range test: the rate to train the configured model at, found on its training rows.

``trackflow lr-find`` builds the model the train stage would train (``train.mode``: a fresh
backbone, or the pretrained one with the mode's freezing), runs Lightning's range test on the
target task's training rows (``--stage pretrain``: the source task, a fresh backbone) with the
stage's optimizer and augmentation, and prints the suggested rate with the params line to set.
MLflow gets one run, ``lr-find-<stage>-<digest>``, with the curve as a figure
(``lr_find/lr_find.png``, the suggestion marked), the curve's points (``lr_find/curve.json``)
and the suggestion as the metric ``lr_find/suggestion``. ``--apply`` writes the suggestion into
the params file, keeping its comments. Nothing else is written; the weights are thrown away.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trackflow.cli_support import add_params_argument

if TYPE_CHECKING:
    from trackflow.config import Params
    from trackflow.learn.lr_find import LrRange
    from trackflow.learn.training_run import TrainingRun
    from trackflow.learn.transfer import TransferPlan

log = logging.getLogger(__name__)

TASKS = {"train": "target", "pretrain": "source"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``trackflow lr-find``."""
    add_params_argument(parser)
    parser.add_argument(
        "--stage",
        choices=sorted(TASKS),
        default="train",
        help="train: the target task, as params.train configures it (default); pretrain: the "
        "source task with a fresh backbone",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/processed"),
        help="folder written by preprocess (default: %(default)s)",
    )
    parser.add_argument(
        "--backbone",
        type=Path,
        default=Path("models/backbone.pt"),
        help="pretrain stage's backbone, when train.backbone is 'pretrained' "
        "(default: %(default)s)",
    )
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first rate (%(default)g)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="last rate (%(default)g)")
    parser.add_argument(
        "--num-training", type=int, default=100, help="steps of the test (%(default)s)"
    )
    parser.add_argument(
        "--apply",
        action="store_true",
        help="write the suggestion to <stage>.lr in the params file (comments kept)",
    )


def run(args: argparse.Namespace) -> None:
    """Check the inputs, run the range test inside an MLflow run, report and maybe apply it."""
    from trackflow.config import load_params
    from trackflow.learn.training_run import TrainingRun
    from trackflow.learn.transfer import TransferPlan, transfer_plan

    _check_range(args)
    params = load_params(args.params)
    key = f"{args.stage}.lr"
    if args.stage == "train":
        plan = transfer_plan(params.train)
    else:  # pretraining always starts from a fresh backbone
        plan = TransferPlan("scratch", None, 1.0, None)
    training = TrainingRun(
        params,
        getattr(params, args.stage),
        TASKS[args.stage],
        args.data,
        "lr-find",
        mode=plan.mode,
        run_name=_run_name(params, args.stage),
        tags={"mlflow.source.name": "trackflow.commands.lr_find"},
    )
    if not training.has_task():
        training.data.setup()  # raises the data module's own message (e.g. no source task)
    with training:
        result = _range_test(training, plan, args)
        _log_result(training, result, args)
    print(f"suggested learning rate for {args.stage}: {result.suggestion:g}")
    print(f"set in {args.params}:  {key}: {result.suggestion:g}")
    if args.apply:
        from trackflow.params_file import update_params_file

        update_params_file(args.params, {key: result.suggestion})
        print(f"wrote {key}: {result.suggestion:g} to {args.params}")


def _check_range(args: argparse.Namespace) -> None:
    from trackflow.errors import ConfigError

    if not 0 < args.min_lr < args.max_lr:
        raise ConfigError(
            f"--min-lr {args.min_lr:g} and --max-lr {args.max_lr:g}: need 0 < min-lr < max-lr"
        )
    if args.num_training < 3:
        raise ConfigError(f"--num-training {args.num_training}: need at least 3 steps")
    if args.backbone.suffix == ".ckpt":
        raise ConfigError(
            f"--backbone {args.backbone} is a Lightning checkpoint; give the pretrain stage's "
            "backbone file (models/backbone.pt), or set train.backbone to a models:/ URI"
        )


def _run_name(params: Params, stage: str) -> str:
    from trackflow.registry.lineage import params_hash
    from trackflow.tracking import run_label

    return run_label("lr-find", stage, params_hash(params)[:6])


def _range_test(training: TrainingRun, plan: TransferPlan, args: argparse.Namespace) -> LrRange:
    """The model the stage would train, and its range test."""
    from trackflow.learn.lr_find import find_lr
    from trackflow.learn.networks import build_head, init_weights
    from trackflow.learn.training import ClassifierLitModule
    from trackflow.learn.transfer import transfer_backbone

    backbone, origin = transfer_backbone(training, plan, args.backbone)
    training.data.setup()
    head = build_head(backbone.out_features, len(training.data.classes))
    init_weights(head, training.params.model.init, training.params.base.seed)
    module = ClassifierLitModule(backbone, head, training.config, plan.backbone_lr_ratio)
    if training.run_id is not None:
        from trackflow.tracking import TAG_PREFIX, set_tags

        tags = {"mode": plan.mode, "lr_find.stage": args.stage, **origin}
        set_tags(training.tracking, training.run_id, {TAG_PREFIX + k: v for k, v in tags.items()})
    with tempfile.TemporaryDirectory(prefix="trackflow-lr-find-") as folder:
        return find_lr(
            module,
            training.data,
            training.config,
            folder,
            plan.callbacks(),
            min_lr=args.min_lr,
            max_lr=args.max_lr,
            num_training=args.num_training,
        )


def _log_result(training: TrainingRun, result: LrRange, args: argparse.Namespace) -> None:
    """The figure, the curve, the suggestion and a one-line description, to the run."""
    from trackflow.learn.lr_find import plot_lr_range
    from trackflow.plotting import pyplot
    from trackflow.tracking import log_metrics, log_params, update_note

    if training.run_id is None:
        return
    tracking, run_id = training.tracking, training.run_id
    settings = {"min_lr": args.min_lr, "max_lr": args.max_lr, "num_training": args.num_training}
    log_params(tracking, run_id, {f"lr_find.{k}": v for k, v in settings.items()})
    log_metrics(tracking, run_id, {"lr_find/suggestion": result.suggestion})
    figure = plot_lr_range(result, f"learning-rate range test, {args.stage} ({training.mode})")
    tracking.client.log_figure(run_id, figure, "lr_find/lr_find.png")
    pyplot().close(figure)
    curve = {"lr": result.lrs, "loss": result.losses, "suggestion": result.suggestion}
    tracking.client.log_dict(run_id, curve, "lr_find/curve.json")
    update_note(
        tracking,
        run_id,
        "lr-find",
        f"suggested {args.stage}.lr {result.suggestion:g} (steepest fall of the training loss, "
        f"{len(result.lrs)} steps from {args.min_lr:g} to {args.max_lr:g}).",
    )
