"""``train.mode: continue``: the champion's whole network keeps training on new rows plus replay.

A real SQLite MLflow store holds the session's ``good`` candidate registered as champion, with a
record of the rows it saw: every target training row but a held-back quarter, which plays the
new labelled rows.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import Candidate, packaged_model, raw_rows, train_argv
from trackflow.config import load_params
from trackflow.errors import ConfigError
from trackflow.io import read_json, read_table, write_table
from trackflow.learn.continual import (
    NoNewRows,
    continue_rows,
    unseen_training_rows,
)
from trackflow.learn.networks import load_classifier, load_network, save_ensemble
from trackflow.learn.training_run import TrainingRun
from trackflow.learn.transfer import continue_champion, train_candidate, transfer_plan
from trackflow.registry.gate import SeenRows
from trackflow.registry.promotion import record_seen_rows
from trackflow.tracking import TAG_PREFIX

LABEL = "target"


def held_back(candidate: Candidate) -> pd.Index:
    """The target training rows the champion is recorded as not having seen: every 4th."""
    return raw_rows(candidate, "train").index[::4]


def register_with_seen_rows(candidate: Candidate, name: str, unseen: pd.Index) -> str:
    """Register ``candidate`` as the champion of ``name`` (a new model), logged into a run of its
    own that records every target training and validation row as seen but ``unseen``.

    A run of its own: the session's training runs are shared by other tests' records.
    """
    from trackflow.tracking import setup_tracking

    train = raw_rows(candidate, "train")
    seen = SeenRows.from_tables(
        {"target_train": train.drop(index=unseen), "target_val": raw_rows(candidate, "val")},
        [c for c in train.columns if c != LABEL],
    )
    tracking = setup_tracking(load_params(candidate.folder / "params.yaml").base.mlflow)
    run_id = tracking.client.create_run(tracking.experiment_id, run_name="champion").info.run_id
    logged = packaged_model(tracking, candidate, train.drop(columns=LABEL), run_id=run_id)
    record_seen_rows(tracking, run_id, seen)
    tracking.client.create_registered_model(name)
    version = tracking.client.create_model_version(name, **logged).version
    tracking.client.set_registered_model_alias(name, "champion", version)
    return str(version)


@pytest.fixture
def continue_params(fast_params: Callable[..., Path], candidate_store: str) -> Path:
    """Params of a continued fit of ``candidate_store``'s champion (registered by the test)."""
    return fast_params(
        {
            "train.mode": "continue",
            "model.name": candidate_store,
            "train.replay_fraction": 0.5,
            "anomaly.detectors": ["knn"],
        }
    )


def open_training(params: Path, data: Path) -> TrainingRun:
    loaded = load_params(params)
    return TrainingRun(loaded, loaded.train, "target", data, "train", "continue")


def test_continue_starts_from_the_champion_and_trains_on_new_rows_plus_replay(
    candidates, candidate_store, continue_params
) -> None:
    good = candidates["good"]
    new = held_back(good)
    version = register_with_seen_rows(good, candidate_store, new)
    params = load_params(continue_params)
    plan = transfer_plan(params.train)
    assert (plan.lr, plan.replay_fraction) == (params.train.continue_lr, 0.5)

    with open_training(continue_params, good.processed) as training:
        backbone, head, origin = continue_champion(training, plan)
        rows = training.data.tables["train"]
        features = training.data.datasets["val"].tensors[0]
        champion, _ = load_classifier(good.files["model"])
        with torch.no_grad():  # before training: the champion's own predictions, exactly
            continued = torch.nn.Sequential(backbone, head).eval()(features)
            torch.testing.assert_close(continued, champion(features), rtol=0, atol=0)

    labels = raw_rows(good, "train")[LABEL]
    seen_per_class = labels.drop(index=new).value_counts()
    replayed = sum(round(0.5 * n) for n in seen_per_class)
    assert set(new) <= set(rows.index)
    assert len(rows) == len(new) + replayed
    replay = labels.loc[rows.index.difference(new)].value_counts()
    expected = (seen_per_class * 0.5).round().astype(int)
    assert replay.sort_index().to_dict() == expected.sort_index().to_dict()  # per class
    assert origin["continued_from"] == version
    assert origin["rows_new"] == str(len(new)) and origin["rows_replayed"] == str(replayed)
    assert origin["backbone_source"] == f"models:/{candidate_store}@champion"


def test_the_stage_continues_at_continue_lr_and_tags_the_run(
    candidates, candidate_store, continue_params
) -> None:
    from mlflow import MlflowClient

    from trackflow.stages.train import main as train

    good = candidates["good"]
    new = held_back(good)
    version = register_with_seen_rows(good, candidate_store, new)
    assert train(train_argv(continue_params, good.processed, "none.pt")) == 0

    run = MlflowClient().get_run(read_json("train_run.json")["run_id"])
    tags = {k.removeprefix(TAG_PREFIX): v for k, v in run.data.tags.items()}
    assert tags["mode"] == "continue" and tags["continued_from"] == version
    assert tags["rows_new"] == str(len(new)) and int(tags["rows_replayed"]) > 0
    history = pd.read_csv("train_history.csv")
    assert history["lr/head"].iloc[0] == history["lr/backbone"].iloc[0]  # all of it trains
    lr = load_params(continue_params).train.continue_lr  # the schedule at 0.5 after epoch 1 of 2
    assert history["lr/head"].iloc[0] == pytest.approx(0.5 * lr)
    saved, champion = load_network("model.pt"), load_network(good.files["model"])
    assert saved["classes"] == champion["classes"]  # one network, as the champion's
    assert saved["model"] == champion["model"] != load_params(continue_params).model.model_dump()
    network, _ = load_classifier("model.pt")  # loads: the architecture is the weights' own
    rows = read_table(good.processed / "target_test.parquet").drop(columns=LABEL)
    assert network(torch.tensor(rows.to_numpy(), dtype=torch.float32)).shape == (len(rows), 5)
    assert read_json("train_run.json")["mode"] == "continue"


