"""Lightning training: data module, classifier module, transfer-learning callbacks, epoch logging.

Transfer learning follows Lightning's own fine-tuning template: the backbone is injected, never
built or downloaded inside the module, and the mode is a ``BaseFinetuning`` callback that freezes
or unfreezes it, not a branch in ``training_step``. The optimizer only ever holds trainable
parameters, in named groups (``head``, ``backbone``) whose learning rates are logged every epoch.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trackflow.config import OptimizationConfig, ScheduleConfig
from trackflow.data.split import SPLITS
from trackflow.errors import DataError
from trackflow.io import read_table
from trackflow.learn.augment import BatchAugmentation
from trackflow.learn.networks import count_parameters

if TYPE_CHECKING:
    from trackflow.tracking import Tracking

log = logging.getLogger(__name__)

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, on every fit: nothing a user
# can act on, and repeated once per sweep trial (each `catch_warnings` resets Python's "once").
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class FeatureDataModule(pl.LightningDataModule):
    """The preprocessed parts of one task as tensors; labels become indices into ``classes``.

    Args:
        folder: Folder of ``{task}_{split}.parquet`` tables written by the preprocess stage.
        task: ``"source"`` or ``"target"``.
        label_column: Class column of the tables.
        batch_size: Rows per training batch.
        seed: Seed of the training loader's shuffling.
    """

    def __init__(
        self, folder: str | Path, task: str, label_column: str, batch_size: int, seed: int
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.task = task
        self.label_column = label_column
        self.batch_size = batch_size
        self.seed = seed
        self.tables: dict[str, pd.DataFrame] = {}
        self.datasets: dict[str, TensorDataset] = {}
        self.classes: list[Any] = []

    def setup(self, stage: str | None = None) -> None:
        """Read the task's parts once; later calls are no-ops."""
        if self.datasets:
            return
        for split in SPLITS:
            path = self.folder / f"{self.task}_{split}.parquet"
            if not path.exists():
                raise DataError(
                    f"{path} is missing: there is no {self.task} task in the preprocessed data"
                    + (" (data.source_classes is null)" if self.task == "source" else "")
                )
            self.tables[split] = read_table(path)
        self.classes = sorted(self.tables["train"][self.label_column].unique().tolist(), key=str)
        for split, table in self.tables.items():
            self.datasets[split] = self._dataset(table)

    def _dataset(self, table: pd.DataFrame) -> TensorDataset:
        """Features (n_rows, n_features) and class indices (n_rows,) of a table."""
        index = {label: i for i, label in enumerate(self.classes)}
        features = torch.tensor(
            table.drop(columns=self.label_column).to_numpy(), dtype=torch.float32
        )
        labels = torch.tensor(table[self.label_column].map(index).to_numpy(), dtype=torch.long)
        return TensorDataset(features, labels)

    def keep_training_rows(self, ids: pd.Index) -> None:
        """Train on the rows ``ids`` (row ids of the training part) only; classes stay as they are.

        Raises:
            DataError: Some ids are not training rows.
        """
        self.setup()
        table = self.tables["train"]
        unknown = ids.difference(table.index)
        if len(unknown):
            raise DataError(f"{len(unknown)} row ids (e.g. {unknown[0]}) are not training rows")
        self.tables["train"] = table.loc[ids]
        self.datasets["train"] = self._dataset(self.tables["train"])

    def row_digests(self, columns: Sequence[str]) -> pd.Series:
        """Raw content digest of each training row, indexed by row id (the preprocess stage's).

        Args:
            columns: The raw columns the digests are compared over, in order (a model's
                :class:`~trackflow.registry.gate.SeenRows` columns): the data's own.

        Raises:
            DataError: The preprocessed data has no digests (written before they were kept).
            ConfigError: ``columns`` are not the data's raw columns in the data's order.
        """
        from trackflow.data.preprocessing import ROW_DIGESTS_FILE
        from trackflow.errors import ConfigError
        from trackflow.io import read_json

        path = self.folder / ROW_DIGESTS_FILE
        if not path.is_file():
            raise DataError(
                f"{path} is missing: the preprocessed data predates row digests; run the "
                "preprocess stage again (dvc repro preprocess)"
            )
        raw = read_json(self.folder / "meta.json")["raw_feature_columns"]
        if list(columns) != list(raw):
            raise ConfigError(
                f"the model's {len(columns)} raw columns are not the data's {len(raw)} (or not in "
                "the same order): it was trained on other data; use train.mode scratch"
            )
        self.setup()
        return read_table(path)["digest"].reindex(self.tables["train"].index)

    @property
    def n_features(self) -> int:
        """Width of the feature vectors."""
        return self.tables["train"].shape[1] - 1

    @property
    def feature_columns(self) -> list[str]:
        """Names of the feature columns, in order."""
        return [c for c in self.tables["train"].columns if c != self.label_column]

    def train_dataloader(self) -> DataLoader:
        """Shuffled, seeded batches of the training rows."""
        generator = torch.Generator().manual_seed(self.seed)
        rows = len(self.datasets["train"])
        return DataLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=rows % self.batch_size == 1 and rows > 1,  # batch norm needs two rows
        )

    def val_dataloader(self) -> DataLoader:
        """Validation rows in order."""
        return DataLoader(self.datasets["val"], batch_size=max(self.batch_size, 512))


