"""Split: stratified, seeded train/val/test parts for the source and target tasks.

Writes ``<out>/{source,target}_{train,val,test}.parquet`` (the source parts only when
``data.source_classes`` is set) and ``<out>/summary.json`` with row and class counts per part and
the digest of the dataset they came from.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.cli_support import add_params_argument, stage_main
from trackflow.io import require_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--dataset", type=Path, required=True, help="canonical table (Parquet)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.data.ingest import table_digest
    from trackflow.data.split import split_table, summarize
    from trackflow.io import atomic_outputs, read_table, write_json, write_table

    params = load_params(args.params)
    label = params.data.label_column
    require_inputs(args.dataset, made_by="ingest")
    table = read_table(args.dataset)
    parts = split_table(table, label, params.data, params.split, params.base.seed)
    summary = {"dataset_digest": table_digest(table), "parts": summarize(parts, label)}
    with atomic_outputs(args.out) as (staging,):
        staging.mkdir()
        for name, part in parts.items():
            write_table(part, staging / f"{name}.parquet")
        write_json(summary, staging / "summary.json")
    log.info(
        "split %d rows: %s -> %s",
        len(table),
        ", ".join(f"{name} {len(part)}" for name, part in parts.items()),
        args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
