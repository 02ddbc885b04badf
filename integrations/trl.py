"""Entrocraft inside TRL's ``GRPOTrainer`` (TRL 1.16; docs/integrations.md).

TRL has no advantage hook, so :class:`EntrocraftGRPOTrainer` overrides the method that produces the
advantages, ``_generate_and_score_completions``: after TRL has generated and scored the batch it

1. takes the rewards of the WHOLE generation batch (TRL gathers them across processes in
   ``_calculate_rewards``, which this class wraps), and the completions' per-token log-probs and entropies
   (one extra no-grad forward), padded and gathered across processes;
2. computes advantages with ``entrotheory.advantages.compute_advantages`` (groups of ``num_generations``,
   as TRL lays them out), the batch's token-mean entropy, and runs the chosen ``entrotheory`` method's
   ``prepare`` over the whole batch (selection is global, never per process);
3. hands TRL this process's rows of the method's ``[B, T]`` advantages (TRL's loss accepts ``[B, T]``);
4. logs ``entrocraft/*`` (accepted fractions, target, band, predicted and measured entropy change) into
   ``self._metrics``, so they appear in ``trainer.state.log_history`` and every TRL logger.

The sampler state is written as ``entrocraft_state.pt`` into each TRL checkpoint and read back on resume.
The loss stays TRL's (its ``loss_type``, clipping, KL); methods whose effect lives in the loss (entropy
bonus, KL-Cov) are refused, Clip-Cov's detached tokens get advantage 0 (the same gradient).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer

from entrotheory.advantages import compute_advantages
from entrotheory.methods import EntropyMethod, make_method, masked_token_mean
from entrotheory.tokens import TokenEntropyStats, token_mean_contributions

__all__ = ["EntrocraftGRPOTrainer", "SUPPORTED_METHODS", "STATE_FILE"]

#: entrotheory methods whose whole effect is on the advantages (what TRL's loss can take)
SUPPORTED_METHODS = ("vanilla", "nsr", "raft++", "w-reinforce", "entropic", "clip-cov", "entrocraft-band",
                     "entrocraft-predictive")
STATE_FILE = "entrocraft_state.pt"
_LOGGED = ("accepted_fraction", "accepted_pos_fraction", "accepted_neg_fraction", "target_entropy", "lower",
           "upper", "predicted_change", "k", "alpha", "num_detached")


class EntrocraftGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages come from an ``entrotheory`` method over the whole batch.

    Parameters (keyword, besides ``GRPOTrainer``'s)
    ----------
    entrocraft_method : one of :data:`SUPPORTED_METHODS` (default ``"entrocraft-band"``).
    entrocraft_options : options of ``make_method`` (``band``, ``schedule``, ``step_offset``...);
        ``total_steps`` defaults to ``args.max_steps`` and ``lr`` to ``args.learning_rate``; the predictive
        sampler uses the npg contributions (``rule="npg"``: TRL gives ``log pi(y_t)`` and ``H_t``).
    entrocraft_estimator : ``entrotheory.advantages`` estimator (default ``"grpo"``); ``"grpo-batch-std"``
        is TRL's ``scale_rewards="batch"``. ``entrocraft_eps``: its eps (default 1e-4, TRL's).

    The step given to the method is ``self.state.global_step`` (0-based, TRL's optimizer steps); pass
    ``step_offset=1`` in ``entrocraft_options`` to read the band where the release (counting from 1) does.
    """

    def __init__(self, *args: Any, entrocraft_method: str = "entrocraft-band",
                 entrocraft_options: dict[str, Any] | None = None, entrocraft_estimator: str = "grpo",
                 entrocraft_eps: float = 1e-4, **kwargs: Any) -> None:
        if entrocraft_method not in SUPPORTED_METHODS:
            raise ValueError(f"entrocraft_method {entrocraft_method!r} is not an advantage transform TRL's loss can "
                             f"take; expected one of {SUPPORTED_METHODS}")
        super().__init__(*args, **kwargs)
        opts = dict(entrocraft_options or {})
        if self.args.max_steps > 0:
            opts.setdefault("total_steps", int(self.args.max_steps))
        opts.setdefault("lr", float(self.args.learning_rate))
        if entrocraft_method == "entrocraft-predictive":
            opts.setdefault("rule", "npg")
        self.entrocraft: EntropyMethod = make_method(entrocraft_method, **opts)
        self.entrocraft_estimator = entrocraft_estimator
        self.entrocraft_eps = float(entrocraft_eps)
        self._entrocraft_rewards: Tensor | None = None
        self._entrocraft_last_entropy: float | None = None
        self._entrocraft_last_prediction: float | None = None
        #: the last batch's global tensors (for inspection and tests): advantages, mask, entropy, plan
        self.entrocraft_last: dict[str, Any] = {}

    # -- step 1: the whole batch's rewards, as TRL gathers them ------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        weights = self.reward_weights.to(rewards_per_func.device).unsqueeze(0)
        self._entrocraft_rewards = (rewards_per_func * weights).nansum(dim=1)
        return rewards_per_func

    def _gather_rows(self, x: Tensor, pad: float) -> Tensor:
        """``[b, T_local]`` on each process -> ``[B, T_max]`` on every process (rows in process order)."""
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=pad)
        return self.accelerator.gather(x)

    # -- steps 2-4 -----------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        mask_local = out["completion_mask"].bool() if "tool_mask" not in out else (
            out["completion_mask"] * out["tool_mask"]).bool()
        with torch.no_grad():
            logps, token_h, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention, completion_ids.size(1),
                batch_size=self.args.per_device_train_batch_size, compute_entropy=True)
        b_local, t_local = completion_ids.shape
        mask = self._gather_rows(mask_local.to(torch.int64), 0).bool()
        lp = self._gather_rows(logps.float(), 0.0)
        h_tok = self._gather_rows(token_h.float(), 0.0)
        rewards = self._entrocraft_rewards
        if rewards is None or rewards.numel() != mask.shape[0]:
            raise RuntimeError("EntrocraftGRPOTrainer: the gathered rewards do not match the gathered batch "
                               f"({None if rewards is None else rewards.numel()} vs {mask.shape[0]} completions)")
        rewards = torch.nan_to_num(rewards.float(), nan=0.0).to(mask.device)  # unscorable rows: TRL zeroes them too
        g = self.num_generations
        seq_adv, info = compute_advantages(rewards.view(-1, g), self.entrocraft_estimator, self.entrocraft_eps)
        adv = torch.where(mask, seq_adv.reshape(-1, 1), torch.zeros_like(lp))
        h = float(masked_token_mean(h_tok, mask))
        measured = None if self._entrocraft_last_entropy is None else h - self._entrocraft_last_entropy
        if measured is not None:
            self.entrocraft.observe(measured)
        stats = TokenEntropyStats(lp, h_tok, torch.zeros_like(lp), mask)
        contrib = token_mean_contributions(stats, adv, mask, rule="npg")
        plan = self.entrocraft.prepare(adv, lp, lp, mask, h, int(self.state.global_step), contributions=contrib,
                                       rewards=rewards)
        trained = plan.advantages if plan.detach is None else torch.where(plan.detach, 0.0, plan.advantages)
        # first-order (logit-space, npg) change of the token-mean entropy per step at TRL's learning rate
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.args.learning_rate
        predicted = lr * float(token_mean_contributions(stats, trained, mask, rule="npg").sum())
        metrics = self._metrics["train"]
        metrics["entrocraft/entropy"].append(h)
        metrics["entrocraft/predicted_entropy_change"].append(predicted)
        if measured is not None:
            metrics["entrocraft/measured_entropy_change"].append(measured)
            metrics["entrocraft/last_predicted_entropy_change"].append(self._entrocraft_last_prediction)
        metrics["entrocraft/zero_signal_fraction"].append(float(info["zero_signal_fraction"]))
        for key in _LOGGED:
            value = plan.diagnostics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                metrics[f"entrocraft/{key}"].append(float(value))
        self._entrocraft_last_entropy, self._entrocraft_last_prediction = h, predicted
        self.entrocraft_last = {"advantages": trained, "base_advantages": adv, "mask": mask, "entropy": h,
                                "rewards": rewards, "log_probs": lp, "token_entropy": h_tok, "plan": plan}
        first = self.accelerator.process_index * b_local
        out["advantages"] = trained[first:first + b_local, :t_local].to(out["completion_mask"].device)
        return out

    # -- checkpoints --------------------------------------------------------------------------------------
    def _entrocraft_state(self) -> dict[str, Any]:
        return {"method": self.entrocraft.state_dict(), "last_entropy": self._entrocraft_last_entropy,
                "last_prediction": self._entrocraft_last_prediction}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            step_dir = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), step_dir)
            torch.save(self._entrocraft_state(), os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and os.path.exists(os.path.join(checkpoint, STATE_FILE)):
            state = torch.load(os.path.join(checkpoint, STATE_FILE), weights_only=False)
            self.entrocraft.load_state_dict(state["method"])
            self._entrocraft_last_entropy = state["last_entropy"]
            self._entrocraft_last_prediction = state["last_prediction"]
