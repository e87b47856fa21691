"""Target test accuracy of fine-tuning, feature extraction and scratch training, with few labels.

Runs the pipeline's own stages (ingest -> split -> preprocess -> pretrain, then train once per
mode) in a temporary folder with its own MLflow store, for several seeds, and prints one table:
median target test accuracy and median wall time of the train stage per mode, next to two
scikit-learn references on the same rows: logistic regression on the preprocessed features, and
on the frozen pretrained backbone's embedding (what feature extraction can reach at best).

    python bench/transfer_modes.py --fraction 0.05 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from common import add_overrides_option, parse_overrides, run, scratch, set_params

MODES = ("finetune", "feature_extraction", "scratch")


def test_accuracy(model: Path) -> float:
    from trackflow.learn.networks import load_classifier, predict_proba
    from trackflow.stages.scoring import labelled_arrays

    network, meta = load_classifier(model)
    x, y = labelled_arrays(Path("data/processed/target_test.parquet"), meta)
    return float((predict_proba(network, x).argmax(axis=1) == y).mean())


def logistic_references() -> dict[str, tuple[float, float]]:
    """Logistic regression on the features and on the frozen embedding: (accuracy, seconds)."""
    from sklearn.linear_model import LogisticRegression

    from trackflow.learn.networks import load_backbone, load_network
    from trackflow.stages.scoring import labelled_arrays

    saved = load_network("models/backbone.pt")
    meta = load_network("models/model.pt")  # the target task's classes and label column
    x_train, y_train = labelled_arrays(Path("data/processed/target_train.parquet"), meta)
    x_test, y_test = labelled_arrays(Path("data/processed/target_test.parquet"), meta)
    backbone = load_backbone(saved, x_train.shape[1], "bench").eval()

    def embed(x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return backbone(torch.tensor(x)).numpy()

    results = {}
    for name, transform in (("logreg on features", lambda x: x), ("logreg on embedding", embed)):
        start = time.perf_counter()
        model = LogisticRegression(max_iter=5000).fit(transform(x_train), y_train)
        results[name] = (model.score(transform(x_test), y_test), time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.05, help="data.target_train_fraction")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_overrides_option(parser)
    args = parser.parse_args()
    names = (*MODES, "logreg on features", "logreg on embedding")
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for seed in args.seeds:
        overrides = {"base.seed": seed, "data.target_train_fraction": args.fraction}
        with scratch(overrides | parse_overrides(args.set)) as folder:
            run("ingest", "split", "preprocess", "pretrain")
            n_rows = len(__import__("pandas").read_parquet("data/processed/target_train.parquet"))
            for mode in MODES:
                set_params(folder, {"train.mode": mode})
                seconds = run("train")
                results[mode].append((test_accuracy(Path("models/model.pt")), seconds))
            for name, result in logistic_references().items():
                results[name].append(result)
    print(
        f"\ntarget task: digits 5-9, {n_rows} labelled training rows "
        f"(target_train_fraction={args.fraction}), seeds {args.seeds}; medians"
    )
    print(f"{'mode':<20}{'test accuracy':>15}{'train s':>15}   per seed")
    for mode, rows in results.items():
        accs = [a for a, _ in rows]
        print(
            f"{mode:<20}{statistics.median(accs):>15.4f}"
            f"{statistics.median(s for _, s in rows):>15.1f}   "
            + " ".join(f"{a:.3f}" for a in accs)
        )


if __name__ == "__main__":
    main()
