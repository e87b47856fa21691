"""Ensembles: several networks trained for the target task, packaged as one model that votes.

``train.ensemble`` asks for ``size`` members (seeds ``base.seed``, ``base.seed + 1``, ...) or lists
``members``, each a mapping of dotted overrides of ``train.*`` keys (and ``base.seed``). Every
member trains through :func:`~trackflow.learn.transfer.train_candidate` in its own MLflow run,
a child of the stage's run; the stage's run records the voting model's validation numbers, and
the model file holds every member (:func:`~trackflow.learn.networks.save_ensemble`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from trackflow.config import EnsembleConfig, Params, set_dotted, validate_params
from trackflow.errors import ConfigError
from trackflow.learn.networks import save_ensemble, voting_network
from trackflow.learn.training_run import TrainingRun
from trackflow.learn.transfer import train_candidate, transfer_plan
from trackflow.tracking import TAG_PREFIX


def member_params(params: Params) -> list[Params]:
    """The params each member trains with: seed ``base.seed + i``, then the member's overrides.

    A member is one network (its ``train.ensemble`` is the default).

    Raises:
        ConfigError: A member's overrides make invalid params (e.g. ``train.mode: finetune``
            with ``train.backbone: null``).
    """
    ensemble = params.train.ensemble
    overrides = ensemble.members or [{}] * ensemble.size
    found = []
    for i, member in enumerate(overrides):
        raw = params.model_dump(mode="json")
        raw["base"]["seed"] = params.base.seed + i
        raw["train"]["ensemble"] = EnsembleConfig().model_dump(mode="json")
        for key, value in member.items():
            set_dotted(raw, key, value)
        found.append(validate_params(raw, source=f"train.ensemble.members[{i}]"))
    return found


def train_target(
    training: TrainingRun, pretrained: Path, resume_from: Path | None = None
) -> dict[str, str]:
    """Train the target model ``training.params`` asks for: one network, or an ensemble.

    Args:
        training: The stage's open run; an ensemble's members become its child runs.
        pretrained: The pretrain stage's backbone file (read when a plan says ``pretrained``).
        resume_from: A Lightning checkpoint to continue from (one network only).

    Returns:
        Tags saying where the backbone came from (the first member's, for an ensemble).

    Raises:
        ConfigError: ``resume_from`` is given for an ensemble, or an ensemble is asked to
            continue the champion (which is one network).
    """
    if not training.params.train.ensemble.votes:
        plan = transfer_plan(training.params.train)
        return train_candidate(training, plan, pretrained, resume_from=resume_from)
    if any(transfer_plan(p.train).continues_champion for p in member_params(training.params)):
        raise ConfigError(
            "train.mode continue keeps training the champion's one network; train.ensemble asks "
            "for several: set train.ensemble.size: 1 (and no members) to continue"
        )
    if resume_from is not None:
        raise ConfigError(
            "--resume continues one network's training; train.ensemble trains several: "
            "run it again without --resume"
        )
    members, origin = train_members(training, pretrained)
    if training.is_writer:
        record_ensemble(training, members, origin)
    return origin


def train_members(
    training: TrainingRun, pretrained: Path
) -> tuple[list[TrainingRun], dict[str, str]]:
    """Fit each member in a child run of ``training``; the members and the first one's origin."""
    members, origins = [], []
    for i, params in enumerate(member_params(training.params), start=1):
        plan = transfer_plan(params.train)
        member = TrainingRun(
            params,
            params.train,
            training.data.task,
            training.data_dir,
            training.name,
            plan.mode,
            parent_run_id=training.run_id,
            run_name=f"{training.run_name}-member-{i}",
            tags={TAG_PREFIX + "ensemble_member": str(i)},
        )
        with member:
            origins.append(train_candidate(member, plan, pretrained))
        members.append(member)
    return members, origins[0]


def record_ensemble(
    training: TrainingRun, members: Sequence[TrainingRun], origin: dict[str, str]
) -> None:
    """Log the voting model's validation numbers to ``training`` and make it save the ensemble.

    ``<stage>/best_val_acc`` and ``<stage>/best_val_loss`` are the voting model's, on the
    validation rows (accuracy, mean cross-entropy); ``<stage>/epochs`` and the parameter counts
    are the members' sums; ``<stage>/member_<i>/best_val_acc`` each member's own.
    """
    ensemble = training.params.train.ensemble
    network = voting_network([(m.module.backbone, m.module.head) for m in members], ensemble.vote)
    features, labels = training.data.datasets["val"].tensors
    with torch.no_grad():
        log_proba = network.eval()(features)
    prefix = f"{training.name}/"
    metrics = {
        prefix + "best_val_acc": float((log_proba.argmax(dim=1) == labels).float().mean()),
        prefix + "best_val_loss": float(torch.nn.functional.nll_loss(log_proba, labels)),
        prefix + "members": len(members),
    }
    for key in ("epochs", "params_trainable", "params_frozen"):
        metrics[prefix + key] = sum(m.metrics.get(prefix + key, math.nan) for m in members)
    for i, member in enumerate(members, start=1):
        metrics[f"{prefix}member_{i}/best_val_acc"] = member.metrics[prefix + "best_val_acc"]

    def save(path: Path) -> None:
        save_ensemble(
            path,
            [(m.module.backbone, m.module.head) for m in members],
            ensemble.vote,
            [m.params.model for m in members],
            training.data.n_features,
            classes=training.data.classes,
            feature_columns=training.data.feature_columns,
            label_column=training.params.data.label_column,
            run_id=training.run_id,
            member_run_ids=[m.run_id for m in members],
        )

    tags = {"mode": members[0].mode or "", **origin, "ensemble_vote": ensemble.vote}
    tags["ensemble_size"] = str(len(members))
    training.record(metrics, members[0].history(), save, tags)
