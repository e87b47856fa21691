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
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MODES = ("finetune", "feature_extraction", "scratch")


def run_stages(folder: Path, params: Path, mode: str | None) -> float:
    """Run the stages up to pretrain (mode None) or train once; return the train stage's seconds."""
    from trackflow.stages import ingest, preprocess, pretrain, split, train

    p = ["--params", str(params)]
    if mode is None:
        steps = [
            (ingest, ["--out", "ingested"]),
            (split, ["--dataset", "ingested/dataset.parquet", "--out", "split"]),
            (
                preprocess,
                [
                    "--splits",
                    "split",
                    "--out",
                    "processed",
                    "--preprocessor",
                    "pre.joblib",
                    "--metrics",
                    "pre.json",
                    "--plots",
                    "plots",
                ],
            ),
            (
                pretrain,
                [
                    "--data",
                    "processed",
                    "--backbone-out",
                    "backbone.pt",
                    "--metrics",
                    "pretrain.json",
                    "--run-out",
                    "pretrain_run.json",
                ],
            ),
        ]
    else:
        steps = [
            (
                train,
                [
                    "--data",
                    "processed",
                    "--backbone",
                    "backbone.pt",
                    "--model-out",
                    f"{mode}.pt",
                    "--metrics",
                    f"{mode}.json",
                    "--run-out",
                    f"{mode}_run.json",
                ],
            )
        ]
    start = time.perf_counter()
    for module, argv in steps:
        if module.main([*p, *argv]) != 0:
            sys.exit(f"{module.__name__} failed")
    return time.perf_counter() - start


def test_accuracy(folder: Path, mode: str) -> float:
    from trackflow.io import read_table
    from trackflow.models import load_classifier

    network, meta = load_classifier(folder / f"{mode}.pt")
    table = read_table(folder / "processed/target_test.parquet")
    label = meta["label_column"]
    x = torch.tensor(table.drop(columns=label).to_numpy(), dtype=torch.float32)
    index = {c: i for i, c in enumerate(meta["classes"])}
    y = torch.tensor(table[label].map(index).to_numpy())
    with torch.no_grad():
        return float((network(x).argmax(1) == y).float().mean())


def logistic_references(folder: Path) -> dict[str, tuple[float, float]]:
    """Logistic regression on the features and on the frozen embedding: (accuracy, seconds)."""
    from sklearn.linear_model import LogisticRegression

    from trackflow.io import read_table
    from trackflow.models import load_backbone, load_network

    train = read_table(folder / "processed/target_train.parquet")
    test = read_table(folder / "processed/target_test.parquet")
    label = train.columns[-1]
    backbone = load_backbone(load_network(folder / "backbone.pt"), train.shape[1] - 1, "bench")

    def embed(table):
        x = torch.tensor(table.drop(columns=label).to_numpy(), dtype=torch.float32)
        with torch.no_grad():
            return backbone.eval()(x).numpy()

    results = {}
    for name, transform in (
        ("logreg on features", lambda t: t.drop(columns=label).to_numpy()),
        ("logreg on embedding", embed),
    ):
        start = time.perf_counter()
        model = LogisticRegression(max_iter=5000).fit(transform(train), train[label])
        results[name] = (model.score(transform(test), test[label]), time.perf_counter() - start)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.05, help="data.target_train_fraction")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra params overrides (YAML values)",
    )
    args = parser.parse_args()
    from trackflow.config import set_dotted

    results: dict[str, list[tuple[float, float]]] = {
        name: [] for name in (*MODES, "logreg on features", "logreg on embedding")
    }
    n_rows = None
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            raw = yaml.safe_load((REPO / "params.yaml").read_text())
            overrides = {
                "base.seed": seed,
                "data.target_train_fraction": args.fraction,
                "base.mlflow.tracking_uri": f"sqlite:///{folder}/mlflow.db",
            }
            overrides |= {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
            for key, value in overrides.items():
                set_dotted(raw, key, value)
            params = folder / "params.yaml"
            params.write_text(yaml.safe_dump(raw))
            import os

            os.chdir(folder)
            run_stages(folder, params, None)
            from trackflow.io import read_table

            n_rows = len(read_table(folder / "processed/target_train.parquet"))
            for mode in MODES:
                raw["train"]["mode"] = mode
                params.write_text(yaml.safe_dump(raw))
                seconds = run_stages(folder, params, mode)
                results[mode].append((test_accuracy(folder, mode), seconds))
            for name, result in logistic_references(folder).items():
                results[name].append(result)
            os.chdir(REPO)
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
