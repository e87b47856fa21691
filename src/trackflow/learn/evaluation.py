"""Held-out metrics, the training-curve diagnosis, scikit-learn baselines, and their figures.

Everything here takes arrays and returns numbers, tables or files: no MLflow, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trackflow.config import DiagnosisConfig
from trackflow.plotting import pyplot


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, classes: Sequence[Any], n_bins: int = 10
) -> dict[str, Any]:
    """Metrics of predicted class probabilities against true class indices.

    Args:
        y_true: True class indices, shape (n_rows,).
        proba: Predicted probabilities, shape (n_rows, n_classes); rows sum to 1.
        classes: Class labels, in the order of ``proba``'s columns.
        n_bins: Confidence bins of the expected calibration error.

    Returns:
        ``accuracy``, ``macro_f1``, ``log_loss``, ``roc_auc_ovr``, ``ece`` and ``per_class``
        (label -> ``precision``, ``recall``).
    """
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    indices = np.arange(len(classes))
    pred = proba.argmax(axis=1)
    # scikit-learn wants the positive class's scores alone for two classes.
    scores = proba[:, 1] if len(classes) == 2 else proba
    precision, recall, _, _ = precision_recall_fscore_support(
        y_true, pred, labels=indices, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, pred)),
        "macro_f1": float(f1_score(y_true, pred, labels=indices, average="macro", zero_division=0)),
        "log_loss": float(log_loss(y_true, proba, labels=indices)),
        "roc_auc_ovr": float(roc_auc_score(y_true, scores, multi_class="ovr", labels=indices)),
        "ece": expected_calibration_error(y_true, proba, n_bins),
        "per_class": {
            str(label): {"precision": float(p), "recall": float(r)}
            for label, p, r in zip(classes, precision, recall, strict=True)
        },
    }


def ensemble_gain(
    y_true: np.ndarray, proba: np.ndarray, member_probas: Sequence[np.ndarray]
) -> dict[str, Any]:
    """How much better the ensemble's accuracy is than its best member's, on the same rows.

    Args:
        y_true: True class indices, shape (n_rows,).
        proba: The ensemble's probabilities, shape (n_rows, n_classes).
        member_probas: Each member's probabilities, shape (n_members, n_rows, n_classes).

    Returns:
        ``ensemble_gain`` (ensemble accuracy minus the best member's), ``best_member_accuracy``
        and ``member_accuracy`` (member number from 1 -> accuracy).
    """
    members = [float((p.argmax(axis=1) == y_true).mean()) for p in member_probas]
    ensemble = float((proba.argmax(axis=1) == y_true).mean())
    return {
        "ensemble_gain": ensemble - max(members),
        "best_member_accuracy": max(members),
        "member_accuracy": {str(i): acc for i, acc in enumerate(members, start=1)},
    }


def reliability_table(y_true: np.ndarray, proba: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and row count (of non-empty bins)."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    table = pd.DataFrame({"bin": bins, "confidence": confidence, "accuracy": correct})
    grouped = table.groupby("bin").agg(
        confidence=("confidence", "mean"), accuracy=("accuracy", "mean"), rows=("accuracy", "size")
    )
    return grouped.reset_index()


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> float:
    """Mean gap between confidence and accuracy over confidence bins, weighted by rows."""
    table = reliability_table(y_true, proba, n_bins)
    weights = table["rows"] / table["rows"].sum()
    return float((weights * (table["accuracy"] - table["confidence"]).abs()).sum())


@dataclass(frozen=True)
class Diagnosis:
    """What the loss curves say about training."""

    state: str  # "underfitting" | "overfitting" | "healthy"
    reason: str
    epoch: int | None = None  # overfitting: the epoch of the lowest validation loss


def diagnose(
    train_loss: Sequence[float], val_loss: Sequence[float], config: DiagnosisConfig
) -> Diagnosis:
    """Read the training state off per-epoch losses.

    Rules, in order: the training loss never falls by ``flat_tolerance`` of its first value
    (both losses flat or high) => underfitting; the validation loss ends more than
    ``rise_tolerance`` above its minimum while the training loss kept falling after that minimum
    => overfitting from the minimum's epoch; otherwise healthy.
    """
    train, val = np.asarray(train_loss, float), np.asarray(val_loss, float)
    if len(train) < 2 or len(val) < 2:
        return Diagnosis("healthy", "too few epochs to judge")
    drop = (train[0] - train.min()) / train[0] if train[0] > 0 else 0.0
    if drop < config.flat_tolerance:
        return Diagnosis(
            "underfitting",
            f"training loss fell only {drop:.1%} from {train[0]:.3g} (less than "
            f"{config.flat_tolerance:.0%}): the model is not learning",
        )
    best = int(val.argmin())
    rise = (val[-1] - val[best]) / val[best] if val[best] > 0 else 0.0
    if best < len(val) - 1 and rise > config.rise_tolerance and train[-1] < train[best]:
        return Diagnosis(
            "overfitting",
            f"validation loss rose {rise:.0%} above its minimum at epoch {best + 1} while "
            "training loss kept falling",
            epoch=best + 1,
        )
    return Diagnosis("healthy", "training and validation losses fell together")


def baseline_accuracies(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> dict[str, float]:
    """Test accuracy of scikit-learn's logistic regression, SVC and MLP on the same features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    models = {
        "logistic_regression": LogisticRegression(max_iter=5000),
        "svc": SVC(),
        "mlp": MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=500, random_state=seed),
    }
    return {
        name: float(model.fit(x_train, y_train).score(x_test, y_test))
        for name, model in models.items()
    }