class LrFactor:
    """Learning-rate factor of an epoch for a schedule (picklable, so checkpoints keep it)."""

    def __init__(self, schedule: ScheduleConfig, max_epochs: int) -> None:
        self.kind = schedule.kind
        self.step_size = schedule.step_size
        self.gamma = schedule.gamma
        self.decay_rate = schedule.decay_rate
        self.max_epochs = max_epochs

    def __call__(self, epoch: int) -> float:
        """Multiplier of the initial learning rate at ``epoch`` (0-based)."""
        if self.kind == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.kind == "exponential":
            return self.gamma**epoch
        if self.kind == "inverse_time":
            return 1.0 / (1.0 + self.decay_rate * epoch)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(epoch, self.max_epochs) / self.max_epochs))
        return 1.0


def build_optimizer(
    groups: list[dict[str, Any]], config: OptimizationConfig
) -> torch.optim.Optimizer:
    """The configured optimizer over named parameter groups."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=config.lr, weight_decay=config.weight_decay)


class ClassifierLitModule(pl.LightningModule):
    """A backbone and a head trained with cross-entropy; one shared ``model_step``.

    Args:
        backbone: Feature extractor, (batch, in_features) -> (batch, out_features).
        head: Classifier, (batch, out_features) -> (batch, n_classes).
        optimization: Optimizer, schedule and epochs.
        backbone_lr_ratio: The backbone's learning rate as a fraction of the head's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        optimization: OptimizationConfig,
        backbone_lr_ratio: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.optimization = optimization
        self.backbone_lr_ratio = backbone_lr_ratio
        self.augmentation: BatchAugmentation | None = None  # built in setup, from training rows
        # Per-epoch sums of (loss x rows, correct rows, rows): logging once per epoch instead of
        # once per step keeps Lightning's logging machinery out of the inner loop.
        self._sums: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (batch, n_classes)."""
        return self.head(self.backbone(x))

    def setup(self, stage: str) -> None:
        """Before fitting: build the training batches' augmentation (``optimization.augment``).

        It learns from the training rows only and is seeded with ``base.seed`` (plus the rank),
        so a deterministic run draws the same changes again.
        """
        if stage != "fit" or self.augmentation is not None:
            return
        augmentation = BatchAugmentation(
            self.optimization.augment,
            self.head.out_features,
            getattr(self.backbone, "image_shape", None),
            seed=_training_seed(self.trainer) + self.global_rank,
        )
        if augmentation.active:
            self.augmentation = augmentation.fit(_training_features(self.trainer))

    def model_step(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and predicted classes of a batch.

        The targets are class indices, or class probabilities (batch, n_classes) after mixup.
        """
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=1)

    def _accumulate(self, split: str, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        loss, preds = self.model_step(batch)
        y = batch[1]
        if y.ndim == 2:  # soft targets: accuracy against each row's dominant label
            y = y.argmax(dim=1)
        with torch.no_grad():
            rows = torch.tensor(float(len(y)), device=loss.device)
            step = torch.stack([loss.detach() * rows, (preds == y).sum().to(loss.dtype), rows])
            self._sums[split] = self._sums.get(split, torch.zeros_like(step)) + step
        return loss

    def _log_epoch(self, split: str) -> None:
        """Log ``<split>/loss`` and ``<split>/acc`` over the epoch's rows, summed across ranks."""
        sums = self.trainer.strategy.reduce(self._sums.pop(split), reduce_op="sum")
        loss, correct, rows = sums.tolist()
        self.log(f"{split}/loss", loss / rows, prog_bar=True)
        self.log(f"{split}/acc", correct / rows, prog_bar=split == "val")

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimization step, on the augmented batch if augmentation is on.

        ``train/loss`` and ``train/acc`` (of the rows as trained on) are logged after the last one.
        """
        if self.augmentation is not None:
            batch = self.augmentation(*batch)
        loss = self._accumulate("train", batch)
        if self.trainer.is_last_batch:
            self._log_epoch("train")
        return loss

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """Accumulate ``val/loss`` and ``val/acc``."""
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics of the epoch."""
        self._log_epoch("val")

    def configure_optimizers(self) -> dict[str, Any]:
        """Optimizer over the trainable parameters only, and a per-epoch schedule."""
        lr = self.optimization.lr
        groups = [
            {"name": name, "params": params, "lr": lr * ratio}
            for name, module, ratio in (
                ("head", self.head, 1.0),
                ("backbone", self.backbone, self.backbone_lr_ratio),
            )
            if (params := [p for p in module.parameters() if p.requires_grad])
        ]
        optimizer = build_optimizer(groups, self.optimization)
        factor = LrFactor(self.optimization.schedule, self.optimization.max_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [factor] * len(groups))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }


