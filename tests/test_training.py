"""Lightning training with transfer learning, on the digits' preprocessed parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers import FAST_TRAINING, pretrain_argv, train_argv
from trackflow.config import ModelConfig, OptimizationConfig, ScheduleConfig, load_params
from trackflow.data.preprocessing import ROW_DIGESTS_FILE
from trackflow.io import read_json
from trackflow.learn.networks import build_backbone, build_head, count_parameters, load_classifier
from trackflow.learn.training import (
    BackboneFreezing,
    ClassifierLitModule,
    FeatureDataModule,
    LrFactor,
    build_trainer,
    transfer_callbacks,
)
from trackflow.registry.lineage import params_hash
from trackflow.stages.pretrain import main as pretrain
from trackflow.stages.train import main as train

LABEL = "target"
NARROW = {"model.widths": [32, 16]}  # with the fast training settings (``fast_params``)
EPOCHS = FAST_TRAINING["train.max_epochs"]


def data_module(processed: Path, task: str = "target") -> FeatureDataModule:
    data = FeatureDataModule(processed, task, LABEL, batch_size=64, seed=0)
    data.setup()
    return data


def lit_module(data: FeatureDataModule, ratio: float = 1.0, **optim: object) -> ClassifierLitModule:
    backbone = build_backbone(ModelConfig(widths=(32, 16)), data.n_features)
    head = build_head(backbone.out_features, len(data.classes))
    return ClassifierLitModule(backbone, head, OptimizationConfig(**optim), ratio)


def fit(module, data, tmp_path, callbacks=(), epochs=3, resume=None, **optim):
    config = OptimizationConfig(max_epochs=epochs, early_stopping_patience=None, **optim)
    trainer, checkpoint = build_trainer(config, tmp_path / "ckpt", list(callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return trainer, checkpoint


def groups(trainer: pl.Trainer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}


@pytest.mark.parametrize(
    ("mode", "frozen_backbone", "group_names"),
    [
        ("finetune", False, {"head", "backbone"}),
        ("feature_extraction", True, {"head"}),
        ("scratch", False, {"head", "backbone"}),
    ],
)
def test_trainable_parameters_per_mode(
    processed, tmp_path, mode, frozen_backbone, group_names
) -> None:
    data = data_module(processed)
    ratio = 1.0 if mode == "scratch" else 0.1
    module = lit_module(data, ratio, lr=1e-3, schedule=ScheduleConfig(kind="none"))
    before = [p.detach().clone() for p in module.backbone.parameters()]
    trainer, _ = fit(module, data, tmp_path, transfer_callbacks(mode, 0, ratio), epochs=2)
    counts = count_parameters(module)
    head_size = sum(p.numel() for p in module.head.parameters())
    backbone_size = sum(p.numel() for p in module.backbone.parameters())
    if frozen_backbone:
        assert counts == {"trainable": head_size, "frozen": backbone_size}
    else:
        assert counts == {"trainable": head_size + backbone_size, "frozen": 0}
    assert set(groups(trainer)) == group_names
    if "backbone" in group_names:
        assert groups(trainer)["backbone"] == pytest.approx(ratio * groups(trainer)["head"])
    moved = any(
        not torch.equal(a, b) for a, b in zip(before, module.backbone.parameters(), strict=True)
    )
    assert moved != frozen_backbone


def test_feature_extraction_keeps_normalization_statistics(processed, tmp_path) -> None:
    data = data_module(processed)
    module = lit_module(data)
    stats = {k: v.clone() for k, v in module.backbone.state_dict().items() if "running" in k}
    fit(module, data, tmp_path, transfer_callbacks("feature_extraction", 0, 0.1), epochs=2)
    after = module.backbone.state_dict()
    assert stats and all(torch.equal(v, after[k]) for k, v in stats.items())


def test_finetuning_unfreezes_at_the_given_epoch(processed, tmp_path) -> None:
    data = data_module(processed)
    module = lit_module(data, 0.1, lr=1e-3, schedule=ScheduleConfig(kind="none"))

    class Watch(pl.Callback):
        def __init__(self) -> None:
            self.frozen: list[bool] = []
            self.training: list[bool] = []

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.frozen.append(not any(p.requires_grad for p in pl_module.backbone.parameters()))
            self.training.append(pl_module.backbone.training)

    watch = Watch()
    trainer, _ = fit(module, data, tmp_path, [BackboneFreezing(2, 0.1), watch], epochs=4)
    assert watch.frozen == [True, True, False, False]
    assert watch.training == [False, False, True, True]  # dropout and batch norm back on
    assert groups(trainer) == pytest.approx({"head": 1e-3, "backbone": 1e-4})


def test_freeze_state_survives_resuming_from_a_checkpoint(processed, tmp_path) -> None:
    data = data_module(processed)
    module = lit_module(data, 0.1, lr=1e-3, schedule=ScheduleConfig(kind="step", step_size=1))
    fit(module, data, tmp_path, [BackboneFreezing(1, 0.1)], epochs=3)
    resumed = lit_module(data, 0.1, lr=1e-3, schedule=ScheduleConfig(kind="step", step_size=1))
    start = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(start, weights_only=False)["state_dict"]
    trainer, _ = fit(
        resumed,
        data,
        tmp_path / "again",
        [BackboneFreezing(1, 0.1)],
        epochs=5,
        resume=start,
        lr=1e-3,
        schedule=ScheduleConfig(kind="step", step_size=1),
    )
    assert all(p.requires_grad for p in resumed.backbone.parameters())
    moved = [
        k
        for k, v in resumed.backbone.state_dict().items()
        if "weight" in k and not torch.equal(v, saved[f"backbone.{k}"])
    ]
    assert moved, "the backbone did not train after resuming"
    assert groups(trainer)["backbone"] == pytest.approx(0.1 * groups(trainer)["head"])
    assert groups(trainer)["head"] == pytest.approx(1e-3 * 0.5**5)  # stepped after each of 5 epochs


def test_loss_decreases_on_tiny_data(processed, tmp_path) -> None:
    data = data_module(processed)
    losses = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            losses.append(float(trainer.callback_metrics["train/loss"]))

    kind = ScheduleConfig(kind="none")
    fit(
        lit_module(data, lr=3e-3, schedule=kind),
        data,
        tmp_path,
        [Record()],
        epochs=5,
        schedule=kind,
    )
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("kind", ["step", "exponential", "inverse_time", "cosine", "none"])
def test_schedules(kind) -> None:
    factor = LrFactor(ScheduleConfig(kind=kind, step_size=2, gamma=0.5, decay_rate=1.0), 4)
    expected = {
        "step": [1, 1, 0.5, 0.5, 0.25],
        "exponential": [1, 0.5, 0.25, 0.125, 0.0625],
        "inverse_time": [1, 1 / 2, 1 / 3, 1 / 4, 1 / 5],
        "cosine": [1, 0.8536, 0.5, 0.1464, 0],
        "none": [1] * 5,
    }[kind]
    assert [factor(epoch) for epoch in range(5)] == pytest.approx(expected, abs=1e-4)


def test_cnn_backbone_needs_image_shaped_features() -> None:
    from trackflow.errors import ConfigError

    cnn = ModelConfig(backbone="cnn", channels=(8, 16))
    assert build_backbone(cnn, 64)(torch.zeros(2, 64)).shape == (2, 4 * 16)  # 2x2 grid
    with pytest.raises(ConfigError, match="40 features are not a square image"):
        build_backbone(cnn, 40)


# Stages, with a real MLflow store -------------------------------------------------------------


def run_stage(stage, params: Path, processed: Path) -> int:
    argv = pretrain_argv if stage is pretrain else train_argv
    return stage(argv(params, processed))


def test_train_stage_records_one_complete_mlflow_run(processed, fast_params) -> None:
    from mlflow import MlflowClient

    commit = commit_a_checkout()
    params = fast_params(NARROW)
    assert run_stage(pretrain, params, processed) == 0
    assert run_stage(train, params, processed) == 0
    run_id = read_json("train_run.json")["run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    digest = params_hash(load_params(params))[:6]
    assert run.info.status == "FINISHED" and run.info.run_name == f"train-finetune-{digest}"
    pretrain_run = client.get_run(read_json("pretrain_run.json")["run_id"])
    assert pretrain_run.info.run_name == f"pretrain-{digest}"
    # Params as params.yaml writes them, not as Python prints them.
    assert run.data.params["train.mode"] == "finetune"
    assert run.data.params["model.widths"] == "[32, 16]"
    assert run.data.params["train.gradient_clip_val"] == "null"
    assert run.data.params["train.deterministic"] == "true"
    detectors = load_params(params).anomaly.detectors
    assert run.data.params["anomaly.detectors"] == "[" + ", ".join(detectors) + "]"
    # MLflow's own source tags, and a description with the headline numbers.
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "trackflow.stages.train"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]
    assert tags["mlflow.source.git.commit"] == commit == tags["trackflow.git_commit"]
    metrics = read_json("train.json")
    assert tags["mlflow.note.content"] == (
        f"**train**: finetune, {EPOCHS} epochs, "
        f"best val loss {metrics['best_val_loss']:.4f}, "
        f"val acc {metrics['best_val_acc']:.4f}."
    )
    assert run.data.tags["trackflow.backbone_run_id"] == read_json("pretrain_run.json")["run_id"]
    assert len(run.data.tags["trackflow.data_digest"]) == 16
    assert run.data.tags["trackflow.data_batches"] == "none"  # lineage: no batch added
    history = client.get_metric_history(run_id, "val/loss")
    assert [m.step for m in history] == list(range(EPOCHS))
    for key in ("train/loss", "val/acc", "lr/head", "lr/backbone", "params/trainable"):
        assert len(client.get_metric_history(run_id, key)) == EPOCHS, key
    artifacts = {
        a.path
        for folder in ("", "checkpoints", "train")
        for a in client.list_artifacts(run_id, folder)
    }
    assert {"model_summary.txt", "checkpoints/best.ckpt", "train/model.pt"} <= artifacts
    metrics = read_json("train.json")
    assert metrics["epochs"] == EPOCHS and 0 < metrics["best_val_acc"] <= 1
    _, meta = load_classifier("model.pt")
    assert meta["classes"] == [5, 6, 7, 8, 9] and meta["run_id"] == run_id


def commit_a_checkout() -> str:
    """Make the working directory a git checkout with one commit; return the commit."""
    for command in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "code"]):
        subprocess.run(["git", *command], check=True, capture_output=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_every_transfer_mode_logs_the_same_metric_keys(processed, fast_params) -> None:
    from mlflow import MlflowClient

    assert run_stage(pretrain, fast_params(NARROW), processed) == 0
    runs = {}
    for mode in ("finetune", "feature_extraction", "scratch"):
        assert run_stage(train, fast_params(NARROW | {"train.mode": mode}), processed) == 0
        runs[mode] = MlflowClient().get_run(read_json("train_run.json")["run_id"])
    keys = {mode: set(run.data.metrics) for mode, run in runs.items()}
    assert keys["finetune"] == keys["feature_extraction"] == keys["scratch"], keys
    frozen = runs["feature_extraction"].info.run_id
    backbone_lr = MlflowClient().get_metric_history(frozen, "lr/backbone")
    assert [m.value for m in backbone_lr] == [0] * EPOCHS
    names = [run.info.run_name for run in runs.values()]
    assert [name.rsplit("-", 1)[0] for name in names] == [
        "train-finetune",
        "train-feature_extraction",
        "train-scratch",
    ]


def test_a_run_is_named_after_the_dvc_experiment_it_belongs_to(monkeypatch) -> None:
    from trackflow.tracking import run_label

    assert run_label("train", "finetune", "3f2a1c") == "train-finetune-3f2a1c"
    assert run_label("pretrain", None, "3f2a1c") == "pretrain-3f2a1c"
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-sole")  # what `dvc exp run` sets for its stages
    assert run_label("train", "scratch", "3f2a1c") == "train-scratch-lucid-sole"


def test_same_params_same_data_same_metrics(processed, fast_params) -> None:
    params = fast_params(NARROW | {"train.mode": "scratch"})
    assert run_stage(train, params, processed) == 0
    first = read_json("train.json")
    assert run_stage(train, params, processed) == 0
    assert read_json("train.json") == first


@pytest.mark.parametrize("uri", ["models:/trackflow-backbone@chosen", "runs:/{run_id}/pretrain"])
def test_backbone_from_the_registry_or_a_run(processed, fast_params, uri) -> None:
    from mlflow import MlflowClient

    assert run_stage(pretrain, fast_params(NARROW), processed) == 0
    pretrain_run = read_json("pretrain_run.json")
    assert (
        pretrain_run["version"] == "1" and pretrain_run["registered_model"] == "trackflow-backbone"
    )
    # pretrain moves no alias (nothing gates backbones): a person picks one, by version or alias.
    MlflowClient().set_registered_model_alias("trackflow-backbone", "chosen", "1")
    Path("backbone.pt").unlink()  # the registry alone must be enough
    uri = uri.format(run_id=pretrain_run["run_id"])
    assert run_stage(train, fast_params(NARROW | {"train.backbone": uri}), processed) == 0
    tags = MlflowClient().get_run(read_json("train_run.json")["run_id"]).data.tags
    assert tags["trackflow.backbone_source"] == uri
    assert tags["trackflow.backbone_run_id"] == pretrain_run["run_id"]
    pretrained = torch.load(
        MlflowClient().download_artifacts(pretrain_run["run_id"], "pretrain/backbone.pt")
    )
    assert tags["trackflow.backbone_version"] == ("1" if uri.startswith("models:/") else "None")
    assert pretrained["in_features"] == 16


def test_backbone_of_another_width_is_a_clear_error(processed, fast_params, capsys) -> None:
    assert run_stage(pretrain, fast_params(NARROW), processed) == 0
    other = Path("narrow")
    for part in processed.glob("*"):
        other.mkdir(exist_ok=True)
        if part.suffix == ".parquet" and part.name != ROW_DIGESTS_FILE:  # a part: drop a column
            table = pytest.importorskip("pandas").read_parquet(part)
            table.drop(columns=["pca15"]).to_parquet(other / part.name)
        else:
            (other / part.name).write_bytes(part.read_bytes())
    assert run_stage(train, fast_params(NARROW), other) == 2
    err = capsys.readouterr().err
    assert "takes 16 features but the preprocessed data has 15" in err
    assert not Path("model.pt").exists()


def test_unknown_registry_model_is_a_clear_error(processed, fast_params, capsys) -> None:
    params = fast_params(NARROW | {"train.backbone": "models:/nope@champion"})
    assert run_stage(train, params, processed) == 2
    assert "'models:/nope@champion' cannot be resolved" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_makes_one_run(processed, fast_params, tmp_path) -> None:
    from mlflow import MlflowClient

    trainer = {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "num_nodes": 1}
    params = fast_params(NARROW | {"train.mode": "scratch", "train.trainer": trainer})
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "trackflow.stages.train", *train_argv(params, processed, "none.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("trackflow").experiment_id])
    assert [r.info.run_name.rsplit("-", 1)[0] for r in runs] == ["train-scratch"]
    assert runs[0].info.run_id == read_json(tmp_path / "train_run.json")["run_id"]
    history = client.get_metric_history(runs[0].info.run_id, "val/loss")
    assert [m.step for m in history] == list(range(EPOCHS))
    # DVC's metrics file: the headline, unprefixed; MLflow has every number
    assert set(read_json(tmp_path / "train.json")) == {"best_val_loss", "best_val_acc", "epochs"}
    logged = client.get_run(runs[0].info.run_id).data.metrics
    assert {"train/params_trainable", "train/params_frozen", "train/best_val_acc"} <= set(logged)


@pytest.mark.parametrize(
    ("name", "kind"),
    [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)],
)
def test_optimizer_choices(name, kind) -> None:
    from trackflow.learn.training import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    config = OptimizationConfig(optimizer=name, lr=0.01, weight_decay=0.1, momentum=0.8)
    optimizer = build_optimizer([{"params": params, "name": "head"}], config)
    assert type(optimizer) is kind
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.1
    if name == "sgd":
        assert group["momentum"] == 0.8


def test_trainer_gets_clipping_and_scale_out_settings(tmp_path) -> None:
    config = OptimizationConfig(gradient_clip_val=0.5, early_stopping_patience=3)
    trainer, checkpoint = build_trainer(config, tmp_path)
    assert trainer.gradient_clip_val == 0.5
    assert checkpoint.monitor == "val/loss"
    assert any(type(c).__name__ == "EarlyStopping" for c in trainer.callbacks)


def test_a_last_batch_of_one_row_is_dropped_for_batch_norm(processed, tmp_path) -> None:
    data = FeatureDataModule(processed, "target", LABEL, batch_size=1, seed=0)
    data.setup()
    rows = len(data.datasets["train"])
    data.batch_size = rows - 1  # leaves a last batch of one row
    assert [len(batch[0]) for batch in data.train_dataloader()] == [rows - 1]
    fit(lit_module(data), data, tmp_path, epochs=1)


def test_train_stage_needs_the_pretrained_backbone(processed, fast_params, capsys) -> None:
    from mlflow import MlflowClient

    assert train(train_argv(fast_params(NARROW), processed, "missing.pt")) == 3
    assert "run the pretrain stage first" in capsys.readouterr().err
    experiment = MlflowClient().get_experiment_by_name("trackflow")
    assert experiment is None or not MlflowClient().search_runs([experiment.experiment_id])


def test_training_stages_need_the_preprocessed_data(fast_params, capsys) -> None:
    assert pretrain(pretrain_argv(fast_params(NARROW), Path("nowhere"))) == 3
    assert "run the preprocess stage first" in capsys.readouterr().err
