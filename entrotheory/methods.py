"""Entropy methods as one registry of token-level, whole-batch transforms (docs/theory.md §4.6).

Every method is built by :func:`make_method` from :data:`METHODS` and used in two phases:

1. ``plan = method.prepare(advantages, log_probs, old_log_probs, mask, entropy, step, ...)`` once
   per batch over the **whole** batch (selections such as Clip-Cov's are global, never per
   micro-batch), returning a :class:`MethodPlan` (advantages to train on, acceptance, per-token
   flags, diagnostics, ``skip``);
2. ``method.token_loss(plan.rows(i), log_probs_i, old_log_probs_i, mask_i, token_entropy_i)`` per
   micro-batch, reduced with :func:`masked_token_mean` by the masked-token count of the WHOLE batch.

The token loss is the PPO clipped surrogate ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``,
``r = exp(log pi - log pi_old)``, bounded on ``A < 0`` tokens by the dual clip ``-A clip_ratio_c`` (verl's
``clip_ratio_c``, default 3), with the token ratio or GSPO's sequence ratio (``importance_ratio``), plus the
method's terms (Clip-Cov detach, KL-Cov penalty
``kl_coef |log pi - log pi_old|`` on its tokens, entropy bonus ``-coef H_t``). KL-Cov follows verl by
default (``verl_compat=True``): no clip, ``-A r`` on every token. A rejected or zeroed token trains with
advantage 0 and keeps its place in the normaliser (§4.5).

Shapes: ``[B, T]`` everywhere (B responses, T positions; a bandit sample is ``T = 1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor

from .core import check_float_tensor, check_rule
from .rejection import EntropyRejectionSampler, SamplerOptions, _as_float
from .schedules import Schedule, parse_schedule

__all__ = [
    "METHODS",
    "MethodPlan",
    "MethodOptions",
    "EntropyBonusOptions",
    "AdaptiveEntropyBonusOptions",
    "ClipHigherOptions",
    "CovOptions",
    "ClipCovOptions",
    "KLCovOptions",
    "SignOptions",
    "WReinforceOptions",
    "EntroPICOptions",
    "EntrocraftOptions",
    "EntropyMethod",
    "make_method",
    "masked_token_mean",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "clipped_surrogate",
    "sequence_log_ratio",
    "ppo_clipped",
    "token_covariance",
]

_LOG_RATIO_CLAMP = 20.0


# ----------------------------------------------------------------------------- pure pieces
def masked_token_mean(loss_tok: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """``sum(loss_tok * mask) / normalizer`` (docs/theory.md §4.5).

    ``normalizer`` is the number of masked tokens in the WHOLE batch (so micro-batch losses add
    up to the batch token mean, and rejected tokens, which carry zero loss, still count).
    Default ``mask.sum()``. A zero normaliser returns a zero that keeps the graph (no NaN).
    """
    if loss_tok.shape != mask.shape:
        raise ValueError(f"loss_tok shape {tuple(loss_tok.shape)} must equal mask shape {tuple(mask.shape)}")
    m = mask.to(torch.bool)
    total = torch.where(m, loss_tok, torch.zeros_like(loss_tok)).sum()
    n = m.sum() if normalizer is None else normalizer
    n_val = float(n)
    if not math.isfinite(n_val) or n_val < 0:
        raise ValueError(f"normalizer must be a finite count >= 0, got {n_val}")
    if n_val == 0:
        return total * 0.0
    return total / n_val


#: loss aggregation modes of :func:`aggregate_loss`: verl's ``loss_agg_mode`` values and TRL's ``loss_type``
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm",
                  "grpo", "bnpo", "dr_grpo")


def _count(value: float | int | Tensor | None, default: Tensor, name: str) -> Tensor | float:
    if value is None:
        return default
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite count >= 0, got {v}")
    return v


def aggregate_loss(
    loss_tok: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    num_tokens: float | Tensor | None = None,
    num_sequences: float | Tensor | None = None,
    horizon: float | None = None,
) -> Tensor:
    """A ``[B, T]`` token loss reduced to a scalar the way verl or TRL does (docs/theory.md §4.5).

    With ``m`` the mask, ``n_b = sum_t m_bt`` and ``S_b = sum_t l_bt m_bt``:

    =========================  ==========================================================================
    ``token-mean`` / ``bnpo``  ``sum_b S_b / N_tok``; ``N_tok = num_tokens`` (default ``sum m``)
    ``token-sum``              ``sum_b S_b``
    ``seq-mean-token-sum``     ``sum_{b: n_b > 0} S_b / N_seq``
    ``seq-mean-token-mean``    ``sum_{b: n_b > 0} (S_b / n_b) / N_seq``
    ``seq-mean-token-sum-norm``  ``seq-mean-token-sum / horizon`` (default ``horizon = T``)
    ``grpo`` (TRL)             ``sum_b S_b / max(n_b, 1) / N_seq`` with ``N_seq`` counting every row
    ``dr_grpo`` (TRL)          ``sum_b S_b / (N_seq horizon)``, every row counted, ``horizon`` =
                               ``max_completion_length`` (default T)
    =========================  ==========================================================================

    ``N_seq = num_sequences``, by default the rows with ``n_b > 0`` (verl's modes) or all B rows (TRL's).
    Give ``num_tokens`` / ``num_sequences`` of the WHOLE batch to make micro-batch losses add up to the
    batch loss (the convention of §4.5); leave them ``None`` for the micro-batch's own counts (the release's
    convention). verl multiplies by ``dp_size`` on top of a global count (its gradients are averaged over
    ranks); that factor is the caller's. A zero count returns a zero that keeps the graph (no NaN).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {LOSS_AGG_MODES}")
    if loss_tok.ndim != 2 or loss_tok.shape != mask.shape:
        raise ValueError(f"loss_tok {tuple(loss_tok.shape)} and mask {tuple(mask.shape)} must be the same [B, T]")
    m = mask.to(torch.bool)
    per_row = torch.where(m, loss_tok, torch.zeros_like(loss_tok)).sum(-1)
    n_b = m.sum(-1)
    if mode in ("token-mean", "bnpo"):
        return _safe_div(per_row.sum(), _count(num_tokens, n_b.sum(), "num_tokens"))
    if mode == "token-sum":
        return per_row.sum()
    if horizon is not None and (not math.isfinite(float(horizon)) or float(horizon) <= 0):
        raise ValueError(f"horizon must be a finite number > 0, got {horizon!r}")
    h = float(horizon) if horizon is not None else float(loss_tok.shape[-1])
    if mode in ("grpo", "dr_grpo"):
        n_seq = _count(num_sequences, torch.tensor(float(loss_tok.shape[0])), "num_sequences")
        if mode == "grpo":
            return _safe_div((per_row / n_b.clamp(min=1)).sum(), n_seq)
        return _safe_div(per_row.sum(), float(n_seq) * h)
    live = n_b > 0
    n_seq = _count(num_sequences, live.sum(), "num_sequences")
    if mode == "seq-mean-token-mean":
        per_row = torch.where(live, per_row / n_b.clamp(min=1), torch.zeros_like(per_row))
    loss = _safe_div(per_row.sum(), n_seq)
    return loss / h if mode == "seq-mean-token-sum-norm" else loss


