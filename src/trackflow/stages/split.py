"""Split: stratified, seeded train/val/test parts for the source and target tasks.

Writes ``<out>/{source,target}_{train,val,test}.parquet`` (the source parts only when
``data.source_classes`` is set), ``<out>/origins.parquet`` (the origin of every row id in them:
``original`` or an added batch's name) and ``<out>/summary.json`` with row and class counts per
part, rows per origin in each part, the added batches, and the digest of the dataset they came
from. The original rows are split as if there were no batches; each batch on its own, appended.
The origins are read from ``origins.parquet`` beside the dataset (none there: all original).
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
    from trackflow.data.batches import ORIGINS_FILE, read_origins
    from trackflow.data.ingest import batch_records, table_digest
    from trackflow.data.split import origin_counts, part_origins, split_table, summarize
    from trackflow.io import atomic_outputs, read_table, write_json, write_table

    params = load_params(args.params)
    label = params.data.label_column
    require_inputs(args.dataset, made_by="ingest")
    table = read_table(args.dataset)
    origins = read_origins(args.dataset.parent)
    parts = split_table(table, label, params.data, params.split, params.base.seed, origins)
    kept = part_origins(parts, origins)
    summary = {
        "dataset_digest": table_digest(table),
        "parts": summarize(parts, label),
        "origins": origin_counts(parts, kept),
        "batches": batch_records(table, origins),
    }
    with atomic_outputs(args.out) as (staging,):
        staging.mkdir()
        for name, part in parts.items():
            write_table(part, staging / f"{name}.parquet")
        write_json(summary, staging / "summary.json")
        write_table(kept.to_frame(), staging / ORIGINS_FILE)
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
