"""One GRPO-style training loop for the bandit and the token environment, batched over seeds.

Each step, for all ``S`` seeds at once:

1. sample ``G`` responses per prompt (``[S, P, G, T]``; a bandit answer is ``T = 1``);
2. score them (+1 / -1) and turn rewards into advantages with any estimator of
   :func:`entrotheory.advantages.compute_advantages` (per seed: ``[P, G]``);
3. measure the entropy of every visited state before the update and the first-order
   contributions of every sample (:meth:`ToyPolicy.contributions`, i.e. entrotheory);
4. per seed, let the entropy method (:func:`entrotheory.methods.make_method`) prepare its plan
   over that seed's whole batch and build its token loss; ``method=None`` trains the plain
   policy-gradient loss ``-A log pi`` (exactly the update the theory describes);
5. one optimiser step (SGD or Adam; ``rule="npg"`` applies the tabular natural gradient by
   dividing each state's logit gradient by ``pi``) — repeated ``updates_per_batch`` times on the
   same batch, as PPO epochs, so that ratio clipping can act;
6. measure the entropy of the same states after the update.

Objective and learning rate. Per seed the loss is the contract's token mean over the whole
batch (rejected tokens keep their place in the normaliser) times the number of prompts ``P``,
i.e. the sum over prompts of a per-prompt mean. With a tabular bandit policy and SGD, each
prompt's logits therefore move by exactly ``lr * logit_update(z_p, y_p, A_p, rule)``.

The entropy the methods see and the loop reports is the token mean over the batch's positions,
``mean_{b,t} H(s_{b,t})``. Its first-order change is, per unit learning rate,
``sum_{b,t} (n_{s(b,t)} / N_tok) c_{b,t}`` with ``c`` the per-position contributions of the
*effective* advantages of the update (``-dLoss/dlog pi``, whatever the method's surrogate did
to them) and ``n_s`` the number of batch positions that share the state (prompt, prefix). An
entropy bonus adds ``predicted_entropy_change(z, w dH/dz)`` with ``w = -dLoss/dH_t``.

``predictor="param"`` replaces the per-position (logit-space) contributions by the parameter-space ones of
:mod:`entrotheory.param_space` (docs/theory.md §5): ``c_t = A_t / N <G grad Hbar, grad log pi(y_t)>`` with
the optimiser's preconditioner ``G`` read from :class:`~toy_envs.optim.SeedOptimizer`, plus the Adam momentum
drift. The applied update's prediction uses the step's own gradient (known after its backward pass, so
Adam's ``v`` is exact); the contributions the method sees before the loss (and ``predicted_vanilla``) use
``v`` updated with the plain loss's gradient of the whole batch (Adam) -- the step's ``v`` if every sample is
accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from entrotheory.advantages import compute_advantages
from entrotheory.core import all_finite, check_rule
from entrotheory.methods import make_method, masked_token_mean
from entrotheory.param_space import StepPreconditioner, adam_preconditioner, sgd_preconditioner

from .optim import SeedOptimizer
from .policies import ToyPolicy

__all__ = ["PREDICTORS", "GROUP_LOCAL_ESTIMATORS", "TrainConfig", "TrainResult", "train", "seed_advantages",
           "seed_optimizer_preconditioner"]

#: where the first-order contributions come from: per-position logit space (docs/theory.md §3) or
#: parameter space (§5)
PREDICTORS = ("logit", "param")

#: advantage estimators whose advantages of a group depend on that group's rewards alone, so that all seeds'
#: groups go through one call (the others normalise over a seed's whole batch)
GROUP_LOCAL_ESTIMATORS = ("grpo", "dr-grpo", "rloo", "reinforce", "raw")

#: plan diagnostics recorded per step when the method reports them
DIAGNOSTIC_KEYS = (
    "accepted_fraction",
    "accepted_pos_fraction",
    "accepted_neg_fraction",
    "target_entropy",
    "lower",
    "upper",
    "entropy_coef",
    "alpha",
    "k",
)


def method_options(config: TrainConfig) -> dict[str, Any]:
    """Options given to ``make_method``: the loop's ``rule``, ``lr`` and ``total_steps``; ``config.method_options``
    win. The loop's contributions are per unit lr of the batch's token-mean entropy (module docstring), the
    convention every method takes them in."""
    opts: dict[str, Any] = {"rule": config.rule, "lr": config.lr, "total_steps": config.steps}
    return opts | dict(config.method_options)


@dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Attributes
    ----------
    steps : training steps (batches).
    group_size : G responses per prompt.
    lr : learning rate.
    optimizer : ``"sgd"`` or ``"adam"``.
    rule : ``"pg"`` (plain logit gradient) or ``"npg"`` (tabular natural gradient); also the
        rule of the contributions given to the method and of the prediction.
    estimator : advantage estimator (``entrotheory.advantages.ESTIMATORS``).
    method : entropy method name (``entrotheory.methods.METHODS``), or ``None`` for the plain
        policy-gradient loss ``-A log pi``.
    method_options : keyword options of ``make_method`` (e.g. ``schedule``, ``total_steps``).
    updates_per_batch : optimiser steps per batch (PPO epochs; 1 = strictly on-policy).
    eval_ks : k values of the recorded pass@k.
    n_eval : samples per prompt for the expected number of distinct correct answers.
    eval_every : evaluate every this many steps (NaN in between; 0 = only after training).
    seed : seed of the sampling generator.
    progress : show a tqdm progress bar over steps.
    predictor : ``"logit"`` (per-position contributions, eq. 3.2) or ``"param"`` (parameter-space
        contributions, eq. 5.3) for the prediction and for the contributions the method selects on.
    """

    steps: int = 100
    group_size: int = 8
    lr: float = 0.1
    optimizer: str = "sgd"
    rule: str = "pg"
    estimator: str = "grpo"
    method: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    updates_per_batch: int = 1
    eval_ks: tuple[int, ...] = (1, 8, 64)
    n_eval: int = 64
    eval_every: int = 1
    seed: int = 0
    progress: bool = False
    predictor: str = "logit"


