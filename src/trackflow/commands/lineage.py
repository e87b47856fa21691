"""Print where a registered model came from: data -> preprocessing -> backbone -> run -> aliases.

``trackflow lineage trackflow@champion`` (an alias) or ``trackflow lineage trackflow/3`` (a
version); ``--json`` for the same chain as JSON.
"""

from __future__ import annotations

import argparse

from trackflow.cli_support import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("model", help="NAME@ALIAS or NAME/VERSION (models:/ prefix optional)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> None:
    import json

    from trackflow.config import load_params
    from trackflow.errors import ConfigError
    from trackflow.registry.lineage import format_trace, trace
    from trackflow.registry.promotion import registry_errors
    from trackflow.tracking import setup_tracking

    ref = args.model.removeprefix("models:/")
    name, sep, which = ref.rpartition("@") if "@" in ref else ref.rpartition("/")
    if not (name and sep and which):
        raise ConfigError(f"{args.model!r} is not NAME@ALIAS or NAME/VERSION")
    tracking = setup_tracking(load_params(args.params).base.mlflow)
    with registry_errors(name):
        chain = trace(tracking, name, which)
    print(json.dumps(chain, indent=2) if args.json else format_trace(chain))
