"""Registering candidates and promoting them behind the gate, in a real SQLite MLflow registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import LOW_FLOORS, Candidate, race_two_promotions
from trackflow.io import read_json
from trackflow.registry.promotion import CHALLENGER, CHAMPION, champion_stack, ledger
from trackflow.stages.register import HEADLINE
from trackflow.stages.register import main as register


def register_argv(candidate: Candidate, params: Path, out: str = "registered.json") -> list[str]:
    files = candidate.files
    argv = ["--params", str(params), "--out", out, "--metrics", "register.json"]
    for flag in ("splits", "preprocessor", "model", "detector", "run"):
        argv += [f"--{flag}", str(files[flag])]
    return [*argv, "--lock", "no-dvc.lock"]


@pytest.fixture
def gate(candidate_store: str, write_params):
    """Register a candidate under this test's model name; return what the stage wrote."""

    def run(candidate: Candidate, **overrides: object) -> dict:
        params = write_params({"model.name": candidate_store, **overrides})
        assert register(register_argv(candidate, params)) == 0
        return read_json("registered.json")

    return run


def aliases(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


def test_first_model_becomes_champion_and_a_worse_one_stays_challenger(
    candidates, candidate_store, gate
) -> None:
    client = MlflowClient()
    run_id = read_json(candidates["good"].files["run"])["run_id"]
    trained_with = client.get_run(run_id).data.tags["trackflow.params_hash"]
    first = gate(candidates["good"])
    # the register stage's own params (another model.name) do not rewrite the training lineage
    assert client.get_run(run_id).data.tags["trackflow.params_hash"] == trained_with
    version_tags = client.get_model_version(candidate_store, "1").tags
    assert version_tags["trackflow.params_hash"] == trained_with
    assert first["promoted"] and first["version"] == "1" and first["champion"] == "1"
    assert first["reason"].startswith("first model passing the floors")
    first_numbers = first["gate"]
    assert first_numbers["gate/champion/accuracy"] is None  # not computed: null, strict JSON

    worse = gate(candidates["weak"], **LOW_FLOORS)
    assert set(worse["gate"]) == set(first_numbers)
    assert set(read_json("register.json")) == set(HEADLINE) <= set(first_numbers)
    logged = [
        {k for k in client.get_run(r).data.metrics if k.startswith("gate/")}
        for r in (run_id, worse["run_id"])
    ]
    assert logged[0] == logged[1] == set(first_numbers)  # no holes in MLflow's compare view
    assert not worse["promoted"] and worse["champion"] == "1"
    assert worse["reason"].startswith("not better: accuracy")
    assert aliases(candidate_store) == {CHAMPION: "1", CHALLENGER: "2"}

    version = client.get_model_version(candidate_store, "2")
    assert version.tags["trackflow.gate.decision"] == "rejected"
    assert version.tags["trackflow.gate.reason"] == worse["reason"]
    assert version.description.startswith("Gate: rejected. not better")
    run = client.get_run(worse["run_id"])
    assert run.data.tags["trackflow.gate.reason"] == worse["reason"]
    assert run.data.metrics["gate/champion/accuracy"] > run.data.metrics["gate/challenger/accuracy"]
    actions = [(e.action, e.version, e.previous) for e in ledger(client, candidate_store)]
    assert actions == [
        ("challenger", "1", None),
        ("promote", "1", None),
        ("challenger", "2", None),
        ("reject", "2", "1"),
    ]


def test_below_the_floor_is_not_promoted_even_without_a_champion(candidates, gate) -> None:
    result = gate(candidates["good"], **{"promotion.min_accuracy": 0.999})
    assert not result["promoted"] and result["champion"] is None
    assert result["reason"].startswith("below the floor: accuracy")


def test_a_significantly_better_model_is_promoted_and_rollback_restores_the_old_one(
    candidates, candidate_store, gate
) -> None:
    assert gate(candidates["weak"], **LOW_FLOORS)["promoted"]
    better = gate(candidates["good"], **LOW_FLOORS)
    assert better["promoted"] and better["reason"].startswith("better: accuracy")
    assert "McNemar p=" in better["reason"]
    assert aliases(candidate_store) == {CHAMPION: "2"}  # the challenger alias moved up with it

    same = gate(candidates["good"], **LOW_FLOORS)  # the same model again: no better
    assert not same["promoted"] and "delta +0.0000" in same["reason"]

    cli = [sys.executable, "-m", "trackflow.cli", "promote", "--params", "params.yaml"]
    rolled = subprocess.run(
        [*cli, "--rollback", "--reason", "bad in prod"], capture_output=True, text=True
    )
    assert rolled.returncode == 0, rolled.stderr
    assert f"{candidate_store}@champion: version 2 -> 1 (rollback)" in rolled.stdout
    assert aliases(candidate_store)[CHAMPION] == "1"
    entries = ledger(MlflowClient(), candidate_store)
    assert entries[-1].action == "rollback" and entries[-1].reason == "bad in prod"
    assert champion_stack(entries) == ["1"]

    again = subprocess.run([*cli, "--rollback"], capture_output=True, text=True)
    assert again.returncode != 0 and "no earlier champion than version 1" in again.stderr
    assert aliases(candidate_store)[CHAMPION] == "1" and len(
        ledger(MlflowClient(), candidate_store)
    ) == len(entries)


@pytest.mark.slow  # four CLI processes, each importing MLflow: ~30 s
def test_history_and_lineage_commands(candidates, candidate_store, gate) -> None:
    result = gate(candidates["good"])
    cli = [sys.executable, "-m", "trackflow.cli"]
    history = subprocess.run(
        [*cli, "history", candidate_store, "--params", "params.yaml", "--format", "csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert history[0].startswith("seq,time,action,alias,version,previous,run_id,reason")
    assert [line.split(",")[2] for line in history[1:]] == ["challenger", "promote"]
    table = subprocess.run(
        [*cli, "history", candidate_store, "--params", "params.yaml"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "rows_compared" in table[0] and " 134 " in table[2] and "134.0" not in table[2]

    shown = subprocess.run(
        [*cli, "lineage", f"{candidate_store}@champion", "--params", "params.yaml"],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    lineage = shown.stdout
    assert f"training run   {result['run_id']}" in lineage
    assert "dataset      training-" in lineage and "promote (champion)" in lineage

    missing = subprocess.run([*cli, "lineage", "nope@champion"], capture_output=True, text=True)
    assert missing.returncode == 2 and "registered model 'nope'" in missing.stderr


def other_table_split(folder: Path) -> Path:
    """A split folder of another table: the raw rows have other columns."""
    folder.mkdir()
    table = pd.DataFrame({"a": [1.0, 2.0], "target": [5, 6]})
    for part in ("target_train", "target_val", "target_test"):
        table.to_parquet(folder / f"{part}.parquet")
    (folder / "summary.json").write_text(
        '{"parts": {"target_train": {}, "target_val": {}, "target_test": {}}}'
    )
    return folder


def test_a_candidate_that_does_not_fit_its_data_changes_nothing(
    candidates, candidate_store, write_params, tmp_path, capsys
) -> None:
    params = write_params({"model.name": candidate_store})
    argv = register_argv(candidates["good"], params)
    argv[argv.index("--splits") + 1] = str(other_table_split(tmp_path / "split"))
    assert register(argv) == 3
    assert "missing columns: pixel_0_0" in capsys.readouterr().err
    assert MlflowClient().search_registered_models(f"name = '{candidate_store}'") == []
    assert not Path("registered.json").exists()


@pytest.mark.slow  # two CLI processes promoting at once: ~40 s
def test_two_promotions_racing_leave_one_champion_and_a_consistent_ledger(
    candidates, candidate_store, write_params
) -> None:
    from trackflow.config import load_params
    from trackflow.tracking import setup_tracking

    params = write_params({"model.name": candidate_store, **LOW_FLOORS})
    tracking = setup_tracking(load_params(params).base.mlflow)
    race_two_promotions(tracking, candidate_store, candidates, params)


def test_the_lock_is_released_on_error_waits_times_out_and_breaks_when_stale(monkeypatch) -> None:
    import trackflow.registry.promotion as promotion
    from trackflow.config import MlflowConfig
    from trackflow.registry.promotion import PromotionError, promotion_lock
    from trackflow.tracking import setup_tracking

    client = setup_tracking(MlflowConfig()).client
    lock = "m" + promotion.LOCK_SUFFIX
    with pytest.raises(RuntimeError), promotion_lock(client, "m", timeout_s=5):
        raise RuntimeError("the gate crashed")
    assert client.search_registered_models(f"name = '{lock}'") == []  # released

    with (
        promotion_lock(client, "m", timeout_s=5),
        pytest.raises(PromotionError, match="another promotion of 'm' holds the lock"),
        promotion_lock(client, "m", timeout_s=0.3),
    ):
        pass
    assert client.search_registered_models(f"name = '{lock}'") == []

    first = promotion_lock(client, "m", timeout_s=5)
    first.__enter__()
    monkeypatch.setattr(promotion, "STALE_LOCK_S", 0.0)  # the first holder is taken for dead
    second = promotion_lock(client, "m", timeout_s=5)
    second.__enter__()  # breaks the first's lock and takes it
    taken = client.get_registered_model(lock).tags["holder"]
    first.__exit__(None, None, None)  # the first ends late: it must not free the second's lock
    assert client.get_registered_model(lock).tags["holder"] == taken
    second.__exit__(None, None, None)
    assert client.search_registered_models(f"name = '{lock}'") == []


def split_with_seed(candidate: Candidate, seed: int, write_params) -> Path:
    """The session's dataset split again with another ``base.seed``: other rows are test rows."""
    from trackflow.stages.split import main as split

    dataset = candidate.processed.parent / "ingested/dataset.parquet"
    params = write_params({"base.seed": seed}, name=f"seed{seed}.yaml")
    out = Path(f"split{seed}")
    assert split(["--params", str(params), "--dataset", str(dataset), "--out", str(out)]) == 0
    return out


def gate_rows(client: MlflowClient, name: str, version: str) -> tuple[int, int]:
    """The labelled rows the version's last gate compared and left out, from its tags."""
    tags = client.get_model_version(name, version).tags
    return int(tags["trackflow.gate.rows_compared"]), int(tags["trackflow.gate.rows_excluded"])


def promote(*argv: str) -> int:
    from trackflow.cli import main

    return main(["promote", "--params", "params.yaml", *argv])


def test_the_gate_never_scores_a_model_on_rows_it_trained_on(
    candidates, candidate_store, gate, write_params, capsys
) -> None:
    client = MlflowClient()
    assert gate(candidates["good"])["promoted"]
    rejected = gate(candidates["weak"], **LOW_FLOORS)  # same split: every test row is held out
    assert rejected["rows"] == {"compared": 134, "excluded": 0}
    record = client.download_artifacts(rejected["run_id"], "gate/seen_rows.json", ".")
    splits = candidates["weak"].files["splits"]
    assert read_json(record)["parts"] == {
        part: len(pd.read_parquet(splits / f"{part}.parquet"))
        for part in ("source_train", "source_val", "target_train", "target_val")
    }

    # After `base.seed` changes, most new test rows are both models' training/validation rows.
    reshuffled = str(split_with_seed(candidates["good"], 7, write_params))
    write_params({"model.name": candidate_store, **LOW_FLOORS})
    assert promote("--version", "2", "--splits", reshuffled) == 0
    reason = client.get_model_version(candidate_store, "2").tags["trackflow.gate.reason"]
    assert reason.startswith("not compared: only ") and "held out from both models" in reason
    assert "promotion.min_gate_rows 30" in reason
    assert "`trackflow promote --version 2 --force --reason ...`" in reason
    assert "\n" not in reason and aliases(candidate_store)[CHAMPION] == "1"
    assert sum(gate_rows(client, candidate_store, "2")) == 134

    # With a lower minimum, the comparison runs on the rows neither model saw, and says how many.
    write_params({"model.name": candidate_store, "promotion.min_gate_rows": 5, **LOW_FLOORS})
    assert promote("--version", "2", "--splits", reshuffled) == 0
    compared, excluded = gate_rows(client, candidate_store, "2")
    assert 5 <= compared < 40 and compared + excluded == 134
    tags = client.get_model_version(candidate_store, "2").tags
    assert tags["trackflow.gate.reason"].startswith("not better: accuracy")
    assert tags["trackflow.gate.reason"].endswith(
        f"[on {compared} of 134 labelled test rows: {excluded} were training/validation rows]"
    )
    metrics = client.get_run(rejected["run_id"]).data.metrics
    assert metrics["gate/rows_compared"] == compared and metrics["gate/rows_excluded"] == excluded
    assert ledger(client, candidate_store)[-1].metrics["rows_excluded"] == excluded

    # A person who has looked can promote it anyway; the floors still apply, the ledger says why.
    capsys.readouterr()
    assert promote("--version", "2", "--splits", reshuffled, "--force") == 2
    assert "--force needs --version N and --reason" in capsys.readouterr().err
    assert promote("--version", "2", "--splits", reshuffled, "--force", "--reason", "looked") == 0
    assert aliases(candidate_store)[CHAMPION] == "2"
    entry = ledger(client, candidate_store)[-1]
    assert entry.action == "promote" and entry.reason.startswith(
        "promoted by hand, not compared with champion version 1: looked"
    )


def test_a_champion_taking_other_columns_is_not_compared(
    candidates, candidate_store, gate, write_params, tmp_path
) -> None:
    """MLflow drops columns a model does not take: the gate must see the schemas differ."""
    import joblib
    import pandas as pd

    from trackflow.config import PreprocessConfig, load_params
    from trackflow.data.preprocessing import fit_preprocessor
    from trackflow.registry.packaging import log_packaged_model
    from trackflow.registry.promotion import register_candidate
    from trackflow.tracking import setup_tracking

    files = candidates["good"].files
    train = pd.read_parquet(files["splits"] / "target_train.parquet")
    narrow = train.drop(columns=["target", "pixel_0_0"])  # a 63-column table
    config = PreprocessConfig(pca={"n_components": 16})
    joblib.dump(fit_preprocessor(narrow, config, impute=False, seed=0), "narrow.joblib")
    tracking = setup_tracking(load_params(write_params()).base.mlflow)
    run_id = tracking.client.create_run(tracking.experiment_id).info.run_id
    info = log_packaged_model(
        tracking,
        run_id,
        tmp_path / "narrow.joblib",
        files["model"],
        files["detector"],
        narrow.head(3),
        narrow,
    )
    register_candidate(tracking, candidate_store, info.model_uri, run_id, info.model_id, {}, 60)
    MlflowClient().set_registered_model_alias(candidate_store, CHAMPION, "1")

    result = gate(candidates["good"])
    assert not result["promoted"] and aliases(candidate_store)[CHAMPION] == "1"
    assert result["reason"].startswith(
        "not compared: challenger version 2 takes 64 columns and champion version 1 63 (only the "
        "challenger version 2: pixel_0_0; only the champion version 1: none)"
    )


# `trackflow promote --version K` on a version that cannot be gated: one line, nothing moved.
# Each fault is made for real: files corrupted or deleted where MLflow stores them, or a plain
# scikit-learn model registered beside trackflow's.


def model_files(name: str, version: str) -> Path:
    """The folder holding a registered version's files (its logged model's artifacts)."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    client = MlflowClient()
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    return Path(local_file_uri_to_path(client.get_logged_model(model_id).artifact_location))


def corrupt_weights(folder: Path) -> None:
    (folder / "artifacts/model.pt").write_bytes(b"these are not weights")


def break_detector(folder: Path) -> None:
    """A detector fitted on 3 features: it loads, then fails on the model's 64-wide embedding."""
    import joblib

    bundle = joblib.load(folder / "artifacts/detector.joblib")
    bundle["detector"].fit(np.random.default_rng(0).normal(size=(20, 3)))
    joblib.dump(bundle, folder / "artifacts/detector.joblib")


def delete_files(folder: Path) -> None:
    shutil.rmtree(folder)


def state(name: str) -> tuple:
    """What a refused promotion must leave as it was: aliases, ledger, version 2's tags."""
    client = MlflowClient()
    version = client.get_model_version(name, "2")
    aliases = dict(client.get_registered_model(name).aliases)
    return aliases, len(ledger(client, name)), version.tags, version.description


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        (corrupt_weights, "cannot be loaded from models:/m-"),
        (break_detector, "cannot score the test rows: ValueError: X has 64 features"),
        (delete_files, "cannot be loaded from models:/m-"),
    ],
)
def test_a_broken_version_is_refused(
    candidates, candidate_store, gate, capsys, fault: Callable[[Path], None], says: str
) -> None:
    assert gate(candidates["good"])["promoted"]
    assert not gate(candidates["good"])["promoted"]  # version 2: the same model again
    before = state(candidate_store)
    fault(model_files(candidate_store, "2"))
    capsys.readouterr()
    assert promote("--version", "2", "--splits", str(candidates["good"].files["splits"])) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: {candidate_store} challenger version 2 ")
    assert says in errors[0] and len(errors[0]) < 400
    assert state(candidate_store) == before


def test_deleted_files_and_corrupt_files_are_told_apart(
    candidates, candidate_store, gate, capsys
) -> None:
    gate(candidates["good"])
    gate(candidates["good"])
    gate(candidates["good"])
    corrupt_weights(model_files(candidate_store, "2"))
    delete_files(model_files(candidate_store, "3"))
    splits = str(candidates["good"].files["splits"])
    capsys.readouterr()
    assert promote("--version", "2", "--splits", splits) == 1
    assert "(its files are corrupt or unreadable: " in capsys.readouterr().err
    assert promote("--version", "3", "--splits", splits) == 1
    assert "its files are missing" in capsys.readouterr().err


def test_a_model_that_is_not_trackflows_is_refused(
    candidates, candidate_store, gate, capsys
) -> None:
    import mlflow
    import mlflow.sklearn
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    splits = candidates["good"].files["splits"]
    assert gate(candidates["good"])["promoted"]
    train = pd.read_parquet(splits / "target_train.parquet")
    plain = LogisticRegression(max_iter=200).fit(train.drop(columns="target"), train["target"])
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("trackflow").experiment_id).info.run_id
    with mlflow.start_run(run_id=run_id):
        info = mlflow.sklearn.log_model(plain, name="plain", pip_requirements=[])
    client.create_model_version(
        candidate_store, info.model_uri, run_id=run_id, model_id=info.model_id
    )
    before = len(ledger(client, candidate_store))
    capsys.readouterr()
    assert promote("--version", "2", "--splits", str(splits)) == 1
    err = capsys.readouterr().err
    assert f"error: {candidate_store} challenger version 2 is not a trackflow model" in err
    assert "Traceback" not in err and "KeyError" not in err
    assert len(ledger(client, candidate_store)) == before
    assert aliases(candidate_store) == {CHAMPION: "1"}


def write_lock(path: Path, split_md5: str) -> Path:
    """A dvc.lock naming only the split stage's output, as `dvc repro` records it."""
    split = {"cmd": "split", "outs": [{"path": "data/split", "md5": split_md5}]}
    path.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"split": split}}))
    return path


