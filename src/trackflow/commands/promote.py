"""Gate a registered version against the champion and promote it if it wins, or roll back.

``trackflow promote`` gates the current ``challenger`` (or ``--version N``) exactly as the register
stage does: both it and the ``champion`` are re-scored on the pinned test rows of ``--splits`` that
neither was trained on. Where the gate cannot compare them (too few such rows, no record of the
champion's training rows, other columns), a person who has looked can promote the version with
``--force --reason "..."``: the floors still apply and the ledger records who and why.
``trackflow promote --rollback`` moves ``champion`` back to the version it replaced. All append to
the model's ledger (``trackflow history``). A version that cannot be loaded or cannot score the rows
is refused in one line, with nothing moved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trackflow.cli_support import add_params_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--name", help="registered model (default: params model.name)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--version", help="version to gate (default: the challenger)")
    what.add_argument("--rollback", action="store_true", help="return champion to the previous one")
    parser.add_argument(
        "--splits",
        type=Path,
        default=Path("data/split"),
        help="split folder (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="promote --version without comparing with the champion (the floors still apply)",
    )
    parser.add_argument("--reason", help="why (recorded with a rollback or --force)")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.errors import ConfigError
    from trackflow.io import require_inputs
    from trackflow.registry.gate import build_gate_set
    from trackflow.registry.promotion import (
        CHALLENGER,
        CHAMPION,
        alias_version,
        promote_if_better,
        registry_errors,
        rollback,
    )
    from trackflow.tracking import setup_tracking

    if args.force and not (args.version and args.reason):
        raise ConfigError(
            "--force needs --version N and --reason saying why (it goes in the ledger)"
        )
    params = load_params(args.params)
    name = args.name or params.model.name
    tracking = setup_tracking(params.base.mlflow)
    with registry_errors(name):
        if args.rollback:
            why = args.reason or "manual rollback"
            entry = rollback(tracking, name, why, params.promotion.lock_timeout_s)
            print(f"{name}@{CHAMPION}: version {entry.previous} -> {entry.version} (rollback)")
            return
        version = args.version or alias_version(tracking.client, name, CHALLENGER)
        if version is None:
            raise ConfigError(f"{name} has no challenger; name one with --version")
        require_inputs(args.splits / "summary.json", made_by="split")
        gate_set = build_gate_set(args.splits, params)
        decision = promote_if_better(
            tracking,
            name,
            str(version),
            gate_set,
            params.promotion,
            params.base.seed,
            force=args.reason if args.force else None,
        )
    print(f"{name} version {version}: {'promoted' if decision.promote else 'not promoted'}")
    print(f"  {decision.reason}")
