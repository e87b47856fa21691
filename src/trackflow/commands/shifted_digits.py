"""Write a distribution-shifted stream of labelled digits to CSV or Parquet.

``trackflow shifted-digits stream.csv --rows 600 --seed 1 --classes 5 6 7 8 9`` draws rows of
scikit-learn's bundled digits and writes them thicker, slightly moved and turned, and noisy
(:mod:`trackflow.data.shift`), with their label ``target``: score them (``trackflow score``) to
see the drift, add them (``trackflow add-batch``) to learn it. ``--no-label`` leaves the label out,
as a stream to score arrives.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from trackflow.data.shift import SHIFTS

    parser.add_argument("out", type=Path, help="file to write (.csv or .parquet)")
    parser.add_argument("--rows", type=int, required=True, help="rows to make")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    parser.add_argument(
        "--classes", type=int, nargs="+", help="digits to draw from (default: all ten)"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=tuple(SHIFTS),
        default=tuple(SHIFTS),
        help="shifts to apply (default: all)",
    )
    parser.add_argument(
        "--strength", type=float, default=1.0, help="scale of every shift (default: 1)"
    )
    parser.add_argument("--no-label", action="store_true", help="leave the label column out")


def run(args: argparse.Namespace) -> None:
    from trackflow.data.shift import LABEL_COLUMN, shifted_digits
    from trackflow.errors import DataError
    from trackflow.io import atomic_outputs

    suffix = args.out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DataError(f"cannot write {str(args.out)!r}: use a .csv or .parquet file name")
    table = shifted_digits(args.rows, args.seed, args.kinds, args.strength, args.classes)
    if args.no_label:
        table = table.drop(columns=LABEL_COLUMN)
    with atomic_outputs(args.out) as (staging,):
        if suffix == ".csv":
            table.to_csv(staging, index=False)
        else:
            table.to_parquet(staging, index=False)
    labels = "" if args.no_label else f", label column {LABEL_COLUMN!r}"
    print(
        f"wrote {len(table)} shifted digits ({', '.join(args.kinds)}, strength {args.strength:g}, "
        f"seed {args.seed}{labels}) to {args.out}"
    )
