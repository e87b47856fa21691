"""Profiles of training data, for telling when new rows no longer look like it (data drift).

A profile is plain JSON, small enough to travel inside the packaged model: per feature, its mean,
standard deviation, quantiles and quantile-bin edges with the share of training rows in each bin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

QUANTILE_LEVELS = np.linspace(0, 1, 101)


def build_profile(rows: pd.DataFrame, bins: int = 10) -> dict[str, Any]:
    """Profile training rows, shape (n_rows, n_features), feature by feature.

    Returns:
        ``{"n_rows": n, "bins": bins, "features": {name: {"mean", "std", "quantiles",
        "bin_edges", "bin_fractions"}}}``. Bin edges are the training quantiles (duplicates
        dropped, so a constant feature has one bin); the outer bins are open-ended.
    """
    features = {}
    for name in rows.columns:
        values = rows[name].to_numpy(dtype=np.float64)
        edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1))[1:-1])
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
        features[str(name)] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "quantiles": np.quantile(values, QUANTILE_LEVELS).tolist(),
            "bin_edges": edges.tolist(),
            "bin_fractions": (counts / len(values)).tolist(),
        }
    return {"n_rows": len(rows), "bins": bins, "features": features}
