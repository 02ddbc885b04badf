"""The Entrocraft rejection sampler: entropy control by biasing the advantage distribution.

docs/theory.md §4.3 (band rule), §4.4 (predictive sampler), §4.5 (loss-normaliser convention).

A rejected sample trains with **zero advantage** and keeps its place in the loss normaliser
(token mean over the whole batch), exactly as the released code zeroes advantages. Nothing is
added to the objective: the sampler only decides which samples' advantages survive.

Two modes:

* ``mode="band"`` — the released rule. With ``H`` the batch's token-mean entropy and the band
  ``[lower(t), upper(t)]``: ``H > upper`` keeps only positive-advantage samples (RAFT++-like),
  ``H < lower`` keeps only negative-advantage samples (NSR-like), inside keeps everything.
  ``exact_reference=True`` reproduces the release's detail: outside the band the *raw rewards*
  (``rewards`` argument, +-1 in the release) replace the advantages, with the wrong sign zeroed; the
  diagnostics then describe the raw rewards (what is trained on), see :meth:`EntropyRejectionSampler.select`.
* ``mode="predictive"`` — our extension. With first-order contributions ``c`` (per unit learning
  rate, from :func:`entrotheory.core.entropy_change_contributions` or
  :func:`entrotheory.tokens.token_entropy_contributions`) and an online-calibrated effective
  step ``k``, it keeps the selection whose predicted change ``k * sum(c_accepted) / norm`` is
  closest to ``target(t + 1) - H`` among the selections that reject the ``m`` samples pushing
  hardest the wrong way (``m = 0, 1, ...``); see :meth:`EntropyRejectionSampler.select`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from .core import check_float_tensor
from .schedules import Band, Schedule, parse_band, parse_schedule

__all__ = ["MODES", "Selection", "SamplerOptions", "EntropyRejectionSampler", "StepSizeCalibrator"]

MODES = ("band", "predictive")


@dataclass
class Selection:
    """Result of :meth:`EntropyRejectionSampler.select`.

    ``accepted``: bool tensor of the advantages' shape (False off-mask).
    ``advantages``: what to train on, same shape; rejected and off-mask entries are 0 (under
    ``exact_reference`` outside the band: the raw rewards of the accepted samples).
    ``diagnostics``: dict of floats and strings (see docs/theory.md §4.3-4.4).
    """

    accepted: Tensor
    advantages: Tensor
    diagnostics: dict[str, float | str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """True when nothing with a non-zero advantage survived (the loop should skip the step)."""
        return bool(self.diagnostics.get("all_rejected", 0.0))


class StepSizeCalibrator:
    """Robust running regression ``measured ~= offset + k * predicted`` (docs/theory.md §4.4).

    Exponentially weighted (forgetting factor ``forget``) least squares over the pairs
    ``(p_j, m_j)`` of prediction per unit step and measured change, with a ridge prior
    ``offset_prior * b^2`` pulling the offset ``b`` to 0 (``fit_offset=False``: ``b = 0``, a
    regression through the origin)::

        minimise  sum_j forget^(n-j) w_j (m_j - b - k p_j)^2 + offset_prior b^2

    ``k`` is clipped to ``[k_min, k_max]`` (a positive floor: a selection's predicted sign is
    never inverted) and to ``[k / max_step, k * max_step]`` around its previous value (one pair
    moves ``k`` by at most a factor ``max_step``, default 10), and ``b`` is re-fitted for the clipped
    ``k``. The Huber weight ``w_j = min(1, huber * s / |m_j - b - k p_j|)`` down-weights outliers
    from the first pair on: ``s`` is a running mean absolute residual and, before any data, the
    prior residual scale ``|k_init p_j|`` (the prior is trusted to its order of magnitude only),
    both floored at ``rel_floor * |k p_j|``. So one wild first pair neither pins ``k`` (it moves it
    by at most ``max_step``) nor dominates the sums afterwards (its weight is at most
    ``huber |k_init p_0| / |m_0 - k_init p_0|``). Before any data ``k = k_init``, ``b = 0``.
    The offset absorbs what the first-order prediction misses systematically: the (negative)
    curvature of a large update and any drift not caused by the policy-gradient term.
    """

    def __init__(
        self,
        k_init: float,
        k_min: float | None = None,
        k_max: float | None = None,
        forget: float = 0.9,
        huber: float = 3.0,
        rel_floor: float = 0.1,
        fit_offset: bool = True,
        offset_prior: float = 0.1,
        max_step: float = 10.0,
    ) -> None:
        for name, v in (("k_init", k_init), ("forget", forget), ("huber", huber), ("rel_floor", rel_floor),
                        ("offset_prior", offset_prior), ("max_step", max_step)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}")
        if k_init <= 0:
            raise ValueError(f"k_init (effective step size before data) must be > 0, got {k_init}")
        if not 0 < forget <= 1:
            raise ValueError(f"forget must be in (0, 1], got {forget}")
        if huber <= 0 or rel_floor < 0 or offset_prior <= 0 or max_step <= 1:
            raise ValueError(f"need huber > 0, rel_floor >= 0, offset_prior > 0, max_step > 1; got {huber}, "
                             f"{rel_floor}, {offset_prior}, {max_step}")
        self.k_init = float(k_init)
        self.k_min = float(k_min) if k_min is not None else self.k_init * 1e-3
        self.k_max = float(k_max) if k_max is not None else self.k_init * 1e4
        if not 0 < self.k_min <= self.k_init <= self.k_max:
            raise ValueError(f"need 0 < k_min <= k_init <= k_max, got {self.k_min}, {self.k_init}, {self.k_max}")
        self.forget = float(forget)
        self.huber = float(huber)
        self.rel_floor = float(rel_floor)
        self.fit_offset = bool(fit_offset)
        self.offset_prior = float(offset_prior)
        self.max_step = float(max_step)
        self.reset()

    _SUMS = ("sw", "sp", "spp", "sm", "spm")

    def reset(self) -> None:
        self.k = self.k_init
        self.offset = 0.0
        self.sw = self.sp = self.spp = self.sm = self.spm = 0.0
        self.scale = 0.0
        self.n_obs = 0

    def predict(self, predicted: float) -> float:
        """Calibrated change ``offset + k * predicted``."""
        return self.offset + self.k * predicted

    def update(self, predicted: float, measured: float) -> float:
        """Feed one ``(prediction per unit k, measured change)`` pair; returns the new ``k``."""
        p, m = float(predicted), float(measured)
        if not (math.isfinite(p) and math.isfinite(m)):
            raise ValueError(f"calibration pair must be finite, got predicted={p}, measured={m}")
        if abs(p) * self.k_max <= 1e-15:
            return self.k  # no prediction, no information about k
        resid = abs(m - self.predict(p))
        # residual scale: the prior's own size |k p| before any data (k = k_init then), afterwards the
        # running mean absolute residual; floored at rel_floor * |k p|. Guarded from the first pair on.
        s = max(abs(self.k * p) if self.n_obs == 0 else self.scale, self.rel_floor * abs(self.k * p))
        cap = self.huber * s
        w = cap / resid if resid > cap else 1.0
        f = self.forget
        self.sw = f * self.sw + w
        self.sp = f * self.sp + w * p
        self.spp = f * self.spp + w * p * p
        self.sm = f * self.sm + w * m
        self.spm = f * self.spm + w * p * m
        if self.fit_offset:
            a11, det = self.sw + self.offset_prior, (self.sw + self.offset_prior) * self.spp - self.sp**2
            k = (a11 * self.spm - self.sp * self.sm) / det if det > 0 else self.spm / self.spp
        else:
            k = self.spm / self.spp
        lo, hi = max(self.k_min, self.k / self.max_step), min(self.k_max, self.k * self.max_step)
        self.k = min(max(k, lo), hi)
        if self.fit_offset:
            self.offset = (self.sm - self.k * self.sp) / (self.sw + self.offset_prior)
        post = min(abs(m - self.predict(p)), cap)  # an outlier does not inflate the scale
        self.scale = post if self.n_obs == 0 else f * self.scale + (1 - f) * post
        self.n_obs += 1
        return self.k

    def state_dict(self) -> dict[str, float]:
        d = {x: getattr(self, x) for x in ("k", "offset", "scale", "k_init", "k_min", "k_max", "forget", "huber",
                                          "rel_floor", "offset_prior", "max_step", *self._SUMS)}
        d["n_obs"] = float(self.n_obs)
        d["fit_offset"] = float(self.fit_offset)
        return d

    def load_state_dict(self, d: dict[str, float]) -> None:
        for key in ("k", "offset", "scale", "k_init", "k_min", "k_max", "forget", "huber", "rel_floor",
                    "offset_prior", "max_step", *self._SUMS):
            if key in d:
                setattr(self, key, float(d[key]))
        self.n_obs = int(d.get("n_obs", 0))
        self.fit_offset = bool(d.get("fit_offset", self.fit_offset))


def _as_float(x: object, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _frac(num: int, den: int) -> float:
    """Fraction with the vacuous case ``0/0 -> 1.0`` (nothing of that kind was rejected)."""
    return num / den if den else 1.0


@dataclass(frozen=True)
class SamplerOptions:
    """The options of :class:`EntropyRejectionSampler`, validated on construction (see its docstring).

    Numbers given as ints or 0-d tensors are stored as floats; a bad value raises ``ValueError`` or
    ``TypeError`` naming the option.
    """

    width: float | None = None
    exact_reference: bool = False
    lr: float = 1.0
    calibration_factor: float = 1.0
    k_init: float | None = None
    k_min: float | None = None
    k_max: float | None = None
    forget: float = 0.9
    huber: float = 3.0
    fit_offset: bool = True
    offset_prior: float = 0.1
    tolerance: float = 0.0
    unit: Literal["sample", "token"] = "sample"
    step_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "calibration_factor", "forget", "huber", "offset_prior", "tolerance"):
            object.__setattr__(self, name, _as_float(getattr(self, name), name))
        for name in ("width", "k_init", "k_min", "k_max"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_float(getattr(self, name), name))
        for name in ("exact_reference", "fit_offset"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.calibration_factor <= 0:
            raise ValueError(f"lr and calibration_factor must be > 0, got lr={self.lr}, "
                             f"calibration_factor={self.calibration_factor}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.unit not in ("sample", "token"):
            raise ValueError(f"unit must be 'sample' or 'token', got {self.unit!r}")
        offset = self.step_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"step_offset must be an int >= 0, got {offset!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> SamplerOptions:
        """Build from keyword options; an unknown name raises ``TypeError`` listing the known ones."""
        known = tuple(f.name for f in fields(cls))
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; expected some of {known}")
        return cls(**kwargs)  # type: ignore[arg-type]


class EntropyRejectionSampler:
    """Entrocraft's sampler: pick which samples keep their advantage (docs/theory.md §4.3-4.4).

    Parameters
    ----------
    target : a :class:`Schedule`, a :class:`Band`, a callable, or a spec string (then
        ``total_steps`` is required). Band mode needs a band (``"LOWER..UPPER"``,
        ``"CENTRE+-HALF"``, or a schedule plus ``width=``); predictive mode aims at a schedule,
        or at the centre of a band.
    mode : ``"band"`` (released rule) or ``"predictive"`` (first-order controller).
    total_steps : horizon for spec strings and callables.

    options : a :class:`SamplerOptions`; or give its fields as keywords instead:
    width : full band width for a centre schedule (band mode).
    exact_reference : band mode; outside the band train on the raw ``rewards`` (wrong sign
        zeroed) instead of the given advantages, as the released code does. Default False.
    lr : the optimiser's learning rate; the default effective step is ``k_init = calibration_factor * lr``.
    calibration_factor : default 1.0 (for an LLM the measured/logit-space ratio is ~300-500; calibration
        learns it, a better prior only shortens the transient).
    k_init, k_min, k_max, forget, huber, fit_offset, offset_prior : see
        :class:`StepSizeCalibrator` (defaults ``calibration_factor * lr``, ``1e-3 k_init``, ``1e4 k_init``,
        0.9, 3.0, True, 0.1).
    tolerance : predictive mode; a predicted error within ``tolerance`` nats counts as on target
        and the fewest-rejections prefix within it is taken. Default 0 (closest prefix).
    unit : ``"sample"`` (default: a row of a ``[B, T]`` batch is accepted or rejected as a whole)
        or ``"token"`` (each masked token separately).
    step_offset : int ``>= 0`` added to the caller's step before the schedules are read (default 0). The
        release counts steps from 1 (verl's ``global_steps``): a loop counting from 0 reproduces its band
        with ``step_offset=1``; a loop that passes verl's ``global_steps`` keeps 0.

    Contributions (one convention): per unit learning rate of the batch's mean entropy, so that the
    first-order change of an accepted set is ``lr * sum(c_accepted)``: per sample as
    :func:`entrotheory.core.entropy_change_contributions` returns them (they carry the 1/N of the mean),
    per token as :func:`entrotheory.tokens.token_mean_contributions` returns them (the token-mean
    entropy under a token-mean loss, docs/theory.md eq. 3.3).
    """

    def __init__(self, target: object, mode: str = "band", total_steps: int | None = None,
                 options: SamplerOptions | None = None, **kwargs: object):
        if options is None:
            options = SamplerOptions.from_kwargs(**kwargs)
        elif kwargs:
            raise TypeError(f"give either options=SamplerOptions(...) or keyword options, not both ({sorted(kwargs)})")
        elif not isinstance(options, SamplerOptions):
            raise TypeError(f"options must be a SamplerOptions, got {type(options).__name__}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self.options = options
        self.mode = mode
        self.exact_reference = options.exact_reference
        if self.exact_reference and mode != "band":
            raise ValueError("exact_reference applies to mode='band' only")
        self.unit = options.unit
        self.tolerance = options.tolerance
        self.band: Band | None = None
        self.schedule: Schedule | None = None
        self._resolve_target(target, total_steps, options.width)
        k_init = options.k_init if options.k_init is not None else options.lr * options.calibration_factor
        self.calibrator = StepSizeCalibrator(k_init=k_init, k_min=options.k_min, k_max=options.k_max,
                                             forget=options.forget, huber=options.huber,
                                             fit_offset=options.fit_offset, offset_prior=options.offset_prior)
        self.step_offset: int = options.step_offset
        self._pending: float | None = None
        self.last_diagnostics: dict[str, float | str] = {}

    # ---------------------------------------------------------------------------- target
    def _resolve_target(self, target: object, total_steps: int | None, width: object) -> None:
        needs_steps = isinstance(target, str) or (callable(target) and not isinstance(target, (Schedule, Band)))
        if needs_steps and total_steps is None:
            raise ValueError(f"target {target!r} is a spec string or callable: total_steps is required")
        is_band_spec = isinstance(target, str) and (".." in target or "+-" in target)
        if isinstance(target, Band) or is_band_spec or isinstance(target, tuple):
            band = target if isinstance(target, Band) else parse_band(target, total_steps)  # type: ignore[arg-type]
            if isinstance(target, Band) and total_steps is not None:
                band = parse_band(target, total_steps)
            if width is not None:
                raise ValueError("width is only for a centre schedule target, not for a band")
            self.band = band
            return
        if isinstance(target, Schedule):
            sched = target if total_steps is None else target.with_total_steps(total_steps)
        elif isinstance(target, (str, int, float)) or callable(target):
            sched = parse_schedule(target, total_steps)  # type: ignore[arg-type]
        else:
            raise TypeError(f"target must be a Schedule, Band, callable or spec string, got {type(target).__name__}")
        if width is not None:
            self.band = parse_band(sched, sched.total_steps, width=width)  # type: ignore[arg-type]
            return
        if self.mode == "band":
            raise ValueError(f"band mode needs a band: got the schedule {sched.spec!r}; pass width=... or a "
                             "'LOWER..UPPER' spec")
        self.schedule = sched

    def target_entropy(self, step: float) -> float:
        """The schedule (or band centre) at ``step``."""
        return self.schedule(step) if self.schedule is not None else self.band.centre(step)  # type: ignore[union-attr]

    @property
    def k(self) -> float:
        """Current effective step size (entropy change per unit of predicted contribution sum)."""
        return self.calibrator.k

    # ---------------------------------------------------------------------------- inputs
    def _items(
        self, advantages: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor], float]:
        """(item_valid [M], mask [shape], broadcast item->shape, masked token count)."""
        shape = advantages.shape
        if mask is None:
            m = torch.ones(shape, dtype=torch.bool, device=advantages.device)
        else:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
            if mask.shape != shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} must equal advantages shape {tuple(shape)}")
            m = mask.to(torch.bool)
        n_tok = float(m.sum())
        if advantages.ndim >= 2 and self.unit == "sample":
            rows = shape[0]
            valid = m.reshape(rows, -1).any(-1)

            def expand(item: Tensor) -> Tensor:
                return item.reshape(rows, *([1] * (len(shape) - 1))).expand(shape) & m

            return valid, m, expand, n_tok
        valid = m.reshape(-1)
        return valid, m, lambda item: item.reshape(shape) & m, n_tok

    def _reduce(self, x: Tensor, m: Tensor) -> Tensor:
        """Per-item sums of ``x`` over masked entries (rows for unit='sample', else entries)."""
        x = torch.where(m, x, torch.zeros_like(x))
        if x.ndim >= 2 and self.unit == "sample":
            return x.reshape(x.shape[0], -1).sum(-1)
        return x.reshape(-1)

    # ---------------------------------------------------------------------------- select
    def select(
        self,
        advantages: Tensor,
        entropy: float | Tensor,
        step: int,
        contributions: Tensor | None = None,
        mask: Tensor | None = None,
        rewards: Tensor | None = None,
    ) -> Selection:
        """Choose the accepted samples for this step (docs/theory.md §4.3-4.4).

        Parameters
        ----------
        advantages : ``[N]`` per sample, or ``[B, T]`` per token (sequence advantage broadcast).
        entropy : current (token-mean) entropy ``H`` of the batch, before the update.
        step : current step ``t >= 0``; predictive mode aims at ``target(t + 1)``.
        contributions : first-order contributions per unit learning rate of the batch's mean entropy
            (class docstring), advantages' shape;
            required in predictive mode, optional in band mode (then only for diagnostics and calibration).
        mask : bool, advantages' shape; off-mask entries are never accepted.
        rewards : raw rewards ``[N]`` / ``[B]`` (or advantages' shape); needed by ``exact_reference``.

        Diagnostics describe what is trained on. Under ``exact_reference`` outside the band the sign
        counts and accepted fractions are those of the raw rewards, and ``predicted_change`` rescales the
        contributions (linear in each advantage) to the trained values, ``c_i A'_i / A_i``; samples with
        ``A_i = 0`` but ``A'_i != 0`` cannot be predicted from ``c_i``: they are left out, counted in
        ``unpredicted_samples``, and the step's pair is not used for calibration (§4.3).
        ``predicted_change_all`` is the prediction of the given advantages, all accepted.

        Predictive algorithm (§4.4): ``s_i`` = item contribution / norm, ``S = sum_i s_i``,
        ``g = (target(t+1) - H) / k``. If ``S > g`` the wrong-way items are those with ``s_i > 0``,
        sorted by decreasing ``s_i``; rejecting the first ``m`` of them gives
        ``S_m = S - (s_(1) + ... + s_(m))``, monotone in ``m``; the smallest ``m`` minimising
        ``|S_m - g|`` (or the smallest within ``tolerance / k``) is taken. ``S < g``: mirror image.
        """
        adv = check_float_tensor(advantages, "advantages")
        if adv.ndim < 1:
            raise ValueError("advantages must have at least one dimension (samples)")
        h = _as_float(entropy, "entropy")
        if h < 0:
            raise ValueError(f"entropy must be >= 0, got {h}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        valid, m, expand, n_tok = self._items(adv, mask)
        t = step + self.step_offset  # the step at which the schedules are read
        contrib = None
        if contributions is not None:
            contrib = check_float_tensor(contributions, "contributions")
            if contrib.shape != adv.shape:
                raise ValueError(f"contributions shape {tuple(contrib.shape)} must equal advantages shape "
                                 f"{tuple(adv.shape)}")
        elif self.mode == "predictive":
            raise ValueError("predictive mode needs contributions (entrotheory.core.entropy_change_contributions "
                             "per sample, or entrotheory.tokens.token_mean_contributions per token)")
        item_adv = self._reduce(adv, m)
        pos, neg = (item_adv > 0) & valid, (item_adv < 0) & valid
        s = self._reduce(contrib.to(torch.float64), m) if contrib is not None else None
        k, b = self.calibrator.k, self.calibrator.offset
        diag: dict[str, float | str] = {"mode": self.mode, "entropy": h, "step": float(step), "k": k, "offset": b}
        train_adv = torch.where(m, adv, torch.zeros_like(adv))
        trains_on_rewards = False  # exact_reference outside the band: train_adv are the raw rewards

        if self.mode == "band":
            lo, up = self.band.lower(t), self.band.upper(t)  # type: ignore[union-attr]
            regime = "above" if h > up else ("below" if h < lo else "inside")
            diag.update(lower=lo, upper=up, target_entropy=0.5 * (lo + up), regime=regime)
            if self.exact_reference and regime != "inside":
                if rewards is None:
                    raise ValueError("exact_reference needs the raw rewards (rewards=...) outside the band")
                raw = self._broadcast_rewards(rewards, adv)
                item_r = self._reduce(raw, m)
                keep = ((item_r > 0) if regime == "above" else (item_r < 0)) & valid
                train_adv = torch.where(m, raw, torch.zeros_like(raw))
                trains_on_rewards = True
                # the signs that count are those of what is trained on: the raw rewards
                pos, neg = (item_r > 0) & valid, (item_r < 0) & valid
            elif regime == "above":
                keep = pos
            elif regime == "below":
                keep = neg
            else:
                keep = valid.clone()
            diag["desired_change"] = diag["target_entropy"] - h
            diag["saturated"] = 0.0
        else:
            target_next = self.target_entropy(t + 1)
            desired = target_next - h
            keep, saturated, m_rej = self._predictive_keep(s, valid, (desired - b) / k, self.tolerance / k)  # type: ignore[arg-type]
            diag.update(target_entropy=target_next, desired_change=desired, saturated=float(saturated),
                        regime="below" if desired > 0 else ("above" if desired < 0 else "on-target"),
                        wrong_way_rejected=float(m_rej))
            if self.band is not None:
                diag.update(lower=self.band.lower(t + 1), upper=self.band.upper(t + 1))

        accepted = expand(keep)
        out_adv = torch.where(accepted, train_adv, torch.zeros_like(train_adv))
        n_valid, n_pos, n_neg = int(valid.sum()), int(pos.sum()), int(neg.sum())
        n_acc = int((keep & valid).sum())
        live = (out_adv != 0).any()
        diag.update(
            num_samples=float(n_valid),
            accepted_fraction=_frac(n_acc, n_valid),
            accepted_pos_fraction=_frac(int((keep & pos).sum()), n_pos),
            accepted_neg_fraction=_frac(int((keep & neg).sum()), n_neg),
            num_pos=float(n_pos),
            num_neg=float(n_neg),
            all_rejected=float(not bool(live)),
        )
        if s is not None:
            # contributions are linear in each sample's (token's) advantage: rescale them to what is
            # trained on, c(A') = c(A) A'/A; where A = 0 but A' != 0 the contribution is unknown (§4.3)
            s_train, unknown = s, None
            if trains_on_rewards:
                a64, t64 = adv.to(torch.float64), train_adv.to(torch.float64)
                known = a64 != 0
                ratio = torch.where(known, t64 / torch.where(known, a64, torch.ones_like(a64)), torch.zeros_like(a64))
                s_train = self._reduce(contrib.to(torch.float64) * ratio, m)
                unknown = self._reduce((~known & (t64 != 0)).to(torch.float64), m) > 0
            acc = keep & valid
            n_unknown = int((unknown & acc).sum()) if unknown is not None else 0
            p_acc = float(s_train[acc].sum())
            p_all = float(s[valid].sum())
            diag.update(predicted_change=b + k * p_acc, predicted_change_all=b + k * p_all,
                        unpredicted_samples=float(n_unknown))
            # a prediction that misses some trained samples would bias the calibration: skip that pair
            self._pending = p_acc if n_unknown == 0 else None
        else:
            self._pending = None
        if not bool(live):
            diag["note"] = ("all rejected: no accepted sample has a non-zero advantage; skip the update"
                            if n_valid else "empty batch: no valid samples")
            self._pending = None
        self.last_diagnostics = diag
        return Selection(accepted=accepted, advantages=out_adv, diagnostics=diag)

    @staticmethod
    def _predictive_keep(
        s: Tensor, valid: Tensor, goal: float, tol: float
    ) -> tuple[Tensor, bool, int]:
        """Greedy prefix rejection (§4.4). Returns (keep [M] bool, saturated, number rejected)."""
        keep = valid.clone()
        s = torch.where(valid, s, torch.zeros_like(s))
        total = float(s.sum())
        if abs(total - goal) <= tol or total == goal:
            return keep, False, 0
        sign = 1.0 if total > goal else -1.0  # +1: wrong-way items are those raising the prediction
        wrong = (s * sign > 0) & valid
        idx = wrong.nonzero().squeeze(-1)
        if idx.numel() == 0:
            return keep, True, 0
        order = idx[torch.argsort(s[idx] * sign, descending=True, stable=True)]
        reached = total - torch.cumsum(s[order], 0)  # S_m for m = 1..n
        sums = torch.cat([torch.tensor([total], dtype=reached.dtype, device=reached.device), reached])
        err = (sums - goal).abs()
        within = (err <= tol).nonzero()
        m_rej = int(within[0]) if within.numel() else int(torch.argmin(err))
        keep[order[:m_rej]] = False
        slack = max(tol, 1e-12 * (abs(goal) + float(s.abs().sum())))  # rounding of the cumulative sum
        saturated = m_rej == idx.numel() and (float(sums[-1]) - goal) * sign > slack
        return keep, bool(saturated), m_rej

    def _broadcast_rewards(self, rewards: Tensor, adv: Tensor) -> Tensor:
        r = rewards
        if not isinstance(r, Tensor):
            raise TypeError(f"rewards must be a torch.Tensor, got {type(r).__name__}")
        r = r.to(device=adv.device, dtype=adv.dtype)
        check_float_tensor(r, "rewards")
        if r.shape == adv.shape:
            return r
        if r.ndim == 1 and r.shape[0] == adv.shape[0]:
            return r.reshape(-1, *([1] * (adv.ndim - 1))).expand(adv.shape)
        raise ValueError(f"rewards shape {tuple(r.shape)} must be per sample ({adv.shape[0]},) or "
                         f"{tuple(adv.shape)}")

    # ---------------------------------------------------------------------------- feedback
    def observe(self, measured_change: float | Tensor) -> float:
        """Feed the measured entropy change of the last update; returns the new ``k`` (§4.4).

        Pairs it with the prediction (per unit ``k``) of the last :meth:`select`; without one
        (no contributions, or the step was all-rejected and skipped) it only returns ``k``.
        """
        m = _as_float(measured_change, "measured_change")
        if self._pending is None:
            return self.calibrator.k
        p, self._pending = self._pending, None
        return self.calibrator.update(p, m)

    def state_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "calibrator": self.calibrator.state_dict(), "pending": self._pending,
                "target": self.band.spec if self.band is not None else self.schedule.spec}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"state is for mode {state.get('mode')!r}, this sampler is {self.mode!r}")
        self.calibrator.load_state_dict(state["calibrator"])  # type: ignore[arg-type]
        pending = state.get("pending")
        self._pending = None if pending is None else float(pending)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        tgt = self.band.spec if self.band is not None else self.schedule.spec  # type: ignore[union-attr]
        return f"EntropyRejectionSampler({tgt!r}, mode={self.mode!r}, k={self.k:.4g})"
