"""Shared helpers of the toy experiments: output folders, JSON, seaborn figures, fit statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from entrotheory import fit_measured_on_predicted  # noqa: E402

__all__ = ["fit_stats", "save_json", "save_figure", "setup_style", "to_jsonable", "plt", "sns"]


def setup_style() -> None:
    """One seaborn style for every figure."""
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.0)


def fit_stats(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Agreement of measured with predicted changes (:func:`entrotheory.fit_measured_on_predicted`, ordinary
    least squares, signs of all pairs).

    ``r2``: squared Pearson correlation (R^2 of the least-squares line); ``slope``/``intercept``:
    that line, measured on predicted; ``r2_identity``: ``1 - sum (m - p)^2 / sum (m - mean m)^2``
    (agreement with the prediction itself, no refit); ``sign_agreement``: fraction of pairs with
    the same sign; ``n``: number of finite pairs. Every statistic is NaN with fewer than 3 pairs or a
    constant series.
    """
    fit = fit_measured_on_predicted(predicted, measured, line="ols", signs="all")
    if math.isnan(fit.correlation):
        return {"n": fit.n, "r2": math.nan, "slope": math.nan, "intercept": math.nan, "r2_identity": math.nan,
                "sign_agreement": math.nan}
    return {"n": fit.n, "r2": fit.correlation * fit.correlation, "slope": fit.slope, "intercept": fit.intercept,
            "r2_identity": fit.r2_identity, "sign_agreement": fit.sign_agreement}


def to_jsonable(x: Any) -> Any:
    """numpy scalars/arrays and NaN -> plain JSON (NaN -> null)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def save_json(data: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n")
    return path


def save_figure(fig: plt.Figure, path: Path, dpi: int = 90) -> Path:
    """Save a PNG (kept small: moderate dpi) and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
