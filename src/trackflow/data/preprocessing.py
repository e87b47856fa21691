"""Standardization then PCA, as one scikit-learn ``Pipeline`` fitted on training rows only.

Only the original data's training rows are fitted on: rows of batches added later
(:mod:`trackflow.data.batches`) are transformed like every row but never move the feature space,
so a network trained before a batch came keeps reading the same features after it
(``train.mode: continue``). Beside the transformed parts, each row's raw content digest is kept
(:data:`ROW_DIGESTS_FILE`), to tell the rows a registered model saw from the new ones.
"""

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


#: The preprocess stage's table of each row id's raw content digest (``digest`` column).
ROW_DIGESTS_FILE = "row_digests.parquet"


def training_features(
    parts: dict[str, pd.DataFrame],
    fit_on: str,
    label_column: str,
    origins: pd.Series | None = None,
) -> pd.DataFrame:
    """Features of the training rows the preprocessor learns from: never validation or test rows.

    Args:
        parts: Split tables by name (``"source_train"``, ``"target_val"``, ...).
        fit_on: ``"source"``, ``"target"`` or ``"both"`` training sets.
        label_column: Column to drop.
        origins: Each row id's origin (:func:`trackflow.data.batches.read_origins`): only the
            original rows are kept. None: every row is original.
    """
    tasks = ("source", "target") if fit_on == "both" else (fit_on,)
    chosen = [parts[f"{task}_train"] for task in tasks if f"{task}_train" in parts]
    if not chosen:
        raise ConfigError(
            f"preprocess.fit_on={fit_on!r} but there is no {fit_on} task (data.source_classes is "
            "null); use 'target' or 'both'"
        )
    features = pd.concat(chosen).drop(columns=label_column)
    if origins is None:
        return features
    return features[original_rows(features.index, origins)]


def original_rows(ids: pd.Index, origins: pd.Series) -> np.ndarray:
    """Whether each row id is one of the original data's rows, shape (n_rows,).

    Raises:
        DataError: Some row ids have no recorded origin (the split's origins are out of date).
    """
    from trackflow.data.batches import ORIGINAL

    missing = ids.difference(origins.index)
    if len(missing):
        raise DataError(
            f"{len(missing)} row ids (e.g. {missing[0]}) have no origin in the split's origins "
            "file; run the split stage again (dvc repro split)"
        )
    return (origins.reindex(ids) == ORIGINAL).to_numpy()


def row_digest_table(parts: dict[str, pd.DataFrame], label_column: str) -> pd.DataFrame:
    """Each row id's raw content digest (:func:`trackflow.registry.gate.row_digests`).

    Returns:
        One row per row id of every part, column ``digest``, the feature columns hashed in their
        order in the parts.
    """
    from trackflow.registry.gate import row_digests

    rows = pd.concat(parts.values())
    columns = [c for c in rows.columns if c != label_column]
    return pd.DataFrame({"digest": row_digests(rows, columns)}, index=rows.index)


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
    origins: pd.Series | None = None,
) -> Preprocessed:
    """Fit on the configured training rows, transform every part, measure the variance kept.

    Args:
        parts: Split tables by name (``"source_train"``, ``"target_test"``, ...).
        config: Scaling, PCA and which training rows to fit on.
        label_column: Class column, carried through untouched.
        impute: Whether to fill NaN with the training median (``data.non_finite: impute``).
        seed: Seed for PCA's solver.
        origins: Each row id's origin: the preprocessor learns from the original rows only
            (batches added later are transformed, never fitted on). None: all rows original.
    """
    features = training_features(parts, config.fit_on, label_column, origins)
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
