"""Learning-rate range test: a short fit at growing learning rates, and the rate to start from.

Lightning's ``Tuner.lr_find`` trains the configured module on its training rows, raising the rate
exponentially from ``min_lr`` to ``max_lr`` over ``num_training`` steps, and records the smoothed
loss at each; the suggestion is the rate where the loss falls fastest per decade of rate. The
module's weights and the trainer are restored afterwards: nothing of the test is kept but its curve.

The range test sweeps every parameter group at the same rate: with a fine-tuned backbone, the
head's rate is the one found, and ``train.backbone_lr_ratio`` applies on top of it in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from trackflow.config import OptimizationConfig
from trackflow.errors import TrackflowError
from trackflow.learn.training import ClassifierLitModule, FeatureDataModule, build_trainer


@dataclass(frozen=True)
class LrRange:
    """The result of a range test.

    Attributes:
        lrs: Learning rate of each step.
        losses: Smoothed training loss after each step (NaN where none was recorded).
        suggestion: The rate where the loss fell fastest, rounded to two significant digits.
        suggestion_index: Index of that step in ``lrs``.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: float
    suggestion_index: int


def find_lr(
    module: ClassifierLitModule,
    data: FeatureDataModule,
    config: OptimizationConfig,
    folder: str | Path,
    callbacks: Sequence[pl.Callback] = (),
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
) -> LrRange:
    """Run the range test on ``module`` and its data, with the optimizer of ``config``.

    Args:
        module: The classifier as the stage would train it (fresh or transferred backbone).
        data: Its task's preprocessed rows.
        config: The stage's optimization section; epochs and early stopping do not limit the test.
        folder: Scratch folder for the trainer's temporary checkpoint.
        callbacks: The transfer mode's callbacks (a frozen backbone stays out of the optimizer).
        min_lr: First learning rate.
        max_lr: Last learning rate.
        num_training: Steps (batches) from ``min_lr`` to ``max_lr``.

    Raises:
        TrackflowError: Too few steps were recorded to suggest a rate.
    """
    from lightning.pytorch.tuner import Tuner

    unlimited = config.model_copy(update={"max_epochs": 100_000, "early_stopping_patience": None})
    trainer, _ = build_trainer(unlimited, folder, callbacks)
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=data,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        update_attr=False,
    )
    results = finder.results if finder is not None else {}
    lrs = [float(lr) for lr in results.get("lr", ())]
    losses = [float(loss) for loss in results.get("loss", ())]
    index = steepest_fall(lrs, losses)
    return LrRange(lrs, losses, float(f"{lrs[index]:.2g}"), index)


def steepest_fall(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 10, skip_end: int = 1
) -> int:
    """Index of the step where the loss falls fastest against the *logarithm* of the rate.

    Lightning's own ``suggestion()`` differentiates against the rate itself: on an exponential
    sweep the first steps are tiny apart, so noise at the smallest rates wins. Per decade of rate
    (as fastai does), the steepest part of the curve is found. The first ``skip_begin`` steps
    (where the smoothed loss is still biased) and the last ``skip_end`` are left out.

    Raises:
        TrackflowError: Fewer than three finite losses are left to compare.
    """
    candidates = [
        i for i in range(skip_begin, len(lrs) - skip_end) if math.isfinite(losses[i]) and lrs[i] > 0
    ]
    if len(candidates) < 3:
        raise TrackflowError(
            f"the learning-rate range test recorded {len(lrs)} steps, too few for a suggestion: "
            "raise --num-training, or widen --min-lr/--max-lr"
        )
    slopes = np.gradient(
        np.array([losses[i] for i in candidates]), np.log10([lrs[i] for i in candidates])
    )
    return candidates[int(np.argmin(slopes))]


def plot_lr_range(result: LrRange, title: str) -> Any:
    """Loss against learning rate (log scale) with the suggestion marked; a matplotlib figure."""
    from trackflow.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    ax.plot(result.lrs, result.losses, color="tab:blue", label="smoothed training loss")
    i = result.suggestion_index
    ax.plot(
        result.lrs[i],
        result.losses[i],
        "o",
        color="tab:red",
        markersize=9,
        label=f"suggestion: {result.suggestion:g} (steepest fall)",
    )
    ax.set_xscale("log")
    finite = [loss for loss in result.losses if math.isfinite(loss)]
    if finite:  # cut the diverging tail, which would flatten the useful part of the curve
        low, high = min(finite), min(max(finite), 2 * max(finite[0], 0.0) + 0.1)
        if high > low:
            margin = 0.05 * (high - low)
            ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
