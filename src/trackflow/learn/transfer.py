"""The transfer plan: what ``train.mode`` means for training, decided in one place.

The train stage asks :func:`transfer_plan` where the backbone comes from, at what learning rate it
trains and which callbacks carry out the mode, and branches on the mode nowhere itself;
:func:`train_candidate` carries the plan out, for the stage, a sweep's trials and ensemble members.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch import nn

    from trackflow.config import TrainConfig
    from trackflow.learn.training_run import TrainingRun


@dataclass(frozen=True)
class TransferPlan:
    """How the train stage adapts a backbone to the target task.

    Attributes:
        mode: ``finetune``, ``feature_extraction`` or ``scratch``.
        backbone: Where the backbone comes from: ``"pretrained"`` (the pretrain stage's output),
            a ``models:/`` or ``runs:/`` URI, or None for a new one with random weights.
        backbone_lr_ratio: The backbone's learning rate as a fraction of the head's (1 when both
            are new: one network trained from scratch).
        unfreeze_at_epoch: Epoch at which a frozen backbone starts training; None: never.
    """

    mode: str
    backbone: str | None
    backbone_lr_ratio: float
    unfreeze_at_epoch: int | None

    @property
    def needs_pretrain_output(self) -> bool:
        """Whether the backbone is the pretrain stage's output file."""
        return self.backbone == "pretrained"

    def callbacks(self) -> list[pl.Callback]:
        """New Lightning callbacks carrying out the mode (they hold state: one set per fit)."""
        from trackflow.learn.training import transfer_callbacks

        return transfer_callbacks(self.mode, self.unfreeze_at_epoch, self.backbone_lr_ratio)


def transfer_plan(config: TrainConfig) -> TransferPlan:
    """The plan ``params.train`` asks for: backbone source, learning-rate ratio, freezing."""
    if config.mode == "scratch":
        return TransferPlan(config.mode, None, 1.0, None)
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
        Tags saying where the backbone came from (``backbone_source``, ``backbone_run_id``, ...).
    """
    backbone, origin = transfer_backbone(training, plan, pretrained)
    tags = {"mode": plan.mode, **origin}
    callbacks = [*plan.callbacks(), *callbacks]
    training.fit(backbone, plan.backbone_lr_ratio, callbacks, tags, resume_from=resume_from)
    return origin


def transfer_backbone(
    training: TrainingRun, plan: TransferPlan, pretrained: Path
) -> tuple[nn.Module, dict[str, str]]:
    """The backbone to adapt and tags saying where it came from."""
    from trackflow.io import require_inputs
    from trackflow.learn.networks import load_backbone, load_network
    from trackflow.registry.uris import resolve

    if plan.backbone is None:
        return training.new_backbone(), {"backbone_source": "none (trained from scratch)"}
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
    candidates = sorted(path.glob("*.pt"))
    if len(candidates) != 1:
        raise ConfigError(f"{uri!r} should hold one saved network (.pt), found {len(candidates)}")
    return candidates[0]
