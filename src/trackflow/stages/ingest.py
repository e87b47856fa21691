"""Ingest: read the source and the added batches into the canonical table and its profile.

Writes ``<out>/dataset.parquet`` (features then label, index = row ids: the source's rows 0..N-1,
then every batch under ``data.batches`` in the order added), ``<out>/profile.json`` (columns,
dtypes, per-feature statistics, class counts, digest; the batches' names, rows and digests) and
``<out>/origins.parquet`` (each row id's origin: ``original`` or its batch's name). Nothing is
written if the data is refused.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.cli_support import add_params_argument, stage_main

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.data.batches import ORIGINS_FILE
    from trackflow.data.ingest import ingest
    from trackflow.io import atomic_outputs, write_json, write_table

    params = load_params(args.params)
    source = params.data.source
    if not source.startswith("sklearn:") and not Path(source).resolve().is_relative_to(
        Path("data/raw").resolve()
    ):
        log.warning(
            "%s is outside data/raw/: dvc.yaml does not track it, so `dvc repro` will not notice "
            "when it changes. Move it under data/raw/ and `dvc add` it",
            source,
        )
    table, profile, origins = ingest(params.data)
    with atomic_outputs(args.out) as (staging,):
        staging.mkdir()
        write_table(table, staging / "dataset.parquet")
        write_json(profile, staging / "profile.json")
        write_table(origins.to_frame(), staging / ORIGINS_FILE)
    batches = profile.get("batches", [])
    log.info(
        "ingested %s%s: %d rows, %d features, %d classes, digest %s -> %s",
        profile["source"],
        f" and {len(batches)} batches ({sum(b['rows'] for b in batches)} rows)" if batches else "",
        profile["n_rows"],
        profile["n_features"],
        len(profile["class_counts"]),
        profile["digest"],
        args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
