"""The transfer plan: what ``train.mode`` means for training, decided in one place.

The train stage asks :func:`transfer_plan` where the backbone comes from, at what learning rate it
trains and which callbacks carry out the mode, and branches on the mode nowhere itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from trackflow.config import TrainConfig


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