def _training_seed(trainer: pl.Trainer) -> int:
    """The data module's seed (``base.seed``), else the one ``seed_everything`` set."""
    seed = getattr(trainer.datamodule, "seed", None)
    return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


def _training_features(trainer: pl.Trainer) -> torch.Tensor:
    """The training rows, (n_rows, n_features), of the fit's :class:`FeatureDataModule`."""
    data = trainer.datamodule
    if not isinstance(data, FeatureDataModule):
        raise TypeError("augmentation learns from a FeatureDataModule's rows: fit with one")
    data.setup("fit")
    return data.datasets["train"].tensors[0]


class BackboneFreezing(BaseFinetuning):
    """Transfer mode as a callback: the backbone is frozen until ``unfreeze_at_epoch``.

    ``unfreeze_at_epoch=None`` is feature extraction: the backbone never unfreezes and stays in eval
    mode, so its normalization statistics do not move. ``unfreeze_at_epoch=0`` is fine-tuning from
    the first step. When the backbone unfreezes, it joins the optimizer as the ``backbone`` group at
    ``backbone_lr_ratio`` x the head's rate, scheduled like the head.

    Lightning restores the optimizer's groups on resume but calls ``freeze_before_training`` again,
    which would silently leave an already-unfrozen backbone frozen; ``on_fit_start`` repairs that.
    """

    def __init__(self, unfreeze_at_epoch: int | None, backbone_lr_ratio: float) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_ratio = backbone_lr_ratio

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        """Freeze the backbone unless fine-tuning starts at once."""
        if self.unfreeze_at_epoch != 0:
            self.freeze(pl_module.backbone, train_bn=False)

    def finetune_function(
        self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        """Unfreeze the backbone at ``unfreeze_at_epoch`` and add it to the optimizer."""
        if self.unfreeze_at_epoch is None or epoch != self.unfreeze_at_epoch or epoch == 0:
            return
        head = optimizer.param_groups[0]
        self.unfreeze_and_add_param_group(
            pl_module.backbone, optimizer, lr=head["lr"] * self.backbone_lr_ratio, train_bn=True
        )
        backbone = optimizer.param_groups[-1]
        backbone["name"] = "backbone"
        # The schedule's base rate: what the head started at, not where it has decayed to.
        backbone["initial_lr"] = head.get("initial_lr", head["lr"]) * self.backbone_lr_ratio
        _schedule_new_group(pl_module.trainer, optimizer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore param groups on resume, and make a restored backbone group trainable again."""
        super().on_fit_start(trainer, pl_module)
        in_optimizer = {
            id(p) for o in trainer.optimizers for g in o.param_groups for p in g["params"]
        }
        if any(id(p) in in_optimizer for p in pl_module.backbone.parameters()):
            self.make_trainable(pl_module.backbone)
            for optimizer in trainer.optimizers:
                _schedule_new_group(trainer, optimizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the schedule of freezing; keep a frozen backbone in eval mode."""
        super().on_train_epoch_start(trainer, pl_module)
        if any(p.requires_grad for p in pl_module.backbone.parameters()):
            pl_module.backbone.train()
        else:
            pl_module.backbone.eval()


def _schedule_new_group(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Extend per-group schedulers to groups added to ``optimizer`` after they were built."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is not optimizer or not hasattr(scheduler, "lr_lambdas"):
            continue
        for group in optimizer.param_groups[len(scheduler.base_lrs) :]:
            group.setdefault("initial_lr", group["lr"])
            scheduler.base_lrs.append(group["initial_lr"])
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])


class EpochReport(pl.Callback):
    """Per-epoch metrics, learning rates and parameter counts: to MLflow and/or as plain lines.

    MLflow gets one batched call per epoch, against an explicit ``run_id``, from rank 0 only.
    """

    def __init__(self, tracking: Tracking | None = None, run_id: str | None = None) -> None:
        self.tracking = tracking
        self.run_id = run_id
        self.print_lines = not sys.stderr.isatty()
        self.rows: list[dict[str, float]] = []

    def history(self) -> pd.DataFrame:
        """One row per epoch (``epoch`` from 1): every metric reported, as columns."""
        return pd.DataFrame(self.rows)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report the epoch that just ended (training and validation)."""
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = epoch_metrics(trainer, pl_module)
        self.rows.append({"epoch": trainer.current_epoch + 1, **metrics})
        if self.tracking is not None and self.run_id is not None:
            from trackflow.tracking import log_metrics

            log_metrics(self.tracking, self.run_id, metrics, step=trainer.current_epoch)
        if self.print_lines:
            shown = " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train/", "val/"))
            )
            log.info("epoch %d/%d %s", trainer.current_epoch + 1, trainer.max_epochs, shown)


def epoch_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """The epoch's logged metrics, each group's learning rate and the parameter counts.

    ``lr/head`` and ``lr/backbone`` are always there (0 for a part outside the optimizer, e.g. a
    frozen backbone), so runs of every transfer mode have the same keys in side-by-side charts.
    """
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))
    }
    for optimizer in trainer.optimizers:
        for i, group in enumerate(optimizer.param_groups):
            metrics[f"lr/{group.get('name', i)}"] = float(group["lr"])
    for part in ("head", "backbone"):  # a frozen part trains at rate 0: every run has both keys
        metrics.setdefault(f"lr/{part}", 0.0)
    counts = count_parameters(pl_module)
    metrics["params/trainable"] = counts["trainable"]
    metrics["params/frozen"] = counts["frozen"]
    return metrics


def build_trainer(
    config: OptimizationConfig,
    checkpoint_dir: str | Path,
    callbacks: Sequence[pl.Callback] = (),
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """A Trainer with the configured scale-out, best-checkpointing on ``val/loss``, early stopping.

    Returns:
        The trainer and its checkpoint callback (``best_model_path`` after ``fit``).
    """
    # Lightning sets its logger to INFO when imported and then repeats our log lines; keep warnings.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir, filename="best", monitor="val/loss", mode="min", save_last=True
    )
    stopping = (
        [EarlyStopping(monitor="val/loss", patience=config.early_stopping_patience)]
        if config.early_stopping_patience
        else []
    )
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.trainer.accelerator,
        devices=config.trainer.devices,
        strategy=config.trainer.strategy,
        num_nodes=config.trainer.num_nodes,
        deterministic=config.deterministic,
        gradient_clip_val=config.gradient_clip_val,
        callbacks=[checkpoint, *stopping, *callbacks],
        logger=False,
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        default_root_dir=str(checkpoint_dir),
    )
    return trainer, checkpoint


def transfer_callbacks(
    mode: str, unfreeze_at_epoch: int | None, backbone_lr_ratio: float
) -> list[pl.Callback]:
    """The callback implementing a transfer mode (none for training from scratch).

    ``unfreeze_at_epoch`` is ignored by feature extraction (the backbone never unfreezes); the
    train stage gets mode, epoch and ratio from :func:`trackflow.learn.transfer.transfer_plan`.
    """
    if mode == "feature_extraction":
        return [BackboneFreezing(None, backbone_lr_ratio)]
    if mode == "finetune":
        return [BackboneFreezing(unfreeze_at_epoch, backbone_lr_ratio)]
    return []


def fit_classifier(
    module: ClassifierLitModule,
    data: FeatureDataModule,
    config: OptimizationConfig,
    checkpoint_dir: str | Path,
    callbacks: Sequence[pl.Callback] = (),
    resume_from: str | Path | None = None,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """Fit, then load the best checkpoint's weights (lowest ``val/loss``) back into ``module``.

    Returns:
        The trainer (``is_global_zero`` tells the process that may write outputs) and its
        checkpoint callback (``best_model_path``, ``best_model_score``).
    """
    trainer, checkpoint = build_trainer(config, checkpoint_dir, callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    if trainer.is_global_zero and checkpoint.best_model_path:
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        module.load_state_dict(best["state_dict"])
    return trainer, checkpoint


def summary_metrics(
    trainer: pl.Trainer, checkpoint: ModelCheckpoint, prefix: str
) -> dict[str, float]:
    """The numbers a stage writes to its DVC metrics file."""
    counts = count_parameters(trainer.lightning_module)
    best = checkpoint.best_model_score
    return {
        f"{prefix}/best_val_loss": float(best) if best is not None else math.nan,
        f"{prefix}/epochs": trainer.current_epoch,
        f"{prefix}/params_trainable": counts["trainable"],
        f"{prefix}/params_frozen": counts["frozen"],
    }


@torch.no_grad()
def accuracy(network: nn.Module, dataset: TensorDataset) -> float:
    """Fraction of rows of ``dataset`` whose predicted class is right."""
    network.eval()
    features, labels = dataset.tensors
    return float((network(features).argmax(dim=1) == labels).float().mean())