def test_without_a_champion_continue_says_to_train_one_first(
    candidates, candidate_store, continue_params
) -> None:
    plan = transfer_plan(load_params(continue_params).train)
    with (
        open_training(continue_params, candidates["good"].processed) as training,
        pytest.raises(ConfigError, match=r"continue needs a champion.*finetune or scratch first"),
    ):
        train_candidate(training, plan, Path("none.pt"))


def test_a_champion_that_saw_every_row_leaves_nothing_to_continue_on(
    candidates, candidate_store, continue_params
) -> None:
    good = candidates["good"]
    register_with_seen_rows(good, candidate_store, pd.Index([]))
    train = raw_rows(good, "train")
    seen = SeenRows.from_tables({"t": train}, [c for c in train if c != LABEL])
    assert unseen_training_rows(train, seen).empty  # what the loop asks first
    assert len(unseen_training_rows(train.iloc[:0], seen)) == 0
    plan = transfer_plan(load_params(continue_params).train)
    with (
        open_training(continue_params, good.processed) as training,
        pytest.raises(NoNewRows, match=r"saw all .* add labelled rows first"),
    ):
        train_candidate(training, plan, Path("none.pt"))


def test_a_champion_of_other_features_is_refused(
    candidates, candidate_store, continue_params, tmp_path
) -> None:
    good = candidates["good"]
    register_with_seen_rows(good, candidate_store, held_back(good))
    narrower = tmp_path / "narrower"  # the same rows, preprocessed to one component fewer
    shutil.copytree(good.processed, narrower)
    for part in narrower.glob("target_*.parquet"):
        write_table(read_table(part).iloc[:, 1:], part)
    plan = transfer_plan(load_params(continue_params).train)
    with (
        open_training(continue_params, narrower) as training,
        pytest.raises(ConfigError, match=r"takes 16 features .* 15 .*use train.mode scratch"),
    ):
        continue_champion(training, plan)


def test_an_ensemble_champion_is_refused(
    candidates, candidate_store, continue_params, tmp_path
) -> None:
    good = candidates["good"]
    ensemble = tmp_path / "ensemble"  # the good network twice, as a voting ensemble
    shutil.copytree(good.folder, ensemble)
    network, meta = load_classifier(good.files["model"])
    save_ensemble(
        ensemble / "model.pt", [(network[0], network[1])] * 2, "soft",
        [load_params(good.folder / "params.yaml").model] * 2, meta["in_features"],
        **{k: meta[k] for k in ("classes", "feature_columns", "label_column", "run_id")},
    )  # fmt: skip
    import joblib

    from trackflow.learn.anomaly import KNNDetector
    from trackflow.learn.networks import embed

    bundle = joblib.load(good.files["detector"])  # in the embedding space: twice as wide now
    features = read_table(good.processed / "target_train.parquet").drop(columns=LABEL)
    ensemble_network, _ = load_classifier(ensemble / "model.pt")
    bundle["detector"] = KNNDetector().fit(embed(ensemble_network, features))
    joblib.dump(bundle, ensemble / "detector.joblib")
    register_with_seen_rows(Candidate(ensemble, good.processed), candidate_store, held_back(good))
    plan = transfer_plan(load_params(continue_params).train)
    with (
        open_training(continue_params, good.processed) as training,
        pytest.raises(ConfigError, match="is an ensemble of 2: retrain"),
    ):
        continue_champion(training, plan)


def test_replay_is_stratified_seeded_and_digest_based() -> None:
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    labels = pd.Series(np.repeat([0, 1, 2], 20), index=rows.index)
    seen = SeenRows.from_tables({"train": rows.iloc[:50]}, ["a", "b", "c"])
    from trackflow.registry.gate import row_digests

    digests = pd.Series(row_digests(rows, ["a", "b", "c"]), index=rows.index)
    first = continue_rows(digests, labels, seen, 0.3, seed=1)
    assert list(first.new) == list(range(50, 60))
    assert labels[first.replayed].value_counts().to_dict() == {0: 6, 1: 6, 2: 3}
    assert first.replayed.equals(continue_rows(digests, labels, seen, 0.3, seed=1).replayed)
    assert not first.replayed.equals(continue_rows(digests, labels, seen, 0.3, seed=2).replayed)
    renumbered = digests.set_axis(digests.index + 1000)  # new ids, same contents: same rows
    assert len(continue_rows(renumbered, labels.set_axis(renumbered.index), seen, 0, 1).new) == 10
    assert continue_rows(digests, labels, seen, 0.0, seed=1).ids.equals(first.new)


def test_an_ensemble_cannot_continue_the_champion(candidates, write_params) -> None:
    from trackflow.learn.ensemble import train_target

    params = write_params({"train.mode": "continue", "train.ensemble.size": 2})
    with (
        open_training(params, candidates["good"].processed) as training,
        pytest.raises(ConfigError, match=r"champion's one network.*train.ensemble.size: 1"),
    ):
        train_target(training, Path("none.pt"))