def test_a_champion_without_a_record_is_compared_only_on_the_same_split(
    candidates, candidate_store, write_params
) -> None:
    """A champion registered before rows were recorded: its DVC split tells which rows it saw."""
    from trackflow.config import load_params
    from trackflow.registry.packaging import log_packaged_model
    from trackflow.registry.promotion import SPLIT_TAG, register_candidate
    from trackflow.tracking import setup_tracking

    params = write_params({"model.name": candidate_store, **LOW_FLOORS})
    tracking = setup_tracking(load_params(params).base.mlflow)
    files = candidates["good"].files
    rows = pd.read_parquet(files["splits"] / "target_test.parquet").drop(columns="target")
    run_id = tracking.client.create_run(tracking.experiment_id).info.run_id  # records no rows
    info = log_packaged_model(
        tracking, run_id, files["preprocessor"], files["model"], files["detector"], rows, rows
    )
    tags = {SPLIT_TAG: "1234.dir"}
    register_candidate(tracking, candidate_store, info.model_uri, run_id, info.model_id, tags, 60)
    MlflowClient().set_registered_model_alias(candidate_store, CHAMPION, "1")

    argv = register_argv(candidates["weak"], params)
    argv[argv.index("--lock") + 1] = str(write_lock(Path("dvc.lock"), "1234.dir"))
    assert register(argv) == 0
    same = read_json("registered.json")
    assert same["reason"].startswith("not better: accuracy")
    assert same["rows"] == {"compared": 134, "excluded": 0}

    write_lock(Path("dvc.lock"), "5678.dir")  # the split changed since the champion trained
    assert register(argv) == 0
    other = read_json("registered.json")
    assert other["reason"].startswith(
        "not compared: champion version 1 recorded no training rows (registered before "
        "trackflow recorded them)"
    )
    assert aliases(candidate_store)[CHAMPION] == "1"


