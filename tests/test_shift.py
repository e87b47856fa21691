"""The shifted stream of digits (trackflow.data.shift) and its command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from trackflow.cli import main
from trackflow.data.ingest import load_bundled
from trackflow.data.shift import SHIFTS, shifted_digits
from trackflow.errors import DataError


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    first = shifted_digits(50, seed=3)
    pd.testing.assert_frame_equal(first, shifted_digits(50, seed=3))
    assert not first.equals(shifted_digits(50, seed=4))


def test_columns_values_and_labels_are_the_digits() -> None:
    table = shifted_digits(2000, seed=0, classes=[5, 6, 7, 8, 9])  # more rows than those classes
    digits = load_bundled("digits")
    assert list(table.columns) == list(digits.columns)
    assert table.shape == (2000, 65)
    assert (table.dtypes.iloc[:-1] == "float64").all() and table["target"].dtype == "int64"
    assert set(table["target"]) == {5, 6, 7, 8, 9}
    pixels = table.drop(columns="target").to_numpy()
    assert pixels.min() >= 0 and pixels.max() <= 16


@pytest.mark.parametrize("kind", SHIFTS)
def test_each_kind_changes_the_images(kind) -> None:
    unshifted = shifted_digits(100, seed=1, strength=0.0)
    shifted = shifted_digits(100, seed=1, kinds=[kind])
    assert unshifted["target"].equals(shifted["target"])  # the same rows were drawn
    change = np.abs(shifted.drop(columns="target") - unshifted.drop(columns="target"))
    assert change.to_numpy().mean() > 0.1, kind


def test_strength_zero_draws_the_digits_unchanged() -> None:
    table = shifted_digits(30, seed=2, strength=0.0)
    digits = load_bundled("digits").astype({c: "float64" for c in table.columns[:-1]})
    merged = table.merge(digits.drop_duplicates(), how="left", indicator=True)
    assert (merged["_merge"] == "both").all()


def test_the_shift_is_visible_in_the_pixels() -> None:
    digits = load_bundled("digits").drop(columns="target")
    shifted = shifted_digits(1000, seed=0).drop(columns="target")
    assert (shifted > 0).mean().mean() > (digits > 0).mean().mean() + 0.2  # strokes, noise
    assert (shifted.mean() - digits.mean()).abs().mean() > 0.5  # every pixel's mean moved


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": ["blur"]}, "unknown shift"),
        ({"classes": [3, 12]}, r"classes \[12\] are not digits"),
        ({"n_rows": 0}, "at least one row"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message) -> None:
    with pytest.raises(DataError, match=message):
        shifted_digits(**{"n_rows": 10, "seed": 0, **kwargs})


def test_command_writes_the_stream(tmp_path, capsys) -> None:
    out = tmp_path / "stream.csv"
    argv = ["shifted-digits", str(out), "--rows", "40", "--seed", "5", "--classes", "5", "6"]
    assert main(argv) == 0
    table = pd.read_csv(out)
    pd.testing.assert_frame_equal(table, shifted_digits(40, 5, classes=[5, 6]), check_exact=False)
    assert "wrote 40 shifted digits" in capsys.readouterr().out
    assert main(["shifted-digits", str(tmp_path / "s.parquet"), "--rows", "3", "--no-label"]) == 0
    assert "target" not in pd.read_parquet(tmp_path / "s.parquet").columns
    assert main(["shifted-digits", str(tmp_path / "s.txt"), "--rows", "3"]) == 3
    assert not (tmp_path / "s.txt").exists()
