"""Advantage estimators: rewards grouped by prompt -> advantages (docs/theory.md §4.2).

Every estimator is a small pure function ``rewards [P, G] -> advantages [P, G]`` registered in
:data:`ADVANTAGE_ESTIMATORS`; :func:`compute_advantages` validates, dispatches and counts the
groups that carry no signal. ``P`` prompts (groups), ``G`` samples per prompt.

=============  ======================================================================
``grpo``       ``(r - mean_g r) / (std_g r + eps)``, unbiased std (a group of one:
               mean 0, std 1, as in the released verl code)
``dr-grpo``    ``r - mean_g r`` (Dr. GRPO: no std division; a group of one: mean 0)
``rloo``       ``r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean_g r)`` (a group of one: 0 baseline)
``reinforce``  ``r - mean_batch r`` (one baseline over all P*G samples)
``raw``        ``r`` (the released NSR / RAFT++ / W-REINFORCE use raw +-1 rewards)
=============  ======================================================================

Groups of size ``G >= 2`` whose rewards are all equal are *zero-signal* groups: the group
estimators (grpo, dr-grpo, rloo) give them exactly zero advantage; ``reinforce`` and ``raw``
have no per-group baseline, so such groups keep their (batch-baselined / raw) signal. They are
counted in ``info["zero_signal_groups"]`` for every estimator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ESTIMATORS", "ADVANTAGE_ESTIMATORS", "compute_advantages"]


def _grpo(r: Tensor, eps: float) -> Tensor:
    g = r.shape[-1]
    if g == 1:
        return r / (1.0 + eps)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, unbiased=True, keepdim=True)
    return (r - mean) / (std + eps)


def _dr_grpo(r: Tensor, eps: float) -> Tensor:
    if r.shape[-1] == 1:
        return r.clone()
    return r - r.mean(-1, keepdim=True)


def _rloo(r: Tensor, eps: float) -> Tensor:
    g = r.shape[-1]
    if g == 1:
        return r.clone()
    return (r - r.mean(-1, keepdim=True)) * (g / (g - 1))


def _reinforce(r: Tensor, eps: float) -> Tensor:
    return r - r.mean()


def _raw(r: Tensor, eps: float) -> Tensor:
    return r.clone()


#: registry ``name -> f(rewards [P, G], eps) -> advantages [P, G]`` (float, same dtype)
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "grpo": _grpo,
    "dr-grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce": _reinforce,
    "raw": _raw,
}
ESTIMATORS = tuple(ADVANTAGE_ESTIMATORS)

_GROUP_ESTIMATORS = ("grpo", "dr-grpo", "rloo")


def compute_advantages(
    rewards: Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> tuple[Tensor, dict[str, int | float | str]]:
    """Advantages from rewards grouped by prompt (docs/theory.md §4.2).

    Parameters
    ----------
    rewards : ``[P, G]`` tensor (float, int or bool), P prompts x G samples each. A 1-D ``[G]``
        tensor is one group and gives a 1-D result.
    estimator : one of :data:`ESTIMATORS` (see the module table).
    eps : added to the std in ``grpo`` (``> 0``).

    Returns
    -------
    advantages : same shape as ``rewards``, float (float64 for float64 input, else float32).
    info : ``{"estimator", "num_groups", "group_size", "zero_signal_groups",
        "zero_signal_fraction", "reward_mean", "advantage_abs_mean"}``.
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    squeeze = rewards.ndim == 1
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [P, G] (or [G] for one group), got shape {tuple(rewards.shape)}")
    r = rewards.unsqueeze(0) if squeeze else rewards
    if r.numel() == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)})")
    if r.is_complex():
        raise TypeError("rewards must be real")
    dtype = torch.float64 if r.dtype == torch.float64 else torch.float32
    r = r.to(dtype)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"rewards contain {int((~torch.isfinite(r)).sum())} NaN/inf value(s)")
    adv = ADVANTAGE_ESTIMATORS[estimator](r, float(eps))
    g = r.shape[-1]
    flat = (r == r[:, :1]).all(-1) if g >= 2 else torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    if estimator in _GROUP_ESTIMATORS:
        adv = torch.where(flat.unsqueeze(-1), torch.zeros_like(adv), adv)
    n_flat = int(flat.sum())
    info: dict[str, int | float | str] = {
        "estimator": estimator,
        "num_groups": int(r.shape[0]),
        "group_size": int(g),
        "zero_signal_groups": n_flat,
        "zero_signal_fraction": n_flat / r.shape[0],
        "reward_mean": float(r.mean()),
        "advantage_abs_mean": float(adv.abs().mean()),
    }
    return (adv.squeeze(0) if squeeze else adv), info
