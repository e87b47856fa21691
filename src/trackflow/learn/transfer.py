"""The transfer plan: what ``train.mode`` means for training, decided in one place.

The train stage asks :func:`transfer_plan` where the backbone comes from, at what learning rate it
trains and which callbacks carry out the mode, and branches on the mode nowhere itself;
:func:`train_candidate` carries the plan out, for the stage, a sweep's trials and ensemble members.

``continue`` starts from the champion's whole network (backbone and head, ``models:/<model.name>
@champion``) instead of a backbone under a new head, trains all of it at ``train.continue_lr``,
and only on the target training rows the champion did not see plus a replay sample of those it
did (:mod:`trackflow.learn.continual`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trackflow.registry.promotion import CHAMPION  # continue's starting point, head included

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from trackflow.config import TrainConfig
    from trackflow.learn.training_run import TrainingRun


@dataclass(frozen=True)
class TransferPlan:
    """How the train stage adapts a backbone to the target task.

    Attributes:
        mode: ``finetune``, ``feature_extraction``, ``scratch`` or ``continue``.
        backbone: Where the backbone comes from: ``"pretrained"`` (the pretrain stage's output),
            a ``models:/`` or ``runs:/`` URI, :data:`CHAMPION` (the champion's whole network,
            head included), or None for a new one with random weights.
        backbone_lr_ratio: The backbone's learning rate as a fraction of the head's (1 when both
            are new: one network trained from scratch).
        unfreeze_at_epoch: Epoch at which a frozen backbone starts training; None: never.
        lr: The learning rate, instead of ``train.lr``; None: ``train.lr``.
        replay_fraction: None: train on every training row. A share: train on the rows the
            starting network did not see, plus this share of those it did (per class).
    """

    mode: str
    backbone: str | None
    backbone_lr_ratio: float
    unfreeze_at_epoch: int | None
    lr: float | None = None
    replay_fraction: float | None = None

    @property
    def needs_pretrain_output(self) -> bool:
        """Whether the backbone is the pretrain stage's output file."""
        return self.backbone == "pretrained"

    @property
    def continues_champion(self) -> bool:
        """Whether the champion's whole network keeps training (head included)."""
        return self.backbone == CHAMPION

    def callbacks(self) -> list[pl.Callback]:
        """New Lightning callbacks carrying out the mode (they hold state: one set per fit)."""
        from trackflow.learn.training import transfer_callbacks

        return transfer_callbacks(self.mode, self.unfreeze_at_epoch, self.backbone_lr_ratio)


def transfer_plan(config: TrainConfig) -> TransferPlan:
    """The plan ``params.train`` asks for: backbone source, learning-rate ratio, freezing."""
    if config.mode == "scratch":
        return TransferPlan(config.mode, None, 1.0, None)
    if config.mode == "continue":
        return TransferPlan(
            config.mode, CHAMPION, 1.0, 0, config.continue_lr, config.replay_fraction
        )
    unfreeze = None if config.mode == "feature_extraction" else config.unfreeze_at_epoch
    return TransferPlan(config.mode, config.backbone, config.backbone_lr_ratio, unfreeze)


def train_candidate(
    training: TrainingRun,
    plan: TransferPlan,
    pretrained: Path,
    callbacks: Sequence[pl.Callback] = (),
    resume_from: Path | None = None,
) -> dict[str, str]:
    """Adapt the planned backbone to the target task inside ``training``: the one training path.

    The train stage, every sweep trial and every ensemble member train through this call.

    Args:
        training: The open run of the target task.
        plan: The transfer plan of ``training.params.train``.
        pretrained: The pretrain stage's backbone file (read when the plan says ``pretrained``).
        callbacks: More Lightning callbacks (a sweep's pruning callback).
        resume_from: A Lightning checkpoint to continue from.

    Returns:
        Tags saying where the backbone came from (``backbone_source``, ``backbone_run_id``, ...;
        for ``continue`` also ``continued_from``, ``rows_new`` and ``rows_replayed``).
    """
    if plan.continues_champion:
        backbone, head, origin = continue_champion(training, plan)
    else:
        (backbone, origin), head = transfer_backbone(training, plan, pretrained), None
    tags = {"mode": plan.mode, **origin}
    callbacks = [*plan.callbacks(), *callbacks]
    training.fit(
        backbone,
        plan.backbone_lr_ratio,
        callbacks,
        tags,
        resume_from=resume_from,
        head=head,
        lr=plan.lr,
    )
    return origin


def continue_champion(
    training: TrainingRun, plan: TransferPlan
) -> tuple[nn.Module, nn.Module, dict[str, str]]:
    """The champion's backbone and head, with ``training``'s rows cut to new rows plus replay.

    Returns:
        Backbone, head, and tags: where the network came from (``continued_from``: the champion's
        version) and the rows trained on (``rows_new``, ``rows_replayed``, ``rows_seen``).

    Raises:
        ConfigError: No champion; it recorded no rows; it is an ensemble; it does not fit the
            preprocessed features or classes.
        NoNewRows: The champion saw every training row.
    """
    from trackflow.learn.continual import champion_seen_rows, continue_rows
    from trackflow.learn.networks import load_network
    from trackflow.registry.uris import model_uri, resolve

    name = training.params.model.name
    version, seen = champion_seen_rows(training.tracking, name)
    uri = model_uri(name, version=version)
    with tempfile.TemporaryDirectory() as folder:
        resolved = resolve(training.tracking, uri, folder)
        saved = load_network(_network_file(resolved.path, uri))
    label = f"the champion of {name!r} (version {version})"
    backbone, head = _whole_network(saved, training, label)
    data = training.data
    digests = data.row_digests(seen.columns)
    rows = continue_rows(
        digests, data.tables["train"][data.label_column], seen, plan.replay_fraction or 0.0,
        training.params.base.seed,
    )  # fmt: skip
    data.keep_training_rows(rows.ids)
    origin = {
        "backbone_source": f"models:/{name}@{CHAMPION}",
        "backbone_run_id": str(resolved.run_id),
        "backbone_version": version,
        "continued_from": version,
    }
    return backbone, head, origin | rows.tags()


def _whole_network(
    saved: dict[str, Any], training: TrainingRun, label: str
) -> tuple[nn.Module, nn.Module]:
    """A saved single network's backbone and head, checked against ``training``'s data.

    ``training`` saves the network it fits with the saved network's architecture (``model.*``
    may have changed since: the weights decide).
    """
    from trackflow.config import ModelConfig
    from trackflow.errors import ConfigError
    from trackflow.learn.networks import ENSEMBLE_FORMAT, build_head, load_backbone

    if saved.get("format") == ENSEMBLE_FORMAT:
        raise ConfigError(
            f"continue trains one network, but {label} is an ensemble of "
            f"{len(saved['members'])}: retrain with train.mode finetune or scratch"
        )
    data = training.data
    data.setup()
    if saved["in_features"] != data.n_features:
        raise ConfigError(
            f"{label} takes {saved['in_features']} features but the preprocessed data has "
            f"{data.n_features} (other preprocess.* settings): continue cannot keep training it "
            "on these features; use train.mode scratch"
        )
    classes = list(saved.get("classes") or [])
    if [str(c) for c in classes] != [str(c) for c in data.classes]:
        raise ConfigError(
            f"{label} predicts the classes {classes} but the target training rows have "
            f"{data.classes}: continue cannot keep its head; use train.mode scratch"
        )
    backbone = load_backbone(saved, data.n_features, label)
    head = build_head(backbone.out_features, len(classes))
    head.load_state_dict(saved["head"])
    training.architecture = ModelConfig(**saved["model"])  # saved with the weights it fits
    return backbone, head


def transfer_backbone(
    training: TrainingRun, plan: TransferPlan, pretrained: Path
) -> tuple[nn.Module, dict[str, str]]:
    """The backbone to adapt and tags saying where it came from."""
    from trackflow.io import require_inputs
    from trackflow.learn.networks import load_backbone, load_network
    from trackflow.registry.uris import resolve

    if plan.backbone is None:
        return training.new_backbone(), {"backbone_source": "none (trained from scratch)"}
    if plan.continues_champion:  # a range test of continue (trackflow lr-find): its backbone
        backbone, _, origin = continue_champion(training, plan)
        return backbone, origin
    training.data.setup()
    if plan.needs_pretrain_output:
        require_inputs(pretrained, made_by="pretrain")
        saved = load_network(pretrained)
        origin = {"backbone_source": str(pretrained), "backbone_run_id": str(saved.get("run_id"))}
    else:
        with tempfile.TemporaryDirectory() as folder:
            resolved = resolve(training.tracking, plan.backbone, folder)
            saved = load_network(_network_file(resolved.path, plan.backbone))
        origin = {
            "backbone_source": plan.backbone,
            "backbone_run_id": str(resolved.run_id),
            "backbone_version": str(resolved.version),
        }
    return load_backbone(saved, training.data.n_features, origin["backbone_source"]), origin


def _network_file(path: Path, uri: str) -> Path:
    from trackflow.errors import ConfigError

    if path.is_file():
        return path
    # A backbone's artifact folder holds the file; a packaged model holds it under artifacts/.
    candidates = sorted(path.glob("*.pt")) or sorted(path.glob("artifacts/*.pt"))
    if len(candidates) != 1:
        raise ConfigError(f"{uri!r} should hold one saved network (.pt), found {len(candidates)}")
    return candidates[0]
