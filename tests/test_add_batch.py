"""``trackflow add-batch`` in a real git + DVC repository; its batches through ingest and split."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import copy_project, dvc
from trackflow.cli import main
from trackflow.data.batches import ORIGINAL, read_origins
from trackflow.data.ingest import load_bundled
from trackflow.data.shift import shifted_digits
from trackflow.io import read_json, read_table
from trackflow.pipeline.driver import stage_order
from trackflow.stages.ingest import main as ingest
from trackflow.stages.split import main as split

BATCHES = Path("data/batches")


@pytest.fixture
def repo(tmp_path: Path, write_params) -> Path:
    """The working folder as a git + DVC repository with the project's params and batches folder."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q", cwd=tmp_path)
    write_params()
    BATCHES.mkdir(parents=True)
    (BATCHES / "README.md").write_text("batches\n")
    return tmp_path


def add(path: Path, *extra: str) -> int:
    return main(["add-batch", str(path), *extra])


def folder_state() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(BATCHES.iterdir())}


def stream(tmp_path: Path, n_rows: int = 60, seed: int = 1, name: str = "new.csv") -> Path:
    path = tmp_path / name
    shifted_digits(n_rows, seed, classes=[5, 6, 7, 8, 9]).to_csv(path, index=False)
    return path


def _digits(n_rows: int = 20) -> pd.DataFrame:
    return shifted_digits(n_rows, 9, classes=[5, 6])


BAD_BATCHES = {
    "missing column": (
        _digits().drop(columns=["pixel_3_3", "pixel_4_4"]),
        r"missing columns pixel_3_3, pixel_4_4",
    ),
    "extra column": (_digits().assign(colour=1.0), "extra columns colour"),
    "unknown class": (
        _digits().assign(target=np.arange(20) % 2 + 10),
        r"classes 10, 11 that the dataset does not.*needs a model trained from scratch",
    ),
    "no rows": (_digits().iloc[:0], "the table has no rows"),
    "NaN in a feature": (
        _digits().assign(pixel_0_0=[np.nan] + [0.0] * 19),
        "1 NaN/inf values in features pixel_0_0",
    ),
    "text cell": (
        _digits().assign(pixel_0_1=["x"] * 20),
        "1 feature columns are not numeric: pixel_0_1",
    ),
    "label column absent": (_digits().rename(columns={"target": "label"}), "'target' is not in"),
    "missing label": (
        _digits().assign(target=[np.nan] + [5.0] * 19),
        "1 rows have no label in 'target'",
    ),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_a_bad_batch_is_refused_and_nothing_is_added(repo, tmp_path, capsys, case) -> None:
    table, message = BAD_BATCHES[case]
    path = tmp_path / "bad.csv"
    table.to_csv(path, index=False)
    before = folder_state()
    assert add(path) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert folder_state() == before


def test_an_absent_file_and_a_folder_outside_dvc_are_refused(tmp_path, write_params, capsys):
    write_params()
    assert add(tmp_path / "absent.csv") == 2  # no DVC repository: said first
    assert "is not inside a DVC repository" in capsys.readouterr().err
    assert not BATCHES.exists()
    dvc("init", "--no-scm", "-q", cwd=tmp_path)
    assert add(tmp_path / "absent.csv") == 3
    assert re.search("batch file .*absent.csv' does not exist", capsys.readouterr().err)


@pytest.mark.slow
def test_batches_are_numbered_tracked_and_duplicates_refused(repo, tmp_path, capsys) -> None:
    first = stream(tmp_path, 60, seed=1)
    assert add(first, "--name", "shifted stream") == 0
    out = capsys.readouterr().out
    assert "added batch 001-shifted-stream: 60 rows" in out and "dvc repro" in out
    stored = BATCHES / "001-shifted-stream.parquet"
    assert (BATCHES / "001-shifted-stream.parquet.dvc").is_file()
    assert "/001-shifted-stream.parquet" in (BATCHES / ".gitignore").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(stored), pd.read_csv(first), check_exact=False)

    before = folder_state()
    assert add(first) == 3  # the same rows again
    assert "is already in the dataset or an earlier batch: nothing added" in capsys.readouterr().err
    assert folder_state() == before

    half_known = tmp_path / "mixed.parquet"
    pd.concat([pd.read_csv(first).head(10), shifted_digits(20, seed=2)]).to_parquet(half_known)
    assert add(half_known) == 0
    out = capsys.readouterr().out
    assert "added batch 002-mixed: 20 rows" in out and "10 rows already in the dataset" in out
    assert len(pd.read_parquet(BATCHES / "002-mixed.parquet")) == 20

    (BATCHES / "001-shifted-stream.parquet").unlink()  # removing a batch: its data and .dvc
    (BATCHES / "001-shifted-stream.parquet.dvc").unlink()
    assert add(stream(tmp_path, 15, seed=3)) == 0
    assert (BATCHES / "003-new.parquet.dvc").is_file()  # numbers are never reused


