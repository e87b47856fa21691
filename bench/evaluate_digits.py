"""The deep model against scikit-learn on 10-class digits, and anomaly detectors' AUROC.

Part 1: all ten classes (no transfer), PCA off, a CNN backbone (64 and 128 channels) trained from
scratch; test accuracy
next to scikit-learn's logistic regression, SVC and MLP fitted on the same preprocessed rows by the
evaluate stage. Part 2: the default transfer split (model of digits 5-9); AUROC of every detector
with the source classes (digits 0-4) as anomalies, next to a kNN on the raw features.
Each part runs the pipeline's own stages per seed, in a scratch folder; medians are printed.

    python bench/evaluate_digits.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import add_overrides_option, parse_overrides, run, scratch

TEN_CLASSES = {
    "data.source_classes": None,
    "data.target_classes": None,
    "preprocess.pca.n_components": None,
    "model.backbone": "cnn",
    "model.channels": [64, 128],
    "model.dropout": 0.2,
    "train.mode": "scratch",
    "train.backbone": None,
    "train.batch_size": 32,
    "train.weight_decay": 0.0001,
    "train.max_epochs": 100,
    "train.early_stopping_patience": 20,
}


def raw_knn_auroc() -> float:
    """kNN on raw (unscaled) features: target training rows; target vs. source test rows."""
    from trackflow.io import read_table
    from trackflow.learn.anomaly import KNNDetector, detection_metrics

    def raw(name: str) -> np.ndarray:
        return read_table(f"data/split/{name}.parquet").drop(columns="target").to_numpy()

    detector = KNNDetector(n_neighbors=5).fit(raw("target_train"))
    normal, anomalous = (
        detector.score_samples(raw("target_test")),
        detector.score_samples(raw("source_test")),
    )
    return detection_metrics(normal, anomalous, threshold=-np.inf)["auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_overrides_option(parser, "--set", "part 1 params")
    add_overrides_option(parser, "--set-anomaly", "part 2 params")
    args = parser.parse_args()
    from trackflow.io import read_json

    accuracy: dict[str, list[float]] = {}
    auroc: dict[str, list[float]] = {}
    for seed in args.seeds:
        with scratch({"base.seed": seed, **TEN_CLASSES, **parse_overrides(args.set)}):
            run("ingest", "split", "preprocess", "train", "evaluate")
            metrics = read_json("plots/evaluate/all_metrics.json")
            accuracy.setdefault("trackflow CNN (scratch)", []).append(metrics["test"]["accuracy"])
            for name, value in metrics["baseline"].items():
                accuracy.setdefault(f"scikit-learn {name}", []).append(value)
        with scratch({"base.seed": seed, **parse_overrides(args.set_anomaly)}):
            run("ingest", "split", "preprocess", "pretrain", "train", "anomaly")
            for name, per_kind in read_json("plots/anomaly/all_metrics.json").items():
                auroc.setdefault(name, []).append(per_kind["source_classes"]["auroc"])
            auroc.setdefault("reference: kNN on raw features", []).append(raw_knn_auroc())
    print(f"\n10-class digits, test accuracy, seeds {args.seeds} (medians)")
    for name, values in accuracy.items():
        print(
            f"  {name:<36}{statistics.median(values):.4f}   " + " ".join(f"{v:.4f}" for v in values)
        )
    print(f"\nanomaly AUROC, digits 0-4 as anomalies for a model of 5-9, seeds {args.seeds}")
    for name, values in auroc.items():
        print(
            f"  {name:<36}{statistics.median(values):.4f}   " + " ".join(f"{v:.4f}" for v in values)
        )


if __name__ == "__main__":
    main()
