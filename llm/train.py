"""GRPO training of a causal LM with the entropy predictor and the Entrocraft sampler.

    python -m llm.train                       # cpu-demo: the embedded SmolLM2-135M on few-shot addition
    python -m llm.train --preset smoke        # tiny random model, seconds
    python -m llm.train --method vanilla --steps 100 --output-dir runs/vanilla
    python -m llm.train --resume runs/cpu-demo

One step (reads top to bottom in :meth:`Trainer.train_step`):

1. sample ``G`` responses for each of ``P`` prompts (KV-cached, the prompt run once per group),
   collecting per-token statistics (log-prob, entropy, pg baseline) from the sampling logits;
2. rewards -> advantages (``entrotheory.advantages``) -> per-token contributions to the entropy
   change (``entrotheory.token_entropy_contributions``) -> ``method.prepare`` over the WHOLE batch
   (rejection sampling, covariance selections, ...);
3. ``ppo_epochs`` optimiser steps, each accumulating the method's token loss over micro-batches,
   normalised by the token count of the whole batch;
4. theory against practice: the predicted change (per-position, logit space, ``lr * mean c_t``),
   the measured change (entropy of the updated policy on the same contexts, one no-grad forward),
   fed back to the method (``method.observe``) for calibration.

Metrics go to ``metrics.jsonl`` (one line per step), checkpoints to ``checkpoint/`` (safetensors
weights, optimizer, scheduler, method/sampler state, RNG), the figure to ``figure.png``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from entrotheory import (
    TokenEntropyStats,
    token_entropy_contributions,
    token_entropy_stats,
    token_mean_entropy_change,
)
from entrotheory import entropy as policy_entropy
from entrotheory.advantages import ESTIMATORS, compute_advantages
from entrotheory.core import all_finite
from entrotheory.methods import METHODS, MethodPlan, make_method, masked_token_mean, ppo_clipped
from entrotheory.param_space import (
    DEFAULT_FD_STEP,
    first_order_entropy_change,
    log_prob_tangent,
    logit_directional_derivative,
    preconditioner_from_optimizer,
)
from entrotheory.state_estimate import EntropyStateEstimate, batch_entropy_variance

from .config import TrainConfig, build_parser, config_from_args, method_options, save_yaml
from .distributed import DistContext, init_distributed, local_tensor, shard_model, shutdown, unsharded
from .errors import UserError
from .models import load_model_and_tokenizer
from .rollout import Rollout, encode_prompts, generate, pad_rollout, response_log_probs, response_logits
from .tasks import Problem, make_task, pass_at_k

__all__ = ["Trainer", "main", "derive_seed", "summarize"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the run seed and a purpose/step: every step's randomness is a pure function
    of (seed, step), which makes ``--resume`` reproduce an uninterrupted run exactly."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    n = int(mask.sum())
    return float(torch.where(mask, x, torch.zeros_like(x)).sum()) / n if n else 0.0


def resolve_device(spec: str, dist: DistContext | None = None) -> torch.device:
    """``auto`` -> ``cuda`` (this rank's card under torchrun) when available, else ``cpu``; UserError for
    a device that is not a torch device or CUDA without CUDA."""
    local = dist.local_rank if dist is not None else 0
    if spec == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"device {spec!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local}")
    return device


def build_method(cfg: TrainConfig, verbose: bool = True):
    """``make_method`` with the run's schedule, horizon, rule, learning rate and ``method_options``."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
    if cfg.estimator not in ESTIMATORS:
        raise UserError(f"unknown estimator {cfg.estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    opts: dict[str, object] = {"total_steps": cfg.steps, "rule": cfg.rule, "lr": cfg.lr}
    accepts_schedule = "schedule" in METHODS[cfg.method].OPTIONS
    if cfg.schedule:
        if not accepts_schedule:
            raise UserError(f"method {cfg.method!r} takes no --schedule (got {cfg.schedule!r}); methods that do: "
                            + ", ".join(n for n, c in METHODS.items() if "schedule" in c.OPTIONS))
        opts["schedule"] = cfg.schedule
    if "k_scale" in METHODS[cfg.method].OPTIONS:
        if cfg.predictor == "param":  # absolute nats per unit lr: measured / predicted ~ 1; calibration may
            # correct it within a factor 3 (the drift, not the samples, dominates some steps' change: an
            # unbounded fit would read its errors as a wrong step size)
            opts.update(k_scale=1.0, k_min=cfg.lr / 3, k_max=3 * cfg.lr)
        elif cfg.calibration_prior > 0:
            opts["k_scale"] = cfg.calibration_prior
    opts.update(method_options(cfg))
    if verbose and cfg.method == "kl-cov" and cfg.ppo_epochs == 1:
        print("warning: kl-cov's penalty |log pi - log pi_old| has zero gradient on the first, on-policy epoch; "
              "with --ppo-epochs 1 it changes nothing but the clipping (use --ppo-epochs 2 or more)", file=sys.stderr)
    try:
        return make_method(cfg.method, **opts)
    except (TypeError, ValueError) as exc:
        what = f"--schedule {cfg.schedule!r}" if cfg.schedule else f"--method {cfg.method!r}"
        raise UserError(f"{what}: {exc}") from None


class _StopFlag:
    """First Ctrl-C: finish the current step, checkpoint, exit. Second Ctrl-C: interrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _tied_duplicates(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied output embedding)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module):
    """FSDP2's counterpart of DDP's ``no_sync``: accumulate this micro-batch's gradients unreduced."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class _ResponseForward(torch.nn.Module):
    """The training forward (prompt once per group, then its samples) as one module call.

    DDP expects one forward per backward; :func:`~llm.rollout.response_logits` runs the model twice
    (prompt with cache, then responses), so DDP wraps this module rather than the model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, prompt_ids, prompt_mask, prompt_index, tokens, share_prefix: bool) -> torch.Tensor:
        return response_logits(self.model, prompt_ids, prompt_mask, prompt_index, tokens, share_prefix)


@dataclass
class ParamDirection:
    """What the parameter-space predictor knows before the update (docs/theory.md §5): ``directional``
    ``[B, T]`` (global) ``s_t = <G grad Hbar, grad log pi(y_t)>`` of the coming optimiser step, ``drift``
    the sample-independent ``<grad Hbar, drift_step>`` (AdamW momentum and weight decay), and the
    entropy gradient (reused for the exact first-order term after the update)."""

    directional: torch.Tensor
    drift: float
    first_order: FirstOrder


@dataclass
class Batch:
    """One step's samples. The token tensors are GLOBAL (``[B, T]`` over all ranks, identical on each);
    ``prompt_ids``/``prompt_mask``/``roll`` are this rank's, padded to the global ``T``; ``rows`` are this
    rank's rows of the global batch."""

    problems: list[Problem]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    roll: Rollout
    rows: slice
    mask: torch.Tensor
    stats: TokenEntropyStats
    correct: torch.Tensor
    answer_keys: list[str]
    mini_batch: torch.Tensor
    mini_batch_tokens: list[float]
    param: ParamDirection | None = None

    @property
    def local_mask(self) -> torch.Tensor:
        return self.mask[self.rows]


class FirstOrder:
    """The exact first-order change ``<dH/dtheta, theta_after - theta_before>`` of the batch's token-mean
    entropy (parameter space, known after the update; docs/theory.md): the entropy gradient accumulated
    over micro-batches and summed over ranks, and the weights before the update.

    Replicated weights (one process, DDP): ``torch.autograd.grad`` per micro-batch, then an all-reduce.
    Sharded weights (FSDP): FSDP hands gradients only to ``.grad``, so the entropy is back-propagated on
    its own before the update (:meth:`Trainer._record_before`) and each rank keeps the reduced gradient
    of its shard; the inner product is summed over the shards."""

    def __init__(self, params: list[torch.nn.Parameter], sharded: bool, loss_scale: float = 1.0,
                 keep_start: bool = True) -> None:
        self.params = params
        self.sharded = sharded
        self.loss_scale = loss_scale
        self.theta0 = [local_tensor(p.detach()).clone() for p in params] if keep_start else None
        self.grad = [torch.zeros_like(local_tensor(p.detach())) for p in params]
        self.ready = False  # the gradient is complete (reduced over micro-batches and ranks)

    def accumulate(self, h_part: torch.Tensor) -> None:
        """Add the gradient of this micro-batch's share ``sum_t H_t / N`` of the token-mean entropy."""
        if self.ready:
            return
        if self.sharded:
            (h_part * self.loss_scale).backward()
            return
        for acc, g in zip(self.grad, torch.autograd.grad(h_part, self.params, retain_graph=True, allow_unused=True)):
            if g is not None:
                acc += g

    def reduce(self, dist: DistContext) -> None:
        """Sum the gradient over ranks (replicated), or take this shard's reduced ``.grad`` (sharded)."""
        if self.ready:
            return
        self.ready = True
        if self.sharded:
            for acc, p in zip(self.grad, self.params):
                if p.grad is not None:
                    acc.copy_(local_tensor(p.grad))
        else:
            dist.sum_tensors_(self.grad)

    def predicted(self, dist: DistContext) -> float:
        local = float(sum((g * (local_tensor(p.detach()) - p0)).sum()
                          for g, p, p0 in zip(self.grad, self.params, self.theta0)))
        return dist.sum(local)[0] if self.sharded else local


@dataclass
class _Before:
    """The pre-update policy on this rank's rows: log-probs and entropies ``[b, T]``, and the entropy
    gradient for ``--exact-first-order``."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    first_order: FirstOrder | None

    @property
    def needs_gradient(self) -> bool:
        """The entropy gradient is still to be accumulated from the forward passes."""
        return self.first_order is not None and not self.first_order.ready

    def store(self, rows: torch.Tensor, log_prob: torch.Tensor, logits: torch.Tensor, batch: Batch,
              token_entropy: torch.Tensor | None, n_tok: float) -> None:
        mask = batch.local_mask[rows]
        self.log_prob[rows] = log_prob
        self.entropy[rows] = token_entropy_stats(logits.detach(), batch.roll.tokens[rows], mask).entropy
        if self.needs_gradient:
            self.first_order.accumulate(masked_token_mean(token_entropy, mask, n_tok))


class Trainer:
    """Holds the model, optimiser, method and task of one run; :meth:`train_step` is one GRPO step.

    ``dist`` places the process in a ``torchrun`` job (default: a single process)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistContext | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist or DistContext()
        if cfg.prompts_per_step % (self.dist.world * cfg.mini_batches):
            raise UserError(f"prompts_per_step {cfg.prompts_per_step} must be a multiple of processes "
                            f"{self.dist.world} x mini_batches {cfg.mini_batches} (whole groups stay on one rank "
                            f"and every mini-batch has the same number of prompts on each)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device, self.dist)
        self.method = build_method(cfg, verbose=self.dist.is_main)
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
        self.model.to(self.device)
        if cfg.predictor == "param" and cfg.param_derivative == "jvp":
            self.model.set_attn_implementation("eager")  # fused attention kernels have no forward-mode AD
        self.task = make_task(cfg, self.tokenizer)
        if self.dist.is_main:
            for w in getattr(self.task, "warnings", [])[:20]:
                print(f"warning: {w}", file=sys.stderr)
        self.ref_model = None
        if cfg.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        forward = _ResponseForward(self.model)
        self.sharded = cfg.fsdp
        # DDP and FSDP average gradients over ranks; the loss (a sum over the whole batch's tokens / N) is
        # scaled by the number of processes so that they sum them
        self.loss_scale = float(self.dist.world)
        if cfg.fsdp:
            if not torch.distributed.is_initialized():
                raise UserError("--fsdp shards over the processes of a torchrun job: start it with torchrun "
                                "(--nproc-per-node 1 is fine)")
            self.fsdp_modules = shard_model(self.model)
            if self.ref_model is not None:
                shard_model(self.ref_model)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(forward, device_ids=ids)
        self.train_forward = forward
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                               weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            raise UserError(f"optimizer must be adamw or sgd, got {cfg.optimizer!r}")
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.params = params
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.estimate = EntropyStateEstimate() if cfg.entropy_estimate else None
        self.last_accepted_fraction = 1.0  # AdamW's reference gradient for the parameter-space predictor
        self.nan_streak = 0
        self.eval_problems = self.task.eval_set(cfg.eval_prompts) if cfg.eval_prompts else []
        self.probe_problems = self.task.eval_set(cfg.probe_prompts) if cfg.probe_every and cfg.probe_prompts else []

    # ------------------------------------------------------------------ helpers
    def autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _generators(self, purpose: str, step: int, first: int, count: int) -> list[torch.Generator]:
        """One generator per prompt, seeded by (seed, purpose, step, the prompt's GLOBAL index): a prompt's
        samples are the same whichever rank draws them and whatever else is in its batch."""
        return [torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed, purpose, step, i))
                for i in range(first, first + count)]

    def _rollout(self, problems: list[Problem], samples: int, temperature: float, gens: list[torch.Generator]):
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [p.prompt for p in problems], self.device)
        self.model.eval()
        roll = generate(self.model, self.tokenizer, prompt_ids, prompt_mask, samples, self.cfg.max_new_tokens,
                        temperature, self.cfg.top_p, gens, self.task.stop_at_newline, autocast=self.autocast)
        return prompt_ids, prompt_mask, roll

    def _full_weights(self):
        """Sampling context: under FSDP the whole model is gathered once on every rank (a collective: every
        rank enters it, whatever its share of prompts), so that decoding needs no communication."""
        return unsharded(self.model) if self.sharded else contextlib.nullcontext()

    def _gradient_sync(self, last: bool):
        """Reduce gradients over ranks on the last micro-batch of an optimiser step only."""
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        if self.sharded:
            return _fsdp_no_sync(self.model)
        return self.train_forward.no_sync()

    def _logits(self, model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, T, V]`` / temperature for this rank's rows ``rows`` (indices into its rows)."""
        roll = batch.roll
        with self.autocast():
            logits = model(batch.prompt_ids, batch.prompt_mask, roll.prompt_index[rows], roll.tokens[rows],
                           self.cfg.share_prompt_prefix)
        return logits.float() / self.cfg.temperature

    def _plain_logits(self, model, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        return self._logits(_ResponseForward(model), batch, rows)

    def _global_mean(self, x: torch.Tensor, mask: torch.Tensor) -> float:
        """Masked mean over the whole batch of a per-token tensor of this rank's rows."""
        total, count = self.dist.sum(float(torch.where(mask, x, torch.zeros_like(x)).sum()), float(mask.sum()))
        return total / count if count else 0.0

    # ------------------------------------------------------------------ evaluation
    def _my_share(self, problems: list[Problem]) -> tuple[int, list[Problem]]:
        """This rank's contiguous share of a list of held-out problems (first index, problems)."""
        share = -(-len(problems) // self.dist.world)
        lo = min(self.dist.rank * share, len(problems))
        return lo, problems[lo:lo + share]

    @torch.no_grad()
    def probe_entropy(self) -> dict[str, float]:
        """Held-out entropy: token-mean entropy of the current policy's own samples on fixed probe prompts,
        at the training temperature, with the same per-prompt seeds every time (common random numbers, so
        that successive probes differ by the policy's change more than by sampling noise)."""
        if not self.probe_problems:
            return {}
        lo, mine = self._my_share(self.probe_problems)
        ent = ntok = 0.0
        with self._full_weights():
            if mine:
                _, _, roll = self._rollout(mine, self.cfg.samples_per_prompt, self.cfg.temperature,
                                           self._generators("probe", 0, lo, len(mine)))
                ent = float(torch.where(roll.mask, roll.stats.entropy, 0.0).sum())
                ntok = float(roll.mask.sum())
        ent, ntok = self.dist.sum(ent, ntok)
        return {"probe_entropy": ent / max(ntok, 1.0)}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """pass@1 and pass@k (unbiased) on the held-out split, at ``eval_temperature``; split over ranks."""
        cfg = self.cfg
        if not self.eval_problems:
            return {}
        t0 = time.perf_counter()
        n, k = cfg.eval_samples, cfg.pass_k
        lo, mine = self._my_share(self.eval_problems)
        p1 = pk = distinct = ent = 0.0
        ntok = 0
        chunk = max(1, cfg.prompts_per_step * cfg.samples_per_prompt // n)
        with self._full_weights():
            for i in range(0, len(mine), chunk):
                probs = mine[i:i + chunk]
                _, _, roll = self._rollout(probs, n, cfg.eval_temperature,
                                           self._generators("eval", step, lo + i, len(probs)))
                ent += float(torch.where(roll.mask, roll.stats.entropy, 0.0).sum())
                ntok += int(roll.mask.sum())
                for j, prob in enumerate(probs):
                    texts = roll.texts[j * n:(j + 1) * n]
                    ok = [self.task.score(prob, t) for t in texts]
                    c = sum(ok)
                    p1 += c / n
                    pk += pass_at_k(n, c, k)
                    distinct += len({self.task.answer_key(t) for t, o in zip(texts, ok) if o})
        p1, pk, distinct, ent, ntok = self.dist.sum(p1, pk, distinct, ent, ntok)
        m = len(self.eval_problems)
        return {"pass_at_1": p1 / m, "pass_at_k": pk / m, "pass_k": float(k),
                "eval_distinct_correct": distinct / m, "eval_entropy": ent / max(ntok, 1),
                "time_eval": time.perf_counter() - t0}

    # ------------------------------------------------------------------ one GRPO step
    def train_step(self, step: int, rewards_override=None) -> dict[str, float | str]:
        """One GRPO step: sample -> plan -> update -> measure; returns its metrics.

        ``rewards_override(rollout) -> [P, G]`` replaces the task's rewards of this rank's prompts (tests
        build steps that must raise or lower entropy this way)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, "torch", step))  # any randomness inside the method
        batch = self._sample(step)
        t_gen = time.perf_counter() - t0
        rewards, adv, adv_info = self._advantages(batch, rewards_override)
        if cfg.predictor == "param":
            batch.param = self._param_directional(batch, adv)
        t_param = time.perf_counter() - t0 - t_gen
        plan, row = self._plan(step, batch, rewards, adv, adv_info)
        row["time_generate"] = t_gen
        if cfg.predictor == "param":
            row["time_predictor"] = t_param
        if plan.skip:
            row.update(skipped="all_rejected" if plan.diagnostics.get("all_rejected") else "no_signal",
                       measured_entropy_change=0.0, predicted_entropy_change=0.0)
            self._scheduler_step()
            self._advance_estimate(0.0)
            return self._timed(row, t0)
        t1 = time.perf_counter()
        before, nan = self._update(batch, plan, row)
        row["time_update"] = time.perf_counter() - t1
        if nan:
            self.nan_streak += 1
            row.update(skipped="nan_loss", measured_entropy_change=0.0, nan_streak=self.nan_streak)
            self._advance_estimate(0.0)
            return self._timed(row, t0)
        self.nan_streak = 0
        if cfg.measure_entropy_change:
            t2 = time.perf_counter()
            self._measure(batch, before, row)
            row["time_measure"] = time.perf_counter() - t2
        self._advance_estimate(float(row.get("measured_entropy_change", row["predicted_entropy_change"])))
        return self._timed(row, t0)

    def _advance_estimate(self, change: float) -> None:
        """Process step of the entropy estimate: the policy moved by the last update's change."""
        if self.estimate is not None and self.estimate.initialised:
            self.estimate.predict(change, self.cfg.estimate_process_std ** 2)

    def _functional_logits(self, params: tuple[torch.Tensor, ...], batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Logits / temperature of this rank's ``rows`` with the weights ``params`` (``torch.func``)."""
        values = {f"model.{n}": p for n, p in zip(self.param_names, params)}
        roll = batch.roll
        with self.autocast():
            logits = torch.func.functional_call(
                _ResponseForward(self.model), values,
                (batch.prompt_ids, batch.prompt_mask, roll.prompt_index[rows], roll.tokens[rows],
                 self.cfg.share_prompt_prefix))
        return logits.float() / self.cfg.temperature

    def _param_directional(self, batch: Batch, adv_tok: torch.Tensor) -> ParamDirection:
        """Parameter-space per-token contributions before the update (docs/theory.md §5).

        One forward of this rank's rows and two backward passes from it give ``grad Hbar`` (the batch's
        token-mean entropy) and the gradient ``g_all`` of the policy-gradient loss with every sample
        accepted, both summed over micro-batches and ranks. The optimiser's coming step
        ``dtheta = drift_step - G g`` is read from its state, with AdamW linearised about the expected
        gradient of the selection, ``f g_all`` (``f`` the last step's accepted fraction), which also covers
        its first step and parameters this batch touches for the first time
        (:func:`~entrotheory.param_space.preconditioner_from_optimizer`, eq. 5.2b). Two no-grad forwards at
        ``theta +- h G grad Hbar`` give every token's ``s_t`` (central difference,
        :func:`~entrotheory.param_space.logit_directional_derivative`)."""
        cfg, d = self.cfg, self.dist
        local_mask = batch.local_mask
        B, T = local_mask.shape
        m_total = float(batch.mask.sum())
        adv = adv_tok[batch.rows]
        norm = torch.tensor(batch.mini_batch_tokens, device=self.device)[batch.mini_batch[batch.rows]].unsqueeze(-1)
        first_order = FirstOrder(self.params, sharded=False)
        loss_grad = FirstOrder(self.params, sharded=False, keep_start=False)
        chunks = torch.arange(B, device=self.device).split(cfg.micro_batch_size)
        centre = []
        self.model.eval()
        for rows in chunks:
            with torch.enable_grad():
                logits = self._plain_logits(self.model, batch, rows)
                first_order.accumulate(masked_token_mean(policy_entropy(logits), local_mask[rows], m_total))
                lp = response_log_probs(logits, batch.roll.tokens[rows])
                loss_grad.accumulate(torch.where(local_mask[rows], -adv[rows] * lp / norm[rows], 0.0).sum())
            centre.append(logits.detach())
        first_order.reduce(d)
        loss_grad.reduce(d)
        f = self.last_accepted_fraction
        step_map = preconditioner_from_optimizer(self.optimizer, self.params, grads=[f * g for g in loss_grad.grad])
        del loss_grad
        direction = [k * g for k, g in zip(step_map.gain, first_order.grad)]
        curvature = float(first_order_entropy_change(first_order.grad, direction))  # <grad H, G grad H> >= 0
        drift_step = [torch.zeros_like(g) if s is None else s for g, s in zip(first_order.grad, step_map.drift_step)]
        drift = float(first_order_entropy_change(first_order.grad, drift_step))
        h = DEFAULT_FD_STEP[torch.float32] / curvature if curvature > 0 else 0.0
        s = torch.zeros(B, T, device=self.device)
        for rows, z in zip(chunks, centre):
            tangent = logit_directional_derivative(lambda ps, r=rows: self._functional_logits(ps, batch, r),
                                                   self.params, direction, cfg.param_derivative,
                                                   h if cfg.param_derivative == "fd" else None)
            tokens = batch.roll.tokens[rows]
            s[rows] = torch.where(local_mask[rows], log_prob_tangent(z, tangent, tokens).float(), 0.0)
        return ParamDirection(d.gather_rows(s), drift, first_order)

    def _timed(self, row: dict, t0: float) -> dict:
        elapsed = time.perf_counter() - t0
        row.update(time_step=elapsed, tokens_per_s=float(row["response_length"]) * self.cfg.prompts_per_step
                   * self.cfg.samples_per_prompt / elapsed)
        return row

    def _sample(self, step: int) -> Batch:
        """Phase 1: this rank's prompts sampled, scored, padded to the global length and gathered."""
        cfg, d = self.cfg, self.dist
        problems = self.task.train_batch(cfg.prompts_per_step, random.Random(derive_seed(cfg.seed, "data", step)))
        local = cfg.prompts_per_step // d.world
        first = d.rank * local
        mine = problems[first:first + local]
        G = cfg.samples_per_prompt
        try:
            with self._full_weights():
                prompt_ids, prompt_mask, roll = self._rollout(mine, G, cfg.temperature,
                                                              self._generators("gen", step, first, local))
        except (ValueError, RuntimeError) as exc:  # NaN/inf logits while sampling: the weights are broken
            raise UserError(f"step {step}: sampling failed, the model produced invalid logits ({exc}); "
                            f"resume from an earlier checkpoint with a lower --lr (now {cfg.lr})") from None
        roll = pad_rollout(roll, int(d.max(roll.tokens.shape[1])), self.tokenizer.pad_token_id)
        correct = torch.tensor([self.task.score(mine[i // G], text) for i, text in enumerate(roll.texts)])
        keys = [self.task.answer_key(t) for t in roll.texts]
        st = roll.stats
        mask, log_prob, ent, base = (d.gather_rows(t) for t in (roll.mask, st.log_prob, st.entropy, st.pg_baseline))
        keys_all = [k for part in d.gather_objects(keys) for k in part]
        rows = slice(first * G, (first + local) * G)
        # mini-batch of each global row: its prompt's global index modulo mini_batches (so the split does not
        # depend on the number of processes), and the token count of each mini-batch over all ranks
        minib = (torch.arange(mask.shape[0], device=self.device) // G) % cfg.mini_batches
        n_mb = [float(mask[minib == m].sum()) for m in range(cfg.mini_batches)]
        return Batch(problems, prompt_ids, prompt_mask, roll, rows, mask, TokenEntropyStats(log_prob, ent, base, mask),
                     d.gather_rows(correct.to(self.device)).cpu(), keys_all, minib, n_mb)

    def _advantages(self, batch: Batch, rewards_override) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Rewards ``[P, G]`` -> per-token advantages ``[B, T]`` of the GLOBAL batch (identical on every rank)."""
        cfg = self.cfg
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        rewards = torch.where(batch.correct, cfg.reward_correct, cfg.reward_wrong).reshape(P, G).float()
        if rewards_override is not None:
            mine = rewards_override(batch.roll).reshape(-1).float().to(self.device)
            rewards = self.dist.gather_rows(mine).cpu().reshape(P, G)
        adv, adv_info = compute_advantages(rewards, cfg.estimator)
        adv_tok = torch.where(batch.mask, adv.reshape(-1, 1).to(self.device).expand_as(batch.mask), 0.0)
        return rewards, adv_tok, adv_info

    def _plan(self, step: int, batch: Batch, rewards: torch.Tensor, adv_tok: torch.Tensor,
              adv_info: dict) -> tuple[MethodPlan, dict]:
        """Phase 2, on the GLOBAL batch (identical on every rank): per-token contributions -> the method's
        plan; the metrics of the batch and the predicted change."""
        cfg = self.cfg
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        mask, stats = batch.mask, batch.stats
        correct = batch.correct
        n_tok = int(mask.sum())
        entropy = masked_mean(stats.entropy, mask)
        # each token's loss is normalised by its mini-batch's token count N_m; scaling contributions by
        # N / N_m lets the sampler and the prediction keep the whole batch's normaliser N (docs/scaling.md)
        if cfg.mini_batches > 1:
            n_mb = torch.tensor(batch.mini_batch_tokens, device=self.device).clamp(min=1)
            scale = (n_tok / n_mb)[batch.mini_batch].unsqueeze(-1)
        else:
            scale = 1.0
        lr_now = self.optimizer.param_groups[0]["lr"]
        contrib = token_entropy_contributions(stats, adv_tok, mask, rule=cfg.rule) * scale
        extra: dict[str, float] = {}
        control = entropy
        if self.estimate is not None:  # aim a state estimate, not the noisy batch entropy, at the schedule
            groups = torch.arange(mask.shape[0], device=mask.device) // G
            _, var = batch_entropy_variance(stats.entropy, mask, groups)
            control = self.estimate.update(entropy, float(var))
            extra.update(entropy_estimate=control, entropy_estimate_std=math.sqrt(self.estimate.variance),
                         batch_entropy_std=math.sqrt(float(var)), estimate_gain=self.estimate.gain)
        drift = 0.0
        if batch.param is not None:
            # c_t = (A_t / N_m) s_t is token t's share of the step's change (nats); the sampler's convention is
            # per unit lr of the token-mean change times M^2 (docs/theory.md eq. 3.3), so that k ~ lr
            drift = batch.param.drift
            contrib = adv_tok * batch.param.directional * (scale / n_tok) * (n_tok ** 2 / lr_now)
            extra["predicted_drift"] = drift
        # the known drift is moved to the entropy side: the sampler chooses samples for target - H - drift
        plan = self.method.prepare(advantages=adv_tok, log_probs=stats.log_prob, old_log_probs=stats.log_prob,
                                   mask=mask, entropy=control + drift, step=step, contributions=contrib,
                                   rewards=rewards.reshape(-1).to(self.device))
        diag = plan.diagnostics
        groups_correct = correct.reshape(P, G)
        keys = batch.answer_keys
        distinct = [len({keys[p * G + g] for g in range(G) if groups_correct[p, g]}) for p in range(P)]
        row: dict[str, float | str] = {
            "step": step,
            "entropy": entropy,
            "reward_mean": float(rewards.mean()),
            "accuracy": float(correct.float().mean()),
            "signal_fraction": 1.0 - float(adv_info["zero_signal_groups"]) / P,
            "distinct_correct": sum(distinct) / P,
            "response_length": n_tok / (P * G),
            "accepted_fraction": float(diag.get("accepted_fraction", 1.0)),
            "accepted_pos_fraction": float(diag.get("accepted_pos_fraction", 1.0)),
            "accepted_neg_fraction": float(diag.get("accepted_neg_fraction", 1.0)),
            "lr": lr_now,
        }
        renamed = {"k": "calibration_k", "predicted_change": "calibrated_predicted_change"}
        for key in ("target_entropy", "lower", "upper", "regime", "k", "predicted_change", "entropy_coef", "alpha",
                    "num_detached", "num_candidates", "num_kl_tokens"):
            if key in diag:
                row[renamed.get(key, key)] = diag[key]
        if "calibration_k" in row:
            row["calibration_factor"] = float(row["calibration_k"]) / lr_now
        row.update(extra)
        self.last_accepted_fraction = max(float(row["accepted_fraction"]), 1e-3)
        # per-position (logit-space) prediction of the token-mean entropy change for the advantages actually
        # trained on, under the token-mean loss with the whole batch's normaliser (docs/theory.md eq. 3.3)
        c_plan = token_entropy_contributions(stats, plan.advantages, mask, rule=cfg.rule) * scale
        logit_pred = lr_now * float(token_mean_entropy_change(c_plan, mask, n_tok))
        if batch.param is not None:  # parameter space (eq. 5.3): drift + sum_t (A_t / N_m) s_t
            row["predicted_entropy_change"] = drift + float(
                (plan.advantages * batch.param.directional * scale / n_tok).sum())
            row["predicted_entropy_change_logit"] = logit_pred
        else:
            row["predicted_entropy_change"] = logit_pred
        return plan, row

    def _update(self, batch: Batch, plan: MethodPlan, row: dict) -> tuple[_Before, bool]:
        """Phase 3: ``ppo_epochs`` x ``mini_batches`` optimiser steps on this rank's rows, gradients summed
        over ranks by DDP, each mini-batch's loss normalised by its token count over all ranks."""
        cfg, d = self.cfg, self.dist
        local_mask = batch.local_mask
        B, T = local_mask.shape
        plan_local = plan.rows(batch.rows)
        minib = batch.mini_batch[batch.rows]
        n_mb = batch.mini_batch_tokens
        first_order = None
        if batch.param is not None:
            first_order = batch.param.first_order  # grad Hbar of the parameter-space predictor, complete
        elif cfg.exact_first_order:
            first_order = FirstOrder(self.params, self.sharded, self.loss_scale)
        before = _Before(torch.zeros(B, T, device=self.device), torch.zeros(B, T, device=self.device), first_order)
        groups = [(minib == m).nonzero().squeeze(-1) for m in range(cfg.mini_batches)]
        # later mini-batches see an updated policy, and FSDP's entropy gradient needs a backward of its own:
        # then the old policy is taken in a pass of its own before the first optimiser step
        separate = cfg.mini_batches > 1 or (self.sharded and before.needs_gradient)
        if separate:
            self.optimizer.zero_grad(set_to_none=True)  # FSDP's entropy gradient lands in .grad
            self._record_before(batch, torch.arange(B, device=self.device), before, n_tok=sum(n_mb))
            if before.first_order is not None:
                before.first_order.reduce(d)
                self.optimizer.zero_grad(set_to_none=True)
        loss_sum = clipped = kl_ref = grad_norm = 0.0
        nan = False
        self.model.eval()  # dropout off: old log-probs, the update and the measured change see one policy
        steps = cfg.ppo_epochs * cfg.mini_batches
        for epoch in range(cfg.ppo_epochs):
            for m, idx in enumerate(groups):
                self.optimizer.zero_grad(set_to_none=True)
                n_tok = n_mb[m]
                chunks = idx.split(cfg.micro_batch_size)
                for c, rows in enumerate(chunks):
                    with self._gradient_sync(c == len(chunks) - 1):
                        logits = self._logits(self.train_forward, batch, rows)
                        if not all_finite(logits):  # skipped like a NaN loss; the backward still joins DDP's
                            nan = True
                            (logits.sum() * 0.0).backward()
                            continue
                        lp = response_log_probs(logits, batch.roll.tokens[rows])
                        first = epoch == 0 and not separate
                        tok_ent = None
                        if self.method.needs_token_entropy or (first and before.needs_gradient):
                            tok_ent = policy_entropy(logits)  # differentiable: the bonus and <dH/dtheta, .>
                        if first:
                            before.store(rows, lp.detach(), logits, batch, tok_ent, n_tok)
                        mrows = local_mask[rows]
                        loss_tok = self.method.token_loss(plan_local.rows(rows), lp, before.log_prob[rows], mrows,
                                                          token_entropy=tok_ent)
                        if self.ref_model is not None:
                            with torch.no_grad():
                                ref_lp = response_log_probs(self._plain_logits(self.ref_model, batch, rows),
                                                            batch.roll.tokens[rows])
                            dlp = ref_lp - lp
                            kl_tok = torch.exp(dlp) - dlp - 1.0  # k3 estimator of KL(pi || pi_ref)
                            loss_tok = loss_tok + cfg.kl_coef * kl_tok
                            kl_ref += float(torch.where(mrows, kl_tok.detach(), 0.0).sum()) / n_tok / steps
                        loss = masked_token_mean(loss_tok, mrows, n_tok)
                        nan |= not bool(torch.isfinite(loss))
                        (loss * self.loss_scale).backward()
                    loss_sum += float(loss.detach()) / cfg.ppo_epochs / cfg.mini_batches  # mean per optimiser step
                    clip = ppo_clipped(lp.detach(), before.log_prob[rows], plan_local.advantages[rows],
                                       plan.eps_low, plan.eps_high)
                    clipped += float((clip & mrows).sum()) / n_tok / steps
                nan = d.any(nan, self.device)
                if not nan:
                    limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                    norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
                    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                    grad_norm += norm / steps  # the mean over this step's optimiser steps
                    nan = not math.isfinite(norm)
                if nan:
                    self.optimizer.zero_grad(set_to_none=True)
                    break
                if before.first_order is not None and epoch == 0 and m == 0 and not separate:
                    before.first_order.reduce(d)
                self.optimizer.step()
            if nan:
                break
        self._scheduler_step()
        loss_sum, clipped, kl_ref = d.sum(loss_sum, clipped, kl_ref)
        row.update(loss=loss_sum, clip_fraction=clipped, grad_norm=grad_norm)
        if self.ref_model is not None:
            row["kl_ref"] = kl_ref
        if before.first_order is not None and not nan:
            row["exact_predicted_entropy_change"] = before.first_order.predicted(d)
        return before, nan

    @torch.no_grad()
    def _record_before(self, batch: Batch, idx: torch.Tensor, before: _Before, n_tok: float) -> None:
        """The pre-update policy on this rank's rows (old log-probs, entropies and, with
        ``--exact-first-order``, the entropy gradient), before any optimiser step."""
        for rows in idx.split(self.cfg.micro_batch_size):
            with torch.enable_grad() if before.needs_gradient else contextlib.nullcontext():
                logits = self._plain_logits(self.model, batch, rows)
                tok_ent = policy_entropy(logits) if before.needs_gradient else None
                before.store(rows, response_log_probs(logits, batch.roll.tokens[rows]).detach(), logits, batch,
                             tok_ent, n_tok)

    @torch.no_grad()
    def _measure(self, batch: Batch, before: _Before, row: dict) -> None:
        """Phase 4, theory against practice: the entropy of the updated policy on the same contexts."""
        local_mask = batch.local_mask
        B, T = local_mask.shape
        h_after = torch.zeros(B, T, device=self.device)
        new_lp = torch.zeros(B, T, device=self.device)
        self.model.eval()
        for rows in torch.arange(B, device=self.device).split(self.cfg.micro_batch_size):
            logits = self._plain_logits(self.model, batch, rows)
            st = token_entropy_stats(logits, batch.roll.tokens[rows], local_mask[rows])
            h_after[rows], new_lp[rows] = st.entropy, st.log_prob
        measured = self._global_mean(h_after, local_mask) - self._global_mean(before.entropy, local_mask)
        log_ratio = new_lp - before.log_prob
        row["kl_old_new"] = self._global_mean(torch.exp(log_ratio) - 1.0 - log_ratio, local_mask)
        row["measured_entropy_change"] = measured
        pred = float(row["predicted_entropy_change"])
        row["measured_over_predicted"] = measured / pred if pred != 0 else float("nan")
        # the sampler is calibrated on the sample-dependent part: the known drift is taken off (see _plan)
        self.method.observe(measured - (batch.param.drift if batch.param is not None else 0.0))

    def _scheduler_step(self) -> None:
        """One learning-rate schedule step per training step, also for skipped steps."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            self.scheduler.step()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, next_step: int) -> Path:
        """Atomically write ``checkpoint/`` (safetensors weights + optimizer/scheduler + method + RNG).

        Written once, by rank 0: the replicas of a data-parallel run are identical, and the state holds no
        number of processes, so any number of processes can resume it."""
        from safetensors.torch import save_model

        final = self.run_dir / "checkpoint"
        if self.sharded:  # full (unsharded) state dicts, gathered by every rank, kept by rank 0
            from safetensors.torch import save_file
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=opts)
            optim = {"fqn": get_optimizer_state_dict(self.model, self.optimizer, options=opts)}
        else:
            optim = self.optimizer.state_dict()
        if not self.dist.is_main:
            self.dist.barrier()
            return final
        tmp = self.run_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.sharded:
            tied = _tied_duplicates(self.model)
            save_file({k: v.contiguous() for k, v in weights.items() if k not in tied}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            save_model(self.model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optim, "scheduler": self.scheduler.state_dict()}, tmp / "optimizer.pt")
        state = {"next_step": next_step, "method": self.method.state_dict(), "nan_streak": self.nan_streak,
                 "estimate": self.estimate.state_dict() if self.estimate is not None else {},
                 "last_accepted_fraction": self.last_accepted_fraction,
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / "trainer_state.pt")
        save_yaml(self.cfg, tmp / "config.yaml")
        old = self.run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return final

    def load_checkpoint(self, ckpt: Path) -> int:
        """Restore everything :meth:`save_checkpoint` wrote; returns the step to continue from."""
        from safetensors.torch import load_file, load_model

        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                weights = load_file(str(ckpt / "model.safetensors"))
                missing = set(self.model.state_dict()) - set(weights)
                if missing - _tied_duplicates(self.model):
                    raise KeyError(f"missing weights {sorted(missing)[:3]}")
                set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            else:
                load_model(self.model, str(ckpt / "model.safetensors"), device=str(self.device))
            opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=True)
            state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, KeyError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} is unreadable or belongs to another model: "
                            f"{str(exc).splitlines()[0]}") from None
        if self.sharded != ("fqn" in opt["optimizer"]):
            raise UserError(f"checkpoint {str(ckpt)!r} was written {'without' if self.sharded else 'with'} --fsdp; "
                            f"resume it the same way (any number of processes)")
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, opt["optimizer"]["fqn"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        try:
            self.method.load_state_dict(state["method"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} holds state for another method: {exc}") from None
        self.nan_streak = int(state["nan_streak"])
        if self.estimate is not None and state.get("estimate"):
            self.estimate.load_state_dict(state["estimate"])
        self.last_accepted_fraction = float(state.get("last_accepted_fraction", 1.0))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["next_step"])


# ---------------------------------------------------------------------- summary and I/O
def _fit(rows: list[dict], key: str, suffix: str, out: dict[str, float]) -> None:
    """Pearson correlation, slope through the origin and sign agreement of measured vs ``key``."""
    pairs = [(float(r[key]), float(r["measured_entropy_change"])) for r in rows
             if isinstance(r.get("measured_entropy_change"), (int, float)) and not r.get("skipped")
             and isinstance(r.get(key), (int, float))]
    if suffix == "":
        out["steps_measured"] = float(len(pairs))
    if len(pairs) < 3:
        return
    p = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    m = torch.tensor([b for _, b in pairs], dtype=torch.float64)
    if float(p.std()) > 0 and float(m.std()) > 0:
        out["correlation" + suffix] = float(torch.corrcoef(torch.stack([p, m]))[0, 1])
    if float((p * p).sum()) > 0:
        out["slope" + suffix] = float((p * m).sum() / (p * p).sum())
    nz = (p != 0) & (m != 0)
    if bool(nz.any()):
        out["sign_agreement" + suffix] = float(((p[nz] > 0) == (m[nz] > 0)).double().mean())


def summarize(rows: list[dict]) -> dict[str, float]:
    """Correlation and slope (through the origin) of measured vs predicted entropy change, plus start/end."""
    out: dict[str, float] = {}
    _fit(rows, "predicted_entropy_change", "", out)
    _fit(rows, "exact_predicted_entropy_change", "_exact", out)
    _fit(rows, "predicted_entropy_change_logit", "_logit", out)  # beside the parameter-space predictor
    train = [r for r in rows if "entropy" in r]
    if train:
        head, tail = train[: max(1, len(train) // 10)], train[-max(1, len(train) // 10):]
        out.update(entropy_start=sum(r["entropy"] for r in head) / len(head),
                   entropy_end=sum(r["entropy"] for r in tail) / len(tail),
                   reward_start=sum(r["reward_mean"] for r in head) / len(head),
                   reward_end=sum(r["reward_mean"] for r in tail) / len(tail),
                   signal_fraction=sum(r["signal_fraction"] for r in train) / len(train),
                   seconds_per_step=sum(r.get("time_step", 0.0) for r in train) / len(train))
    evals = [r for r in rows if "pass_at_1" in r]
    if evals:
        out.update(pass_at_1_start=evals[0]["pass_at_1"], pass_at_k_start=evals[0]["pass_at_k"],
                   pass_at_1_end=evals[-1]["pass_at_1"], pass_at_k_end=evals[-1]["pass_at_k"])
    ks = [r["calibration_factor"] for r in rows if "calibration_factor" in r]
    if ks:
        out["calibration_factor_end"] = ks[-1]
    return out


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_safe(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


class _Scalars:
    """TensorBoard scalars when tensorboard is installed; otherwise nothing."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v)):
                self.writer.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _resolve_resume(path: str) -> tuple[Path, Path]:
    """``--resume DIR``: DIR is a run directory holding ``checkpoint/`` or the checkpoint itself."""
    p = Path(path).expanduser()
    if (p / "checkpoint" / "model.safetensors").exists():
        return p, p / "checkpoint"
    if (p / "model.safetensors").exists():
        return p.parent, p
    raise UserError(f"--resume {path!r}: no checkpoint there (expected {p}/checkpoint/model.safetensors)")


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line, train, evaluate, plot; returns the end-of-run summary.

    Under ``torchrun`` every rank runs this; rank 0 alone writes files and shows progress."""
    args = build_parser().parse_args(argv)
    if args.resume:
        run_dir, ckpt = _resolve_resume(args.resume)
        import yaml

        base = yaml.safe_load((ckpt / "config.yaml").read_text())
        cfg = config_from_args(args, base=base)
        cfg.output_dir = str(run_dir)
        if args.stop_after is None:  # an interruption request does not carry over
            cfg.stop_after = 0
    else:
        cfg = config_from_args(args)
        run_dir = Path(cfg.output_dir).expanduser()
        if (run_dir / "checkpoint").exists() or (run_dir / "metrics.jsonl").exists():
            raise UserError(f"output directory {str(run_dir)!r} already holds a run; continue it with --resume "
                            f"{run_dir} or choose another --output-dir")
        ckpt = None
    dist = init_distributed(resolve_device(cfg.device).type, need_group=cfg.fsdp)
    try:
        return _train(cfg, run_dir, ckpt, dist)
    finally:
        shutdown(dist)


def _train(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, dist: DistContext) -> dict[str, float]:
    main_rank = dist.is_main
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, dist)
    start = trainer.load_checkpoint(ckpt) if ckpt is not None else 0
    metrics_path = run_dir / "metrics.jsonl"
    rows = [r for r in _read_rows(metrics_path) if r["step"] < start]  # drop anything after the checkpoint
    dist.barrier()  # every rank has read the old metrics before rank 0 rewrites them
    if main_rank:
        save_yaml(cfg, run_dir / "config.yaml")
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scalars = _Scalars(run_dir, cfg.tensorboard and main_rank)
    bar = _progress(cfg, start) if main_rank else None
    step = start
    done_here = 0
    finished = start >= cfg.steps
    out = metrics_path.open("a") if main_rank else contextlib.nullcontext(None)

    def emit(row: dict) -> None:
        rows.append(_json_safe(row))
        if main_rank:
            out.write(json.dumps(rows[-1]) + "\n")
            out.flush()
            scalars.write(rows[-1])

    try:
        with _StopFlag() as stop, out:
            for step in range(start, cfg.steps):
                row: dict = {}
                if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                    row.update(trainer.evaluate(step))
                if cfg.probe_every and step % cfg.probe_every == 0:
                    row.update(trainer.probe_entropy())
                row = {**trainer.train_step(step), **row}
                emit(row)
                done_here += 1
                if bar is not None:
                    post = {"R": f"{row['reward_mean']:+.2f}", "H": f"{row['entropy']:.3f}",
                            "acc": f"{row['accepted_fraction']:.2f}"}
                    if "target_entropy" in row:
                        post["tgt"] = f"{float(row['target_entropy']):.3f}"
                    if "pass_at_1" in row:
                        post["p@1"] = f"{row['pass_at_1']:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if row.get("skipped") == "nan_loss" and trainer.nan_streak >= cfg.max_nan_steps:
                    trainer.save_checkpoint(step + 1)
                    raise UserError(f"loss was NaN/inf on {trainer.nan_streak} consecutive steps (last: step {step}); "
                                    f"stopped with a checkpoint in {run_dir / 'checkpoint'}; try a lower --lr "
                                    f"(now {cfg.lr})")
                if row.get("skipped") == "nan_loss" and main_rank:
                    print(f"warning: step {step}: NaN/inf loss, update skipped", file=sys.stderr)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    trainer.save_checkpoint(step + 1)
                if main_rank and cfg.plot and cfg.plot_every and (step + 1) % cfg.plot_every == 0:
                    _plot(rows, run_dir, cfg)
                finished = step + 1 == cfg.steps
                # every rank stops at the same step, whichever received the interrupt
                if dist.any(stop.requested or bool(cfg.stop_after and done_here >= cfg.stop_after),
                            trainer.device):
                    break
            if finished:
                emit({"step": cfg.steps, "final": True, **trainer.evaluate(cfg.steps), **trainer.probe_entropy()})
                trainer.save_checkpoint(cfg.steps)
            else:
                trainer.save_checkpoint(step + 1)
                if main_rank:
                    print(f"stopped after step {step}; checkpoint in {run_dir / 'checkpoint'} "
                          f"(continue with --resume {run_dir})", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
        scalars.close()
    summary = summarize(rows)
    if main_rank:
        (run_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
        if cfg.plot:
            _plot(rows, run_dir, cfg)
    return summary


def _plot(rows: list[dict], run_dir: Path, cfg: TrainConfig) -> None:
    from .plotting import plot_runs

    plot_runs({cfg.method: rows}, run_dir / "figure.png")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        summary = run(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 speaks for the job
        return 0
    keys = ("entropy_start", "entropy_end", "reward_start", "reward_end", "pass_at_1_end", "pass_at_k_end",
            "correlation", "slope", "calibration_factor_end", "signal_fraction", "seconds_per_step")
    print(" ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