def test_a_champion_that_cannot_score_blocks_with_a_one_line_reason(
    candidates, candidate_store, gate
) -> None:
    assert gate(candidates["good"])["promoted"]
    break_detector(model_files(candidate_store, "1"))
    blocked = gate(candidates["weak"], **LOW_FLOORS)
    assert not blocked["promoted"] and aliases(candidate_store)[CHAMPION] == "1"
    assert blocked["reason"].startswith(
        f"not compared: {candidate_store} champion version 1 cannot score the test rows: "
        "ValueError: X has 64 features"
    )
    assert "\n" not in blocked["reason"] and len(blocked["reason"]) < 400


def test_test_rows_without_the_versions_columns_are_refused_in_one_line(
    candidates, candidate_store, gate, tmp_path, capsys
) -> None:
    gate(candidates["good"])
    gate(candidates["good"])
    before = state(candidate_store)
    capsys.readouterr()
    assert promote("--version", "2", "--splits", str(other_table_split(tmp_path / "other"))) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert error == (
        f"error: {candidate_store} challenger version 2 cannot score the test rows: they lack its "
        "columns pixel_0_0, pixel_0_1, pixel_0_2, ... (64 in all)"
    )
    assert state(candidate_store) == before


def split_with_a_batch(candidate: Candidate, folder: Path) -> Path:
    """The candidate's split, with every other target test row taken as a labelled batch's row.

    Its ``origins.parquet`` says where each row id comes from, as the split stage writes it when
    ``trackflow add-batch`` added rows: here half of the held-out target rows are "new".
    """
    from trackflow.data.batches import ORIGIN_COLUMN, ORIGINAL, ORIGINS_FILE
    from trackflow.registry.gate import read_parts

    shutil.copytree(candidate.files["splits"], folder)
    ids = pd.concat(read_parts(folder).values()).index
    origins = pd.Series(ORIGINAL, index=ids, name=ORIGIN_COLUMN)
    origins[pd.read_parquet(folder / "target_test.parquet").index[::2]] = "001-new"
    origins.to_frame().to_parquet(folder / ORIGINS_FILE)
    return folder


