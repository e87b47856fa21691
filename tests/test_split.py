from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trackflow.config import DataConfig, SplitConfig
from trackflow.data.ingest import load_bundled, to_canonical
from trackflow.data.split import split_table
from trackflow.errors import DataError
from trackflow.io import read_json, read_table
from trackflow.stages.split import main as split_stage

LABEL = "target"


@pytest.fixture(scope="module")
def digits() -> pd.DataFrame:
    return to_canonical(load_bundled("digits"), LABEL)[0]


def split(table: pd.DataFrame, seed: int = 0, **data: object) -> dict[str, pd.DataFrame]:
    return split_table(table, LABEL, DataConfig(**data), SplitConfig(), seed)


def test_parts_are_disjoint_and_cover_every_row(digits) -> None:
    parts = split(digits)
    ids = [set(part.index) for part in parts.values()]
    assert sum(map(len, ids)) == len(digits) == len(set().union(*ids))


def test_tasks_hold_their_classes_only(digits) -> None:
    parts = split(digits)
    assert sorted(parts) == [
        f"{t}_{s}" for t in ("source", "target") for s in ("test", "train", "val")
    ]
    for name, part in parts.items():
        expected = set(range(5)) if name.startswith("source") else set(range(5, 10))
        assert set(part[LABEL]) == expected


def test_split_is_stratified(digits) -> None:
    parts = split(digits)
    overall = digits[LABEL].value_counts(normalize=True)
    for task, classes in (("source", range(5)), ("target", range(5, 10))):
        share = overall[list(classes)] / overall[list(classes)].sum()
        for name in ("train", "val", "test"):
            observed = parts[f"{task}_{name}"][LABEL].value_counts(normalize=True)
            np.testing.assert_allclose(observed[share.index], share, atol=0.02)
    sizes = {name: len(part) for name, part in parts.items()}
    assert sizes["target_test"] / (
        sizes["target_train"] + sizes["target_val"] + sizes["target_test"]
    ) == pytest.approx(0.15, abs=0.01)


def test_same_seed_same_split_other_seed_other_split(digits) -> None:
    first, again, other = split(digits, seed=1), split(digits, seed=1), split(digits, seed=2)
    assert all(first[k].index.equals(again[k].index) for k in first)
    assert not first["target_test"].index.equals(other["target_test"].index)


def test_without_source_classes_everything_is_the_target_task(digits) -> None:
    parts = split(digits, source_classes=None, target_classes=None)
    assert sorted(parts) == ["target_test", "target_train", "target_val"]
    assert set(parts["target_train"][LABEL]) == set(range(10))


def test_target_defaults_to_the_classes_not_in_the_source(digits) -> None:
    parts = split(digits, source_classes=[0, 1], target_classes=None)
    assert set(parts["target_val"][LABEL]) == set(range(2, 10))


def test_target_train_fraction_keeps_a_stratified_subset(digits) -> None:
    full, few = split(digits), split(digits, target_train_fraction=0.1)
    kept = few["target_train"]
    assert abs(len(kept) - 0.1 * len(full["target_train"])) <= 5
    assert set(kept.index) <= set(full["target_train"].index)
    assert kept[LABEL].value_counts().min() >= 5
    assert few["target_test"].index.equals(full["target_test"].index)  # test rows untouched


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_target_train_fraction_keeps_at_least_one_row_per_class(digits, fraction) -> None:
    full, kept = split(digits)["target_train"], split(digits, target_train_fraction=fraction)
    counts = kept["target_train"][LABEL].value_counts()
    assert set(counts.index) == set(range(5, 10))
    expected = full[LABEL].value_counts().map(lambda n: max(1, round(fraction * n)))
    pd.testing.assert_series_equal(counts.sort_index(), expected.sort_index())


@pytest.mark.parametrize("n_rows", range(4, 40))
@pytest.mark.parametrize(("val", "test"), [(0.15, 0.15), (0.1, 0.3), (0.4, 0.2)])
def test_small_tables_split_or_fail_with_a_data_error(n_rows, val, test) -> None:
    table = pd.DataFrame({"x": np.arange(float(n_rows)), LABEL: np.arange(n_rows) % 2})
    try:
        parts = split_table(
            table,
            LABEL,
            DataConfig(source_classes=None, target_classes=None),
            SplitConfig(val_fraction=val, test_fraction=test),
            seed=0,
        )
    except DataError as error:
        assert "too few" in str(error) or "fewer than 3 rows" in str(error)
    else:
        assert all(part[LABEL].nunique() == 2 for part in parts.values())


def test_class_labels_match_across_int_and_str() -> None:
    table = pd.DataFrame({"x": np.arange(60.0), LABEL: [f"{i % 4}" for i in range(60)]})
    parts = split(table, source_classes=[0, 1], target_classes=[2, 3])
    assert set(parts["source_train"][LABEL]) == {"0", "1"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"source_classes": [0, 11]},
            r"data.source_classes lists \[11\], absent from the data; its classes are \[0, 1,",
        ),
        ({"source_classes": list(range(9)), "target_classes": None}, "target task has 1 class"),
    ],
)
def test_impossible_tasks_are_refused(digits, data, message) -> None:
    with pytest.raises(DataError, match=message):
        split(digits, **data)


def test_too_few_rows_for_the_split_is_refused() -> None:
    table = pd.DataFrame({"x": np.arange(12.0), LABEL: np.arange(12) % 4})
    with pytest.raises(DataError, match=r"12 rows are too few .* Provide at least 22 rows"):
        split(table, source_classes=None, target_classes=None)


def test_classes_with_fewer_than_three_rows_are_refused() -> None:
    table = pd.DataFrame({"x": np.arange(41.0), LABEL: [0] * 20 + [1] * 19 + [2] * 2})
    with pytest.raises(DataError, match=r"classes 2 \(2 rows\) have fewer than 3 rows"):
        split(table, source_classes=None, target_classes=None)


