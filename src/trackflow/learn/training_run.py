"""What the pretrain and train stages share: one MLflow run around one fitted candidate.

The run is created by rank 0 only and addressed by its id; other ranks of a distributed run train
and then write nothing. Outputs are written all together once training succeeded; the run ends
FINISHED, or FAILED if anything raised.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn

from trackflow.config import OptimizationConfig, Params, flatten_params
from trackflow.io import atomic_outputs, read_json, require_inputs, write_json
from trackflow.learn.networks import build_backbone, build_head, init_weights, save_network
from trackflow.learn.training import (
    ClassifierLitModule,
    EpochReport,
    FeatureDataModule,
    accuracy,
    fit_classifier,
    summary_metrics,
)
from trackflow.registry.lineage import batches_tag, log_datasets, params_hash, run_tags
from trackflow.tracking import (
    TAG_PREFIX,
    log_metrics,
    log_params,
    run_label,
    set_tags,
    setup_tracking,
    source_tags,
    update_note,
)

log = logging.getLogger(__name__)

DVC_METRICS = ("best_val_acc", "best_val_loss", "epochs")  # of the metrics file, unprefixed


class TrainingRun:
    """Context manager: data of one task, an MLflow run, fitting, and the stage's outputs.

    The run fits one network (:meth:`fit`), or records what networks fitted in its child runs
    make together (:meth:`record`: an ensemble's members, each a ``TrainingRun`` nested here).

    Args:
        params: The validated params.
        config: The stage's optimization section (``params.pretrain`` or ``params.train``).
        task: ``"source"`` or ``"target"``.
        data_dir: Folder written by the preprocess stage.
        name: Stage name, used as metric prefix and first part of the run's name.
        mode: The transfer mode, if any, second part of the run's name.
        parent_run_id: Nest the run under this one (a sweep's trial, an ensemble's member).
        run_name: The run's name, instead of the default below.
        tags: More tags of the run.

    The run is named ``<name>[-<mode>]-<DVC experiment name or params digest>``
    (``train-finetune-3f2a1c``), so runs can be told apart in MLflow's runs table and charts.
    """

    def __init__(
        self,
        params: Params,
        config: OptimizationConfig,
        task: str,
        data_dir: Path,
        name: str,
        mode: str | None = None,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        require_inputs(data_dir / "meta.json", made_by="preprocess")
        self.params, self.config, self.name, self.mode = params, config, name, mode
        self.parent_run_id = parent_run_id
        self.extra_tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
        self.extra_tags |= tags or {}
        self._run_name = run_name
        self.data_dir = data_dir
        self.data = FeatureDataModule(
            data_dir, task, params.data.label_column, config.batch_size, params.base.seed
        )
        self.tracking = setup_tracking(params.base.mlflow)
        #: The fitted network's architecture, saved with its weights: ``params.model``, or the
        #: architecture of the network training started from (``continue``: the champion's).
        self.architecture = params.model
        self.is_writer = rank_zero_only.rank == 0
        self.run_id: str | None = None
        self.metrics: dict[str, float] = {}
        self._checkpoints = tempfile.TemporaryDirectory(prefix=f"trackflow-{name}-")
        self._history: pd.DataFrame | None = None
        self._save_network: Callable[[Path], None] | None = None

    def __enter__(self) -> TrainingRun:
        seed_everything(self.params.base.seed, workers=True, verbose=False)
        if self.is_writer:
            meta = read_json(self.data_dir / "meta.json")
            tags = {
                TAG_PREFIX + "stage": self.name,
                TAG_PREFIX + "data_digest": meta["dataset_digest"],
                TAG_PREFIX + "preprocess_run_id": str(meta.get("run_id")),
            } | run_tags(self.params)
            tags |= batches_tag(meta.get("batches", []))  # which added batches it saw (lineage)
            tags = source_tags(f"trackflow.stages.{self.name}") | tags | self.extra_tags
            run = self.tracking.client.create_run(
                self.tracking.experiment_id, run_name=self.run_name, tags=tags
            )
            self.run_id = run.info.run_id
            try:
                log_params(self.tracking, self.run_id, flatten_params(self.params))
                self._log_datasets(meta["dataset_digest"])
            except BaseException as error:
                self.__exit__(type(error), error, None)
                raise
        return self

    @property
    def run_name(self) -> str:
        """The MLflow run's name: stage, mode, DVC experiment name or params digest."""
        if self._run_name:
            return self._run_name
        return run_label(self.name, self.mode, params_hash(self.params)[:6])

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._checkpoints.cleanup()
        if self.run_id is not None:
            status = "FINISHED" if error is None else "FAILED"
            self.tracking.client.set_terminated(self.run_id, status=status)

    def _log_datasets(self, digest: str) -> None:
        """The task's preprocessed parts as the run's dataset inputs, when the task exists."""
        if not self.has_task():
            return
        self.data.setup()
        contexts = {"train": "training", "val": "validation", "test": "testing"}
        tables = {contexts[split]: table for split, table in self.data.tables.items()}
        log_datasets(self.tracking, self.run_id, tables, digest, str(self.data_dir))

    def has_task(self) -> bool:
        """Whether the preprocessed data holds this run's task."""
        return (self.data_dir / f"{self.data.task}_train.parquet").exists()

    def new_backbone(self) -> nn.Module:
        """A freshly initialized backbone of the configured architecture."""
        self.data.setup()
        backbone = build_backbone(self.params.model, self.data.n_features)
        init_weights(backbone, self.params.model.init, self.params.base.seed)
        return backbone

    def fit(
        self,
        backbone: nn.Module,
        backbone_lr_ratio: float,
        callbacks: list[Any],
        tags: dict[str, str],
        resume_from: Path | None = None,
        head: nn.Module | None = None,
        lr: float | None = None,
    ) -> None:
        """Fit ``backbone`` under ``head`` (default: a new one), keep the best weights, log the run.

        ``lr`` replaces the stage's learning rate (``train.continue_lr`` for ``continue``).
        """
        self.data.setup()
        if head is None:
            head = build_head(backbone.out_features, len(self.data.classes))
            init_weights(head, self.params.model.init, self.params.base.seed)
        if lr is not None:
            self.config = self.config.model_copy(update={"lr": lr})
        self.module = ClassifierLitModule(backbone, head, self.config, backbone_lr_ratio)
        if self.run_id is not None:
            set_tags(self.tracking, self.run_id, {TAG_PREFIX + k: v for k, v in tags.items()})
        self.report = EpochReport(self.tracking, self.run_id)
        trainer, checkpoint = fit_classifier(
            self.module,
            self.data,
            self.config,
            self._checkpoints.name,
            [*callbacks, self.report],
            resume_from,
        )
        self.is_writer = trainer.is_global_zero
        if not self.is_writer:
            return
        self.metrics = summary_metrics(trainer, checkpoint, self.name) | {
            f"{self.name}/best_val_acc": accuracy(self.module, self.data.datasets["val"])
        }
        log_metrics(self.tracking, self.run_id, self.metrics)
        update_note(self.tracking, self.run_id, self.name, self.summary())
        client = self.tracking.client
        client.log_text(
            self.run_id, str(ModelSummary(self.module, max_depth=3)), "model_summary.txt"
        )
        for path in (checkpoint.best_model_path, checkpoint.last_model_path):
            if path:  # best: the weights kept; last: where `--resume` continues from
                client.log_artifact(self.run_id, path, "checkpoints")
        log.info("%s: %s", self.name, ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))

    def record(
        self,
        metrics: dict[str, float],
        history: pd.DataFrame,
        save_network: Callable[[Path], None],
        tags: dict[str, str],
    ) -> None:
        """Take on results of training done in child runs, and log them to this run.

        Args:
            metrics: This run's numbers, named as :meth:`fit` names them (``train/best_val_acc``).
            history: Per-epoch rows, written by :meth:`write_outputs`.
            save_network: Writes the model file to the path given (:meth:`log_network` calls it).
            tags: This run's tags (without the ``trackflow.`` prefix).
        """
        self.metrics, self._history, self._save_network = metrics, history, save_network
        if self.run_id is None:
            return
        set_tags(self.tracking, self.run_id, {TAG_PREFIX + k: v for k, v in tags.items()})
        log_metrics(self.tracking, self.run_id, metrics)
        update_note(self.tracking, self.run_id, self.name, self.summary())
        log.info("%s: %s", self.name, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def history(self) -> pd.DataFrame:
        """One row per epoch of the fit (or the recorded history)."""
        return self._history if self._history is not None else self.report.history()

    def summary(self) -> str:
        """One sentence of headline numbers, the stage's part of the run's description."""
        m = self.metrics
        members = m.get(f"{self.name}/members")
        vote = self.params.train.ensemble.vote if members else ""
        return (
            (f"{self.mode}, " if self.mode else "")
            + (f"ensemble of {members:g} ({vote} vote), " if members else "")
            + f"{m[f'{self.name}/epochs']:g} epochs, best val loss "
            f"{m[f'{self.name}/best_val_loss']:.4f}, val acc {m[f'{self.name}/best_val_acc']:.4f}."
        )

    def log_network(self, file_name: str, with_head: bool) -> Path:
        """Save the fitted network under ``file_name`` and log it to the run as ``<name>/``."""
        local = Path(self._checkpoints.name) / file_name
        if self._save_network is not None:
            self._save_network(local)
            self.tracking.client.log_artifact(self.run_id, str(local), self.name)
            return local
        save_network(
            local,
            self.module.backbone,
            self.architecture,
            self.data.n_features,
            head=self.module.head if with_head else None,
            classes=self.data.classes,
            feature_columns=self.data.feature_columns,
            label_column=self.params.data.label_column,
            run_id=self.run_id,
        )
        self.tracking.client.log_artifact(self.run_id, str(local), self.name)
        return local

    def write_outputs(
        self,
        network: Path,
        network_out: Path,
        metrics_out: Path,
        run_out: Path,
        history_out: Path | None = None,
        **meta: Any,
    ) -> None:
        """Write the network, metrics, run file (run id for later stages) and epoch history.

        The metrics file (DVC's) holds the headline without the stage prefix, so the pretrain and
        train rows of ``dvc metrics show`` share columns; MLflow has every number.
        """
        prefix = f"{self.name}/"
        headline = {k: self.metrics[prefix + k] for k in DVC_METRICS}
        run_info = {"run_id": self.run_id, "experiment_id": self.tracking.experiment_id} | meta
        outputs = (network_out, metrics_out, run_out, *([history_out] if history_out else []))
        with atomic_outputs(*outputs) as (network_tmp, metrics_tmp, run_tmp, *history_tmp):
            shutil.copyfile(network, network_tmp)
            write_json(headline, metrics_tmp)
            write_json(run_info, run_tmp)
            if history_tmp:
                self.history().to_csv(history_tmp[0], index=False)
