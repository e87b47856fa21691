"""``trackflow`` command line: the pipeline's stages plus tools to inspect params and data."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow import __version__
from trackflow.cli_support import add_params_argument, configure_logging, execute
from trackflow.stages import STAGES


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-command per stage and tool."""
    parser = argparse.ArgumentParser(
        prog="trackflow",
        description="Reproducible MLOps pipeline: DVC stages, Lightning training, MLflow tracking.",
    )
    parser.add_argument("--version", action="version", version=f"trackflow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        module = importlib.import_module(f"trackflow.stages.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = commands.add_parser(
            name, help=f"stage: {summary.split(': ', 1)[-1]}", description=module.__doc__
        )
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)

    for name in _tool_names():
        module = importlib.import_module(f"trackflow.commands.{name}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        # The module lr_find is the command lr-find.
        sub = commands.add_parser(name.replace("_", "-"), help=summary, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)

    params = commands.add_parser(
        "params", help="validate the params file and print it with defaults filled in"
    )
    add_params_argument(params)
    shown = params.add_mutually_exclusive_group()
    shown.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    shown.add_argument(
        "--check",
        action="store_true",
        help="only validate the whole file: exit 0 if valid, 2 with what is wrong otherwise",
    )
    params.set_defaults(handler=_show_params)

    example = commands.add_parser(
        "example-data", help="export a dataset bundled with scikit-learn to CSV or Parquet"
    )
    example.add_argument("name", help="digits, breast_cancer, wine or iris")
    example.add_argument("out", type=Path, help="file to write (.csv or .parquet)")
    example.set_defaults(handler=_export_example)
    return parser


def _tool_names() -> list[str]:
    """Modules of ``trackflow.commands``: each is one sub-command (``add_arguments``, ``run``)."""
    import trackflow.commands

    return sorted(m.name for m in pkgutil.iter_modules(trackflow.commands.__path__))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trackflow`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return execute(args.handler, args)


def _show_params(args: argparse.Namespace) -> None:
    from trackflow.config import load_params, params_schema

    if args.schema:
        print(json.dumps(params_schema(), indent=2))
        return
    import yaml

    params = load_params(args.params)
    if args.check:
        print(f"{args.params} is valid")
        return
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")


def _export_example(args: argparse.Namespace) -> None:
    from trackflow.data.ingest import load_bundled
    from trackflow.errors import DataError
    from trackflow.io import atomic_outputs

    suffix = args.out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise DataError(f"cannot write {str(args.out)!r}: use a .csv or .parquet file name")
    table = load_bundled(args.name)
    with atomic_outputs(args.out) as (staging,):
        if suffix == ".csv":
            table.to_csv(staging, index=False)
        else:
            table.to_parquet(staging, index=False)
    print(f"wrote {len(table)} rows of sklearn:{args.name} to {args.out} (label column 'target')")


if __name__ == "__main__":
    sys.exit(main())