def test_stage_writes_parts_and_summary(write_params, tmp_path, digits) -> None:
    digits.to_parquet(tmp_path / "dataset.parquet")
    code = split_stage(
        [
            "--params",
            str(write_params()),
            "--dataset",
            str(tmp_path / "dataset.parquet"),
            "--out",
            str(tmp_path / "split"),
        ]
    )
    assert code == 0
    summary = read_json(tmp_path / "split/summary.json")
    assert summary["parts"]["target_test"]["rows"] == len(
        read_table(tmp_path / "split/target_test.parquet")
    )
    assert len(summary["dataset_digest"]) == 16


def test_stage_needs_the_ingested_dataset(write_params, tmp_path, capsys) -> None:
    code = split_stage(["--params", str(write_params()), "--dataset", "nope.parquet", "--out", "s"])
    assert code == 3 and "run the ingest stage first" in capsys.readouterr().err


def test_stage_refuses_too_small_data_and_writes_nothing(write_params, tmp_path, capsys) -> None:
    table = pd.DataFrame({"x": np.arange(12.0), LABEL: np.arange(12) % 4})
    table.to_parquet(tmp_path / "dataset.parquet")
    params = write_params({"data.source_classes": None, "data.target_classes": None})
    code = split_stage(
        [
            "--params",
            str(params),
            "--dataset",
            str(tmp_path / "dataset.parquet"),
            "--out",
            str(tmp_path / "split"),
        ]
    )
    assert code == 3 and "too few" in capsys.readouterr().err
    assert not (tmp_path / "split").exists()


# --- added batches (trackflow add-batch): split on their own, appended ---------------------------


def with_batches(digits: pd.DataFrame, *sizes: int) -> tuple[pd.DataFrame, pd.Series]:
    """The digits followed by batches of ``sizes`` rows (copies of digits rows), and origins."""
    from trackflow.data.batches import ORIGINAL

    batches = [digits.sample(n, random_state=i) for i, n in enumerate(sizes)]
    table = pd.concat([digits, *batches], ignore_index=True).rename_axis("row_id")
    names = [ORIGINAL] * len(digits)
    for i, n in enumerate(sizes):
        names += [f"{i + 1:03d}-b"] * n
    return table, pd.Series(names, index=table.index, name="origin")


def test_batches_leave_the_original_parts_as_they_were(digits) -> None:
    table, origins = with_batches(digits, 200, 12)
    without = split(digits)
    parts = split_table(table, LABEL, DataConfig(), SplitConfig(), 0, origins)
    for name, part in parts.items():
        pd.testing.assert_frame_equal(part.loc[part.index < len(digits)], without[name])
    ids = [set(part.index) for part in parts.values()]
    assert sum(map(len, ids)) == len(table) == len(set().union(*ids))


def test_a_batch_is_split_with_the_same_fractions_stratified_and_on_its_own(digits) -> None:
    table, origins = with_batches(digits, 200, 100)
    parts = split_table(table, LABEL, DataConfig(), SplitConfig(), 0, origins)
    first = {n: p.index[origins[p.index] == "001-b"] for n, p in parts.items()}
    assert sum(len(ids) for n, ids in first.items() if n.endswith("_test")) == 30  # 0.15 x 200
    alone, alone_origins = with_batches(digits, 200)  # without the second batch: the same rows
    again = split_table(alone, LABEL, DataConfig(), SplitConfig(), 0, alone_origins)
    for name, part in again.items():
        assert list(part.index[part.index >= len(digits)]) == list(first[name])


def test_a_tiny_or_one_class_batch_still_splits(digits) -> None:
    from trackflow.data.split import MIN_BATCH_SPLIT_ROWS

    sevens = digits[digits[LABEL] == 7]
    tiny, one_class = sevens.iloc[: MIN_BATCH_SPLIT_ROWS - 1], sevens.iloc[:40]
    table = pd.concat([digits, tiny, one_class], ignore_index=True).rename_axis("row_id")
    names = ["original"] * len(digits) + ["001-tiny"] * len(tiny) + ["002-sevens"] * 40
    origins = pd.Series(names, index=table.index)
    parts = split_table(table, LABEL, DataConfig(), SplitConfig(), 0, origins)
    counts = {n: origins[p.index].value_counts() for n, p in parts.items()}
    assert counts["target_train"]["001-tiny"] == len(tiny)  # too few to hold out: all train
    assert sum(c.get("001-tiny", 0) for c in counts.values()) == len(tiny)
    assert counts["target_test"]["002-sevens"] == 6  # one class: still 0.15 held out
    assert sum(c.get("002-sevens", 0) for c in counts.values()) == 40


def test_stage_writes_origins_and_counts_per_origin(write_params, tmp_path, digits) -> None:
    from trackflow.data.batches import ORIGINS_FILE, read_origins

    table, origins = with_batches(digits, 50)
    table.to_parquet(tmp_path / "dataset.parquet")
    origins.to_frame().to_parquet(tmp_path / ORIGINS_FILE)
    argv = ["--params", str(write_params()), "--dataset", str(tmp_path / "dataset.parquet")]
    assert split_stage([*argv, "--out", str(tmp_path / "split")]) == 0
    summary = read_json(tmp_path / "split/summary.json")
    written = read_origins(tmp_path / "split")
    assert written.index.is_monotonic_increasing and len(written) == len(table)
    assert written.value_counts().to_dict() == {"original": len(digits), "001-b": 50}
    assert sum(c.get("001-b", 0) for c in summary["origins"].values()) == 50
    assert [b["name"] for b in summary["batches"]] == ["001-b"]
