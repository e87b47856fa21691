"""Standardization then PCA, as one scikit-learn ``Pipeline`` fitted on training rows only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from trackflow.config import PreprocessConfig
from trackflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


def training_features(
    parts: dict[str, pd.DataFrame], fit_on: str, label_column: str
) -> pd.DataFrame:
    """Features of the training rows the preprocessor learns from: never validation or test rows.

    Args:
        parts: Split tables by name (``"source_train"``, ``"target_val"``, ...).
        fit_on: ``"source"``, ``"target"`` or ``"both"`` training sets.
        label_column: Column to drop.
    """
    tasks = ("source", "target") if fit_on == "both" else (fit_on,)
    chosen = [parts[f"{task}_train"] for task in tasks if f"{task}_train" in parts]
    if not chosen:
        raise ConfigError(
            f"preprocess.fit_on={fit_on!r} but there is no {fit_on} task (data.source_classes is "
            "null); use 'target' or 'both'"
        )
    return pd.concat(chosen).drop(columns=label_column)


def build_preprocessor(config: PreprocessConfig, impute: bool, seed: int) -> Pipeline:
    """An unfitted pipeline: [median imputation], scaling, PCA; disabled steps are passthrough."""
    from sklearn.decomposition import PCA
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    scalers = {"standard": StandardScaler, "minmax": MinMaxScaler}
    steps: list[tuple[str, Any]] = []
    if impute:
        steps.append(("impute", SimpleImputer(strategy="median", keep_empty_features=True)))
    steps.append(("scale", scalers[config.scaler]() if config.scaler in scalers else "passthrough"))
    pca = config.pca
    steps.append(
        (
            "pca",
            "passthrough"
            if pca.n_components is None
            else PCA(n_components=pca.n_components, whiten=pca.whiten, random_state=seed),
        )
    )
    return Pipeline(steps).set_output(transform="pandas")


def fit_preprocessor(
    features: pd.DataFrame, config: PreprocessConfig, impute: bool, seed: int
) -> Pipeline:
    """Fit the preprocessor on training features.

    Args:
        features: Training rows only, shape (n_rows, n_features).
        config: Scaling and PCA settings.
        impute: Whether to fill NaN with the median of ``features`` (``data.non_finite: impute``).
        seed: Seed for PCA's solver.

    Raises:
        ConfigError: An int ``n_components`` exceeds the features or rows available.
        DataError: The features hold NaN although imputation is off.
    """
    n_components = config.pca.n_components
    limit = min(features.shape)
    if isinstance(n_components, int) and n_components > limit:
        raise ConfigError(
            f"preprocess.pca.n_components={n_components} exceeds what {features.shape[0]} rows of "
            f"{features.shape[1]} features allow; use at most {limit}, or a float for a fraction "
            "of variance"
        )
    if not impute and features.isna().any().any():
        raise DataError("training features hold NaN; set data.non_finite: impute to fill them")
    return build_preprocessor(config, impute, seed).fit(features)


def transform_table(preprocessor: Pipeline, table: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """Transform a split's features, keeping its row ids and label column."""
    transformed = preprocessor.transform(table.drop(columns=label_column))
    transformed.index = table.index
    return transformed.assign(**{label_column: table[label_column]})


def variance_spectrum(preprocessor: Pipeline, features: pd.DataFrame) -> pd.DataFrame:
    """Explained variance of every principal component of the scaled training features.

    Computed whether or not PCA is on, so the scree plot shows what each ``n_components`` keeps.

    Returns:
        One row per component: ``component`` (from 1), ``explained_variance_ratio``, ``cumulative``.
    """
    from sklearn.decomposition import PCA

    scaled = preprocessor[:-1].transform(features)
    ratio = PCA(svd_solver="full").fit(scaled).explained_variance_ratio_
    return pd.DataFrame(
        {
            "component": np.arange(1, len(ratio) + 1),
            "explained_variance_ratio": ratio,
            "cumulative": np.cumsum(ratio),
        }
    )


def variance_metrics(preprocessor: Pipeline, n_features: int) -> dict[str, float | int]:
    """What the fitted preprocessor keeps of ``n_features``: components and fraction of variance."""
    pca = preprocessor.named_steps["pca"]
    if isinstance(pca, str):  # "passthrough": PCA is off, every feature and all variance kept
        return {"n_features_in": n_features, "n_components": n_features, "explained_variance": 1.0}
    return {
        "n_features_in": n_features,
        "n_components": int(pca.n_components_),
        "explained_variance": float(pca.explained_variance_ratio_.sum()),
    }


def plot_spectrum(spectrum: pd.DataFrame, n_kept: int, path: str | Path) -> None:
    """Scree plot (per-component variance) with the cumulative curve and the kept cut-off."""
    from trackflow.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.bar(
        spectrum["component"],
        spectrum["explained_variance_ratio"],
        color="#8fb3d9",
        label="per component",
    )
    ax.plot(
        spectrum["component"],
        spectrum["cumulative"],
        color="#1f4e79",
        marker=".",
        label="cumulative",
    )
    n_kept = min(n_kept, len(spectrum))  # PCA off on fewer rows than features: all of the spectrum
    kept = spectrum["cumulative"].iloc[n_kept - 1]
    ax.axvline(
        n_kept + 0.5,
        color="#c0392b",
        linestyle="--",
        label=f"kept: {n_kept} components, {kept:.1%} of variance",
    )
    ax.set(
        xlabel="principal component",
        ylabel="fraction of variance explained",
        ylim=(0, 1.02),
        title="PCA spectrum of the scaled training features",
    )
    ax.legend(loc="center right")
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass(frozen=True)
class Preprocessed:
    """The fitted preprocessor, every part transformed, and what it keeps."""

    preprocessor: Pipeline
    parts: dict[str, pd.DataFrame]
    spectrum: pd.DataFrame
    metrics: dict[str, float | int]


def preprocess(
    parts: dict[str, pd.DataFrame],
    config: PreprocessConfig,
    label_column: str,
    impute: bool,
    seed: int,
) -> Preprocessed:
    """Fit on the configured training rows, transform every part, measure the variance kept.

    Args:
        parts: Split tables by name (``"source_train"``, ``"target_test"``, ...).
        config: Scaling, PCA and which training rows to fit on.
        label_column: Class column, carried through untouched.
        impute: Whether to fill NaN with the training median (``data.non_finite: impute``).
        seed: Seed for PCA's solver.
    """
    features = training_features(parts, config.fit_on, label_column)
    preprocessor = fit_preprocessor(features, config, impute, seed)
    transformed = {
        name: transform_table(preprocessor, part, label_column) for name, part in parts.items()
    }
    imputed = sum(
        int(part.drop(columns=label_column).isna().sum().sum()) for part in parts.values()
    )
    metrics = variance_metrics(preprocessor, features.shape[1]) | {"n_fit_rows": len(features)}
    if impute:
        metrics["imputed_values"] = imputed
    spectrum = variance_spectrum(preprocessor, features)
    return Preprocessed(preprocessor, transformed, spectrum, metrics)
