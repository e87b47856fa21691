"""The model the pipeline ships against scikit-learn's baselines, per seed: issue 13's targets.

For each configuration (the repository's ``params.yaml``, and the documented fragments under
``examples/``), per seed, this runs the pipeline's own stages in a scratch folder and prints, side
by side: the trackflow model's target test accuracy, every scikit-learn baseline the evaluate stage
fitted on the same rows, an ensemble's members and gain (when ``train.ensemble`` has several), and
for configurations with a source task the anomaly AUROC on classes the model never saw (the
shipped detector, every detector, and a kNN on the raw features as the reference) and on the worst
corruption. Medians over the seeds; the wall time of the stages.

    python bench/model_quality.py                               # every configuration, 3 seeds
    python bench/model_quality.py --configs default --seeds 42     # one
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import yaml
from common import REPO, add_overrides_option, parse_overrides, run, scratch
from detectors import raw_knn_auroc

EXAMPLES = REPO / "examples"
CONFIGS = ("default", "digits_cnn", "digits_10_classes", "breast_cancer", "wine")


def overrides_of(config: str) -> dict[str, Any]:
    """Dotted params overrides of a configuration: none for ``default``, else its example file."""
    if config == "default":
        return {}
    from trackflow.config import flatten

    fragment = yaml.safe_load((EXAMPLES / f"{config}.yaml").read_text())
    return flatten(fragment)


def measure(overrides: dict[str, Any]) -> dict[str, Any]:
    """One seed of one configuration, in a scratch folder: every number of the table."""
    from trackflow.config import load_params
    from trackflow.io import read_json

    row: dict[str, Any] = {}
    with scratch(overrides):
        params = load_params("params.yaml")
        has_source = params.data.source_classes is not None
        stages = ["ingest", "split", "preprocess", *(["pretrain"] if has_source else []), "train"]
        row["seconds: train (cold, stages up to train)"] = run(*stages)
        run("evaluate")
        evaluation = read_json("plots/evaluate/all_metrics.json")
        row["trackflow model"] = evaluation["test"]["accuracy"]
        for name, value in evaluation.get("baseline", {}).items():
            row[f"scikit-learn {name}"] = value
        test = evaluation["test"]
        if "ensemble_gain" in test:
            row["ensemble: best member"] = test["best_member_accuracy"]
            row["ensemble: gain over the best member"] = test["ensemble_gain"]
        if has_source:
            run("anomaly")
            headline = read_json("metrics/anomaly.json")
            detectors = read_json("plots/anomaly/all_metrics.json")
            row["detector shipped: unseen classes"] = headline["auroc_real"]
            row["detector shipped: worst corruption"] = headline["auroc_worst_corruption"]
            for name in sorted(detectors):
                auroc = detectors[name]["source_classes"]["auroc"]
                row[f"detector {name}: unseen classes"] = auroc
            row["reference: kNN on raw features: unseen classes"] = raw_knn_auroc()["real"]
            row["shipped"] = headline["detector"]
    return row


def print_table(config: str, seeds: list[int], rows: list[dict[str, Any]]) -> None:
    """Medians and per-seed values, and whether the model is at least every baseline."""
    print(f"\n{config}: seeds {' '.join(map(str, seeds))}")
    print(f"  {'':<58}{'median':>8}  per seed")
    for key in (k for k in rows[0] if k != "shipped"):
        values = [row.get(key, float("nan")) for row in rows]
        print(
            f"  {key:<58}{statistics.median(values):>8.4f}  " + " ".join(f"{v:.4f}" for v in values)
        )
    if "shipped" in rows[0]:
        print(
            f"  {'detector shipped, per seed':<58}{'':>8}  " + " ".join(r["shipped"] for r in rows)
        )
    model = statistics.median(row["trackflow model"] for row in rows)
    baselines = [k for k in rows[0] if k.startswith("scikit-learn")]
    beaten = [k for k in baselines if statistics.median(row[k] for row in rows) > model]
    verdict = "every baseline" if not beaten else "below " + ", ".join(beaten)
    print(f"  trackflow model (median {model:.4f}) is at least {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    add_overrides_option(parser, "--set", "params overrides for every configuration")
    args = parser.parse_args()
    extra = parse_overrides(args.set)
    for config in args.configs:
        rows = [
            measure({"base.seed": seed, **overrides_of(config), **extra}) for seed in args.seeds
        ]
        print_table(config, args.seeds, rows)


if __name__ == "__main__":
    main()
