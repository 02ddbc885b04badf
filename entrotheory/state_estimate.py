"""A state estimate of the policy's entropy for control (docs/theory.md §5.6).

The batch token-mean entropy that a controller reacts to is a noisy sample of the policy's entropy on
the task distribution: with 8 prompts x 8 samples of ~3 tokens it swings by more than one update moves
it. :class:`EntropyStateEstimate` is a scalar Kalman filter over that entropy:

* state ``x`` (nats): the policy's token-mean entropy on the task distribution, with variance ``P``;
* process step (:meth:`~EntropyStateEstimate.predict`): ``x <- x + delta``, ``P <- P + q``, where ``delta``
  is the measured (or predicted) change of the last update on the same contexts and ``q`` the variance of
  what ``delta`` misses;
* observation (:meth:`~EntropyStateEstimate.update`): the batch entropy ``y = x + noise`` with the sampling
  variance ``r`` measured from the batch itself (:func:`batch_entropy_variance`):
  ``K = P / (P + r)``, ``x <- x + K (y - x)``, ``P <- (1 - K) P``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import check_float_tensor

__all__ = ["EntropyStateEstimate", "batch_entropy_variance"]


def _number(value: object, name: str, *, variance: bool = False) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (not variance and math.isinf(value)):
        raise ValueError(f"{name} must be finite, got {value}")
    if variance and value < 0:
        raise ValueError(f"{name} is a variance and must be >= 0, got {value}")
    return value


def batch_entropy_variance(
    token_entropy: Tensor, mask: Tensor, groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-mean entropy of a batch and its sampling variance, from the batch itself (eq. 5.6).

    The batch value is the ratio ``Hbar = sum_u S_u / sum_u L_u`` over independent units ``u`` (rows, or
    the groups of rows that share a prompt when ``groups`` is given: samples of one prompt are not
    independent draws of the task distribution) with ``S_u`` the unit's summed token entropy and ``L_u``
    its token count. Its variance, to first order in ``1/n`` (the ratio-estimator / cluster formula), is

    ``Var(Hbar) ~= n / (n - 1) * sum_u (S_u - Hbar L_u)^2 / (sum_u L_u)^2``,

    which for equal lengths is the sample variance of the per-unit means divided by ``n``.

    Parameters
    ----------
    token_entropy : ``[B, T]`` per-token entropies (nats).
    mask : ``[B, T]`` bool, the tokens that count.
    groups : optional ``[B]`` integer unit index per row (e.g. the prompt index).

    Returns
    -------
    ``(Hbar, variance)``, two scalar float64 tensors (nats, nats^2). Raises with fewer than 2 units.
    """
    h = check_float_tensor(token_entropy, "token_entropy")
    if h.ndim != 2:
        raise ValueError(f"token_entropy must be [B, T], got shape {tuple(h.shape)}")
    if not isinstance(mask, Tensor) or mask.shape != h.shape:
        raise ValueError(f"mask shape {tuple(getattr(mask, 'shape', ()))} must equal token_entropy shape "
                         f"{tuple(h.shape)}")
    m = mask.to(torch.bool)
    s_row = torch.where(m, h.double(), torch.zeros((), dtype=torch.float64)).sum(1)
    l_row = m.sum(1).double()
    if groups is None:
        s_u, l_u = s_row, l_row
    else:
        if not isinstance(groups, Tensor) or groups.shape != (h.shape[0],) or groups.is_floating_point():
            raise ValueError(f"groups must be an integer tensor of shape ({h.shape[0]},)")
        _, idx = torch.unique(groups, return_inverse=True)
        n_groups = int(idx.max()) + 1
        s_u = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, s_row)
        l_u = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, idx, l_row)
    keep = l_u > 0
    s_u, l_u = s_u[keep], l_u[keep]
    n = int(s_u.numel())
    if n < 2:
        raise ValueError(f"need at least 2 units with masked-in tokens to estimate a variance, got {n}")
    total = l_u.sum()
    h_bar = s_u.sum() / total
    var = n / (n - 1) * ((s_u - h_bar * l_u) ** 2).sum() / total**2
    return h_bar, var


class EntropyStateEstimate:
    """Scalar Kalman filter of the policy's entropy (eq. 5.6; see the module docstring).

    Parameters
    ----------
    mean, variance : prior ``x`` and ``P``; the default ``variance = inf`` (no prior) makes the first
        observation the estimate (``K = 1``).

    Attributes
    ----------
    mean, variance : the current estimate ``x`` (nats) and its variance ``P`` (nats^2).
    gain : the last Kalman gain ``K`` (``nan`` before any observation).
    innovation : the last ``y - x`` before the update (``nan`` before any observation).
    steps : number of observations so far.
    """

    def __init__(self, mean: float = 0.0, variance: float = math.inf) -> None:
        self.mean = _number(mean, "mean")
        self.variance = _number(variance, "variance", variance=True)
        self.gain = math.nan
        self.innovation = math.nan
        self.steps = 0

    @property
    def initialised(self) -> bool:
        """True once the estimate has a finite variance (a prior or an observation)."""
        return math.isfinite(self.variance)

    def predict(self, delta: float, variance: float) -> float:
        """Process step: ``x <- x + delta``, ``P <- P + variance``; returns ``x``.

        ``delta`` is the change of the last update (measured on the same contexts, or predicted) and
        ``variance`` the variance of its error plus the policy's drift on contexts it did not see.
        """
        delta = _number(delta, "delta")
        variance = _number(variance, "variance", variance=True)
        if math.isinf(variance):
            raise ValueError("process variance must be finite")
        self.mean += delta
        self.variance += variance
        return self.mean

    def update(self, observation: float, variance: float) -> float:
        """Observation step with the batch entropy ``observation`` of sampling variance ``variance``.

        ``K = P / (P + r)``; ``x <- x + K (y - x)``; ``P <- (1 - K) P`` (with no prior, ``x = y``,
        ``P = r``). A zero ``r`` with a finite ``P`` gives ``K = 1``. Returns ``x``.
        """
        y = _number(observation, "observation")
        r = _number(variance, "observation variance", variance=True)
        if math.isinf(r):
            raise ValueError("observation variance must be finite")
        self.innovation = y - self.mean if self.initialised else math.nan
        if not self.initialised:
            k, p = 1.0, r
        elif self.variance + r == 0.0:
            k, p = 1.0, 0.0
        else:
            k = self.variance / (self.variance + r)
            p = (1.0 - k) * self.variance
        self.mean = self.mean + k * (y - self.mean) if self.initialised else y
        self.variance = p
        self.gain = k
        self.steps += 1
        return self.mean

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: ``mean``, ``variance``, ``gain``, ``innovation``, ``steps``."""
        return {"mean": self.mean, "variance": self.variance, "gain": self.gain, "innovation": self.innovation,
                "steps": float(self.steps)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` (validated: finite mean, variance >= 0)."""
        missing = {"mean", "variance"} - set(state)
        if missing:
            raise KeyError(f"state_dict lacks {sorted(missing)}")
        self.mean = _number(state["mean"], "mean")
        self.variance = _number(state["variance"], "variance", variance=True)
        self.gain = float(state.get("gain", math.nan))
        self.innovation = float(state.get("innovation", math.nan))
        self.steps = int(state.get("steps", 0))

    def __repr__(self) -> str:
        return f"EntropyStateEstimate(mean={self.mean:.4f}, variance={self.variance:.3g}, steps={self.steps})"
