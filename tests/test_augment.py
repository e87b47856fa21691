"""Augmentation of training batches: which rows it touches, what it does to them, its params."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import run_data_stages, train_argv
from trackflow.config import AugmentConfig, ModelConfig, OptimizationConfig, load_params
from trackflow.errors import ConfigError
from trackflow.learn.augment import BatchAugmentation
from trackflow.learn.networks import build_backbone, build_head, load_network
from trackflow.learn.training import ClassifierLitModule, FeatureDataModule, build_trainer

LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def images(rows: int = 6, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    """Rows of random 'pixels' in [0, 1), flattened."""
    return torch.rand(rows, *shape, generator=torch.Generator().manual_seed(seed)).flatten(1)


def augmented(config: AugmentConfig, x: torch.Tensor, seed: int = 0, **kwargs) -> tuple:
    return BatchAugmentation(config, 3, seed=seed, **kwargs).fit(x)(x, LABELS[: len(x)])


class InputRecorder(pl.Callback):
    """The rows the backbone saw, per phase (training or not)."""

    def __init__(self) -> None:
        self.seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(module: torch.nn.Module, args: tuple) -> None:
            self.seen[module.training].append(args[0].detach().clone())

        pl_module.backbone.register_forward_pre_hook(record)


def test_only_training_batches_are_changed(processed: Path, tmp_path: Path) -> None:
    data = FeatureDataModule(processed, "target", "target", batch_size=64, seed=0)
    data.setup()
    backbone = build_backbone(ModelConfig(widths=(16,)), data.n_features)
    augment = AugmentConfig(noise=0.5, mixup=0.4)
    config = OptimizationConfig(max_epochs=1, early_stopping_patience=None, augment=augment)
    module = ClassifierLitModule(backbone, build_head(16, len(data.classes)), config)
    recorder = InputRecorder()
    trainer, _ = build_trainer(config, tmp_path / "ckpt", [recorder])
    trainer.fit(module, datamodule=data)

    validation_rows = data.datasets["val"].tensors[0]
    assert torch.equal(torch.cat(recorder.seen[False][-1:]), validation_rows)  # untouched
    trained_on = torch.cat(recorder.seen[True])
    training_rows = data.datasets["train"].tensors[0]
    assert trained_on.shape == training_rows.shape
    # No row trained on is a training row as it is: each was moved by noise and mixed.
    distances = torch.cdist(trained_on, training_rows).min(dim=1).values
    assert (distances > 1e-3).all()
    # What was fitted is the network alone: no augmentation state in its weights.
    assert not any("augment" in key for key in module.state_dict())


def test_augmentation_is_off_when_every_setting_is_zero(processed: Path, tmp_path: Path) -> None:
    data = FeatureDataModule(processed, "target", "target", batch_size=64, seed=0)
    config = OptimizationConfig(max_epochs=1, early_stopping_patience=None, augment=AugmentConfig())
    data.setup()
    backbone = build_backbone(ModelConfig(widths=(16,)), data.n_features)
    module = ClassifierLitModule(backbone, build_head(16, len(data.classes)), config)
    recorder = InputRecorder()
    trainer, _ = build_trainer(config, tmp_path / "ckpt", [recorder])
    trainer.fit(module, datamodule=data)
    assert module.augmentation is None
    seen = torch.cat(recorder.seen[True])
    assert torch.equal(
        seen.sort(dim=0).values, data.datasets["train"].tensors[0].sort(dim=0).values
    )


def test_same_seed_same_changes_and_another_seed_other_changes() -> None:
    config = AugmentConfig(shift=1, rotate=10, scale=0.1, noise=0.1, mixup=0.4)
    x = images()
    first, second, other = (augmented(config, x, seed) for seed in (7, 7, 8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    # Each batch gets new draws: a second call differs from the first.
    augmentation = BatchAugmentation(config, 3, seed=7).fit(x)
    assert not torch.equal(augmentation(x, LABELS)[0], augmentation(x, LABELS)[0])


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 4, 6)])
def test_image_moves_keep_shapes_and_the_background(shape: tuple[int, int, int]) -> None:
    x = images(shape=shape)
    config = AugmentConfig(shift=1, rotate=15, scale=0.2)
    moved, targets = augmented(config, x, image_shape=shape)
    assert moved.shape == x.shape and targets.shape == (len(x), 3)
    assert not torch.equal(moved, x)
    # Rows at each column's minimum (the background) stay background wherever they move.
    background = BatchAugmentation(config, 3, image_shape=shape).fit(x)
    blank = background.low_.expand(len(x), -1)
    assert torch.allclose(background(blank, LABELS)[0], blank, atol=1e-6)


def test_a_shift_moves_whole_pixels_with_background_coming_in() -> None:
    x = images()
    moved, _ = augmented(AugmentConfig(shift=1), x)
    augmentation = BatchAugmentation(AugmentConfig(shift=1), 3).fit(x)
    low, span = augmentation.low_, augmentation.span_
    before = ((x - low) / span).reshape(-1, 8, 8)
    after = ((moved - low) / span).reshape(-1, 8, 8)
    for image, result in zip(before, after, strict=True):
        candidates = [_shifted(image, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.allclose(c, result, atol=1e-5) for c in candidates)


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    height, width = image.shape
    ys, xs = slice(max(dy, 0), height + min(dy, 0)), slice(max(dx, 0), width + min(dx, 0))
    yd, xd = slice(max(-dy, 0), height + min(-dy, 0)), slice(max(-dx, 0), width + min(-dx, 0))
    out[yd, xd] = image[ys, xs]
    return out


def test_geometric_moves_need_image_rows() -> None:
    with pytest.raises(ConfigError, match=r"preprocess\.pca\.n_components: null"):
        BatchAugmentation(AugmentConfig(shift=1), 3).fit(torch.rand(4, 10))


def test_mixup_gives_soft_targets_led_by_each_rows_own_label() -> None:
    x = images()
    mixed, targets = augmented(AugmentConfig(mixup=0.4), x)
    assert torch.allclose(targets.sum(dim=1), torch.ones(len(x)))
    assert (targets >= 0).all()
    assert torch.equal(targets.argmax(dim=1), LABELS)  # the row keeps the larger share
    assert mixed.shape == x.shape


def test_noise_has_the_configured_size() -> None:
    x = torch.zeros(2000, 16)
    noisy, targets = BatchAugmentation(AugmentConfig(noise=0.3), 3).fit(x)(
        x, torch.zeros(2000, dtype=torch.long)
    )
    assert abs(float(noisy.std()) - 0.3) < 0.01
    assert torch.equal(targets, torch.nn.functional.one_hot(torch.zeros(2000).long(), 3).float())


def test_calling_before_fit_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        BatchAugmentation(AugmentConfig(noise=0.1), 3)(torch.zeros(2, 4), LABELS[:2])


@pytest.mark.parametrize("stage", ["pretrain", "train"])
def test_image_moves_with_pca_on_are_refused_naming_the_keys(write_params, stage: str) -> None:
    overrides = {"preprocess.pca.n_components": 16, "model.backbone": "mlp"}
    params = write_params({f"{stage}.augment.rotate": 10, **overrides})
    with pytest.raises(ConfigError) as error:
        load_params(params)
    message = str(error.value)
    assert "preprocess.pca.n_components: null" in message
    assert f"{stage}.augment.shift, .rotate and .scale to 0" in message
    # Noise and mixup need no images: accepted with PCA on.
    load_params(write_params({f"{stage}.augment.noise": 0.1, f"{stage}.augment.mixup": 0.2}))


def test_train_stage_fits_with_noise_and_mixup(processed: Path, fast_params) -> None:
    from mlflow import MlflowClient

    from trackflow.io import read_json
    from trackflow.stages.train import main as train

    overrides = {"train.mode": "scratch", "model.widths": [32]}
    overrides |= {"train.augment.noise": 0.2, "train.augment.mixup": 0.3}
    assert train(train_argv(fast_params(overrides), processed, "none.pt")) == 0
    run = MlflowClient().get_run(read_json("train_run.json")["run_id"])
    assert run.data.params["train.augment.noise"] == "0.2"
    assert run.data.params["train.augment.mixup"] == "0.3"
    assert 0 < read_json("train.json")["best_val_acc"] <= 1
    assert set(load_network("model.pt")) >= {"backbone", "head"}


@pytest.mark.slow
def test_train_stage_moves_images_for_a_cnn(fast_params) -> None:
    from trackflow.io import read_json
    from trackflow.stages.train import main as train

    overrides = {"model.backbone": "cnn", "model.channels": [8], "train.mode": "scratch"}
    overrides |= {"preprocess.pca.n_components": None, "train.augment.shift": 1}
    overrides |= {"train.augment.rotate": 10, "train.augment.scale": 0.1}
    params = fast_params(overrides)
    assert run_data_stages(params) == 0
    assert train(train_argv(params, Path("processed"), "none.pt")) == 0
    assert 0 < read_json("train.json")["best_val_acc"] <= 1