@dataclass
class TrainResult:
    """History of a run: every entry of ``history`` is an array ``[steps, S]`` (one column per seed).

    Keys: ``entropy`` (before the step's update), ``entropy_after``, ``measured`` (after - before,
    same states), ``predicted`` (first-order prediction of the applied update(s), times lr),
    ``predicted_vanilla`` (the same for the plain advantages, before the method), ``reward``,
    ``skipped``, ``zero_signal_groups``, ``pass@k`` and ``distinct`` (policy at the start of the
    step), ``diag/<key>`` (the method's diagnostics, NaN when absent). ``final`` holds the
    evaluation metrics after the last step, ``[S]`` each.
    """

    config: TrainConfig
    history: dict[str, np.ndarray]
    final: dict[str, np.ndarray]

    def mean(self, key: str) -> np.ndarray:
        """Seed-mean curve ``[steps]`` of a history key."""
        return np.nanmean(self.history[key], axis=1)


def seed_advantages(rewards: Tensor, estimator: str) -> tuple[Tensor, list[int]]:
    """Advantages of every seed's ``[P, G]`` groups and each seed's number of zero-signal groups.

    Parameters
    ----------
    rewards : ``[S, P, G]`` rewards, ``G`` samples of each of ``P`` prompts per seed.
    estimator : :data:`entrotheory.advantages.ESTIMATORS` name.

    Returns
    -------
    ``[S, P, G]`` advantages, equal to :func:`~entrotheory.advantages.compute_advantages` of each seed's
    ``rewards[s]``, and per seed ``info["zero_signal_groups"]`` of that call (groups of ``G >= 2`` equal
    rewards). For the :data:`GROUP_LOCAL_ESTIMATORS` one call on all ``S * P`` groups gives the same numbers.
    """
    if rewards.ndim != 3:
        raise ValueError(f"rewards must be [S, P, G], got shape {tuple(rewards.shape)}")
    s_, p_, g_ = rewards.shape
    if estimator in GROUP_LOCAL_ESTIMATORS:
        adv, _ = compute_advantages(rewards.reshape(s_ * p_, g_), estimator)
        flat = (rewards == rewards[..., :1]).all(-1) if g_ >= 2 else torch.zeros(s_, p_, dtype=torch.bool)
        return adv.reshape(s_, p_, g_), [int(n) for n in flat.sum(-1)]
    adv_list, zero_sig = [], []
    for s in range(s_):
        a, info = compute_advantages(rewards[s], estimator)
        adv_list.append(a)
        zero_sig.append(int(info["zero_signal_groups"]))
    return torch.stack(adv_list), zero_sig


