"""Ensembles: member params, the voting network, its file, and the train/evaluate/package path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import Candidate, packaged_model, raw_rows, train_argv
from trackflow.config import ModelConfig, load_params
from trackflow.errors import ConfigError
from trackflow.io import read_json
from trackflow.learn.ensemble import member_params
from trackflow.learn.networks import (
    build_backbone,
    build_head,
    embed,
    load_backbone,
    load_classifier,
    load_network,
    member_count,
    member_probas,
    predict_proba,
    save_ensemble,
    save_network,
    voting_network,
)

CLASSES = [5, 6, 7, 8, 9]


def _members(n: int, widths: list[int]) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    torch.manual_seed(0)
    found = []
    for width in widths[:n]:
        backbone = build_backbone(ModelConfig(widths=[width]), 16).eval()
        found.append((backbone, build_head(backbone.out_features, len(CLASSES))))
    return found


def _rows() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, 16))


def test_soft_vote_is_the_mean_of_the_members_probabilities() -> None:
    members = _members(3, [8, 12, 8])
    network = voting_network(members, "soft").eval()
    proba = predict_proba(network, _rows())
    single = [predict_proba(torch.nn.Sequential(*m).eval(), _rows()) for m in members]
    np.testing.assert_allclose(proba, np.mean(single, axis=0), atol=1e-5)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(member_probas(network, _rows()), single, atol=1e-6)
    assert embed(network, _rows()).shape == (64, 28)  # the members' embeddings side by side
    assert member_count(network) == 3


def test_hard_vote_gives_the_share_of_votes_and_breaks_ties_by_mean_probability() -> None:
    members = _members(2, [8, 8])
    network = voting_network(members, "hard").eval()
    proba = predict_proba(network, _rows())
    single = np.stack([predict_proba(torch.nn.Sequential(*m).eval(), _rows()) for m in members])
    votes = np.zeros_like(proba)
    for member in single:
        votes[np.arange(len(votes)), member.argmax(axis=1)] += 0.5
    np.testing.assert_allclose(proba, votes, atol=2e-4)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    tied = votes.max(axis=1) == 0.5
    assert tied.any() and (~tied).any()
    mean = single.mean(axis=0)
    for row in np.flatnonzero(tied):  # of the two classes voted for, the likelier one wins
        voted = np.flatnonzero(votes[row])
        assert proba[row].argmax() == voted[mean[row, voted].argmax()]


def test_an_ensemble_file_loads_as_one_network_and_a_format_1_file_still_loads(
    tmp_path: Path,
) -> None:
    members = _members(2, [8, 12])
    meta = {"classes": CLASSES, "feature_columns": [f"f{i}" for i in range(16)]}
    configs = [ModelConfig(widths=[8]), ModelConfig(widths=[12])]
    save_ensemble(tmp_path / "e.pt", members, "soft", configs, 16, **meta)
    network, loaded = load_classifier(tmp_path / "e.pt")
    assert loaded["format"] == 2 and loaded["vote"] == "soft" and loaded["classes"] == CLASSES
    expected = predict_proba(voting_network(members, "soft"), _rows())
    np.testing.assert_allclose(predict_proba(network, _rows()), expected, atol=1e-6)
    assert [b.out_features for b in network[0].members] == [8, 12]

    backbone, head = members[0]
    save_network(tmp_path / "one.pt", backbone, ModelConfig(widths=[8]), 16, head=head, **meta)
    single, loaded = load_classifier(tmp_path / "one.pt")
    assert loaded["format"] == 1 and member_count(single) == 1
    assert isinstance(single, torch.nn.Sequential) and len(single) == 2
    np.testing.assert_allclose(
        predict_proba(single, _rows()), predict_proba(torch.nn.Sequential(*members[0]), _rows())
    )
    with pytest.raises(ConfigError, match="ensemble of 2 networks"):
        load_backbone(load_network(tmp_path / "e.pt"), 16, "e.pt")


def test_members_get_consecutive_seeds_and_their_overrides(fast_params) -> None:
    params = load_params(fast_params({"base.seed": 7, "train.ensemble.size": 3}))
    assert [p.base.seed for p in member_params(params)] == [7, 8, 9]
    assert all(p.train.ensemble.size == 1 for p in member_params(params))
    members = [{"train.lr": 0.002}, {"train.weight_decay": 1e-4, "base.seed": 1}]
    params = load_params(fast_params({"train.ensemble.members": members}))
    assert params.train.ensemble.size == 2
    first, second = member_params(params)
    assert (first.train.lr, first.base.seed) == (0.002, 42)
    assert (second.train.weight_decay, second.base.seed) == (1e-4, 1)
    assert second.train.lr == params.train.lr  # not overridden: the section's value


@pytest.mark.parametrize(
    ("ensemble", "message"),
    [
        ({"members": [{"model.widths": [8]}]}, "'model.widths' cannot differ between members"),
        ({"members": [{"train.lr": -1}]}, r"members\[0\]: train.lr: Input should be greater"),
        ({"members": [{}, {"train.lrr": 0.1}]}, r"members\[1\]: unknown key 'train.lrr'"),
        ({"members": [{"train.ensemble.size": 2}]}, "a member cannot hold an ensemble"),
        ({"members": [{"train.schedule.kind": "linear"}]}, "train.schedule.kind: Input should"),
        ({"size": 3, "members": [{}, {}]}, "size is 3 but 2 members are listed"),
        ({"vote": "median"}, "train.ensemble.vote"),
    ],
)
def test_bad_member_overrides_are_clear_errors(fast_params, ensemble, message) -> None:
    overrides = {f"train.ensemble.{k}": v for k, v in ensemble.items()}
    with pytest.raises(ConfigError, match=message):
        load_params(fast_params(overrides))


def test_a_member_override_that_breaks_the_params_names_the_member(fast_params) -> None:
    members = [{}, {"train.backbone": None}]  # mode finetune needs a backbone
    params = load_params(fast_params({"train.ensemble.members": members}))
    with pytest.raises(ConfigError, match=r"(?s)members\[1\].*needs a backbone"):
        member_params(params)


def _evaluate(params: Path, processed: Path) -> dict:
    from trackflow.stages.evaluate import main as evaluate

    argv = ["--params", str(params), "--data", str(processed), "--model", "model.pt"]
    argv += ["--run", "train_run.json", "--history", "train_history.csv"]
    assert evaluate([*argv, "--metrics", "evaluate.json", "--plots", "plots"]) == 0
    return read_json("plots/all_metrics.json")


def _anomaly(params: Path, processed: Path) -> None:
    from trackflow.stages.anomaly import main as anomaly

    data = processed.parent
    argv = ["--params", str(params), "--splits", str(data / "split")]
    argv += ["--preprocessor", str(data / "models/preprocessor.joblib")]
    argv += ["--model", "model.pt", "--run", "train_run.json"]
    argv += ["--detector-out", "detector.joblib", "--metrics", "anomaly.json"]
    assert anomaly([*argv, "--plots", "anomaly_plots"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "ensemble",
    [{"size": 2, "vote": "soft"}, {"vote": "hard", "members": [{"train.lr": 0.01}, {}]}],
    ids=["soft", "hard"],
)
def test_the_train_stage_trains_members_as_child_runs_and_evaluate_reports_the_gain(
    processed, fast_params, ensemble
) -> None:
    from mlflow import MlflowClient

    from trackflow.stages.scoring import labelled_arrays
    from trackflow.stages.train import main as train

    overrides = {f"train.ensemble.{k}": v for k, v in ensemble.items()}
    params = fast_params({"train.mode": "scratch", "model.widths": [32], **overrides})
    assert train(train_argv(params, processed, "none.pt")) == 0
    client, parent = MlflowClient(), read_json("train_run.json")["run_id"]
    run = client.get_run(parent)
    children = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", order_by=["start_time"]
    )
    assert [c.info.run_name for c in children] == [
        f"{run.info.run_name}-member-{i}" for i in (1, 2)
    ]
    assert [c.data.params["base.seed"] for c in children] == ["42", "43"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert run.data.tags["trackflow.ensemble_size"] == "2"
    assert run.data.tags["trackflow.ensemble_vote"] == ensemble["vote"]
    assert f"ensemble of 2 ({ensemble['vote']} vote)" in run.data.tags["mlflow.note.content"]
    assert read_json("train.json").keys() == {"best_val_acc", "best_val_loss", "epochs"}
    assert run.data.metrics["train/best_val_acc"] == read_json("train.json")["best_val_acc"]
    assert run.data.metrics["train/epochs"] == sum(c.data.metrics["train/epochs"] for c in children)
    saved = load_network("model.pt")
    assert saved["format"] == 2 and len(saved["members"]) == 2
    assert saved["member_run_ids"] == [c.info.run_id for c in children]

    metrics = _evaluate(params, processed)["test"]
    best = max(metrics["member_accuracy"].values())
    assert metrics["best_member_accuracy"] == best
    assert metrics["ensemble_gain"] == pytest.approx(metrics["accuracy"] - best)
    assert read_json("evaluate.json")["test"]["ensemble_gain"] == metrics["ensemble_gain"]
    logged = client.get_run(parent).data.metrics
    assert logged["test/ensemble_gain"] == metrics["ensemble_gain"]
    assert set(logged) >= {"test/member_accuracy/1", "test/member_accuracy/2"}
    network, meta = load_classifier("model.pt")
    features, _ = labelled_arrays(processed / "target_test.parquet", meta)
    proba, members = predict_proba(network, features), member_probas(network, features)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    if ensemble["vote"] == "soft":
        np.testing.assert_allclose(proba, members.mean(axis=0), atol=1e-5)
    else:
        votes = np.eye(len(CLASSES))[members.argmax(axis=2)].mean(axis=0)
        np.testing.assert_allclose(proba, votes, atol=2e-4)


@pytest.mark.slow
def test_the_packaged_ensemble_scores_raw_rows_like_a_single_network(
    processed, fast_params, trained_model, tmp_path, monkeypatch
) -> None:
    import mlflow.pyfunc

    from trackflow.stages.train import main as train
    from trackflow.tracking import setup_tracking

    _anomaly(trained_model, processed)  # the single network of the trained_model fixture
    tracking = setup_tracking(load_params(trained_model).base.mlflow)
    rows = raw_rows(Candidate(tmp_path, processed), "test").drop(columns="target")
    single = mlflow.pyfunc.load_model(
        packaged_model(tracking, Candidate(tmp_path, processed), rows)["source"]
    ).predict(rows.head(20))

    folder = tmp_path / "ensemble"
    folder.mkdir()
    overrides = {"train.mode": "scratch", "model.widths": [32], "train.ensemble.size": 2}
    params = fast_params(overrides, name="ensemble/params.yaml")
    monkeypatch.chdir(folder)
    assert train(train_argv(params, processed, "none.pt")) == 0
    _anomaly(params, processed)
    candidate = Candidate(folder, processed)
    model = mlflow.pyfunc.load_model(packaged_model(tracking, candidate, rows)["source"])
    scored = model.predict(rows.head(20))
    assert list(scored.columns) == list(single.columns)
    assert list(scored.dtypes) == list(single.dtypes)
    proba = scored.filter(like="proba_").to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    voted = scored.filter(like="proba_").idxmax(axis=1).str.removeprefix("proba_")
    assert (scored["label"].astype(str) == voted).all()
    assert np.isfinite(scored["anomaly_score"]).all()
