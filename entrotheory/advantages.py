"""Advantage estimators: rewards grouped by prompt -> advantages (docs/theory.md §4.2).

Every estimator is a small pure function ``(rewards [N], group statistics, eps) -> advantages [N]``
registered in :data:`ADVANTAGE_ESTIMATORS`. :func:`compute_group_advantages` takes ``N`` rewards and a
group id per sample (verl's ``uid``; groups may have UNEQUAL sizes); :func:`compute_advantages` is the
same for ``P`` equal groups of ``G`` (a ``[P, G]`` tensor). Both validate, dispatch and count the groups
that carry no signal. ``n_g`` is the size of sample i's group, ``mean_g`` / ``std_g`` its mean and
unbiased std.

==================  ======================================================================
``grpo``            ``(r - mean_g) / (std_g + eps)``, unbiased std (a group of one: mean 0, std 1,
                    as verl's ``compute_grpo_outcome_advantage``)
``grpo-batch-std``  ``(r - mean_g) / (std_batch + eps)``: TRL's ``scale_rewards="batch"`` (the
                    group baseline, one unbiased std over all N; TRL uses ``eps = 1e-4``)
``dr-grpo``         ``r - mean_g`` (Dr. GRPO: no std division; a group of one: mean 0)
``rloo``            ``r_i - mean_{j != i} r_j = n_g/(n_g-1) (r_i - mean_g)`` (a group of one: 0 baseline)
``reinforce``       ``r``: the raw reward, as the Entrocraft release's ``reinforce`` baseline
``reinforce-baseline``  ``r - mean_batch r`` (one baseline over all N samples)
``raw``             ``r`` (the released NSR / RAFT++ / W-REINFORCE use raw +-1 rewards)
==================  ======================================================================

Groups of size ``n_g >= 2`` whose rewards are all equal are *zero-signal* groups: the group
estimators (grpo, grpo-batch-std, dr-grpo, rloo) give them exactly zero advantage; ``reinforce``,
``reinforce-baseline`` and ``raw`` have no per-group baseline, so such groups keep their signal. They
are counted in ``info["zero_signal_groups"]`` for every estimator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ESTIMATORS", "ADVANTAGE_ESTIMATORS", "GroupStats", "group_stats", "compute_advantages",
           "compute_group_advantages"]


class GroupStats(NamedTuple):
    """Per-sample statistics of each sample's group, all ``[N]`` (docs/theory.md §4.2).

    ``size``: ``n_g``; ``mean``: ``mean_g`` (0 for a group of one); ``std``: unbiased ``std_g``
    (1 for a group of one); ``flat``: the group has ``n_g >= 2`` equal rewards (zero signal).
    """

    size: Tensor
    mean: Tensor
    std: Tensor
    flat: Tensor


def group_stats(r: Tensor, group: Tensor, num_groups: int) -> GroupStats:
    """Group size, mean, unbiased std and zero-signal flag of each sample's group, ``[N]`` each.

    ``r`` ``[N]`` float rewards, ``group`` ``[N]`` int64 ids in ``0..num_groups-1``. A group of one has
    mean 0 and std 1 (verl's convention); ``std_g = sqrt(sum (r - mean_g)^2 / (n_g - 1))``.
    """
    zeros = torch.zeros(num_groups, dtype=r.dtype, device=r.device)
    size = zeros.index_add(0, group, torch.ones_like(r))
    mean = zeros.index_add(0, group, r) / size
    dev = r - mean[group]
    ss = zeros.index_add(0, group, dev * dev)
    std = torch.sqrt(ss / (size - 1).clamp(min=1))
    lo = torch.full_like(zeros, float("inf")).scatter_reduce(0, group, r, "amin")
    hi = torch.full_like(zeros, -float("inf")).scatter_reduce(0, group, r, "amax")
    single = size == 1
    mean = torch.where(single, zeros, mean)
    std = torch.where(single, torch.ones_like(std), std)
    flat = (size >= 2) & (lo == hi)
    return GroupStats(size[group], mean[group], std[group], flat[group])


def _grpo(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    return (r - g.mean) / (g.std + eps)


def _grpo_batch_std(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    std = r.std(unbiased=True) if r.numel() > 1 else torch.ones((), dtype=r.dtype, device=r.device)
    return (r - g.mean) / (std + eps)


def _dr_grpo(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    return r - g.mean


def _rloo(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    factor = torch.where(g.size > 1, g.size / (g.size - 1).clamp(min=1), torch.ones_like(g.size))
    return (r - g.mean) * factor


def _reinforce_baseline(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    return r - r.mean()


def _raw(r: Tensor, g: GroupStats, eps: float) -> Tensor:
    return r.clone()


#: registry ``name -> f(rewards [N], GroupStats, eps) -> advantages [N]`` (float, same dtype)
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, GroupStats, float], Tensor]] = {
    "grpo": _grpo,
    "grpo-batch-std": _grpo_batch_std,
    "dr-grpo": _dr_grpo,
    "rloo": _rloo,
    "reinforce": _raw,
    "reinforce-baseline": _reinforce_baseline,
    "raw": _raw,
}
ESTIMATORS = tuple(ADVANTAGE_ESTIMATORS)

_GROUP_ESTIMATORS = ("grpo", "grpo-batch-std", "dr-grpo", "rloo")


def _check(rewards: object, estimator: str, eps: object) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if rewards.numel() == 0:
        raise ValueError(f"rewards is empty (shape {tuple(rewards.shape)})")
    if rewards.is_complex():
        raise TypeError("rewards must be real")


def _float(r: Tensor) -> Tensor:
    r = r.to(torch.float64 if r.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"rewards contain {int((~torch.isfinite(r)).sum())} NaN/inf value(s)")
    return r


def _estimate(r: Tensor, group: Tensor, num_groups: int, estimator: str, eps: float) -> tuple[Tensor, Tensor]:
    """(advantages [N], flat-group flag per group [K]) for flat rewards and group ids."""
    stats = group_stats(r, group, num_groups)
    adv = ADVANTAGE_ESTIMATORS[estimator](r, stats, float(eps))
    if estimator in _GROUP_ESTIMATORS:
        adv = torch.where(stats.flat, torch.zeros_like(adv), adv)
    flat_group = torch.zeros(num_groups, dtype=torch.bool, device=r.device).index_put((group,), stats.flat)
    return adv, flat_group


def _info(estimator: str, r: Tensor, adv: Tensor, flat_group: Tensor, sizes: Tensor) -> dict[str, int | float | str]:
    n_flat = int(flat_group.sum())
    return {
        "estimator": estimator,
        "num_groups": int(flat_group.numel()),
        "group_size": int(sizes.max()),
        "min_group_size": int(sizes.min()),
        "zero_signal_groups": n_flat,
        "zero_signal_fraction": n_flat / flat_group.numel(),
        "reward_mean": float(r.mean()),
        "advantage_abs_mean": float(adv.abs().mean()),
    }


def compute_advantages(
    rewards: Tensor, estimator: str = "grpo", eps: float = 1e-6
) -> tuple[Tensor, dict[str, int | float | str]]:
    """Advantages from rewards in ``P`` equal groups of ``G`` (docs/theory.md §4.2).

    Parameters
    ----------
    rewards : ``[P, G]`` tensor (float, int or bool), P prompts x G samples each. A 1-D ``[G]``
        tensor is one group and gives a 1-D result.
    estimator : one of :data:`ESTIMATORS` (see the module table).
    eps : added to the std in ``grpo`` / ``grpo-batch-std`` (``> 0``).

    Returns
    -------
    advantages : same shape as ``rewards``, float (float64 for float64 input, else float32).
    info : ``{"estimator", "num_groups", "group_size", "min_group_size", "zero_signal_groups",
        "zero_signal_fraction", "reward_mean", "advantage_abs_mean"}``.
    """
    _check(rewards, estimator, eps)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [P, G] (or [G] for one group), got shape {tuple(rewards.shape)}")
    squeeze = rewards.ndim == 1
    r = _float(rewards.unsqueeze(0) if squeeze else rewards)
    p, g = r.shape
    group = torch.arange(p, device=r.device).repeat_interleave(g)
    adv, flat_group = _estimate(r.reshape(-1), group, p, estimator, eps)
    adv = adv.reshape(p, g)
    info = _info(estimator, r, adv, flat_group, torch.full((1,), g, device=r.device))
    return (adv.squeeze(0) if squeeze else adv), info


def compute_group_advantages(
    rewards: Tensor, index: Tensor | np.ndarray | Sequence[object], estimator: str = "grpo", eps: float = 1e-6
) -> tuple[Tensor, dict[str, int | float | str]]:
    """Advantages of ``N`` rewards grouped by a per-sample id, groups of any sizes (docs/theory.md §4.2).

    Parameters
    ----------
    rewards : ``[N]`` tensor (float, int or bool), one scalar reward per response.
    index : ``N`` group ids: an integer tensor, or an array / sequence of hashables (verl's
        ``non_tensor_batch["uid"]``, strings). Samples with equal ids form a group; groups need not be
        contiguous nor of equal size.
    estimator, eps : as :func:`compute_advantages`; with equal contiguous groups the result is that of
        :func:`compute_advantages` on the ``[P, G]`` reshape.

    Returns
    -------
    advantages : ``[N]`` float (float64 for float64 input, else float32).
    info : as :func:`compute_advantages`; ``group_size`` / ``min_group_size`` are the largest / smallest group.
    """
    _check(rewards, estimator, eps)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [N] (one reward per response), got shape {tuple(rewards.shape)}")
    r = _float(rewards)
    if isinstance(index, Tensor):
        if index.ndim != 1 or index.is_floating_point() or index.is_complex():
            raise ValueError(f"index must be a 1-D integer tensor (or an array of ids), got {index.dtype} "
                             f"of shape {tuple(index.shape)}")
        _, inverse = torch.unique(index.to(r.device), return_inverse=True)
    else:
        ids = np.asarray(index, dtype=object)
        if ids.ndim != 1:
            raise ValueError(f"index must be one id per sample, got an array of shape {ids.shape}")
        _, inv = np.unique(ids.astype(str), return_inverse=True)
        inverse = torch.as_tensor(inv.reshape(-1), dtype=torch.long, device=r.device)
    if inverse.numel() != r.numel():
        raise ValueError(f"index has {inverse.numel()} ids for {r.numel()} rewards (need one per response)")
    group = inverse.to(torch.long)
    num_groups = int(group.max()) + 1
    adv, flat_group = _estimate(r, group, num_groups, estimator, eps)
    sizes = torch.zeros(num_groups, dtype=torch.long, device=r.device).index_add(0, group, torch.ones_like(group))
    return adv, _info(estimator, r, adv, flat_group, sizes)