def _safe_div(total: Tensor, count: Tensor | float) -> Tensor:
    c = float(count)
    return total * 0.0 if c == 0 else total / c


def sequence_log_ratio(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's per-token log ratio ``log pi_t - sg(log pi_t) + sg(mean_t (log pi - log pi_old))``, ``[B, T]``.

    Its value is the sequence's length-normalised log importance ratio ``log s_b`` at every position, and
    its gradient is ``grad log pi_t`` (Zheng et al. 2025, GSPO; verl's ``compute_policy_loss_gspo``).
    """
    m = mask.to(torch.bool)
    diff = torch.where(m, log_probs - old_log_probs, torch.zeros_like(log_probs))
    seq = diff.sum(-1) / m.sum(-1).clamp(min=1)
    return log_probs - log_probs.detach() + seq.detach().unsqueeze(-1)


def clipped_surrogate(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None = None,
    log_ratio: Tensor | None = None,
) -> Tensor:
    """PPO token loss ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, ``[B, T]`` (§4.6).

    ``clip_ratio_c`` (``> 1``; None: off): dual-clip PPO (Ye et al. 2020, verl's ``clip_ratio_c``): on
    ``A < 0`` tokens the loss is ``min(-A c, max(-A r, -A clip(r)))``. ``log_ratio``: the log ratio to use
    (e.g. :func:`sequence_log_ratio` for GSPO); default ``log pi - log pi_old``, clamped to ``[-20, 20]``.
    """
    lr = (log_probs - old_log_probs) if log_ratio is None else log_ratio
    ratio = torch.exp(lr.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if clip_ratio_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_ratio_c), loss)
    return loss


def token_covariance(advantages: Tensor, log_probs: Tensor, mask: Tensor) -> Tensor:
    """Cui et al. (2025) token covariance ``(A_t - mean A)(log pi_t - mean log pi)``, whole batch.

    Means over the masked tokens of the whole ``[B, T]`` batch; off-mask entries are 0.
    """
    m = mask.to(torch.bool)
    n = max(int(m.sum()), 1)
    a = torch.where(m, advantages, torch.zeros_like(advantages))
    lp = torch.where(m, log_probs.detach(), torch.zeros_like(log_probs))
    cov = (a - a.sum() / n) * (lp - lp.sum() / n)
    return torch.where(m, cov, torch.zeros_like(cov))


def ppo_clipped(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, eps_low: float,
                 eps_high: float) -> Tensor:
    """Tokens whose PPO term is on the clipped side: ``-A clip(r) > -A r`` (verl's ``clip_by_origin``).

    Their surrogate is constant in ``log pi``, so they carry no policy gradient (§4.6).
    """
    ratio = torch.exp((log_probs - old_log_probs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high) > -advantages * ratio


def _row_sign_stats(adv_in: Tensor, accepted: Tensor, mask: Tensor) -> dict[str, float]:
    """Acceptance fractions over samples (rows); a row's sign is that of its masked ``adv_in`` sum
    (``adv_in``: the values the method decides on, see ``MethodPlan.sign_source``)."""
    row_valid = mask.any(-1)
    row_adv = torch.where(mask, adv_in, torch.zeros_like(adv_in)).sum(-1)
    row_acc = (accepted & mask).any(-1) & row_valid
    pos, neg = (row_adv > 0) & row_valid, (row_adv < 0) & row_valid

    def frac(a: Tensor, b: Tensor) -> float:
        d = int(b.sum())
        return int((a & b).sum()) / d if d else 1.0

    return {
        "num_samples": float(row_valid.sum()),
        "num_pos": float(pos.sum()),
        "num_neg": float(neg.sum()),
        "accepted_fraction": frac(row_acc, row_valid),
        "accepted_pos_fraction": frac(row_acc, pos),
        "accepted_neg_fraction": frac(row_acc, neg),
    }


# ----------------------------------------------------------------------------- plan
@dataclass
class MethodPlan:
    """What one batch trains on (docs/theory.md §4.6). All tensors ``[B, T]``.

    ``advantages`` (rejected/zeroed entries 0), ``accepted`` (bool), ``diagnostics``, ``skip``
    (nothing to train on: the loop skips the optimiser step), ``detach`` (Clip-Cov: tokens whose
    gradient is removed), ``kl_mask`` (KL-Cov: tokens with the KL penalty), ``entropy_coef``
    (bonus coefficient in effect this step), ``eps_low``/``eps_high`` (KL-Cov with ``verl_compat``:
    ``1`` / ``inf``, i.e. no clipping), ``clip_ratio_c`` (dual clip on ``A < 0``, None: off),
    ``importance_ratio`` (``"token"`` or GSPO's ``"sequence"``), ``kl_coef``, ``sign_source`` (the values
    whose signs define the positive and negative samples of the acceptance diagnostics, when they are not the given
    advantages: the raw rewards under ``source="rewards"`` or Entrocraft's ``exact_reference``).
    """

    advantages: Tensor
    accepted: Tensor
    diagnostics: dict[str, float | str] = field(default_factory=dict)
    skip: bool = False
    detach: Tensor | None = None
    kl_mask: Tensor | None = None
    entropy_coef: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float | None = None
    importance_ratio: str = "token"
    kl_coef: float = 0.0
    sign_source: Tensor | None = field(default=None, repr=False)

    def rows(self, index: int | slice | Tensor | list[int]) -> MethodPlan:
        """The same plan restricted to some rows (a micro-batch); an int keeps the row dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return replace(self, advantages=take(self.advantages), accepted=take(self.accepted),
                       detach=take(self.detach), kl_mask=take(self.kl_mask), sign_source=take(self.sign_source))


# ----------------------------------------------------------------------------- typed options
def _set_float(obj: object, name: str, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    object.__setattr__(obj, name, _as_float(value, name))


def _check_choice(obj: object, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {getattr(obj, name)!r}")


def _defaults(options_class: type) -> dict[str, object]:
    return {f.name: f.default for f in fields(options_class)}


#: a target: a number (constant), a schedule spec, or a Schedule
TargetSpec = float | str | Schedule | None


@dataclass(frozen=True)
class MethodOptions:
    """Options every method takes (docs/theory.md §4.6), validated on construction.

    ``eps_low``/``eps_high``: PPO clip range; ``clip_ratio_c``: dual clip on ``A < 0`` tokens (verl's
    default 3; None: off); ``importance_ratio``: ``"token"`` or GSPO's ``"sequence"``; ``rule``: the rule
    for which callers compute contributions; ``lr``: the optimiser's learning rate (predictive
    calibration); ``total_steps``: horizon of schedule specs.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    importance_ratio: Literal["token", "sequence"] = "token"
    rule: Literal["pg", "npg"] = "pg"
    lr: float = 1.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _set_float(self, "eps_low", optional=True)
        _set_float(self, "eps_high", optional=True)
        low, high = self.eps_low, self.eps_high
        if low is not None and high is not None and (not (0 <= low <= 1) or high < 0):
            raise ValueError(f"need 0 <= eps_low <= 1 and eps_high >= 0, got {low}, {high}")
        _set_float(self, "clip_ratio_c", optional=True)
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1 or None, got {self.clip_ratio_c}")
        if self.importance_ratio not in ("token", "sequence"):
            raise ValueError(f"importance_ratio must be 'token' or 'sequence' (GSPO), got {self.importance_ratio!r}")
        check_rule(str(self.rule))
        _set_float(self, "lr")
        ts = self.total_steps
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0):
            raise ValueError(f"total_steps must be an int > 0, got {ts!r}")


@dataclass(frozen=True)
class EntropyBonusOptions(MethodOptions):
    coef: float = 0.003  # the bonus coefficient

    def __post_init__(self) -> None:
        super().__post_init__()
        _set_float(self, "coef")


@dataclass(frozen=True)
class AdaptiveEntropyBonusOptions(MethodOptions):
    target: TargetSpec = 0.5  # entropy below which the bonus grows
    schedule: TargetSpec = None  # alias of target (a schedule spec)
    coef_init: float = 0.0
    delta: float = 0.001
    coef_max: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("coef_init", "delta", "coef_max"):
            _set_float(self, name)
        if self.coef_init < 0 or self.delta <= 0 or self.coef_max < 0:
            raise ValueError("need coef_init >= 0, delta > 0, coef_max >= 0")


@dataclass(frozen=True)
class ClipHigherOptions(MethodOptions):
    eps_high: float = 0.28  # DAPO's decoupled upper clip


@dataclass(frozen=True)
class CovOptions(MethodOptions):
    ratio: float = 2e-4  # fraction of the batch's tokens selected
    seed: int = 0  # of the generator that draws Clip-Cov's tokens
    verl_compat: bool = True  # verl's details (docs/theory.md §4.6)

    def __post_init__(self) -> None:
        super().__post_init__()
        _set_float(self, "ratio")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not isinstance(self.verl_compat, bool):
            raise TypeError(f"verl_compat must be a bool, got {self.verl_compat!r}")


@dataclass(frozen=True)
class ClipCovOptions(CovOptions):
    lb: float = 1.0  # covariance bounds of the candidate tokens
    ub: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _set_float(self, "lb")
        _set_float(self, "ub")
        if self.lb > self.ub:
            raise ValueError(f"clip-cov bounds need lb <= ub, got {self.lb}, {self.ub}")


@dataclass(frozen=True)
class KLCovOptions(CovOptions):
    """``eps_low``/``eps_high`` default to None: with ``verl_compat`` KL-Cov has no PPO clip, so giving
    them is an error; without it they default to 0.2 / 0.2."""

    eps_low: float | None = None
    eps_high: float | None = None
    kl_coef: float = 0.1

    def __post_init__(self) -> None:
        given = sorted(n for n in ("eps_low", "eps_high") if getattr(self, n) is not None)
        if self.verl_compat and given:
            raise ValueError(f"kl-cov with verl_compat=True has no PPO clip (verl's -A r), so {given} would be "
                             "ignored; pass verl_compat=False to use a clipped surrogate")
        for name in ("eps_low", "eps_high"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, 0.2)
        super().__post_init__()
        _set_float(self, "kl_coef")


@dataclass(frozen=True)
class SignOptions(MethodOptions):
    source: Literal["advantages", "rewards"] = "advantages"  # the values whose signs decide

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice(self, "source", ("advantages", "rewards"))


@dataclass(frozen=True)
class WReinforceOptions(SignOptions):
    weight: float = 0.1  # lambda, the weight of positive samples

    def __post_init__(self) -> None:
        super().__post_init__()
        _set_float(self, "weight")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class EntroPICOptions(MethodOptions):
    target: TargetSpec = 0.5
    schedule: TargetSpec = None  # alias of target
    kp: float = 1.0
    ki: float = 0.01
    alpha_max: float = 1.0
    source: Literal["advantages", "rewards"] = "advantages"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("kp", "ki", "alpha_max"):
            _set_float(self, name)
        _check_choice(self, "source", ("advantages", "rewards"))


@dataclass(frozen=True)
class EntrocraftOptions(MethodOptions):
    """Entrocraft: one of ``target``/``schedule``/``band`` (default: the method's), ``exact_reference``
    (band mode only), and the sampler's options (:class:`entrotheory.rejection.SamplerOptions`; None
    keeps the sampler's default)."""

    target: TargetSpec = None
    schedule: TargetSpec = None
    band: TargetSpec = None
    width: float | None = None
    exact_reference: bool = False
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
        super().__post_init__()
        given = [k for k in ("target", "schedule", "band") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of target/schedule/band, got {given}")
        self.sampler_options()  # validates the sampler's part

    def sampler_options(self) -> SamplerOptions:
        names = [f.name for f in fields(SamplerOptions)]
        return SamplerOptions(**{n: getattr(self, n) for n in names})


# ----------------------------------------------------------------------------- base class
class EntropyMethod:
    """Base class: vanilla GRPO/PPO token loss, no entropy intervention (docs/theory.md §4.6).

    Subclasses override :meth:`_transform` (advantage/acceptance/flags) and declare their
    options in ``OPTIONS`` (name -> default). Common options for every method: ``eps_low``,
    ``eps_high``, ``total_steps``, ``rule`` (``"pg"``/``"npg"``, the rule for which callers
    compute contributions), ``lr`` (used by predictive calibration; recorded otherwise), ``clip_ratio_c``
    (dual clip on ``A < 0`` tokens, verl's default 3; None: off), ``importance_ratio`` (``"token"``, or
    ``"sequence"`` for GSPO's length-normalised sequence ratio; the release ran GSPO with the band rule).
    """

    name = "vanilla"
    needs_token_entropy = False
    needs_contributions = False
    Options: type[MethodOptions] = MethodOptions
    #: option name -> default, of ``Options`` (for introspection: which options a method takes)
    OPTIONS: dict[str, object] = _defaults(MethodOptions)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.OPTIONS = _defaults(cls.Options)

    def __init__(self, options: MethodOptions | None = None, **kwargs: object) -> None:
        if options is None:
            known = set(self.OPTIONS)
            unknown = sorted(set(kwargs) - known)
            if unknown:
                raise TypeError(f"method {self.name!r}: unknown option(s) {unknown}; allowed: {sorted(known)}")
            try:
                options = self.Options(**kwargs)  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"method {self.name!r}: {exc}") from None
        elif kwargs:
            raise TypeError(f"method {self.name!r}: give either options= or keyword options, not both")
        elif not isinstance(options, self.Options):
            raise TypeError(f"method {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.eps_low: float = options.eps_low  # type: ignore[assignment]
        self.eps_high: float = options.eps_high  # type: ignore[assignment]
        self.clip_ratio_c: float | None = options.clip_ratio_c
        self.importance_ratio: str = options.importance_ratio
        self.rule = check_rule(str(options.rule))
        self.total_steps: int | None = options.total_steps
        self._setup()

    def _setup(self) -> None:
        """Per-method option checks and state; override."""

    def _target(self, key: str = "target") -> Schedule:
        spec = getattr(self.options, key)
        if key == "target" and getattr(self.options, "schedule", None) is not None:
            spec = self.options.schedule
        if spec is None:
            raise ValueError(f"method {self.name!r} needs {key}=... (a number, a schedule spec or a Schedule)")
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return parse_schedule(spec, self.total_steps or 1)
        if self.total_steps is None:
            raise ValueError(f"method {self.name!r}: {key}={spec!r} needs total_steps=...")
        return parse_schedule(spec, self.total_steps)  # type: ignore[arg-type]

    # -- phase 1 ------------------------------------------------------------------------------
    def prepare(
        self,
        advantages: Tensor,
        log_probs: Tensor,
        old_log_probs: Tensor,
        mask: Tensor,
        entropy: float | Tensor,
        step: int,
        contributions: Tensor | None = None,
        rewards: Tensor | None = None,
    ) -> MethodPlan:
        """Build this batch's :class:`MethodPlan` over the WHOLE batch (docs/theory.md §4.6).

        Parameters
        ----------
        advantages : ``[B, T]`` per-token advantages (sequence advantage broadcast).
        log_probs, old_log_probs : ``[B, T]`` current / behaviour ``log pi(y_t)`` (detached is fine).
        mask : ``[B, T]`` bool response tokens.
        entropy : token-mean entropy of the batch (masked), before the update.
        step : int ``>= 0``.
        contributions : ``[B, T]`` per-token first-order contributions or None.
        rewards : ``[B]`` raw per-sequence rewards or None.
        """
        adv = check_float_tensor(advantages, "advantages")
        if adv.ndim != 2:
            raise ValueError(f"advantages must be [B, T] (use .unsqueeze(-1) for T = 1), got {tuple(adv.shape)}")
        for name, t in (("log_probs", log_probs), ("old_log_probs", old_log_probs)):
            check_float_tensor(t, name)
            if t.shape != adv.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} must equal advantages shape {tuple(adv.shape)}")
        if not isinstance(mask, Tensor) or mask.shape != adv.shape:
            raise ValueError(f"mask must be a tensor of shape {tuple(adv.shape)}")
        m = mask.to(torch.bool)
        h = _as_float(entropy, "entropy")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if contributions is not None:
            check_float_tensor(contributions, "contributions")
            if contributions.shape != adv.shape:
                raise ValueError(f"contributions shape {tuple(contributions.shape)} must equal {tuple(adv.shape)}")
        if rewards is not None:
            rewards = check_float_tensor(rewards.to(device=adv.device, dtype=adv.dtype)
                                         if isinstance(rewards, Tensor) else rewards, "rewards")
            if rewards.shape not in ((adv.shape[0],), adv.shape):
                raise ValueError(f"rewards must be [B] = ({adv.shape[0]},) or {tuple(adv.shape)}, "
                                 f"got {tuple(rewards.shape)}")
        adv = torch.where(m, adv, torch.zeros_like(adv))
        plan = self._transform(adv, log_probs.detach(), old_log_probs.detach(), m, h, step, contributions, rewards)
        plan.advantages = torch.where(m, plan.advantages, torch.zeros_like(plan.advantages))
        plan.accepted = plan.accepted & m
        sign_src = adv if plan.sign_source is None else plan.sign_source
        diag = {"method": self.name, "entropy": h, **_row_sign_stats(sign_src, plan.accepted, m), **plan.diagnostics}
        live = bool((plan.advantages != 0).any())
        extra = plan.entropy_coef != 0 or (plan.kl_mask is not None and bool(plan.kl_mask.any()))
        plan.skip = not (live or extra)
        diag["all_rejected"] = float(not live)
        if plan.skip:
            diag.setdefault("note", "nothing to train on (all advantages zero or rejected): skip the update")
        plan.diagnostics = diag
        plan.eps_low, plan.eps_high = self._plan_eps()
        plan.clip_ratio_c = self._plan_dual_clip()
        plan.importance_ratio = self.importance_ratio
        return plan

    def _plan_eps(self) -> tuple[float, float]:
        """The clip range the token loss uses (KL-Cov under ``verl_compat``: none)."""
        return self.eps_low, self.eps_high

    def _plan_dual_clip(self) -> float | None:
        """The dual clip the token loss uses (verl's Clip-Cov, KL-Cov and GSPO losses have none)."""
        return None if self.importance_ratio == "sequence" else self.clip_ratio_c

    def _source(self, adv: Tensor, rewards: Tensor | None, mask: Tensor) -> Tensor:
        """Advantages or, with ``source="rewards"``, the raw rewards broadcast to ``[B, T]``."""
        if getattr(self.options, "source", "advantages") == "advantages":
            return adv
        if rewards is None:
            raise ValueError(f"method {self.name!r} with source='rewards' needs rewards=...")
        r = rewards if rewards.shape == adv.shape else rewards.unsqueeze(-1).expand(adv.shape)
        return torch.where(mask, r, torch.zeros_like(r))

    def _transform(
        self, adv: Tensor, lp: Tensor, old: Tensor, mask: Tensor, h: float, step: int,
        contributions: Tensor | None, rewards: Tensor | None,
    ) -> MethodPlan:
        return MethodPlan(advantages=adv, accepted=mask.clone())

    # -- phase 2 ------------------------------------------------------------------------------
    def token_loss(
        self,
        plan: MethodPlan,
        log_probs: Tensor,
        old_log_probs: Tensor,
        mask: Tensor,
        token_entropy: Tensor | None = None,
    ) -> Tensor:
        """Per-token loss ``[B, T]`` with gradients through ``log_probs`` (and ``token_entropy``).

        ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` (dual-clipped on ``A < 0`` by ``clip_ratio_c``;
        with ``importance_ratio="sequence"`` ``r`` is GSPO's sequence ratio); Clip-Cov tokens detached; plus
        ``kl_coef |log pi - log pi_old|`` on KL-Cov tokens; minus ``entropy_coef * H_t``. Zero off-mask.
        """
        if log_probs.shape != plan.advantages.shape or old_log_probs.shape != log_probs.shape:
            raise ValueError(f"log_probs {tuple(log_probs.shape)} / old_log_probs {tuple(old_log_probs.shape)} "
                             f"must match the plan's rows {tuple(plan.advantages.shape)} (use plan.rows(...))")
        if mask.shape != log_probs.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal {tuple(log_probs.shape)}")
        m = mask.to(torch.bool)
        old = old_log_probs.detach()
        log_ratio = sequence_log_ratio(log_probs, old, m) if plan.importance_ratio == "sequence" else None
        loss = clipped_surrogate(log_probs, old, plan.advantages.to(log_probs.dtype), plan.eps_low, plan.eps_high,
                                 plan.clip_ratio_c, log_ratio)
        if plan.detach is not None:
            loss = torch.where(plan.detach, loss.detach(), loss)
        if plan.kl_mask is not None and plan.kl_coef != 0:
            loss = loss + torch.where(plan.kl_mask, plan.kl_coef * (log_probs - old).abs(), torch.zeros_like(loss))
        if plan.entropy_coef != 0:
            if token_entropy is None:
                raise ValueError(f"method {self.name!r} needs token_entropy [B, T] (with grad) for its bonus")
            if token_entropy.shape != loss.shape:
                raise ValueError(f"token_entropy shape {tuple(token_entropy.shape)} must equal {tuple(loss.shape)}")
            loss = loss - plan.entropy_coef * token_entropy
        return torch.where(m, loss, torch.zeros_like(loss))

    # -- feedback and state -----------------------------------------------------------------------
    def observe(self, measured_change: float | Tensor) -> None:
        """Measured entropy change of the last update (used by calibrating methods)."""
        _as_float(measured_change, "measured_change")

    def state_dict(self) -> dict[str, object]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for method {state.get('name')!r}, not {self.name!r}")

    def __repr__(self) -> str:
        return f"make_method({self.name!r})"


# ----------------------------------------------------------------------------- the methods
class Vanilla(EntropyMethod):
    """Plain GRPO/PPO (eps 0.2 / 0.2). First order: ``dH = -Cov(log pi, dz)``, usually < 0 (§4.6)."""

    name = "vanilla"


class EntropyBonus(EntropyMethod):
    """Fixed entropy bonus ``-coef * H_t`` (coef 0.003). Raises entropy (§4.6)."""

    name = "entropy-bonus"
    needs_token_entropy = True
    Options = EntropyBonusOptions

    def _setup(self) -> None:
        self.coef = self.options.coef

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        return MethodPlan(advantages=adv, accepted=mask.clone(), entropy_coef=self.coef,
                          diagnostics={"entropy_coef": self.coef})


class AdaptiveEntropyBonus(EntropyMethod):
    """Skywork-OR1 adaptive bonus (§4.6), "update after use": at step k the bonus coefficient is
    ``c_k`` if ``H_k < target(k)`` and 0 otherwise; then ``c_{k+1} = min(c_k + delta, coef_max)``
    if ``H_k < target(k)``, else ``max(c_k - delta, 0)``. ``c_0 = coef_init``."""

    name = "adaptive-entropy-bonus"
    needs_token_entropy = True
    Options = AdaptiveEntropyBonusOptions

    def _setup(self) -> None:
        self.target = self._target()
        self.coef = self.options.coef_init
        self.delta = self.options.delta
        self.coef_max = self.options.coef_max

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        target = self.target(step)
        below = h < target
        active = self.coef if below else 0.0  # c_k, set by the previous steps' entropies (update after use)
        self.coef = min(self.coef + self.delta, self.coef_max) if below else max(self.coef - self.delta, 0.0)
        return MethodPlan(advantages=adv, accepted=mask.clone(), entropy_coef=active,
                          diagnostics={"entropy_coef": active, "coef_state": self.coef, "target_entropy": target,
                                       "regime": "below" if below else "above"})

    def state_dict(self):
        return {"name": self.name, "coef": self.coef}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.coef = float(state["coef"])


class ClipHigher(EntropyMethod):
    """DAPO clip-higher: decoupled ``eps_low = 0.2``, ``eps_high = 0.28`` (§4.6)."""

    name = "clip-higher"
    Options = ClipHigherOptions


class _CovMethod(EntropyMethod):
    Options = CovOptions

    def _setup(self) -> None:
        self.ratio = self.options.ratio
        self.verl_compat: bool = self.options.verl_compat
        self.generator = torch.Generator().manual_seed(int(self.options.seed))

    def _count(self, mask: Tensor) -> int:
        return max(int(self.ratio * int(mask.sum())), 1)

    def _plan_dual_clip(self) -> float | None:
        # verl's compute_policy_loss_clip_cov / _kl_cov apply no dual clip (clip_ratio_c is accepted, unused)
        return None if self.verl_compat else super()._plan_dual_clip()

    def state_dict(self):
        return {"name": self.name, "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]


class ClipCov(_CovMethod):
    """Clip-Cov (Cui et al. 2025, §4.6): among the candidate tokens a random
    ``max(1, int(ratio * n_tokens))`` of the WHOLE batch are detached from the gradient.

    ``verl_compat=True`` (default), as verl: candidates have ``lb < cov < ub`` (strict) and are not
    already clipped by PPO at ``prepare`` time (ratio from the ``log_probs`` / ``old_log_probs``
    given there). ``verl_compat=False``: ``lb <= cov <= ub``, clipped tokens not excluded.
    """

    name = "clip-cov"
    Options = ClipCovOptions

    def _setup(self) -> None:
        super()._setup()
        self.lb, self.ub = self.options.lb, self.options.ub

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        cov = token_covariance(adv, lp, mask)
        if self.verl_compat:
            clipped = mask & ppo_clipped(lp, old, adv, self.eps_low, self.eps_high)
            in_range = mask & ~clipped & (cov > self.lb) & (cov < self.ub)
        else:
            clipped = torch.zeros_like(mask)
            in_range = mask & (cov >= self.lb) & (cov <= self.ub)
        cand = in_range.reshape(-1).nonzero().squeeze(-1)
        n = min(self._count(mask), cand.numel())
        detach = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        if n:  # the generator lives on the CPU: draw there, index on the batch's device
            perm = torch.randperm(cand.numel(), generator=self.generator, device=self.generator.device)[:n]
            detach[cand[perm.to(cand.device)]] = True
        return MethodPlan(advantages=adv, accepted=mask.clone(), detach=detach.reshape(mask.shape),
                          diagnostics={"num_detached": float(n), "num_candidates": float(cand.numel()),
                                       "num_ppo_clipped": float(clipped.sum())})


class KLCov(_CovMethod):
    """KL-Cov (Cui et al. 2025, §4.6): the top ``max(1, int(ratio * n_tokens))`` tokens of the WHOLE
    batch by covariance get ``kl_coef |log pi - log pi_old|`` (zero gradient at the first on-policy step).

    ``verl_compat=True`` (default), as verl: every token's surrogate is the unclipped ``-A r`` (no
    PPO clip, so ``eps_low``/``eps_high`` may not be given); ``verl_compat=False``: the clipped
    surrogate ``-min(r A, clip(r) A)`` plus the penalty.
    """

    name = "kl-cov"
    Options = KLCovOptions

    def _setup(self) -> None:
        super()._setup()
        self.kl_coef = self.options.kl_coef

    def _plan_eps(self) -> tuple[float, float]:
        # clamp(r, 0, inf) = r for every r > 0: -min(r A, r A) = -A r, verl's unclipped KL-Cov surrogate
        return (1.0, math.inf) if self.verl_compat else (self.eps_low, self.eps_high)

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        cov = token_covariance(adv, lp, mask)
        n = min(self._count(mask), int(mask.sum()))
        flat = torch.where(mask, cov, torch.full_like(cov, -math.inf)).reshape(-1)
        kl_mask = torch.zeros_like(flat, dtype=torch.bool)
        if n:
            kl_mask[torch.topk(flat, n).indices] = True
        plan = MethodPlan(advantages=adv, accepted=mask.clone(), kl_mask=kl_mask.reshape(mask.shape) & mask,
                          diagnostics={"num_kl_tokens": float(n)})
        plan.kl_coef = self.kl_coef
        return plan


class _SignMethod(EntropyMethod):
    Options = SignOptions

    def _weights(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        a = self._source(adv, rewards, mask)
        out = a * self._weights(a)
        accepted = mask & ((out != 0) | (a == 0))
        return MethodPlan(advantages=out, accepted=accepted, sign_source=a)


class NSR(_SignMethod):
    """Negative-sample reinforcement: positives set to 0 (§4.6)."""

    name = "nsr"

    def _weights(self, a):
        return (a < 0).to(a.dtype)


class RaftPP(_SignMethod):
    """RAFT++: negatives set to 0 (§4.6)."""

    name = "raft++"

    def _weights(self, a):
        return (a > 0).to(a.dtype)


class WReinforce(_SignMethod):
    """W-REINFORCE: positives weighted by ``weight`` (lambda = 0.1), negatives kept (§4.6)."""

    name = "w-reinforce"
    Options = WReinforceOptions

    def _setup(self) -> None:
        self.weight = self.options.weight

    def _weights(self, a):
        return torch.where(a > 0, torch.full_like(a, self.weight), torch.ones_like(a))


class EntroPIC(EntropyMethod):
    """EntroPIC-style PI control of positive/negative weights (§4.6).

    ``e = H - target(step)``; ``alpha = clip(I + kp e, -alpha_max, alpha_max)``; ``I <- I + ki e``
    (the release: ``alpha <- alpha_prev + e``, stored ``alpha - 0.99 e``, i.e. kp = 1, ki = 0.01).
    Positive advantages weighted ``1 + alpha``, negative ``1 - alpha``. ``source="rewards"`` weights the
    raw rewards instead of the given advantages, as the release does.
    """

    name = "entropic"
    Options = EntroPICOptions

    def _setup(self) -> None:
        self.target = self._target()
        self.kp, self.ki, self.alpha_max = self.options.kp, self.options.ki, self.options.alpha_max
        self.integral = 0.0
        self.alpha = 0.0

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        target = self.target(step)
        e = h - target
        self.alpha = max(-self.alpha_max, min(self.alpha_max, self.integral + self.kp * e))
        self.integral += self.ki * e
        a = self._source(adv, rewards, mask)
        w = torch.where(a > 0, torch.full_like(a, 1 + self.alpha), torch.full_like(a, 1 - self.alpha))
        return MethodPlan(advantages=a * w, accepted=mask.clone(),
                          diagnostics={"alpha": self.alpha, "target_entropy": target,
                                       "regime": "above" if e > 0 else "below"},
                          sign_source=None if a is adv else a)

    def state_dict(self):
        return {"name": self.name, "integral": self.integral, "alpha": self.alpha}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.integral, self.alpha = float(state["integral"]), float(state["alpha"])


class _Entrocraft(EntropyMethod):
    MODE = "band"
    Options = EntrocraftOptions
    DEFAULT_TARGET = "linear:0.6->0.4..linear:0.7->0.5"

    def _setup(self) -> None:
        o = self.options
        given = [k for k in ("target", "schedule", "band") if getattr(o, k) is not None]
        target = getattr(o, given[0]) if given else self.DEFAULT_TARGET
        if self.MODE != "band" and o.exact_reference:
            raise ValueError("exact_reference applies to entrocraft-band only")
        self.sampler = EntropyRejectionSampler(target, mode=self.MODE, total_steps=self.total_steps,
                                               options=o.sampler_options())

    def _transform(self, adv, lp, old, mask, h, step, contributions, rewards):
        sel = self.sampler.select(adv, h, step, contributions=contributions, mask=mask, rewards=rewards)
        # the base class recomputes the acceptance statistics per sample (row), whatever the unit
        diag = {k: v for k, v in sel.diagnostics.items()
                if k not in ("accepted_fraction", "accepted_pos_fraction", "accepted_neg_fraction", "num_samples",
                             "num_pos", "num_neg")}
        sign_src = None
        if self.sampler.exact_reference and sel.diagnostics.get("regime") in ("above", "below"):
            sign_src = torch.where(mask, self.sampler._broadcast_rewards(rewards, adv), torch.zeros_like(adv))
        return MethodPlan(advantages=sel.advantages, accepted=sel.accepted, diagnostics=diag, sign_source=sign_src)

    def observe(self, measured_change):
        self.sampler.observe(measured_change)

    def state_dict(self):
        return {"name": self.name, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])  # type: ignore[arg-type]


class EntrocraftBand(_Entrocraft):
    """Entrocraft, the released band rule (§4.3); default band ``linear:0.6->0.4..linear:0.7->0.5``."""

    name = "entrocraft-band"
    MODE = "band"


class EntrocraftPredictive(_Entrocraft):
    """Entrocraft, predictive mode (§4.4); needs ``contributions`` in ``prepare``."""

    name = "entrocraft-predictive"
    MODE = "predictive"
    needs_contributions = True
    DEFAULT_TARGET = "linear:0.65->0.45"


#: registry ``name -> class``; build with :func:`make_method`
METHODS: dict[str, type[EntropyMethod]] = {
    cls.name: cls
    for cls in (Vanilla, EntropyBonus, AdaptiveEntropyBonus, ClipHigher, ClipCov, KLCov, NSR, WReinforce, RaftPP,
                EntroPIC, EntrocraftBand, EntrocraftPredictive)
}


def make_method(name: str, options: MethodOptions | None = None, **kwargs: object) -> EntropyMethod:
    """Build the entropy method ``name`` from :data:`METHODS` (docs/theory.md §4.6).

    Options are either a typed ``options=`` (``METHODS[name].Options``, e.g. :class:`ClipCovOptions`) or
    the same fields as keywords; unknown or invalid options raise naming the method and the option."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {tuple(METHODS)}")
    return METHODS[name](options, **kwargs)
