"""Print a registered model's promotion ledger: every alias move and gate decision.

One row per entry, oldest first: sequence, time, action (challenger, promote, reject, rollback),
alias, version and the one it replaced, run id, reason, git commit, who, and the gate's metrics
(with ``rows_compared`` and ``rows_excluded``: the labelled test rows it scored, and those it left
out because a model had trained on them). Once labelled batches were added, the table also shows
the challenger's accuracy on the original data's rows and on the batches' (``old_accuracy``,
``new_accuracy``) and how much it lost on the original rows against the champion
(``forgetting``).
"""

from __future__ import annotations

import argparse

from trackflow.cli_support import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("name", nargs="?", help="registered model (default: params model.name)")
    parser.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="default: %(default)s"
    )


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.registry.promotion import history_table, ledger, registry_errors
    from trackflow.tracking import setup_tracking

    params = load_params(args.params)
    name = args.name or params.model.name
    tracking = setup_tracking(params.base.mlflow)
    with registry_errors(name):
        table = history_table(ledger(tracking.client, name))
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
    elif args.format == "json":
        print(table.to_json(orient="records", indent=2))
    elif table.empty:
        print(f"{name}: no ledger entries")
    else:
        columns = ["seq", "time", "action", "alias", "version", "previous", "accuracy"]
        columns += ["anomaly_auroc", "rows_compared"]
        columns += [c for c in ("old_accuracy", "new_accuracy", "forgetting") if c in table]
        columns += ["git_commit", "reason"]
        shown = table.reindex(columns=columns)
        shown["git_commit"] = shown["git_commit"].str[:10]
        shown["rows_compared"] = shown["rows_compared"].astype("Int64")  # a count, not 134.0000
        print(shown.to_string(index=False, float_format="{:.4f}".format))
