"""How well a predicted per-step entropy change agrees with the measured one.

One function for every "theory against practice" table and figure of the project:
:func:`fit_measured_on_predicted` fits the line ``m ~ slope * p (+ intercept)`` of measured changes ``m`` on
predicted ones ``p`` and reports the Pearson correlation, the fit's slope, the agreement with the prediction
itself (``r2_identity``) and the fraction of steps whose signs agree.

Callers and their options:

* ``llm.metrics.summarize`` (``summary.json`` of ``python -m llm.train`` and the tables of docs/llm.md):
  ``line="origin"`` (the slope is the measured/predicted ratio the sampler's calibration learns) and
  ``signs="nonzero"`` (a skipped step logs a change of exactly 0, which has no sign);
* ``toy_envs.experiments.common.fit_stats`` (the toy experiments): ``line="ols"`` and ``signs="all"``;
* ``llm.plotting`` (the ``r`` in the figure's legend): the correlation, which depends on neither option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["LineFit", "fit_measured_on_predicted", "MIN_FIT_PAIRS"]

MIN_FIT_PAIRS = 3  # fewer (predicted, measured) pairs than this: every statistic is NaN

ArrayLike = Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class LineFit:
    """Agreement of ``n`` measured changes with their predictions (see :func:`fit_measured_on_predicted`).

    A statistic that the data do not define is NaN (never an exception)."""

    n: int
    correlation: float
    slope: float
    intercept: float
    r2_identity: float
    sign_agreement: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _vector(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a tensor, an array or a sequence of numbers") from None
    return t.reshape(-1)


def fit_measured_on_predicted(
    predicted: ArrayLike,
    measured: ArrayLike,
    *,
    line: Literal["origin", "ols"] = "ols",
    signs: Literal["all", "nonzero"] = "all",
) -> LineFit:
    """Fit measured on predicted entropy changes; pairs with a non-finite member are left out.

    With the ``n`` remaining pairs ``(p_i, m_i)`` (nats per step), means ``pbar``, ``mbar``:

    * ``correlation`` (Pearson) ``r = sum (p - pbar)(m - mbar) / sqrt(sum (p - pbar)^2 sum (m - mbar)^2)``,
      NaN when either sample standard deviation is 0;
    * ``line="origin"``: ``slope = sum p m / sum p^2`` (least squares through the origin), ``intercept = 0``,
      NaN when every ``p`` is 0;
      ``line="ols"``: ``slope = sum (p - pbar)(m - mbar) / sum (p - pbar)^2``, ``intercept = mbar - slope pbar``
      (ordinary least squares), NaN when the standard deviation of ``p`` is 0;
    * ``r2_identity = 1 - sum (m - p)^2 / sum (m - mbar)^2``: the prediction itself as the fit (no refit; 1 is
      perfect, 0 no better than ``mbar``), NaN when every ``m`` is equal;
    * ``signs="all"``: ``sign_agreement`` is the fraction of pairs with ``sign(p) == sign(m)`` (0 agrees only
      with 0); ``signs="nonzero"``: the fraction of agreeing signs among the pairs where both are nonzero,
      NaN when there is none.

    With fewer than :data:`MIN_FIT_PAIRS` pairs every statistic is NaN. Computed in float64.

    Parameters
    ----------
    predicted, measured : ``[n]`` (any shape, flattened; the same number of elements) predicted and measured
        changes, e.g. of the token-mean entropy (nats).
    line : ``"ols"`` (slope and intercept) or ``"origin"`` (slope through the origin).
    signs : which pairs ``sign_agreement`` counts, ``"all"`` or ``"nonzero"``.

    Returns
    -------
    :class:`LineFit` with ``n`` (the pairs used) and the statistics above.
    """
    if line not in ("origin", "ols"):
        raise ValueError(f"line must be 'origin' or 'ols', got {line!r}")
    if signs not in ("all", "nonzero"):
        raise ValueError(f"signs must be 'all' or 'nonzero', got {signs!r}")
    p, m = _vector(predicted, "predicted"), _vector(measured, "measured")
    if p.numel() != m.numel():
        raise ValueError(f"predicted has {p.numel()} values but measured has {m.numel()}")
    ok = torch.isfinite(p) & torch.isfinite(m)
    p, m = p[ok], m[ok]
    n = int(p.numel())
    nan = math.nan
    if n < MIN_FIT_PAIRS:
        return LineFit(n, nan, nan, nan, nan, nan)
    varies_p, varies_m = float(p.std()) > 0, float(m.std()) > 0
    correlation = float(torch.corrcoef(torch.stack([p, m]))[0, 1]) if varies_p and varies_m else nan
    if line == "origin":
        pp = float((p * p).sum())
        slope = float((p * m).sum() / (p * p).sum()) if pp > 0 else nan
        intercept = 0.0
    elif varies_p:
        dp, dm = p - p.mean(), m - m.mean()
        slope = float((dp * dm).sum() / (dp * dp).sum())
        intercept = float(m.mean()) - slope * float(p.mean())
    else:
        slope = intercept = nan
    sst = float(((m - m.mean()) ** 2).sum())
    r2_identity = 1.0 - float(((m - p) ** 2).sum()) / sst if sst > 0 else nan
    if signs == "all":
        sign_agreement = float((torch.sign(p) == torch.sign(m)).double().mean())
    else:
        both = (p != 0) & (m != 0)
        sign_agreement = float(((p[both] > 0) == (m[both] > 0)).double().mean()) if bool(both.any()) else nan
    return LineFit(n, correlation, slope, intercept, r2_identity, sign_agreement)
