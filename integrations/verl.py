"""Entrocraft as verl (0.9.1) advantage estimators (docs/integrations.md).

Importing this module registers, through verl's own extension point ``core_algos.register_adv_est``:

=========================  ===========================================================================
``entrocraft_band``        the released band rule (``entrotheory`` method ``entrocraft-band``)
``entrocraft_predictive``  the predictive sampler (``entrocraft-predictive``, npg contributions)
``entrocraft_grpo``        ``entrotheory``'s estimators alone (no entropy control), uid groups of any size
=========================  ===========================================================================

Each takes verl's arguments (``token_level_rewards`` ``[B, T]``, ``response_mask`` ``[B, T]``, ``index`` the
``uid`` array, ``config`` the ``algorithm`` config) and reads its options from ``config.entrocraft`` (see
:func:`entrocraft_options`). The batch entropy is read as the released fork does: the token-mean entropy of
the current rollout batch, computed when the old log-probs are recomputed. verl 0.9.1 computes it there (its
``actor/entropy`` metric) but passes it to no estimator, so :class:`EntrocraftTrainerMixin` feeds it (and
verl's ``global_steps``, which count from 1 like the release) to :func:`feed_batch`; a fork that passes
``entropy=`` / ``step=`` to the estimator works too. State across steps (the band's step, the calibration of
the predictive sampler, Clip-Cov's random generator) lives in one :class:`EntrocraftAdvantage` per name on
the driver, where verl runs ``compute_advantage``; :meth:`EntrocraftTrainerMixin._save_checkpoint` stores it
next to verl's checkpoint.

Whole-batch Clip-Cov: with ``config.entrocraft.clip_cov`` set, the tokens Clip-Cov detaches are chosen at
the advantage stage over the WHOLE rollout batch (all ranks, all micro-batches) from the old log-probs, and
their advantage is set to 0, which removes exactly their policy gradient (verl's ``corr = 0``). verl's own
``clip_cov`` loss selects per micro-batch, on each rank.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from verl.trainer.ppo import core_algos

from entrotheory.advantages import compute_group_advantages
from entrotheory.methods import EntropyMethod, make_method
from entrotheory.tokens import TokenEntropyStats, token_mean_contributions

__all__ = ["ESTIMATOR_NAMES", "EntrocraftAdvantage", "EntrocraftTrainerMixin", "entrocraft_options", "feed_batch",
           "get_controller", "reset_controllers"]

#: registered estimator name -> entrotheory method (None: estimator only)
ESTIMATOR_NAMES: dict[str, str | None] = {
    "entrocraft_band": "entrocraft-band",
    "entrocraft_predictive": "entrocraft-predictive",
    "entrocraft_grpo": None,
}
_NOT_METHOD_OPTIONS = ("estimator", "eps", "clip_cov")


def entrocraft_options(config: Any) -> dict[str, Any]:
    """The ``entrocraft`` section of verl's ``algorithm`` config as a plain dict (``{}`` if absent).

    Keys: ``estimator`` (an ``entrotheory.advantages`` name, default ``"grpo"``), ``eps`` (1e-6),
    ``clip_cov`` (``{ratio, lb, ub, seed}`` or None), and any option of the entrotheory method
    (``band``, ``schedule``, ``total_steps``, ``exact_reference``, ``step_offset``, ``lr``, ``calibration_factor``...).
    """
    if config is None:
        return {}
    section = config.get("entrocraft", None) if hasattr(config, "get") else getattr(config, "entrocraft", None)
    if section is None:
        return {}
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    if not isinstance(section, Mapping):
        raise TypeError(f"algorithm.entrocraft must be a mapping, got {type(section).__name__}")
    return dict(section)


class EntrocraftAdvantage:
    """Driver-side state of one registered estimator: the method, the fed batch data, the step counter.

    ``feed(entropy, step, token_entropy, old_log_probs)`` stores this rollout batch's data; a call then
    computes advantages for verl. Without a fed step the calls are counted from 1 (verl's ``global_steps``).
    """

    def __init__(self, name: str) -> None:
        if name not in ESTIMATOR_NAMES:
            raise ValueError(f"unknown estimator {name!r}; expected one of {tuple(ESTIMATOR_NAMES)}")
        self.name = name
        self.method: EntropyMethod | None = None
        self.clip_cov: EntropyMethod | None = None
        self._options: dict[str, Any] | None = None
        self.calls = 0
        self._fed: dict[str, Any] = {}
        self._last_entropy: float | None = None
        self.last_diagnostics: dict[str, float | str] = {}

    def feed(self, entropy: float | Tensor, step: int | None = None, token_entropy: Tensor | None = None,
             old_log_probs: Tensor | None = None) -> None:
        """This rollout batch's token-mean entropy (nats/token), verl step, per-token entropy and old log-probs."""
        h = float(entropy)
        if not math.isfinite(h) or h < 0:
            raise ValueError(f"batch entropy must be a finite number >= 0, got {h}")
        self._fed = {"entropy": h, "step": step, "token_entropy": token_entropy, "old_log_probs": old_log_probs}

    def _build(self, options: dict[str, Any]) -> None:
        if self._options is not None:
            if options != self._options:
                raise ValueError(f"{self.name}: algorithm.entrocraft changed between steps ({self._options} -> "
                                 f"{options}); call reset_controllers() to start over")
            return
        self._options = dict(options)
        method_name = ESTIMATOR_NAMES[self.name]
        method_opts = {k: v for k, v in options.items() if k not in _NOT_METHOD_OPTIONS}
        if method_name is not None:
            if method_name == "entrocraft-predictive":
                method_opts.setdefault("rule", "npg")  # verl gives log pi(y_t) and H_t, not the pg baseline
            self.method = make_method(method_name, **method_opts)
        elif method_opts:
            raise ValueError(f"{self.name} takes only {_NOT_METHOD_OPTIONS}, got {sorted(method_opts)}")
        if options.get("clip_cov") is not None:
            self.clip_cov = make_method("clip-cov", **dict(options["clip_cov"]))

    def __call__(self, token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
                 entropy: float | Tensor | None = None, step: int | None = None, old_log_probs: Tensor | None = None,
                 token_entropy: Tensor | None = None, **_: Any) -> tuple[Tensor, Tensor]:
        """verl's estimator call: ``(advantages, returns)``, both ``[B, T]`` (zero off the response mask)."""
        options = entrocraft_options(config)
        self._build(options)
        if token_level_rewards.ndim != 2 or response_mask.shape != token_level_rewards.shape:
            raise ValueError(f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
                             f"{tuple(response_mask.shape)} must be the same [B, T]")
        if index is None:
            raise ValueError(f"{self.name} needs verl's uid index (data.non_tensor_batch['uid']) to group responses")
        mask = response_mask.to(torch.bool)
        scores = token_level_rewards.sum(-1)
        seq_adv, info = compute_group_advantages(scores, index, options.get("estimator", "grpo"),
                                                 float(options.get("eps", 1e-6)))
        adv = torch.where(mask, seq_adv.unsqueeze(-1).to(token_level_rewards.dtype), 0.0)
        self.calls += 1
        fed = self._fed
        self._fed = {}
        old = old_log_probs if old_log_probs is not None else fed.get("old_log_probs")
        tok_h = token_entropy if token_entropy is not None else fed.get("token_entropy")
        t = step if step is not None else fed.get("step")
        t = self.calls if t is None else int(t)
        diag: dict[str, float | str] = {"zero_signal_fraction": float(info["zero_signal_fraction"])}
        if self.method is not None:
            h = entropy if entropy is not None else fed.get("entropy")
            if h is None:
                raise ValueError(f"{self.name} needs the batch entropy: train with EntrocraftTrainerMixin (it feeds "
                                 "verl's recomputed old-log-prob entropy), or call integrations.verl.feed_batch(...) "
                                 "before compute_advantage, or pass entropy= from a forked compute_advantage")
            h = float(h)
            if self._last_entropy is not None:  # the last update's effect, as far as the batches show it
                self.method.observe(h - self._last_entropy)
            self._last_entropy = h
            contrib = None
            if old is not None and tok_h is not None:
                stats = TokenEntropyStats(old.float(), tok_h.float(), torch.zeros_like(old, dtype=torch.float32), mask)
                contrib = token_mean_contributions(stats, adv.float(), mask, rule="npg").to(adv.dtype)
            elif self.method.needs_contributions:
                raise ValueError(f"{self.name} needs the per-token entropy and old log-probs of the batch "
                                 "(feed_batch(..., token_entropy=, old_log_probs=) or EntrocraftTrainerMixin)")
            lp = old if old is not None else torch.zeros_like(adv)
            plan = self.method.prepare(adv, lp, lp, mask, h, t, contributions=contrib, rewards=scores)
            adv = plan.advantages
            diag.update(plan.diagnostics)
        if self.clip_cov is not None:
            if old is None:
                raise ValueError(f"{self.name} with clip_cov needs the old log-probs of the whole batch")
            plan = self.clip_cov.prepare(adv, old, old, mask, float(fed.get("entropy", 0.0)), t)
            adv = torch.where(plan.detach, torch.zeros_like(adv), adv)
            diag.update(num_detached=plan.diagnostics["num_detached"],
                        num_candidates=plan.diagnostics["num_candidates"])
        diag["step"] = float(t)
        self.last_diagnostics = diag
        return adv, adv

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls, "last_entropy": self._last_entropy, "options": self._options,
                "method": None if self.method is None else self.method.state_dict(),
                "clip_cov": None if self.clip_cov is None else self.clip_cov.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for {state.get('name')!r}, not {self.name!r}")
        if state.get("options") is not None:
            self._options = None
            self._build(state["options"])
        self.calls, self._last_entropy = int(state["calls"]), state["last_entropy"]
        if self.method is not None and state.get("method") is not None:
            self.method.load_state_dict(state["method"])
        if self.clip_cov is not None and state.get("clip_cov") is not None:
            self.clip_cov.load_state_dict(state["clip_cov"])


_CONTROLLERS: dict[str, EntrocraftAdvantage] = {}


def get_controller(name: str) -> EntrocraftAdvantage:
    """The driver-side state of the registered estimator ``name``."""
    if name not in _CONTROLLERS:
        _CONTROLLERS[name] = EntrocraftAdvantage(name)
    return _CONTROLLERS[name]


def reset_controllers() -> None:
    """Forget all estimator state (a new run in the same process)."""
    _CONTROLLERS.clear()


def feed_batch(entropy: float | Tensor, step: int | None = None, token_entropy: Tensor | None = None,
               old_log_probs: Tensor | None = None) -> None:
    """Give every Entrocraft estimator this rollout batch's entropy (nats/token) and verl step."""
    for name in ESTIMATOR_NAMES:
        get_controller(name).feed(entropy, step, token_entropy, old_log_probs)


def _make_estimator(name: str):
    def estimator(token_level_rewards: Tensor, response_mask: Tensor, index: np.ndarray | None = None,
                  config: Any = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return get_controller(name)(token_level_rewards, response_mask, index=index, config=config, **kwargs)

    estimator.__name__ = f"compute_{name}_advantage"
    estimator.__doc__ = f"verl advantage estimator {name!r} (integrations.verl, docs/integrations.md)."
    return estimator


for _name in ESTIMATOR_NAMES:
    if _name not in core_algos.ADV_ESTIMATOR_REGISTRY:  # a re-import must not re-register a new function
        core_algos.register_adv_est(_name)(_make_estimator(_name))


class EntrocraftTrainerMixin:
    """Mix into verl's ``RayPPOTrainer``: feeds the batch entropy and step, checkpoints the estimator state.

    ``class Trainer(EntrocraftTrainerMixin, RayPPOTrainer): pass``. After verl recomputes the old log-probs
    (with per-token entropies) it computes the token-mean entropy exactly like its ``actor/entropy``
    metric (``agg_loss`` with the actor's ``loss_agg_mode``) and calls :func:`feed_batch` with
    ``self.global_steps``; Entrocraft's diagnostics are added to the actor's metrics as ``entrocraft/*``.
    """

    def _compute_old_log_prob(self, batch):  # noqa: D102 - verl's hook
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        token_entropy = old_log_prob.batch["entropys"]
        mask = batch.batch["response_mask"]
        actor = self.config.actor_rollout_ref.actor
        h = core_algos.agg_loss(loss_mat=token_entropy, loss_mask=mask, loss_agg_mode=actor.loss_agg_mode,
                                loss_scale_factor=actor.get("loss_scale_factor", None))
        feed_batch(float(h), step=int(self.global_steps), token_entropy=token_entropy,
                   old_log_probs=old_log_prob.batch["old_log_probs"])
        return old_log_prob, mfu

    def _update_actor(self, batch):  # noqa: D102 - verl's hook
        output = super()._update_actor(batch)
        name = self.config.algorithm.adv_estimator
        if name in _CONTROLLERS:
            metrics = output.meta_info.setdefault("metrics", {})
            for key, value in _CONTROLLERS[name].last_diagnostics.items():
                if isinstance(value, (int, float)):  # verl's loggers take numbers (the regime is a string)
                    metrics[f"entrocraft/{key}"] = float(value)
        return output

    def _entrocraft_path(self) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}",
                            "entrocraft.pt")

    def _save_checkpoint(self):  # noqa: D102 - verl's hook
        super()._save_checkpoint()
        torch.save({name: c.state_dict() for name, c in _CONTROLLERS.items()}, self._entrocraft_path())

    def _load_checkpoint(self):  # noqa: D102 - verl's hook
        out = super()._load_checkpoint()
        path = self._entrocraft_path()
        if self.global_steps and os.path.exists(path):
            for name, state in torch.load(path, weights_only=False).items():
                get_controller(name).load_state_dict(state)
        return out