def _token_stats_for(policy: ToyPolicy, tokens: Tensor, prompt_entropy: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-position entropy and visit weights ``n_s / N_tok`` (both ``[S, P, G, T]``); ``prompt_entropy``
    ``[S, P]``: the states' entropies, already known for a policy with ``prompt_states``."""
    ent = _position_entropy(policy, tokens, prompt_entropy)
    n_tok = tokens.shape[1] * tokens.shape[2] * tokens.shape[3]
    return ent, policy.visit_counts(tokens) / n_tok


def _position_entropy(policy: ToyPolicy, tokens: Tensor, prompt_entropy: Tensor | None) -> Tensor:
    """``policy.entropy(tokens)`` ``[S, P, G, T]`` float64, from ``prompt_entropy`` ``[S, P]`` when given."""
    if prompt_entropy is None:
        return policy.entropy(tokens)
    return prompt_entropy[:, :, None, None].expand(tokens.shape).contiguous()


def seed_optimizer_preconditioner(opt: SeedOptimizer, grads: list[Tensor] | None = None) -> StepPreconditioner:
    """The next step of a :class:`~toy_envs.optim.SeedOptimizer` as a linear map (eq. 5.2), per seed.

    SGD: ``gain = lr``. Adam: its moments and per-seed step counts (``grads``: the step's loss gradients,
    for the exact second moment; required while a seed has taken no step yet).
    """
    if opt.kind == "sgd":
        return sgd_preconditioner(opt.params, opt.lr)
    return adam_preconditioner(opt.params, opt.m, opt.v, opt.steps, opt.lr, opt.betas, opt.eps, grads=grads)


def _param_prediction(policy: ToyPolicy, opt: SeedOptimizer, tokens: Tensor, advantages: Tensor, normalizer: float,
                      grads: list[Tensor] | None, entropy_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(contributions [S, P, G, T], predicted [S])`` of the coming step in parameter space (eq. 5.3)."""
    pre = seed_optimizer_preconditioner(opt, grads)
    out = policy.param_space_contributions(tokens, advantages, pre, normalizer, entropy_weights)
    return out.contributions.to(torch.float32), out.predicted.to(torch.float32)


def _plain_loss_grads(policy: ToyPolicy, tokens: Tensor, adv_tok: Tensor, n_tok: int, scale: float) -> list[Tensor]:
    """Gradients of the plain PG loss ``-(P / N_tok) sum A log pi`` of every seed (for Adam's second moment)."""
    lp, _ = policy.forward(tokens)
    params = policy.parameters()
    grads = torch.autograd.grad(-(adv_tok * lp).sum() / n_tok * scale, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def train(
    policy: ToyPolicy, task: Any, config: TrainConfig, method_factory: Any = None
) -> TrainResult:
    """Train ``policy`` on ``task`` (see module docstring) and return its history.

    Parameters
    ----------
    policy : a :class:`~toy_envs.policies.ToyPolicy` (modified in place).
    task : the environment's task (``reward(tokens, generator)``, ``evaluate(policy, ks, n)``).
    config : :class:`TrainConfig`.
    method_factory : optional callable ``() -> method`` overriding ``config.method`` (one
        independent method object is built per seed).
    """
    cfg = config
    check_rule(cfg.rule)
    if cfg.rule == "npg" and not policy.tabular:
        raise ValueError("rule='npg' (tabular natural gradient) needs a tabular policy")
    if cfg.updates_per_batch < 1:
        raise ValueError(f"updates_per_batch must be >= 1, got {cfg.updates_per_batch}")
    if cfg.predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {cfg.predictor!r}; expected one of {PREDICTORS}")
    if cfg.predictor == "param" and cfg.rule != "pg":
        raise ValueError("predictor='param' needs rule='pg' (the tabular natural gradient is not an optimiser step)")
    s_, p_, g_, t_ = policy.n_seeds, policy.n_prompts, cfg.group_size, policy.seq_len
    b_, n_tok = p_ * g_, p_ * g_ * t_
    scale = float(p_)  # sum over prompts of the per-prompt mean
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = SeedOptimizer(policy.parameters(), cfg.optimizer, cfg.lr)

    methods: list[Any] | None = None
    if method_factory is not None or cfg.method is not None:
        if method_factory is None:
            def method_factory() -> Any:
                return make_method(cfg.method, **method_options(cfg))

        methods = [method_factory() for _ in range(s_)]
    needs_entropy = bool(methods and methods[0].needs_token_entropy)
    mask = torch.ones(b_, t_, dtype=torch.bool)

    hist: dict[str, list[np.ndarray]] = {}

    def rec(key: str, value: Tensor | np.ndarray | list[float]) -> None:
        hist.setdefault(key, []).append(np.asarray(value, dtype=np.float64).reshape(s_))

    # a bandit's state entropies do not depend on the tokens: those measured after a step's update are the
    # next step's entropies before it (the parameters do not change in between)
    prompt_h: Tensor | None = None
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc=cfg.method or "pg", leave=False)
    for step in bar:
        if cfg.eval_every and step % cfg.eval_every == 0:
            for k, v in task.evaluate(policy, cfg.eval_ks, cfg.n_eval).items():
                rec(k, v.numpy())
        else:
            for k in [f"pass@{k}" for k in cfg.eval_ks] + ["distinct"]:
                rec(k, np.full(s_, np.nan))
        tokens = policy.sample(g_, gen)  # [S, P, G, T]
        rewards = task.reward(tokens, gen)  # [S, P, G]
        adv, zero_sig = seed_advantages(rewards, cfg.estimator)  # [S, P, G], [S]
        adv_tok = adv.unsqueeze(-1).expand(s_, p_, g_, t_).contiguous()
        if policy.prompt_states and prompt_h is None:
            prompt_h = policy.prompt_entropy()
        h_before, weight = _token_stats_for(policy, tokens, prompt_h)
        h_mean = h_before.mean(dim=(1, 2, 3))  # [S]
        # per-sample first-order contributions (per unit lr) to the batch token-mean entropy
        if cfg.predictor == "param":
            plain_grads = _plain_loss_grads(policy, tokens, adv_tok, n_tok, scale) if opt.kind == "adam" else None
            c_param, pred_vanilla = _param_prediction(policy, opt, tokens, adv_tok, n_tok / scale, plain_grads)
            contrib = c_param / cfg.lr
        else:
            contrib = policy.contributions(tokens, adv_tok, cfg.rule) * weight * (scale / n_tok)
            pred_vanilla = contrib.sum(dim=(1, 2, 3)) * cfg.lr

        plans: list[Any] = [None] * s_
        active = torch.ones(s_, dtype=torch.bool)
        old_lp: Tensor | None = None
        predicted = torch.zeros(s_)
        diags: dict[str, list[float]] = {k: [math.nan] * s_ for k in DIAGNOSTIC_KEYS}
        for update in range(cfg.updates_per_batch):
            # lp and ht start their own graph: the loss is back-propagated to them, then policy_backward()
            # carries their gradients into the parameters (block by block for the bandit)
            lp, ht, policy_backward = policy.forward_leaves(tokens, with_entropy=needs_entropy)
            lp.retain_grad()
            if ht is not None:
                ht.retain_grad()
            if old_lp is None:
                old_lp = lp.detach()
            losses = []
            if methods is None:  # the plain PG loss of every seed at once: [S]
                losses.append(-(adv_tok * lp).sum(dim=(1, 2, 3)) / n_tok * scale)
            for s in range(s_ if methods is not None else 0):
                lp_s = lp[s].reshape(b_, t_)
                olp_s = old_lp[s].reshape(b_, t_)
                if update == 0:
                    plans[s] = methods[s].prepare(
                        advantages=adv_tok[s].reshape(b_, t_),
                        log_probs=lp_s.detach(),
                        old_log_probs=olp_s,
                        mask=mask,
                        entropy=float(h_mean[s]),
                        step=step,
                        contributions=contrib[s].reshape(b_, t_),
                        rewards=rewards[s].reshape(b_),
                    )
                    for k in DIAGNOSTIC_KEYS:
                        val = plans[s].diagnostics.get(k)
                        if isinstance(val, (int, float)) and not isinstance(val, bool):
                            diags[k][s] = float(val)
                    if plans[s].skip:
                        active[s] = False
                if not active[s]:
                    continue
                ht_s = ht[s].reshape(b_, t_) if ht is not None else None
                loss_tok = methods[s].token_loss(plans[s], lp_s, olp_s, mask, token_entropy=ht_s)
                losses.append(masked_token_mean(loss_tok, mask, n_tok) * scale)
            if not losses:
                break
            torch.cat([loss.reshape(-1) for loss in losses]).sum().backward()
            policy_backward()
            # first-order prediction of this update, from the effective advantages it applied
            if cfg.predictor == "param":
                eff_adv = -lp.grad if lp.grad is not None else torch.zeros_like(lp)
                bonus_w = -ht.grad if (ht is not None and ht.grad is not None) else None
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in policy.parameters()]
                _, pred_step = _param_prediction(policy, opt, tokens, eff_adv.detach(), 1.0, grads, bonus_w)
                predicted += torch.where(active, pred_step, torch.zeros_like(pred_step))
            elif methods is None and update == 0:
                # the plain on-policy PG loss: -dLoss/dlog pi = (P / N_tok) A, so the prediction is
                # exactly the one already computed from the advantages
                pred_u = contrib.sum(dim=(1, 2, 3))
            else:
                eff_adv = -lp.grad if lp.grad is not None else torch.zeros_like(lp)
                pred_u = (policy.contributions(tokens, eff_adv, cfg.rule) * weight).sum(dim=(1, 2, 3))
            if cfg.predictor == "logit":
                if ht is not None and ht.grad is not None:
                    bonus = policy.bonus_contributions(tokens, -ht.grad, cfg.rule) * weight
                    pred_u = pred_u + bonus.sum(dim=(1, 2, 3))
                predicted += torch.where(active, pred_u * cfg.lr, torch.zeros_like(pred_u))
            if cfg.rule == "npg":
                policy.precondition_npg()
            opt.step(active)
            opt.zero_grad()
        for prm in policy.parameters():
            if not all_finite(prm.detach()):
                raise FloatingPointError(f"non-finite parameters after step {step}")
        with torch.no_grad():
            prompt_h = policy.prompt_entropy() if policy.prompt_states else None
            h_after = _position_entropy(policy, tokens, prompt_h).mean(dim=(1, 2, 3))
        measured = h_after - h_mean
        if methods is not None:
            for s in range(s_):
                if active[s]:
                    methods[s].observe(float(measured[s]))
        rec("entropy", h_mean.numpy())
        rec("entropy_after", h_after.numpy())
        rec("measured", measured.numpy())
        rec("predicted", predicted.numpy())
        rec("predicted_vanilla", pred_vanilla.numpy())
        rec("reward", rewards.mean(dim=(1, 2)).numpy())
        rec("skipped", (~active).float().numpy())
        rec("zero_signal_groups", zero_sig)
        for k, vals in diags.items():
            rec(f"diag/{k}", vals)
        if cfg.progress:
            bar.set_postfix(H=f"{float(h_mean.mean()):.3f}", R=f"{float(rewards.mean()):.3f}")
    final = {k: v.numpy().astype(np.float64) for k, v in task.evaluate(policy, cfg.eval_ks, cfg.n_eval).items()}
    history = {k: np.stack(v) for k, v in hist.items()}
    return TrainResult(cfg, history, final)
