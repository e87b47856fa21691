"""Wall time of Lightning training against a plain PyTorch loop doing the same work, as a ratio.

Same model (trackflow's MLP backbone + head), data (the digits' preprocessed training and validation
rows), batch size, optimizer and epochs; both validate once per epoch. Lightning runs with
trackflow's settings minus checkpointing and logging (that is I/O, not framework overhead).
Each variant runs --repeats times, alternating; medians are printed.

    python bench/lightning_overhead.py --epochs 20 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trackflow.config import (
    DataConfig,
    ModelConfig,
    OptimizationConfig,
    PreprocessConfig,
    SplitConfig,
)
from trackflow.data.ingest import load_bundled, to_canonical
from trackflow.data.preprocessing import preprocess
from trackflow.data.split import split_table
from trackflow.learn.networks import build_backbone, build_head
from trackflow.learn.training import ClassifierLitModule

LABEL = "target"


def datasets() -> tuple[TensorDataset, TensorDataset]:
    table = to_canonical(load_bundled("digits"), LABEL)[0]
    data = DataConfig(source_classes=None, target_classes=None)
    parts = split_table(table, LABEL, data, SplitConfig(), seed=0)
    parts = preprocess(parts, PreprocessConfig(), LABEL, impute=False, seed=0).parts

    def tensors(name: str) -> TensorDataset:
        part = parts[name]
        x = torch.tensor(part.drop(columns=LABEL).to_numpy(), dtype=torch.float32)
        return TensorDataset(x, torch.tensor(part[LABEL].to_numpy()))

    return tensors("target_train"), tensors("target_val")


def model(n_features: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(), n_features)
    return backbone, build_head(backbone.out_features, 10)


def plain_loop(train: TensorDataset, val: TensorDataset, config: OptimizationConfig) -> float:
    backbone, head = model(train.tensors[0].shape[1])
    network = torch.nn.Sequential(backbone, head)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    val_loader = DataLoader(val, batch_size=512)
    start = time.perf_counter()
    for _ in range(config.max_epochs):  # the same work as ClassifierLitModule: loss and accuracy
        network.train()
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for x, y in loader:
            optimizer.zero_grad()
            logits = network(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        _ = (float(loss_sum) / len(train), int(correct) / len(train))
        network.eval()
        with torch.no_grad():
            loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
            for x, y in val_loader:
                logits = network(x)
                loss_sum += F.cross_entropy(logits, y) * len(y)
                correct += (logits.argmax(1) == y).sum()
        _ = (float(loss_sum) / len(val), int(correct) / len(val))
    return time.perf_counter() - start


def lightning_loop(train: TensorDataset, val: TensorDataset, config: OptimizationConfig) -> float:
    backbone, head = model(train.tensors[0].shape[1])
    module = ClassifierLitModule(backbone, head, config)
    loader = DataLoader(
        train,
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    trainer = pl.Trainer(
        max_epochs=config.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(module, loader, DataLoader(val, batch_size=512))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # the machine is shared and noisy: one thread, less variance
    train, val = datasets()
    config = OptimizationConfig(
        max_epochs=args.epochs, batch_size=args.batch_size, schedule={"kind": "none"}
    )
    times: dict[str, list[float]] = {"plain PyTorch loop": [], "Lightning": []}
    lightning_loop(train, val, config.model_copy(update={"max_epochs": 1}))  # warm-up
    for _ in range(args.repeats):
        times["plain PyTorch loop"].append(plain_loop(train, val, config))
        times["Lightning"].append(lightning_loop(train, val, config))
    plain = statistics.median(times["plain PyTorch loop"])
    steps = args.epochs * -(-len(train) // args.batch_size)
    print(
        f"\n{len(train)} training rows, batch {args.batch_size}, {args.epochs} epochs "
        f"({steps} steps), validation every epoch; medians of {args.repeats}"
    )
    print(f"{'loop':<22}{'seconds':>10}{'ms/step':>10}{'ratio':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22}{median:>10.3f}{1000 * median / steps:>10.3f}{median / plain:>8.2f}")


if __name__ == "__main__":
    main()
