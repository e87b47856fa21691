"""Augmentation of training batches on the fly: image moves, input noise and mixup.

:class:`BatchAugmentation` follows the estimator contract: ``__init__`` keeps the settings,
:meth:`~BatchAugmentation.fit` learns what it needs from the training rows (each column's range,
for moving images) and returns ``self``, and calling it on a batch returns a new, randomly changed
batch. The classifier module applies it to training batches only; validation, test and the saved
model never see it.

Rows are the preprocessed features: standardized pixels, each column with its own mean and scale,
so moving a value from one column to another is not moving a raw pixel. Image moves therefore map
every column to its training range, ``[min, max] -> [0, 1]`` (0 is the background of digits-like
images, whatever the scaler), move the images there with zeros coming in at the borders, and map
back. For images whose pixels all span the same raw range (the digits: 0..16) this undoes and
redoes the standard scaling exactly, without reading the preprocessor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trackflow.config import AugmentConfig
from trackflow.errors import ConfigError


class BatchAugmentation:
    """Random changes to a batch of rows, drawn anew for every batch from a seeded generator.

    Args:
        config: Which changes and how large (``params.<stage>.augment``).
        n_classes: Number of classes; targets come back as probabilities over them.
        image_shape: (channels, height, width) of a row, needed by shift, rotation and zoom;
            None: one square channel.
        seed: Seed of the random draws: the same seed and batches give the same changes.

    Attributes:
        low_: Each column's minimum over the training rows, shape (n_features,); geometric only.
        span_: Each column's maximum minus minimum (1 where that is 0), shape (n_features,).
    """

    def __init__(
        self,
        config: AugmentConfig,
        n_classes: int,
        image_shape: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.n_classes = n_classes
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.seed = seed

    @property
    def active(self) -> bool:
        """Whether any change is switched on."""
        c = self.config
        return bool(c.geometric or c.noise or c.mixup)

    def fit(self, features: torch.Tensor) -> BatchAugmentation:
        """Learn each column's range from the training rows, shape (n_rows, n_features).

        Raises:
            ConfigError: Geometric changes are asked for but rows are not images.
        """
        self.generator_ = torch.Generator().manual_seed(self.seed)
        self.rng_ = np.random.default_rng(self.seed)
        if self.config.geometric:
            self.image_shape_ = self._resolve_shape(features.shape[1])
            self.low_ = features.min(dim=0).values
            span = features.max(dim=0).values - self.low_
            self.span_ = torch.where(span > 0, span, torch.ones_like(span))
        return self

    def __call__(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Changed rows and soft targets.

        Args:
            features: (batch, n_features) rows.
            labels: (batch,) class indices.

        Returns:
            The changed rows, (batch, n_features), and the targets as class probabilities,
            (batch, n_classes), each row summing to 1 (one-hot unless mixup mixed it).
        """
        if not hasattr(self, "generator_"):
            raise RuntimeError("BatchAugmentation is not fitted: call fit(training rows) first")
        with torch.no_grad():
            targets = F.one_hot(labels, self.n_classes).to(features.dtype)
            if self.config.geometric:
                features = self._move(features)
            if self.config.noise:
                features = features + self.config.noise * self._randn(features.shape, features)
            if self.config.mixup:
                features, targets = self._mix(features, targets)
        return features, targets

    def _move(self, features: torch.Tensor) -> torch.Tensor:
        """Shift, rotate and zoom every row as an image: one affine grid for the batch."""
        c = self.config
        rows = len(features)
        low, span = self.low_.to(features), self.span_.to(features)
        images = ((features - low) / span).reshape(rows, *self.image_shape_)
        _, height, width = self.image_shape_
        angle = torch.deg2rad(self._uniform(rows, c.rotate))
        zoom = 1.0 + self._uniform(rows, c.scale)
        shift = torch.randint(-c.shift, c.shift + 1, (rows, 2), generator=self.generator_)
        # affine_grid maps output to input coordinates in [-1, 1]: one pixel is 2 / size.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin, 2 * shift[:, 0] / width], dim=1),
                torch.stack([sin, cos, 2 * shift[:, 1] / height], dim=1),
            ],
            dim=1,
        ).to(features)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        moved = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
        return moved.reshape(rows, -1) * span + low

    def _mix(
        self, features: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup: each row mixed with another row of the batch, weight ~ Beta(alpha, alpha)."""
        alpha = self.config.mixup
        weight = torch.as_tensor(self.rng_.beta(alpha, alpha, size=len(features))).to(features)
        weight = torch.maximum(weight, 1 - weight)[:, None]  # the row keeps the larger share
        partner = torch.randperm(len(features), generator=self.generator_).to(features.device)
        mixed = weight * features + (1 - weight) * features[partner]
        return mixed, weight * targets + (1 - weight) * targets[partner]

    def _uniform(self, rows: int, bound: float) -> torch.Tensor:
        return (2 * torch.rand(rows, generator=self.generator_) - 1) * bound

    def _randn(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator_).to(like)

    def _resolve_shape(self, n_features: int) -> tuple[int, int, int]:
        if self.image_shape is not None:
            shape = self.image_shape
        else:
            side = math.isqrt(n_features)
            shape = (1, side, side)
        if len(shape) != 3 or math.prod(shape) != n_features:
            raise ConfigError(
                f"augment.shift/rotate/scale move images, but rows of {n_features} features are "
                f"not images of shape {list(shape)}: turn PCA off (preprocess.pca.n_components: "
                "null), set model.image_shape, or set the augment's shift, rotate and scale to 0"
            )
        return (int(shape[0]), int(shape[1]), int(shape[2]))