def test_with_a_batch_the_gate_asks_for_better_on_its_rows_and_no_forgetting_of_the_others(
    candidates, candidate_store, write_params, tmp_path
) -> None:
    client = MlflowClient()
    splits = str(split_with_a_batch(candidates["good"], tmp_path / "batch-split"))
    params = write_params({"model.name": candidate_store, **LOW_FLOORS})

    def gate(candidate: Candidate) -> dict:
        argv = register_argv(candidate, params)
        argv[argv.index("--splits") + 1] = splits
        assert register(argv) == 0
        return read_json("registered.json")

    first = gate(candidates["weak"])
    assert first["promoted"] and "; accuracy on the original rows " in first["reason"]
    assert first["rows"] == {"compared": 134, "excluded": 0, "old": 67, "new": 67}
    assert first["gate"]["gate/forgetting"] is None and first["gate"]["gate/rows_new"] == 67

    better = gate(candidates["good"])  # much better on the new rows, and on the old ones
    assert better["promoted"], better["reason"]
    assert better["reason"].startswith("better: accuracy on the new rows ")
    assert "within max_forgetting 0.01)" in better["reason"]
    numbers = better["gate"]
    assert numbers["gate/delta"] == pytest.approx(
        numbers["gate/challenger/new/accuracy"] - numbers["gate/champion/new/accuracy"]
    )
    assert numbers["gate/forgetting"] < 0  # better on the original rows too

    forgets = gate(candidates["weak"])  # the weak one again, against the good champion
    assert not forgets["promoted"] and aliases(candidate_store)[CHAMPION] == "2"
    old = {
        role: forgets["gate"][f"gate/{role}/old/accuracy"] for role in ("challenger", "champion")
    }
    assert forgets["reason"].startswith(
        f"forgets: accuracy on the original rows {old['challenger']:.4f} vs champion "
        f"{old['champion']:.4f} ({old['challenger'] - old['champion']:+.4f} > max_forgetting 0.01)"
        "; accuracy on the new rows "
    )
    assert read_json("register.json")["gate/forgetting"] == pytest.approx(
        old["champion"] - old["challenger"]
    )
    entry = ledger(client, candidate_store)[-1]
    assert entry.action == "reject" and entry.metrics["rows_new"] == 67
    assert entry.metrics["old_accuracy"] == pytest.approx(old["challenger"])
    assert entry.metrics["forgetting"] == pytest.approx(old["champion"] - old["challenger"])
    tags = client.get_model_version(candidate_store, "3").tags
    assert float(tags["trackflow.gate.forgetting"]) == pytest.approx(entry.metrics["forgetting"])
    run = client.get_run(forgets["run_id"]).data.metrics
    assert run["gate/challenger/new/accuracy"] == forgets["gate"]["gate/challenger/new/accuracy"]
