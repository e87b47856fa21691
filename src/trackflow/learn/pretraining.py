"""Pretraining a backbone on the source task, as a library call.

The pretrain stage registers its backbone and writes DVC outputs around the same fit; a sweep trial
whose ``model.*`` or ``pretrain.*`` values differ from the workspace's pretrains its own backbone
here, in a run nested under the trial's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trackflow.config import Params
from trackflow.errors import ConfigError


def pretrain_backbone(
    params: Params,
    data_dir: Path,
    out: Path,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
) -> str | None:
    """Train backbone + head on the source task and save the backbone (no head) to ``out``.

    Args:
        params: The validated params (``model`` and ``pretrain`` sections).
        data_dir: Folder written by the preprocess stage.
        out: The backbone file to write.
        parent_run_id: Nest the MLflow run under this one.
        run_name: The run's name.
        tags: More tags of the run.

    Returns:
        The MLflow run id.

    Raises:
        ConfigError: The data has no source task (``data.source_classes: null``).
    """
    from trackflow.learn.training_run import TrainingRun

    training = TrainingRun(
        params,
        params.pretrain,
        "source",
        data_dir,
        "pretrain",
        parent_run_id=parent_run_id,
        run_name=run_name,
        tags=tags,
    )
    if not training.has_task():
        raise ConfigError(
            "there is no source task to pretrain on (data.source_classes is null): "
            "use train.mode: scratch or a registered backbone"
        )
    with training:
        training.fit(training.new_backbone(), 1.0, callbacks=[], tags={"backbone_source": "new"})
        network = training.log_network(out.name, with_head=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(network, out)
    return training.run_id