@pytest.mark.slow
def test_a_failing_dvc_add_leaves_the_folder_as_it_was(repo, tmp_path, capsys) -> None:
    (repo / "dvc.yaml").write_text(  # the folder as a stage's output: DVC refuses to add into it
        "stages:\n  make:\n    cmd: echo\n    outs: [data/batches]\n"
    )
    (BATCHES / ".gitignore").write_text("/something-else\n")
    before = folder_state()
    assert add(stream(tmp_path)) == 3
    err = capsys.readouterr().err
    assert "`dvc add data/batches/001-new.parquet` failed, nothing added: ERROR: " in err
    assert "overlaps with an output of stage: 'make'" in err
    assert folder_state() == before


@pytest.mark.slow
def test_ingest_and_split_append_the_batches_and_keep_the_original_parts(
    repo, tmp_path, write_params
) -> None:
    params = str(write_params())
    split_argv = ["--params", params, "--dataset", "ingested/dataset.parquet"]
    assert ingest(["--params", params, "--out", "ingested"]) == 0
    assert split([*split_argv, "--out", "before"]) == 0
    assert (read_origins(Path("before")) == ORIGINAL).all()

    assert add(stream(tmp_path, 80, seed=1, name="a.csv")) == 0
    assert add(stream(tmp_path, 6, seed=2, name="tiny.csv")) == 0  # too few to hold out
    assert ingest(["--params", params, "--out", "ingested"]) == 0
    assert split([*split_argv, "--out", "after"]) == 0

    n_original = len(load_bundled("digits"))
    table = read_table("ingested/dataset.parquet")
    origins = read_origins(Path("ingested"))
    assert list(table.index) == list(range(n_original + 86))
    assert origins.value_counts().to_dict() == {ORIGINAL: n_original, "001-a": 80, "002-tiny": 6}
    assert (origins.iloc[:n_original] == ORIGINAL).all()
    profile = read_json("ingested/profile.json")
    assert [(b["name"], b["rows"]) for b in profile["batches"]] == [("001-a", 80), ("002-tiny", 6)]

    summary = read_json("after/summary.json")
    assert summary["batches"] == profile["batches"]
    split_origins = read_origins(Path("after"))
    for name in summary["parts"]:
        before = Path("before") / f"{name}.parquet"
        after = read_table(Path("after") / f"{name}.parquet")
        kept = after[split_origins.reindex(after.index) == ORIGINAL]
        kept.to_parquet(tmp_path / "kept.parquet", index=True)
        assert (tmp_path / "kept.parquet").read_bytes() == before.read_bytes(), name
        counts = split_origins.reindex(after.index).value_counts().to_dict()
        assert summary["origins"][name] == counts
    assert summary["origins"]["target_train"]["002-tiny"] == 6
    assert sum(summary["origins"][f"target_{s}"]["001-a"] for s in ("train", "val", "test")) == 80
    assert summary["origins"]["target_test"]["001-a"] == 12  # ceil(0.15 x 80)


def test_the_batches_a_model_saw_are_a_tag_its_lineage_shows() -> None:
    from trackflow.registry.lineage import BATCHES_TAG, batches_tag, format_trace, read_batches_tag

    batches = [
        {"name": "001-shifted", "digest": "6c5cdac57c95ffae", "rows": 600},
        {"name": "002-more", "digest": "0616c6ac71e449fc", "rows": 5},
    ]
    (key, value), *others = batches_tag(batches).items()
    assert key == f"trackflow.{BATCHES_TAG}" and not others
    assert read_batches_tag(value) == batches
    assert read_batches_tag(batches_tag([])[key]) == [] and read_batches_tag(None) is None
    chain = {
        "data": {"source": "sklearn:digits", "digest": "d", "dvc": {}, "datasets": []},
        "preprocessing": {"run_id": None},
        "backbone": {"source": None, "run_id": None, "version": None},
        "training": {
            **dict.fromkeys(("run_id", "mode", "status", "git_commit", "git_dirty")),
            **dict.fromkeys(("params_hash", "prefect_flow_run_id")),
        },
        "model": {"name": "m", "version": "2", "source": "s", "aliases": [], "gate": None},
        "history": [],
    }
    assert "batch" not in format_trace(chain)  # a model trained before batches existed
    chain["data"]["batches"] = batches
    lines = format_trace(chain).splitlines()
    assert lines[1:3] == [
        "  batch        001-shifted  600 rows  digest 6c5cdac57c95ffae",
        "  batch        002-more  5 rows  digest 0616c6ac71e449fc",
    ]
    chain["data"]["batches"] = []
    assert "  batches      none (the original data only)" in format_trace(chain)


@pytest.mark.slow
def test_dvc_repro_takes_an_added_batch_into_the_data(tmp_path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")

    def run(*argv: str) -> str:
        done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    copy_project(project)  # with the project's .dvc/config
    (project / BATCHES).mkdir(parents=True, exist_ok=True)
    (project / BATCHES / "README.md").write_text("batches\n")
    run("dvc", "repro", "split")
    assert run("dvc", "status", "ingest").strip().endswith("up to date.")
    run("trackflow", "add-batch", str(stream(tmp_path, 40)), "--name", "shifted")
    assert "modified:           data/batches" in run("dvc", "status", "ingest")
    # the batch's .dvc file is a stage of DVC's graph too, one with nothing to run
    assert stage_order(project, "split") == ["ingest", "split"]
    run("dvc", "repro", "split")
    origins = read_origins(project / "data/split")
    assert origins.value_counts().to_dict() == {ORIGINAL: 1797, "001-shifted": 40}
