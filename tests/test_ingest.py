from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trackflow.data.ingest import load_bundled, table_digest
from trackflow.io import read_json, read_table
from trackflow.stages.ingest import main as ingest


def run_ingest(write_params, tmp_path: Path, **overrides) -> int:
    params = write_params({f"data.{key}": value for key, value in overrides.items()})
    return ingest(["--params", str(params), "--out", str(tmp_path / "out")])


def tiny_table(n_rows: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n_rows, 3)), columns=["a", "b", "c"])
    frame["label"] = np.arange(n_rows) % 3
    return frame


def test_default_source_is_scikit_learns_digits(write_params, tmp_path) -> None:
    assert run_ingest(write_params, tmp_path) == 0
    table = read_table(tmp_path / "out/dataset.parquet")
    profile = read_json(tmp_path / "out/profile.json")
    assert table.shape == (1797, 65)
    assert list(table.columns[:2]) == ["pixel_0_0", "pixel_0_1"]
    assert table.columns[-1] == "target"
    assert (table.dtypes.iloc[:-1] == "float64").all()
    assert profile["n_rows"] == 1797 and profile["n_features"] == 64
    assert sum(profile["class_counts"].values()) == 1797 and len(profile["class_counts"]) == 10
    assert profile["digest"] == table_digest(table)
    assert profile["features"][0] == {
        "name": "pixel_0_0",
        "dtype": "float64",
        "mean": 0.0,
        "std": 0.0,
        "min": 0.0,
        "max": 0.0,
        "missing": 0,
    }


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_users_table_gives_the_same_canonical_data(write_params, tmp_path, suffix) -> None:
    path = tmp_path / f"digits{suffix}"
    digits = load_bundled("digits")
    digits.to_csv(path, index=False) if suffix == ".csv" else digits.to_parquet(path)
    assert run_ingest(write_params, tmp_path, source=str(path)) == 0
    from_file = read_json(tmp_path / "out/profile.json")
    assert run_ingest(write_params, tmp_path) == 0
    assert from_file["digest"] == read_json(tmp_path / "out/profile.json")["digest"]


def test_label_column_is_configurable(write_params, tmp_path) -> None:
    frame = tiny_table().rename(columns={"label": "species"})
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert (
        run_ingest(write_params, tmp_path, source=str(tmp_path / "t.csv"), label_column="species")
        == 0
    )
    assert read_table(tmp_path / "out/dataset.parquet").columns[-1] == "species"


