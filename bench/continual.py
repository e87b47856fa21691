"""Continued training against retraining from scratch, on a shifted stream: issue 15's targets.

Per seed, in a scratch folder, through the pipeline's own stages: a champion is trained on the
bundled digits (ingest ... train, anomaly, register: the first model passing the floors becomes
champion, with its record of the rows it saw). A shifted stream of target-class digits
(:func:`trackflow.data.shift.shifted_digits`: thicker strokes, a shift, rotations, noise) is cut
into labelled new rows, added as a batch, and held-out shifted test rows, never trained on.
Then the same data version is trained two ways: (a) ``train.mode: continue`` (the champion's
network on the batch's training rows plus a replay of ``train.replay_fraction`` of the rows it
saw, at ``train.continue_lr``) and (b) ``train.mode: scratch`` on the union.

Printed, side by side, medians over the seeds and each seed's value: accuracy on the original
test rows and on the shifted test rows, before (the champion) and after; the recovered share of
the drop the shift caused, ``(new_after - new_before) / (old_before - new_before)``; forgetting,
``old_before - old_after``; the train stage's wall time and epochs; and whether the register
stage's gate (``promotion.*``, forgetting rule included) promotes the first continue variant.
The targets: continue recovers at least 90% of the drop and forgets at most
``promotion.max_forgetting`` (0.01).

    python bench/continual.py                          # seeds 0 1 2, the repository's params
    python bench/continual.py --quick --seeds 0        # 3 epochs everywhere: the wiring only
    python bench/continual.py --set train.replay_fraction=1.0 train.continue_lr=0.0005
    python bench/continual.py --variants "" train.continue_lr=0.003   # two continue runs per seed
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from common import add_overrides_option, parse_overrides, run, scratch, set_params

QUICK = {"pretrain.max_epochs": 3, "train.max_epochs": 3}
TARGET_RECOVERED = 0.9  # the issue's: share of the drop recovered by the promoted model
STREAM_SEED = 1000  # the shifted stream of seed s is drawn with seed STREAM_SEED + s


def shifted_stream(seed: int, n_new: int, n_test: int, classes: list[int]) -> tuple[Any, Any]:
    """Labelled new rows and held-out shifted test rows: one draw, cut in two (no row in both)."""
    from trackflow.data.shift import shifted_digits

    stream = shifted_digits(n_new + n_test, seed=STREAM_SEED + seed, classes=classes)
    return stream.iloc[:n_new].reset_index(drop=True), stream.iloc[n_new:].reset_index(drop=True)


def accuracy(rows: Any, label: str) -> float:
    """Accuracy of the train stage's ``models/model.pt`` on raw labelled ``rows``."""
    import joblib
    import numpy as np

    from trackflow.learn.networks import load_classifier, predict_proba

    preprocessor = joblib.load("models/preprocessor.joblib")
    network, meta = load_classifier("models/model.pt")
    features = preprocessor.transform(rows.drop(columns=label))
    predicted = np.asarray(meta["classes"])[predict_proba(network, features).argmax(axis=1)]
    return float((predicted == rows[label].to_numpy()).mean())


def train_timed(folder: Path, settings: dict[str, Any]) -> tuple[float, int]:
    """Run the train stage with ``settings`` (params overrides); wall seconds and epochs run."""
    from trackflow.io import read_json

    set_params(folder, settings)
    seconds = run("train")
    return seconds, int(read_json("metrics/train.json")["epochs"])


def measure(
    seed: int, overrides: dict[str, Any], variants: list[dict[str, Any]], n_new: int, n_test: int
) -> dict[str, Any]:
    """One seed: the champion, then each variant of continue, then scratch, on the data with
    the batch added."""
    import joblib

    from trackflow.config import flatten_params, load_params
    from trackflow.io import read_json, read_table, write_table

    row: dict[str, Any] = {}
    with scratch({"base.seed": seed, "data.batches": "batches", **overrides}) as folder:
        (folder / "batches").mkdir()
        params = load_params("params.yaml")
        label = params.data.label_column
        start = time.perf_counter()
        run("ingest", "split", "preprocess", "pretrain", "train", "anomaly", "register")
        row["seconds: champion (every stage to register)"] = time.perf_counter() - start
        if not read_json("models/registered.json")["promoted"]:
            raise SystemExit(f"seed {seed}: the first model was not promoted; see the gate")
        old_test = read_table("data/split/target_test.parquet")
        new_rows, new_test = shifted_stream(seed, n_new, n_test, params.data.target_classes)
        before = {"old": accuracy(old_test, label), "new": accuracy(new_test, label)}
        fitted = joblib.load("models/preprocessor.joblib")

        write_table(new_rows, folder / "batches/001-shifted.parquet")
        run("ingest", "split", "preprocess")
        after_batch = joblib.load("models/preprocessor.joblib")
        rows = old_test.drop(columns=label)
        same = (fitted.transform(rows) == after_batch.transform(rows)).all().all()
        row["preprocessor unchanged by the batch"] = float(same)
        row["champion: old test rows"] = before["old"]
        row["champion: shifted test rows"] = before["new"]
        defaults = flatten_params(params)
        runs = [(variant_name(v), {"train.mode": "continue", **v}) for v in variants]
        runs.append(("scratch", {"train.mode": "scratch"}))
        found = {}
        for name, settings in [*runs[1:], runs[0]]:  # the first continue last: the gate judges it
            seconds, epochs = train_timed(folder, settings)
            set_params(folder, {key: defaults[key] for key in settings})  # for the next one
            found[name] = scores(before, old_test, new_test, label) | {
                "seconds, train stage": seconds,
                "epochs": epochs,
            }
            if name.startswith("continue"):
                run_id = read_json("models/train_run.json")["run_id"]
                found[name]["rows new/replayed"] = _rows_trained(run_id)
        run("anomaly", "register")
        registered = read_json("models/registered.json")
        found[runs[0][0]]["promoted by the gate (1 = yes)"] = float(registered["promoted"])
        print(f"seed {seed}, {runs[0][0]}: {registered['decision']}: {registered['reason']}")
        for name, _ in runs:
            row |= {f"{name}: {key}": value for key, value in found[name].items()}
    return row