def confusion_table(y_true: np.ndarray, pred: np.ndarray, classes: Sequence[Any]) -> pd.DataFrame:
    """One row per test row, ``actual`` and ``predicted`` labels: DVC's confusion-matrix input."""
    labels = np.asarray([str(c) for c in classes])
    return pd.DataFrame({"actual": labels[y_true], "predicted": labels[pred]})


def plot_confusion(
    y_true: np.ndarray, pred: np.ndarray, classes: Sequence[Any], path: Path
) -> None:
    """Confusion matrix with counts in each cell."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    matrix = confusion_matrix(y_true, pred, labels=np.arange(len(classes)))
    fig, ax = plt.subplots(figsize=(5, 4.5), constrained_layout=True)
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ticks = np.arange(len(classes))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test rows)",
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(history: pd.DataFrame, diagnosis: Diagnosis, path: Path) -> None:
    """Loss and accuracy per epoch, training and validation, titled with the diagnosis."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for split, style in (("train", "-"), ("val", "--")):
        loss_ax.plot(history["epoch"], history[f"{split}_loss"], style, label=split)
        acc_ax.plot(history["epoch"], history[f"{split}_acc"], style, label=split)
    if diagnosis.epoch is not None:
        for ax in (loss_ax, acc_ax):
            ax.axvline(diagnosis.epoch, color="#c0392b", linestyle=":", label="overfitting from")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    loss_ax.legend()
    fig.suptitle(f"Diagnosis: {diagnosis.state} ({diagnosis.reason})", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class(per_class: dict[str, dict[str, float]], path: Path) -> None:
    """Precision and recall per class, as grouped bars."""
    plt = pyplot()
    labels = list(per_class)
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for offset, key in ((-0.2, "precision"), (0.2, "recall")):
        ax.bar(x + offset, [per_class[c][key] for c in labels], width=0.4, label=key)
    ax.set(xticks=x, xticklabels=labels, ylim=(0, 1.05), xlabel="class", title="Per-class metrics")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reliability(table: pd.DataFrame, ece: float, path: Path) -> None:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), constrained_layout=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    ax.plot(table["confidence"], table["accuracy"], marker="o", label="model")
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Reliability diagram (ECE {ece:.3f})",
    )
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)
