"""Anomaly detectors on classes the model never saw, next to a plain kNN on the raw features.

For each seed and each model configuration (the default MLP on PCA components, and a CNN on the
pixels with PCA off), the pipeline's own stages run in a scratch folder up to ``anomaly``; the
AUROC of every detector is read from ``plots/anomaly/all_metrics.json``: on the source classes
(digits 0-4, for a model of digits 5-9) and on the corruption it detects worst. ``saved`` is the
detector the stage kept (``anomaly.detector: best``, chosen on validation rows only). The
reference, plain kNN (5 neighbours) on the raw features, is fitted here on the same rows.
Medians over the seeds, then each seed's value.

    python bench/detectors.py --seeds 42 43 44 [--configs mlp cnn]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from common import add_overrides_option, parse_overrides, run, scratch

CONFIGS = {
    "mlp": ("mlp on PCA (default)", {}),
    "cnn": ("cnn, PCA off", {"model.backbone": "cnn", "preprocess.pca.n_components": None}),
}
REFERENCE = "reference: kNN on raw features"


def raw_knn_auroc() -> dict[str, float]:
    """Plain kNN on the raw features of this folder's split: AUROC on the source classes and on
    the worst corruption, with the anomaly stage's own test anomalies."""
    from trackflow.config import load_params
    from trackflow.io import read_json, read_table
    from trackflow.learn import anomaly as an

    params = load_params("params.yaml")
    parts = read_json("data/split/summary.json")["parts"]
    raw = {name: read_table(f"data/split/{name}.parquet") for name in parts}
    sets = an.anomaly_sets(raw, params.data.label_column, params.anomaly, params.base.seed)
    detector = an.KNNDetector(n_neighbors=5).fit(sets.train.to_numpy())
    normal = detector.score_samples(sets.test.to_numpy())
    auroc = {
        kind: an.detection_metrics(normal, detector.score_samples(x.to_numpy()), -np.inf)["auroc"]
        for kind, x in sets.test_anomalies.items()
    }
    return {"real": auroc.pop("source_classes"), "worst": min(auroc.values())}


def measure(seed: int, overrides: dict) -> dict[str, dict[str, float]]:
    """AUROC (real, worst corruption) per detector, the saved one (and its name), the reference."""
    from trackflow.io import read_json

    with scratch({"base.seed": seed, **overrides}):
        run("ingest", "split", "preprocess", "pretrain", "train", "anomaly")
        found = {}
        for name, per_kind in read_json("plots/anomaly/all_metrics.json").items():
            corruptions = [
                v["auroc"] for k, v in per_kind.items() if k not in ("source_classes", "all")
            ]
            found[name] = {"real": per_kind["source_classes"]["auroc"], "worst": min(corruptions)}
        headline = read_json("metrics/anomaly.json")
        found["saved"] = {
            "real": headline["auroc_real"],
            "worst": headline["auroc_worst_corruption"],
            "name": headline["detector"],
        }
        found[REFERENCE] = raw_knn_auroc()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    add_overrides_option(parser, "--set", "params (every configuration)")
    args = parser.parse_args()
    for label, overrides in (CONFIGS[name] for name in args.configs):
        runs = [measure(seed, {**overrides, **parse_overrides(args.set)}) for seed in args.seeds]
        saved = ", ".join(r["saved"].pop("name") for r in runs)
        print(f"\n{label}: test AUROC, seeds {args.seeds}; saved: {saved}")
        print(f"  {'detector':<34}{'unseen classes: median, per seed':<40}worst corruption")
        for name in runs[0]:
            real, worst = ([r[name][key] for r in runs] for key in ("real", "worst"))
            print(
                f"  {name:<34}{statistics.median(real):.4f}  "
                + " ".join(f"{v:.4f}" for v in real)
                + f"{'':<8}{statistics.median(worst):.4f}  "
                + " ".join(f"{v:.4f}" for v in worst)
            )


if __name__ == "__main__":
    main()