def _write(tmp_path: Path, content: str | pd.DataFrame, name: str = "bad.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_bytes(content.encode("latin-1"))
    elif name.endswith(".csv"):
        content.to_csv(path, index=False)
    else:
        content.to_parquet(path, index=False)
    return path


def _with(column: str, values: object) -> pd.DataFrame:
    frame = tiny_table()
    frame[column] = values
    return frame


BAD_INPUTS = {
    "missing file": (None, "does not exist"),
    "empty file": ("", "is empty"),
    "header only": ("a,b,label\n", "has no rows"),
    "label column absent": (
        tiny_table().rename(columns={"label": "labels"}),
        "label column 'label' is not in the table.*Did you mean 'labels'",
    ),
    "non-numeric feature": (_with("b", "x"), "1 feature columns are not numeric: b"),
    "NaN in a feature": (_with("a", [np.nan] + [1.0] * 29), "1 NaN/inf values in features a"),
    "inf in a feature": (_with("c", [np.inf] * 2 + [1.0] * 28), "2 NaN/inf values in features c"),
    "missing label": (_with("label", [np.nan] + [1.0] * 29), "1 rows have no label"),
    "single class": (_with("label", 0), r"holds a single class \(0\);"),
    "text cell": (
        _with("b", ["10.0"] * 5 + ["abc"] + ["1"] * 24),
        r"not numeric: b \(b holds 'abc' in data row 6\)",
    ),
    "duplicate column names": ("a,a,label\n1,2,0\n3,4,1\n", r"duplicate column names \['a'\]"),
    "no feature columns": (tiny_table()[["label"]], "no feature columns"),
    "malformed parquet": ("not parquet at all", "not a readable Parquet file"),
    "not UTF-8": ("a,b,label\n1,2,caf\xe9\n", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_writes_nothing(write_params, tmp_path, capsys, case) -> None:
    content, message = BAD_INPUTS[case]
    name = "bad.parquet" if "parquet" in case else "bad.csv"
    path = tmp_path / name if content is None else _write(tmp_path, content, name)
    assert run_ingest(write_params, tmp_path, source=str(path), label_column="label") == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_a_source_outside_data_raw_is_flagged(write_params, tmp_path, caplog) -> None:
    path = _write(tmp_path, tiny_table(), "outside.csv")
    assert run_ingest(write_params, tmp_path, source=str(path), label_column="label") == 0
    assert "outside data/raw/" in caplog.text


def test_duplicate_columns_in_parquet_are_refused(write_params, tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table([[1.0, 2.0], [3.0, 4.0], [0, 1]], names=["a", "a", "label"])
    pq.write_table(table, tmp_path / "dup.parquet")
    code = run_ingest(
        write_params, tmp_path, source=str(tmp_path / "dup.parquet"), label_column="label"
    )
    assert code == 3 and "duplicate column names ['a']" in capsys.readouterr().err


def test_failure_keeps_the_previous_outputs(write_params, tmp_path) -> None:
    assert run_ingest(write_params, tmp_path) == 0
    before = (tmp_path / "out/dataset.parquet").read_bytes()
    assert run_ingest(write_params, tmp_path, source=str(tmp_path / "gone.csv")) == 3
    assert (tmp_path / "out/dataset.parquet").read_bytes() == before


def test_impute_keeps_non_finite_values_as_nan_and_counts_them(write_params, tmp_path) -> None:
    frame = _with("a", [np.nan, np.inf, -np.inf] + [1.0] * 27)
    path = _write(tmp_path, frame)
    assert (
        run_ingest(
            write_params, tmp_path, source=str(path), label_column="label", non_finite="impute"
        )
        == 0
    )
    table = read_table(tmp_path / "out/dataset.parquet")
    assert table["a"].isna().sum() == 3
    assert read_json(tmp_path / "out/profile.json")["non_finite_values"] == {"a": 3}


def test_module_entry_point_exits_non_zero_without_a_traceback(write_params, tmp_path) -> None:
    params = write_params({"data.source": str(tmp_path / "absent.csv")})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trackflow.stages.ingest",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_csv_saved_with_pandas_index_drops_it_with_a_warning(
    write_params, tmp_path, caplog
) -> None:
    load_bundled("digits").to_csv(tmp_path / "indexed.csv")  # index included: "Unnamed: 0"
    assert run_ingest(write_params, tmp_path, source=str(tmp_path / "indexed.csv")) == 0
    profile = read_json(tmp_path / "out/profile.json")
    assert profile["n_features"] == 64
    assert profile["digest"] == table_digest(read_table(tmp_path / "out/dataset.parquet"))
    assert "dropped the first column 'Unnamed: 0'" in caplog.text
    assert "data.index_column: keep" in caplog.text
    assert run_ingest(write_params, tmp_path) == 0  # the bundled table: the same canonical data
    assert profile["digest"] == read_json(tmp_path / "out/profile.json")["digest"]


def test_a_reset_index_column_of_row_numbers_is_dropped_too(write_params, tmp_path) -> None:
    tiny_table().reset_index().to_csv(tmp_path / "t.csv", index=False)  # column "index": 0..n-1
    assert (
        run_ingest(write_params, tmp_path, source=str(tmp_path / "t.csv"), label_column="label")
        == 0
    )
    assert list(read_table(tmp_path / "out/dataset.parquet").columns) == ["a", "b", "c", "label"]


def test_a_named_first_column_is_a_feature(write_params, tmp_path) -> None:
    frame = tiny_table().rename(columns={"a": "index"})  # named "index" but not row numbers
    frame.to_csv(tmp_path / "t.csv", index=False)
    assert (
        run_ingest(write_params, tmp_path, source=str(tmp_path / "t.csv"), label_column="label")
        == 0
    )
    assert read_table(tmp_path / "out/dataset.parquet").columns[0] == "index"


def test_index_column_policy_keep_or_fail(write_params, tmp_path, capsys) -> None:
    tiny_table().to_csv(tmp_path / "t.csv")
    source = {"source": str(tmp_path / "t.csv"), "label_column": "label"}
    assert run_ingest(write_params, tmp_path, **source, index_column="fail") == 3
    err = capsys.readouterr().err
    assert "the first column 'Unnamed: 0' looks like a saved row index" in err
    assert "index=False" in err and "data.index_column" in err
    assert not (tmp_path / "out").exists()
    assert run_ingest(write_params, tmp_path, **source, index_column="keep") == 0
    table = read_table(tmp_path / "out/dataset.parquet")
    assert list(table.columns) == ["Unnamed: 0", "a", "b", "c", "label"]
    assert table["Unnamed: 0"].tolist() == list(range(30))


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_a_csv_with_another_separator_is_named_in_a_short_message(
    write_params, tmp_path, capsys, separator
) -> None:
    path = tmp_path / "digits.csv"
    load_bundled("digits").to_csv(path, sep=separator, index=False)
    assert run_ingest(write_params, tmp_path, source=str(path)) == 3
    err = capsys.readouterr().err
    expected = json.dumps(separator)
    assert f'fields look separated by {expected}, not ","' in err
    assert f"Set data.separator: {expected} in params.yaml" in err
    assert len(err) < 300 and err.count("\n") == 1, err
    assert run_ingest(write_params, tmp_path, source=str(path), separator=separator) == 0
    from_file = read_json(tmp_path / "out/profile.json")["digest"]
    assert run_ingest(write_params, tmp_path) == 0
    assert from_file == read_json(tmp_path / "out/profile.json")["digest"]


def test_a_missing_label_among_many_long_columns_gives_a_short_message(
    write_params, tmp_path, capsys
) -> None:
    frame = pd.DataFrame(
        {f"feature_with_a_rather_long_name_{i:03d}_" * 3: [1.0, 2.0] for i in range(50)}
    )
    frame.to_csv(tmp_path / "wide.csv", index=False)
    assert run_ingest(write_params, tmp_path, source=str(tmp_path / "wide.csv")) == 3
    err = capsys.readouterr().err
    assert "label column 'target' is not in the table" in err and "(50 in all)" in err
    assert len(err) < 600, err


def test_a_parquet_text_column_names_its_first_non_number(write_params, tmp_path, capsys) -> None:
    frame = _with("c", ["1.5", None, "2", "n/a"] + ["3"] * 26)
    frame["a"] = [[1.0]] * 30  # a list per cell: not a number either
    path = _write(tmp_path, frame, "t.parquet")
    assert run_ingest(write_params, tmp_path, source=str(path), label_column="label") == 3
    err = capsys.readouterr().err
    assert "2 feature columns are not numeric: a, c" in err
    assert "a holds '[1.]' in data row 1; c holds 'n/a' in data row 4" in err


# --- batches added with trackflow add-batch ------------------------------------------------------


def test_without_batches_every_row_is_original(write_params, tmp_path) -> None:
    from trackflow.data.batches import ORIGINAL, read_origins

    assert run_ingest(write_params, tmp_path) == 0
    origins = read_origins(tmp_path / "out")
    assert (origins == ORIGINAL).all() and list(origins.index) == list(range(1797))
    assert "batches" not in read_json(tmp_path / "out/profile.json")


def test_batches_follow_the_source_rows_in_name_order(write_params, tmp_path) -> None:
    from trackflow.data.batches import read_origins

    folder = tmp_path / "batches"
    folder.mkdir()
    (folder / "README.md").write_text("not a batch")
    tiny_table(6).assign(label=2).to_parquet(folder / "002-b.parquet", index=False)
    tiny_table(9).to_parquet(folder / "001-a.parquet", index=False)
    source = _write(tmp_path, tiny_table(), "t.csv")
    code = run_ingest(
        write_params, tmp_path, source=str(source), label_column="label", batches=str(folder)
    )
    assert code == 0
    table = read_table(tmp_path / "out/dataset.parquet")
    assert list(table.index) == list(range(45))
    pd.testing.assert_frame_equal(
        table.iloc[30:39].reset_index(drop=True), tiny_table(9), check_index_type=False
    )
    origins = read_origins(tmp_path / "out")
    assert list(origins.iloc[28:]) == ["original"] * 2 + ["001-a"] * 9 + ["002-b"] * 6
    batches = read_json(tmp_path / "out/profile.json")["batches"]
    assert [(b["name"], b["rows"]) for b in batches] == [("001-a", 9), ("002-b", 6)]
    assert batches[1]["digest"] == table_digest(table.iloc[39:].reset_index(drop=True))


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            tiny_table(5).drop(columns="c"),
            r"001-x.parquet': the batch's columns.*missing columns c",
        ),
        (tiny_table(5).assign(label=7), r"classes 7 that the dataset does not"),
        ("a .dvc file only", r"001-x.parquet.dvc.*are tracked by DVC.*run `dvc pull`"),
    ],
)
def test_a_bad_or_absent_batch_names_itself(write_params, tmp_path, capsys, batch, message):
    folder = tmp_path / "batches"
    folder.mkdir()
    if isinstance(batch, str):
        (folder / "001-x.parquet.dvc").write_text("outs: []\n")
    else:
        batch.to_parquet(folder / "001-x.parquet", index=False)
    source = _write(tmp_path, tiny_table(), "t.csv")
    code = run_ingest(
        write_params, tmp_path, source=str(source), label_column="label", batches=str(folder)
    )
    assert code == 3
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
