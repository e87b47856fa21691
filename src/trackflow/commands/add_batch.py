"""Add a CSV/Parquet of new labelled rows to the dataset, as a new data version tracked by DVC.

``trackflow add-batch new.csv [--name shifted]`` reads the file as ingest reads ``data.source``
(same checks, same messages), checks it against the dataset's columns and classes (those of
``--dataset``, the ingested table, or of ``data.source`` when it was not ingested yet), leaves out
rows the dataset or an earlier batch already holds, and writes the rest as
``<data.batches>/<NNN>-<name>.parquet`` (NNN: the next number, so names sort in the order added),
then runs ``dvc add`` on it. All or nothing: a refused batch, or a failing ``dvc add``, leaves the
folder as it was. The ingest stage appends every batch to the source's rows; ``dvc repro``
retrains. To remove a batch, delete its ``.parquet`` and ``.parquet.dvc`` files.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import TYPE_CHECKING

from trackflow.cli_support import add_params_argument

if TYPE_CHECKING:
    import pandas as pd

    from trackflow.config import DataConfig

_NUMBERED = re.compile(r"(\d{3,})-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="table of new labelled rows (.csv or .parquet)")
    parser.add_argument("--name", help="the batch's name (default: the file's stem)")
    add_params_argument(parser)
    parser.add_argument(
        "--dataset",
        type=Path,
        default=Path("data/ingested/dataset.parquet"),
        help="ingested dataset the batch must fit (default: %(default)s; if absent, data.source)",
    )


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.errors import ConfigError, DataError

    config = load_params(args.params).data
    if config.batches is None:
        raise ConfigError(
            f"data.batches is null in {args.params}: set it to the folder batches go in "
            "(data/batches) to add one"
        )
    folder = Path(config.batches)
    root = dvc_root(folder)
    if not args.file.is_file():
        raise DataError(f"batch file {str(args.file)!r} does not exist")
    batch, known = new_rows(args.file, args.dataset, config)
    path = folder / f"{next_number(folder):03d}-{batch_stem(args.name or args.file.stem)}.parquet"
    add_tracked(batch, path, root)
    report(batch, known, path, config.label_column)


def new_rows(file: Path, dataset: Path, config: DataConfig) -> tuple[pd.DataFrame, int]:
    """The file's rows, checked, without those already in the dataset or an earlier batch.

    Returns:
        The canonical batch and how many of the file's rows were left out as already known.

    Raises:
        DataError: As ingest would for the file; columns or classes that differ from the
            dataset's; every row already known.
    """
    from trackflow.data.ingest import (
        check_batch,
        handle_index_column,
        read_batches,
        read_canonical,
        read_source,
        row_keys,
        to_canonical,
    )
    from trackflow.errors import DataError
    from trackflow.io import read_table

    label = config.label_column
    raw = handle_index_column(read_source(str(file), config.separator), label, config.index_column)
    batch, _ = to_canonical(raw, label, config.non_finite, min_classes=1)
    reference = read_table(dataset) if dataset.is_file() else read_canonical(config)[0]
    batch = check_batch(batch, reference, label)
    known = set(row_keys(reference, label))
    for earlier in read_batches(config, reference).values():
        known |= set(row_keys(earlier, label))
    is_known = row_keys(batch, label).isin(known).to_numpy()
    if is_known.all():
        raise DataError(
            f"every row of {str(file)!r} ({len(batch)}) is already in the dataset or an earlier "
            "batch: nothing added"
        )
    kept = batch[~is_known].reset_index(drop=True).rename_axis("row_id")
    return kept, int(is_known.sum())


def dvc_root(folder: Path) -> Path:
    """The DVC repository ``folder`` is in (the nearest folder above it holding ``.dvc/``).

    Raises:
        ConfigError: It is in none.
    """
    from trackflow.errors import ConfigError

    where = folder.resolve()
    for candidate in (where, *where.parents):
        if (candidate / ".dvc").is_dir():
            return candidate
    raise ConfigError(
        f"{str(folder)!r} (data.batches) is not inside a DVC repository, so the batch could not "
        "be tracked: run trackflow add-batch in the project (where `dvc init` was run), or set "
        "data.batches to a folder in it"
    )


def next_number(folder: Path) -> int:
    """One more than the highest ``NNN-`` number of a batch in ``folder`` (1 if none)."""
    numbers = [
        int(match.group(1))
        for path in (folder.iterdir() if folder.is_dir() else ())
        if (match := _NUMBERED.match(path.name))
    ]
    return max(numbers, default=0) + 1


def batch_stem(name: str) -> str:
    """``name`` as a safe file-name part: letters, digits, ``_``, ``.`` and ``-`` only."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "batch"


def add_tracked(batch: pd.DataFrame, path: Path, root: Path) -> None:
    """Write ``batch`` to ``path`` and ``dvc add`` it; on any failure leave the folder as it was.

    Raises:
        DataError: ``path`` appeared meanwhile (another batch added at the same time), or ``dvc
            add`` failed (its message is kept).
    """
    import subprocess
    import sys

    from trackflow.errors import DataError

    folder = path.parent
    created = not folder.exists()
    ignore = folder / ".gitignore"
    ignored = ignore.read_bytes() if ignore.is_file() else None
    folder.mkdir(parents=True, exist_ok=True)
    try:
        try:
            with path.open("xb") as handle:
                batch.to_parquet(handle, index=False)
        except FileExistsError:
            raise DataError(f"{path} appeared while adding the batch; try again") from None
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "add", str(path.resolve())],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode:
            said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            errors = [line for line in said if line.startswith("ERROR")] or said[-1:]
            why = " ".join(errors) or f"exit status {done.returncode}"
            raise DataError(f"`dvc add {path}` failed, nothing added: {why}")
    except BaseException:
        _restore(path, ignore, ignored, folder if created else None)
        raise


def _restore(path: Path, ignore: Path, ignored: bytes | None, created: Path | None) -> None:
    """Undo :func:`add_tracked`: its files gone, ``.gitignore`` as it was."""
    for written in (path, path.with_name(path.name + ".dvc")):
        written.unlink(missing_ok=True)
    if ignored is None:
        ignore.unlink(missing_ok=True)
    else:
        ignore.write_bytes(ignored)
    if created is not None and not any(created.iterdir()):
        created.rmdir()


def report(batch: pd.DataFrame, known: int, path: Path, label: str) -> None:
    """What was added, and the next step."""
    counts = batch[label].value_counts().sort_index()
    classes = ", ".join(f"{k}: {v}" for k, v in counts.items())
    left_out = f"; {known} rows already in the dataset left out" if known else ""
    tracker = path.with_name(path.name + ".dvc")
    print(f"added batch {path.stem}: {len(batch)} rows (classes {classes}){left_out}")
    print(f"  -> {path}, tracked by DVC in {tracker}")
    print(
        f"next: `git add {tracker} {path.parent / '.gitignore'}` to version it, then `dvc repro` "
        "to retrain on the dataset with it (`dvc push` to share its data)"
    )