def scores(before: dict[str, float], old_test: Any, new_test: Any, label: str) -> dict[str, float]:
    """The train stage's model on the old and shifted test rows, against the champion's."""
    after = {"old": accuracy(old_test, label), "new": accuracy(new_test, label)}
    drop = before["old"] - before["new"]
    return {
        "old test rows": after["old"],
        "shifted test rows": after["new"],
        "recovered share of the drop": (after["new"] - before["new"]) / drop,
        "forgetting (old before - after)": before["old"] - after["old"],
    }


def variant_name(settings: dict[str, Any]) -> str:
    """``continue`` or ``continue lr=0.003``: a variant's name in the table."""
    short = {"train.continue_lr": "lr", "train.replay_fraction": "replay"}
    shown = " ".join(f"{short.get(k, k)}={v}" for k, v in settings.items())
    return f"continue {shown}" if shown else "continue"


def _rows_trained(run_id: str) -> str:
    """``new/replayed`` rows of a continued run, from its tags."""
    from trackflow.config import load_params
    from trackflow.tracking import TAG_PREFIX, setup_tracking

    tracking = setup_tracking(load_params("params.yaml").base.mlflow)
    tags = tracking.client.get_run(run_id).data.tags
    return f"{tags[TAG_PREFIX + 'rows_new']}/{tags[TAG_PREFIX + 'rows_replayed']}"


def print_table(seeds: list[int], rows: list[dict[str, Any]], max_forgetting: float) -> None:
    """Medians and per-seed values, then continue's verdict against the issue's targets."""
    print(f"\nseeds {' '.join(map(str, seeds))}")
    print(f"  {'':<56}{'median':>8}  per seed")
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], str):
            print(f"  {key:<56}{'':>8}  " + " ".join(values))
            continue
        print(
            f"  {key:<56}{statistics.median(values):>8.4f}  " + " ".join(f"{v:.4f}" for v in values)
        )
    names = [k.removesuffix(": epochs") for k in rows[0] if k.endswith(": epochs")]
    for name in names:
        recovered = statistics.median(r[f"{name}: recovered share of the drop"] for r in rows)
        forgetting = statistics.median(r[f"{name}: forgetting (old before - after)"] for r in rows)
        met = recovered >= TARGET_RECOVERED and forgetting <= max_forgetting
        print(
            f"  {name}: recovered {recovered:.1%} (target >= {TARGET_RECOVERED:.0%}), forgot "
            f"{forgetting:+.4f} (target <= {max_forgetting:g}): {'met' if met else 'NOT met'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="3 epochs: the wiring, not quality")
    parser.add_argument("--new-rows", type=int, default=600, help="labelled shifted rows added")
    parser.add_argument("--test-rows", type=int, default=280, help="held-out shifted test rows")
    add_overrides_option(parser, "--set", "params overrides")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[""],
        metavar="KEY=VALUE,...",
        help="continue runs, each with its own params overrides ('' = the params as they are)",
    )
    args = parser.parse_args()
    overrides = {**(QUICK if args.quick else {}), **parse_overrides(args.set)}
    variants = [parse_overrides([i for i in v.split(",") if i]) for v in args.variants]
    rows = [
        measure(seed, overrides, variants, args.new_rows, args.test_rows) for seed in args.seeds
    ]
    from trackflow.config import PromotionConfig

    limit = overrides.get("promotion.max_forgetting", PromotionConfig().max_forgetting)
    print_table(args.seeds, rows, limit)


if __name__ == "__main__":
    main()
