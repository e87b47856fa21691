"""Register: package the candidate as the challenger; promote it if it beats the champion.

Logs preprocessor + network + anomaly detector to the candidate's run as one pyfunc model that
scores raw rows, registers it as a new version of ``model.name`` with the alias ``challenger`` and
the lineage tags (git, params digest, DVC hashes from ``--lock``), then runs the gate
(``promotion.*``): the challenger and the current ``champion`` are scored on the same pinned test
rows (the target test split plus held-out anomalies), less any row either was trained or
early-stopped on, and ``champion`` moves only if the challenger passes the floors and beats it with
statistical support; when the split holds rows of labelled batches added later
(``origins.parquet``), it must beat it on those new rows and may lose at most
``promotion.max_forgetting`` on the original data's rows. The digests of the candidate's training
and validation rows (every part of ``--splits`` but the test parts) are logged to its run as
``gate/seen_rows.json`` for later gates. Writes ``--out`` (version, decision and every number of
the gate under ``gate``) and ``--metrics`` (what ``dvc metrics show`` prints: whether it was
promoted, the difference on the primary metric, its statistical support and the forgetting on
the original rows). The challenger is scored before anything is registered, so a candidate that
cannot score its own test rows changes nothing in the registry.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from trackflow.cli_support import add_params_argument, stage_main
from trackflow.io import require_inputs

log = logging.getLogger(__name__)

HEADLINE = ("gate/promoted", "gate/delta", "gate/p_value", "gate/ci_low", "gate/forgetting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_argument(parser)
    parser.add_argument("--splits", type=Path, required=True, help="folder written by split")
    parser.add_argument("--preprocessor", type=Path, required=True, help="fitted preprocessor")
    parser.add_argument("--model", type=Path, required=True, help="target model (train stage)")
    parser.add_argument("--detector", type=Path, required=True, help="anomaly stage's detector")
    parser.add_argument("--run", type=Path, required=True, help="train stage's run JSON file")
    parser.add_argument("--lock", type=Path, default=Path("dvc.lock"), help="DVC lock file")
    parser.add_argument("--out", type=Path, required=True, help="registration JSON to write")
    parser.add_argument("--metrics", type=Path, required=True, help="gate headline JSON file")


def run(args: argparse.Namespace) -> None:
    from trackflow.config import load_params
    from trackflow.io import atomic_outputs, read_json, read_table, write_json
    from trackflow.registry.gate import build_gate_set, evaluate, seen_rows
    from trackflow.registry.lineage import dvc_hashes, training_lineage
    from trackflow.registry.packaging import Scorer, log_packaged_model
    from trackflow.registry.promotion import (
        Contender,
        alias_version,
        promote_if_better,
        record_seen_rows,
        register_candidate,
    )
    from trackflow.tracking import set_tags, setup_tracking

    params = load_params(args.params)
    require_inputs(args.model, args.run, made_by="train")
    require_inputs(args.detector, made_by="anomaly")
    require_inputs(args.preprocessor, made_by="preprocess")
    require_inputs(args.splits / "summary.json", made_by="split")
    label = params.data.label_column
    gate_set = build_gate_set(args.splits, params)
    scorer = Scorer.from_files(args.preprocessor, args.model, args.detector)
    log.info("challenger on the pinned test rows: %s", evaluate(scorer.predict, gate_set).metrics)
    seen = seen_rows(args.splits, label, scorer.columns)

    tracking = setup_tracking(params.base.mlflow)
    run_id = read_json(args.run)["run_id"]
    train_rows = read_table(args.splits / "target_train.parquet").drop(columns=label)
    info = log_packaged_model(
        tracking,
        run_id,
        args.preprocessor,
        args.model,
        args.detector,
        example=gate_set.rows.head(5),
        reference=train_rows,
    )
    hashes = dvc_hashes(args.lock)
    set_tags(tracking, run_id, hashes)  # what training set when it started stays as it was
    record_seen_rows(tracking, run_id, seen)
    lineage = training_lineage(tracking, run_id, params) | hashes
    name = params.model.name
    version = register_candidate(
        tracking,
        name,
        info.model_uri,
        run_id,
        info.model_id,
        lineage,
        params.promotion.lock_timeout_s,
    )
    challenger = Contender(name, version, "challenger", scorer.predict, scorer.columns, seen)
    decision = promote_if_better(
        tracking, name, version, gate_set, params.promotion, params.base.seed, challenger
    )
    champion = alias_version(tracking.client, name)
    # NaN (not computed) as null: strict JSON for DVC and others
    numbers = {k: None if math.isnan(v) else v for k, v in decision.metrics().items()}
    with atomic_outputs(args.out, args.metrics) as (out, metrics):
        write_json(
            {
                "name": name,
                "version": version,
                "run_id": run_id,
                "model_uri": f"models:/{name}/{version}",
                "logged_model_uri": info.model_uri,
                "promoted": decision.promote,
                "decision": "promoted" if decision.promote else "rejected",
                "reason": decision.reason,
                "champion": champion,
                "test_digest": gate_set.digest,
                "rows": decision.rows,
                "gate": numbers,
            },
            out,
        )
        write_json({k: numbers[k] for k in HEADLINE}, metrics)
    log.info(
        "registered %s version %s (challenger); %s: %s",
        name,
        version,
        "promoted to champion" if decision.promote else "not promoted",
        decision.reason,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
