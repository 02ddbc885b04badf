"""GRPO training of a causal LM with the entropy predictor and the Entrocraft sampler.

    python -m llm.train                       # cpu-demo: the embedded SmolLM2-135M on few-shot addition
    python -m llm.train --preset smoke        # tiny random model, seconds
    python -m llm.train --method vanilla --steps 100 --output-dir runs/vanilla
    python -m llm.train --resume runs/cpu-demo

One step (reads top to bottom in :meth:`Trainer.train_step`):

1. sample: ``G`` responses for each of ``P`` prompts (KV-cached, the prompt run once per group),
   collecting per-token statistics (log-prob, entropy, pg baseline) from the sampling logits; rewards ->
   advantages (``entrotheory.advantages``);
2. plan: per-token contributions to the entropy change (``entrotheory.token_mean_contributions``, or
   the parameter-space ones of ``--predictor param``) -> ``method.prepare`` over the WHOLE batch
   (rejection sampling, covariance selections, ...) and the predicted change;
3. update: ``ppo_epochs`` x ``mini_batches`` optimiser steps, each accumulating the method's token loss
   over micro-batches, normalised by the token count of its mini-batch;
4. measure: the entropy of the updated policy on the same contexts (one no-grad forward), fed back to
   the method (``method.observe``) for calibration;
5. metrics: the step's row of ``metrics.jsonl`` (llm/metrics.py).

Metrics go to ``metrics.jsonl`` (one line per step), checkpoints to ``checkpoint/`` (safetensors
weights, optimizer, scheduler, method/sampler state, RNG), the figure to ``figure.png``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from entrotheory import (
    TokenEntropyStats,
    token_entropy_stats,
    token_mean_contributions,
)
from entrotheory import entropy as policy_entropy
from entrotheory.advantages import compute_advantages
from entrotheory.core import all_finite
from entrotheory.methods import METHODS, MethodPlan, make_method, masked_token_mean, ppo_clipped
from entrotheory.param_space import (
    first_order_entropy_change,
    inner_product,
    log_prob_tangent,
    logit_directional_derivative,
    momentum_carry_factor,
    optimizer_step_direction,
)
from entrotheory.schedules import anchor_schedule_spec, is_relative_spec
from entrotheory.state_estimate import EntropyStateEstimate, batch_entropy_variance

from .config import TrainConfig, build_parser, config_from_args, save_yaml
from .distributed import DistContext, init_distributed, local_tensor, shard_model, shutdown, unsharded
from .errors import UserError
from .metrics import MetricsLog, read_rows, summarize, write_summary
from .models import load_model_and_tokenizer
from .rollout import Rollout, encode_prompts, generate, pad_rollout, response_log_probs, response_logits
from .tasks import Problem, make_task, pass_at_k

__all__ = ["Trainer", "main", "derive_seed", "summarize", "RewardFn"]

RewardFn = Callable[[Rollout], torch.Tensor]  # this rank's rollout -> rewards [P_local, G] (replaces the task's)

# the rejection sampler's names for its calibration (entrotheory/rejection.py): it fits measured ~= offset +
# k * predicted-per-unit-step from k_init = calibration_factor * lr, so the calibration factor k / lr (logged as
# calibration_factor) starts at --calibration-factor; its k itself is logged as calibration_k
SAMPLER_CALIBRATION_FACTOR = "calibration_factor"
SAMPLER_STEP_BOUNDS = ("k_min", "k_max")
SAMPLER_DIAGNOSTICS = {"k": "calibration_k", "predicted_change": "calibrated_predicted_change"}
# the method diagnostics copied into the step's metrics (under the names of SAMPLER_DIAGNOSTICS)
PLAN_DIAGNOSTICS = ("target_entropy", "desired_change", "lower", "upper", "regime", "k", "predicted_change",
                    "entropy_coef", "alpha", "num_detached", "num_candidates", "num_kl_tokens")
# --predictor param predicts absolute nats (measured / predicted ~ 1): the calibration factor starts at 1 and
# may correct it within this factor either way (the drift, not the samples, dominates some steps' change: an
# unbounded fit would read its errors as a wrong step size)
PARAM_CALIBRATION_RANGE = 3.0
# the accepted fraction that scales AdamW's reference gradient of the next step's parameter-space prediction
# is kept above this floor (a step that rejects everything must not zero it)
MIN_ACCEPTED_FRACTION = 1e-3
# nats: the first-order change of the batch entropy that the central difference's step causes,
# h <grad Hbar, G grad Hbar>. float32 logits round at ~1e-7 relative, and the rounding of the difference
# grows as 1/h while the truncation grows as h^2: against the exact JVP the error of the per-token s_t (relative
# to the largest) on SmolLM2-135M after three AdamW steps was 2.5e-2 at 1e-3, 1.4e-3 at 3e-3, 2.0e-4 at 1e-2,
# 8.4e-5 at 3e-2 and 9.1e-4 at 1e-1 nats, and that of the prediction on the tiny test model 2e-4 at 1e-2 and
# 2.2e-3 at 3e-2 (truncation); 1e-2 suits both
PARAM_FD_CHANGE = 1e-2
# the same for the one-sided difference (``--param-derivative forward``), whose truncation is O(h): against the JVP on
# SmolLM2-135M after three AdamW steps the per-token error (relative to the largest |s_t|) was 2.6e-2, 3.1e-3, 3.0e-3
# and 8.2e-3 at 1e-3, 3e-3, 1e-2 and 3e-2 nats, and that of sum_t A_t s_t (relative to sum_t |A_t s_t|) 8.6e-3,
# 9.7e-4, 1.6e-4 and 2.5e-4
PARAM_FORWARD_CHANGE = 1e-2
CLIP_NORM_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6)
MISSING_WEIGHTS_SHOWN = 3  # names of missing weights quoted when a checkpoint does not fit the model
MAX_TASK_WARNINGS = 20  # at most this many of the task's warnings (malformed dataset records) are printed


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


#: the anchor with which a relative schedule (``H0`` in ``--schedule``) is checked before the run knows its
#: initial entropy: large enough that ``H0 - x`` stays >= 0 for any sensible ``x`` (the real anchor's check
#: comes at the first step)
_PROVISIONAL_ANCHOR = 1e3


def build_method(cfg: TrainConfig, verbose: bool = True, anchor: float | None = None):
    """``make_method`` with the run's schedule, horizon, rule, learning rate, calibration factor and
    ``method_options`` (the config has checked the method's and the estimator's names). A relative schedule
    (docs/theory.md §4.1) is anchored at ``anchor``, the controlled entropy before the first update; without
    one the method is provisional (anchored far above any entropy, only to check the spec)."""
    opts: dict[str, object] = {"total_steps": cfg.steps, "rule": cfg.rule, "lr": cfg.lr}
    accepts_schedule = "schedule" in METHODS[cfg.method].OPTIONS
    if cfg.schedule:
        if not accepts_schedule:
            raise UserError(f"method {cfg.method!r} takes no --schedule (got {cfg.schedule!r}); methods that do: "
                            + ", ".join(n for n, c in METHODS.items() if "schedule" in c.OPTIONS))
        opts["schedule"] = cfg.schedule
        if is_relative_spec(cfg.schedule):
            opts["schedule"] = anchor_schedule_spec(cfg.schedule, _PROVISIONAL_ANCHOR if anchor is None else anchor)
    opts.update(_calibration_options(cfg))
    opts.update(cfg.method_options)
    if verbose and cfg.method == "kl-cov" and cfg.ppo_epochs == 1:
        print("warning: kl-cov's penalty |log pi - log pi_old| has zero gradient on the first, on-policy epoch; "
              "with --ppo-epochs 1 it changes nothing but the clipping (use --ppo-epochs 2 or more)", file=sys.stderr)
    try:
        return make_method(cfg.method, **opts)
    except (TypeError, ValueError) as exc:
        what = f"--schedule {cfg.schedule!r}" if cfg.schedule else f"--method {cfg.method!r}"
        if anchor is not None and is_relative_spec(cfg.schedule):
            what += f" anchored at the initial entropy H0 = {anchor:.4g}"
        raise UserError(f"{what}: {exc}") from None


def _calibration_options(cfg: TrainConfig) -> dict[str, float]:
    """The sampler's calibration options for ``cfg`` (none for methods without a calibration)."""
    if SAMPLER_CALIBRATION_FACTOR not in METHODS[cfg.method].OPTIONS:
        return {}
    if cfg.predictor == "param":
        low, high = SAMPLER_STEP_BOUNDS
        return {SAMPLER_CALIBRATION_FACTOR: 1.0, low: cfg.lr / PARAM_CALIBRATION_RANGE,
                high: PARAM_CALIBRATION_RANGE * cfg.lr}
    if cfg.calibration_factor > 0:
        return {SAMPLER_CALIBRATION_FACTOR: cfg.calibration_factor}
    return {}


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


class FirstOrder:
    """The exact first-order change ``<dH/dtheta, theta_after - theta_before>`` of a token-mean entropy (the
    batch's, or with ``--control-prompts`` the control set's; parameter space, known after the update;
    docs/theory.md): the entropy gradient accumulated
    over micro-batches and summed over ranks, and the weights before the update.

    Replicated weights (one process, DDP): ``torch.autograd.grad`` per micro-batch, then an all-reduce.
    Sharded weights (FSDP): FSDP hands gradients only to ``.grad``, so the entropy is back-propagated on
    its own before the update (:meth:`Trainer._record_before`), from empty ``.grad`` (cleared here when the
    object is made and again once the gradient is taken), and each rank keeps the reduced gradient of its
    shard; the inner product is summed over the shards.

    Use: :meth:`accumulate` per micro-batch, :meth:`reduce` once (later calls do nothing), and after the
    optimiser step :meth:`predicted` (needs ``keep_start``)."""

    def __init__(self, params: list[torch.nn.Parameter], sharded: bool, loss_scale: float = 1.0,
                 keep_start: bool = True, start: list[torch.Tensor] | None = None) -> None:
        self.params = params
        self.sharded = sharded
        self.loss_scale = loss_scale
        self.theta0 = None
        if keep_start:  # into the caller's buffers when given (a model-sized allocation per step is slow)
            self.theta0 = ([local_tensor(p.detach()).clone() for p in params] if start is None else
                           [b.copy_(local_tensor(p.detach())) for b, p in zip(start, params)])
        self._grad: list[torch.Tensor] | None = None  # allocated when first needed (a reused one replaces it)
        self.ready = False  # the gradient is complete (reduced over micro-batches and ranks)
        if sharded:
            self._clear_param_grads()

    @property
    def grad(self) -> list[torch.Tensor]:
        if self._grad is None:
            self._grad = [torch.zeros_like(local_tensor(p.detach())) for p in self.params]
        return self._grad

    @grad.setter
    def grad(self, value: list[torch.Tensor]) -> None:
        self._grad = value

    def _clear_param_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def accumulate(self, h_part: torch.Tensor) -> None:
        """Add the gradient of this micro-batch's share ``sum_t H_t / N`` of the token-mean entropy."""
        if self.ready:
            return
        if self.sharded:
            (h_part * self.loss_scale).backward()
            return
        grads = torch.autograd.grad(h_part, self.params, retain_graph=True, allow_unused=True)
        if self._grad is None:  # the first micro-batch's gradients are the sum so far: no zeroed buffer to add to
            self._grad = [torch.zeros_like(local_tensor(p.detach())) if g is None else g
                          for p, g in zip(self.params, grads)]
            return
        for acc, g in zip(self._grad, grads):
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
            self._clear_param_grads()
        else:
            dist.sum_tensors_(self.grad)

    def predicted(self, dist: DistContext) -> float:
        """``<dH/dtheta, theta_now - theta_before>`` (nats), summed over the shards. The step is formed in the
        start weights' place: they are used up (a second call raises)."""
        if self.theta0 is None:
            raise RuntimeError("FirstOrder has no start weights to measure a step from (keep_start=False, or "
                               "predicted() was called already)")
        steps, self.theta0 = self.theta0, None
        local = float(sum(inner_product(g, torch.sub(local_tensor(p.detach()), p0, out=p0))
                          for g, p, p0 in zip(self.grad, self.params, steps)))
        return dist.sum(local)[0] if self.sharded else local


@dataclass
class ParamDirection:
    """What the parameter-space predictor knows before the update (docs/theory.md §5): ``directional``
    ``[B, T]`` (global) ``s_t = <G grad Hbar, grad log pi(y_t)>`` of the coming optimiser step (taken on the
    rows with a non-zero advantage, ``computed``, and zero elsewhere until a plan trains on one), ``drift``
    the sample-independent ``<grad Hbar, drift_step>`` (AdamW momentum and weight decay), the
    entropy gradient (reused for the exact first-order term after the update), ``clip_factor``, the
    expected scale of the coming gradient by gradient clipping (included in ``directional``), and with a
    control set ``control_entropy``, its entropy before the update (``Hbar`` is then the control set's), and
    with ``--control-reckoning`` at a refresh ``control_reckoning_error``, the measured entropy minus the value
    reckoned since the last measurement.
    With ``--fused-update``: ``whole_gradient``, the loss gradient with every sample accepted (this rank's
    rows, summed over ranks), and ``before``, the pre-update policy on the batch, both from the predictor's
    forward, which the update reuses; ``update_seconds``, the time of that forward and backward, the update's
    own work done early (the step's clock books it to the update when the fused update ran, ``fused``).
    With ``--one-backward``: ``graphs``, the logits of the update's own forward (with their graphs, the same
    micro-batches), through which the update back-propagates the plan's loss once."""

    directional: torch.Tensor
    drift: float
    first_order: FirstOrder
    clip_factor: float = 1.0
    control_entropy: float | None = None
    control_reckoning_error: float | None = None
    whole_gradient: list[torch.Tensor] | None = None
    before: _Before | None = None
    update_seconds: float = 0.0
    fused: bool = False  # the update took them (set by Trainer._update)
    graphs: list[torch.Tensor] | None = None  # --one-backward: the update's logits per micro-batch, with graph
    computed: torch.Tensor | None = None  # [B] global: the rows whose s_t was taken (those with a non-zero advantage)
    direction: tuple[torch.Tensor, ...] | None = None  # G grad Hbar (the predictor's buffers, valid until the update)
    step_h: float = 0.0  # the finite difference's step along it


@dataclass
class FixedSet:
    """Fixed contexts: prompts with responses sampled once from the initial policy (the probe and control
    sets, docs/theory.md eq. 5.6b). ``problems`` are the whole set's prompts; ``prompt_ids``/``prompt_mask``/
    ``roll`` hold this rank's share of them; ``n_tokens`` counts the response tokens of the whole set over all
    ranks. Its entropy, the token mean of ``H(pi(.|context))`` over these contexts, is a deterministic function
    of the weights: no sampling noise."""

    problems: list[Problem]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    roll: Rollout
    n_tokens: float


@dataclass
class Batch:
    """One step's samples. The token tensors are GLOBAL (``[B, T]`` over all ranks, identical on each);
    ``prompt_ids``/``prompt_mask``/``roll`` are this rank's, padded to the global ``T``; ``rows`` are this
    rank's rows of the global batch. ``rewards`` ``[P, G]`` (CPU) and ``advantages`` ``[B, T]`` (0 off the
    mask) are global too; ``mini_batch`` ``[B]`` is each row's mini-batch and ``mini_batch_tokens`` the token
    count of each over all ranks."""

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
    rewards: torch.Tensor
    advantages: torch.Tensor
    advantage_info: dict
    param: ParamDirection | None = None

    @property
    def local_mask(self) -> torch.Tensor:
        return self.mask[self.rows]

    @property
    def n_tokens(self) -> int:
        """Response tokens of the whole batch (the loss normaliser ``N``)."""
        return int(self.mask.sum())


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


@dataclass
class _Planned:
    """Phase 2's outcome: the method's plan, the entropy the batch showed (``entropy``, nats), the learning
    rate of this step, the controller's extra state (entropy estimate, known drift) and the predicted change
    of the token-mean entropy (``predicted``: the predictor the sampler selected on; ``predicted_logit``: the
    per-position one beside the parameter-space predictor)."""

    plan: MethodPlan
    entropy: float
    lr: float
    control: dict[str, float]
    predicted: float
    predicted_logit: float | None


@dataclass
class _UpdateTotals:
    """Means over one step's ``steps`` optimiser steps, accumulated micro-batch by micro-batch."""

    steps: int
    loss: float = 0.0
    clipped: float = 0.0
    kl_ref: float = 0.0
    grad_norm: float = 0.0


@dataclass
class _Updated:
    """Phase 3's outcome: the pre-update policy, whether every loss and gradient was finite, and the update's
    metrics (loss, clip fraction, gradient norm, KL to the reference, exact first-order change)."""

    before: _Before
    finite: bool
    metrics: dict[str, float]


@dataclass
class _PhaseClock:
    """Wall-clock seconds of a step's phases (``time_<phase>``) and of the whole step."""

    start: float = field(default_factory=time.perf_counter)
    laps: dict[str, float] = field(default_factory=dict)

    def time(self, phase: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        key = f"time_{phase}"
        self.laps[key] = self.laps.get(key, 0.0) + time.perf_counter() - t0
        return out

    def move(self, source: str, target: str, seconds: float) -> None:
        """Book ``seconds`` of phase ``source`` to phase ``target`` (work one phase did for another)."""
        if seconds:
            self.laps[f"time_{source}"] -= seconds
            self.laps[f"time_{target}"] = self.laps.get(f"time_{target}", 0.0) + seconds

    def stamp(self, row: dict, rows: int) -> dict:
        """``row`` with the phase times, ``time_step`` and ``tokens_per_s`` (``rows`` responses)."""
        elapsed = time.perf_counter() - self.start
        row.update(self.laps, time_step=elapsed, tokens_per_s=float(row["response_length"]) * rows / elapsed)
        return row


class Trainer:
    """Holds the model, optimiser, method and task of one run; :meth:`train_step` is one GRPO step.

    ``dist`` places the process in a ``torchrun`` job (default: a single process). ``reward_fn(rollout) ->
    [P_local, G]``, when given, replaces the task's rewards of this rank's prompts (tests build steps that must
    raise or lower entropy this way); it is the attribute :attr:`reward_fn`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, dist: DistContext | None = None,
                 reward_fn: RewardFn | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist or DistContext()
        self.reward_fn = reward_fn
        if cfg.prompts_per_step % (self.dist.world * cfg.mini_batches):
            raise UserError(f"prompts_per_step {cfg.prompts_per_step} must be a multiple of processes "
                            f"{self.dist.world} x mini_batches {cfg.mini_batches} (whole groups stay on one rank "
                            f"and every mini-batch has the same number of prompts on each)")
        if cfg.fsdp and not torch.distributed.is_initialized():
            raise UserError("--fsdp shards over the processes of a torchrun job: start it with torchrun "
                            "(--nproc-per-node 1 is fine)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device, self.dist)
        self.method = build_method(cfg, verbose=self.dist.is_main)
        # a relative schedule's anchor: the controlled entropy before the first update, set by the first plan (or
        # a checkpoint); until then the method is provisional
        self.schedule_anchor: float | None = None
        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model, cfg.seed)
        self.model.to(self.device)
        if cfg.predictor == "param" and cfg.param_derivative == "jvp":
            self.model.set_attn_implementation("eager")  # fused attention kernels have no forward-mode AD
        self.task = make_task(cfg, self.tokenizer)
        if self.dist.is_main:
            for w in getattr(self.task, "warnings", [])[:MAX_TASK_WARNINGS]:
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
        else:  # sgd (the config allows no other)
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warm = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.params = params
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.estimate = EntropyStateEstimate() if cfg.entropy_estimate else None
        self.last_accepted_fraction = 1.0  # AdamW's reference gradient for the parameter-space predictor
        # the last update's gradient norm before clipping: --one-backward's clip factor (None: none taken yet)
        self.last_grad_norm: float | None = None
        self.scratch: dict[str, list[torch.Tensor]] = {}  # see _buffers
        if cfg.one_backward and self.dist.enabled:
            raise UserError("--one-backward keeps the predictor's forward graph for the update's backward, which "
                            "DDP does not reduce: it runs in one process only")
        # the control set's entropy after the last update (measured) and its gradient (taken every
        # control_gradient_every steps); None: take them afresh
        self.control_value: float | None = None
        self.control_gradient: list[torch.Tensor] | None = None
        self.control_reckoned = False  # control_value was advanced by first-order changes (--control-reckoning)
        self.nan_streak = 0
        self.eval_problems = self.task.eval_set(cfg.eval_prompts) if cfg.eval_prompts else []
        probe = self.task.eval_set(cfg.probe_prompts) if cfg.probe_every and cfg.probe_prompts else []
        # sampled here, from the initial weights, before any checkpoint is loaded: a resumed run has the same sets
        self.probe_set = self._fixed_set(probe, cfg.probe_samples, "probe") if probe else None
        # distinct training prompts: a repeated prompt would weigh twice in the set's entropy
        control = self.task.distinct_train_set(cfg.control_prompts, random.Random(derive_seed(cfg.seed, "control")))
        self.control_set = self._fixed_set(control, cfg.control_samples, "control") if control else None

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
        """This rank's contiguous share of a list of problems (first index, problems): ``ceil(n / world)`` each,
        so the last ranks may get fewer or none."""
        share = -(-len(problems) // self.dist.world)
        lo = min(self.dist.rank * share, len(problems))
        return lo, problems[lo:lo + share]

    @torch.no_grad()
    def _fixed_set(self, problems: list[Problem], samples: int, purpose: str) -> FixedSet:
        """``samples`` responses per prompt, sampled now at the training temperature with one
        generator per prompt seeded by (seed, purpose, the prompt's index); this rank keeps its share."""
        lo, mine = self._my_share(problems)
        with self._full_weights():  # a collective under FSDP: every rank enters, whatever its share
            if mine:
                prompt_ids, prompt_mask, roll = self._rollout(mine, samples, self.cfg.temperature,
                                                              self._generators(purpose, 0, lo, len(mine)))
        if not mine:  # a rank past the last share (e.g. 5 prompts on 4 ranks: shares of 2, 2, 1, 0)
            empty = torch.zeros(0, 1, dtype=torch.long, device=self.device)
            none = torch.zeros(0, 1, device=self.device)
            prompt_ids, prompt_mask = empty, empty
            roll = Rollout(empty, empty.bool(), TokenEntropyStats(none, none, none, empty.bool()),
                           torch.zeros(0, dtype=torch.long, device=self.device), [])
        n_tokens = self.dist.sum(float(roll.mask.sum()))[0]
        if n_tokens == 0:
            raise UserError(f"the {purpose} set's {len(problems)} prompts gave no response tokens")
        return FixedSet(problems, prompt_ids, prompt_mask, roll, n_tokens)

    def fixed_set_entropy(self, fixed: FixedSet, first_order: FirstOrder | None = None) -> float:
        """Token-mean entropy (nats) of the current policy over the fixed contexts of ``fixed``, summed over
        ranks; with ``first_order`` its gradient is accumulated too (one backward per micro-batch)."""
        total = 0.0
        mask = fixed.roll.mask
        chunks = torch.arange(mask.shape[0], device=self.device).split(self.cfg.micro_batch_size)
        with torch.enable_grad() if first_order is not None else torch.no_grad(), self._full_weights():
            for rows in chunks if mask.shape[0] else ():  # an empty share still joins the sums below
                ent = policy_entropy(self._plain_logits(self.model, fixed, rows))
                if first_order is not None:
                    first_order.accumulate(masked_token_mean(ent, mask[rows], fixed.n_tokens))
                total += float(torch.where(mask[rows], ent.detach(), 0.0).sum())
        return self.dist.sum(total)[0] / fixed.n_tokens

    def probe_entropy(self) -> dict[str, float]:
        """Held-out entropy: the token-mean entropy of the current policy on the probe set, fixed contexts of
        held-out prompts never trained on (a deterministic function of the weights)."""
        if self.probe_set is None:
            return {}
        self.model.eval()
        return {"probe_entropy": self.fixed_set_entropy(self.probe_set)}

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
    def train_step(self, step: int) -> dict[str, float | str]:
        """One GRPO step: sample -> plan -> update -> measure -> metrics; returns the step's metrics row."""
        clock = _PhaseClock()
        torch.manual_seed(derive_seed(self.cfg.seed, "torch", step))  # any randomness inside the method
        batch = clock.time("generate", self._sample, step)
        if self.cfg.predictor == "param":
            batch.param = clock.time("predictor", self._param_directional, batch, step)
        planned = self._plan(step, batch)
        updated = None if planned.plan.skip else clock.time("update", self._update, batch, planned.plan)
        if batch.param is not None and batch.param.fused:  # the predictor's forward and backward were the update's
            clock.move("predictor", "update", batch.param.update_seconds)
        self._scheduler_step()  # one learning-rate step per training step, skipped or not
        if updated is not None:
            self.nan_streak = 0 if updated.finite else self.nan_streak + 1
        measured = None
        if updated is not None and updated.finite and self.cfg.measure_entropy_change:
            measured = clock.time("measure", self._measure, batch, updated)
        elif updated is not None:
            self.control_value = None  # the weights may have moved unmeasured: the next step measures the control set
        row = self._metrics(step, batch, planned, updated, measured)
        self._advance_estimate(float(row.get("measured_entropy_change",
                                            row.get("reckoned_entropy_change", row["predicted_entropy_change"]))))
        return clock.stamp(row, self.cfg.prompts_per_step * self.cfg.samples_per_prompt)

    # ---------------------------------------------------------- 1. sample
    def _sample(self, step: int, purpose: str = "") -> Batch:
        """This rank's prompts sampled, scored, padded to the global length and gathered; rewards and
        advantages of the whole batch. A ``purpose`` other than the training batches' (``""``) draws other
        prompts and samples (seeded by it)."""
        cfg, d = self.cfg, self.dist
        seeds = (purpose,) if purpose else ()
        problems = self.task.train_batch(cfg.prompts_per_step,
                                         random.Random(derive_seed(cfg.seed, *seeds, "data", step)))
        local = cfg.prompts_per_step // d.world
        first = d.rank * local
        mine = problems[first:first + local]
        G = cfg.samples_per_prompt
        try:
            with self._full_weights():
                prompt_ids, prompt_mask, roll = self._rollout(mine, G, cfg.temperature,
                                                              self._generators(purpose + "gen", step, first, local))
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
        correct = d.gather_rows(correct.to(self.device)).cpu()
        rewards = self._rewards(correct, roll)
        adv, adv_info = compute_advantages(rewards, cfg.estimator)
        adv_tok = torch.where(mask, adv.reshape(-1, 1).to(self.device).expand_as(mask), 0.0)
        return Batch(problems, prompt_ids, prompt_mask, roll, rows, mask, TokenEntropyStats(log_prob, ent, base, mask),
                     correct, keys_all, minib, n_mb, rewards, adv_tok, adv_info)

    def warm_start_optimizer(self) -> None:
        """``--adam-warm-start K``: AdamW's second moment from ``K`` batches before the first step.

        Adam's first step is ``-lr sign(g)`` to within ``eps`` (``vhat = g^2``): its size per parameter is
        fixed, so no selection of samples can choose how far it moves the entropy (its linear map in ``g`` is
        zero, docs/theory.md §5.2d). Here the loss gradients ``g_k`` of ``K`` batches of the initial policy
        (rollouts of their own seeds: the training batches are unchanged; every sample accepted; clipped to
        ``grad_clip`` as the update clips) set ``exp_avg_sq = (1 - beta2^K) mean_k g_k^2`` and ``step = K``, so
        that ``vhat`` starts at ``mean_k g_k^2``; the momentum starts at zero and no weight moves. The first
        step is then ``-lr (1 - beta1) / (1 - beta1^(K+1)) g / (sqrt(vhat) + eps)``: linear in ``g`` up to
        the ``1 / (K + 1)`` share of ``g^2`` in the new ``vhat``."""
        cfg = self.cfg
        K = cfg.adam_warm_start
        beta2 = self.optimizer.param_groups[0]["betas"][1]
        squares = [torch.zeros_like(p) for p in self.params]
        norms = 0.0  # the mean gradient norm of the K batches: the first step's clip factor of --one-backward
        self.model.eval()
        for k in range(K):
            batch = self._sample(k, purpose="adam-warm-start")
            local_mask, adv = batch.local_mask, batch.advantages[batch.rows]
            n_tok = float(batch.mask.sum())
            self.optimizer.zero_grad(set_to_none=True)
            chunks = torch.arange(local_mask.shape[0], device=self.device).split(cfg.micro_batch_size)
            for c, rows in enumerate(chunks):
                with self._gradient_sync(c == len(chunks) - 1):
                    logits = self._logits(self.train_forward, batch, rows)
                    lp = response_log_probs(logits, batch.roll.tokens[rows])
                    loss = masked_token_mean(torch.where(local_mask[rows], -adv[rows] * lp, 0.0), local_mask[rows],
                                             n_tok)
                    (loss * self.loss_scale).backward()
            totals = _UpdateTotals(steps=K)
            if not self._clip_gradients(False, totals):
                raise UserError(f"--adam-warm-start: batch {k} gave a non-finite gradient; the initial weights "
                                f"or --lr are broken")
            norms += totals.grad_norm
            for acc, p in zip(squares, self.params):
                if p.grad is not None:
                    acc.addcmul_(p.grad, p.grad, value=1.0 / K)
        self.optimizer.zero_grad(set_to_none=True)
        for p, v in zip(self.params, squares):
            state = self.optimizer.state[p]
            state["step"] = torch.tensor(float(K), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = v.mul_(1 - beta2**K)
        self.last_grad_norm = norms

    def _rewards(self, correct: torch.Tensor, roll: Rollout) -> torch.Tensor:
        """Rewards ``[P, G]`` of the whole batch: the task's (``correct`` ``[B]``, global), or
        :attr:`reward_fn` of this rank's rollout gathered over ranks."""
        cfg = self.cfg
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        if self.reward_fn is None:
            return torch.where(correct, cfg.reward_correct, cfg.reward_wrong).reshape(P, G).float()
        mine = self.reward_fn(roll).reshape(-1).float().to(self.device)
        return self.dist.gather_rows(mine).cpu().reshape(P, G)

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

    def _clock(self) -> float:
        """``time.perf_counter()`` after the device's queued work (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _fusable(self) -> bool:
        """Whether the update can reuse the predictor's forward and whole-batch gradient (``--fused-update``):
        one process (DDP reduces gradients only in its own backward), one PPO epoch and one mini-batch (every
        other pass sees an updated policy), no reference KL (its term needs the update's forward) and no entropy
        term. (Plans that detach tokens, add KL or use sequence ratios are sent to the usual update per step.)"""
        cfg = self.cfg
        return (cfg.fused_update and cfg.predictor == "param" and not self.dist.enabled and cfg.ppo_epochs == 1
                and cfg.mini_batches == 1 and self.ref_model is None and not self.method.needs_token_entropy)

    def _control_direction(self, first_order: FirstOrder, step: int) -> tuple[float, float | None]:
        """The control set's entropy before this step's update and its gradient (into ``first_order``): a
        forward and backward of the set every ``control_gradient_every`` steps (and whenever the value or the
        gradient is unknown, e.g. after a resume); in between the gradient last taken and the entropy measured
        after the last update, or with ``--control-reckoning`` reckoned (docs/theory.md §5.6c). Returns the
        entropy and, at a refresh that follows reckoned steps, the measured entropy minus the reckoned one."""
        every = self.cfg.control_gradient_every
        if self.control_gradient is None or self.control_value is None or step % every == 0:
            reckoned = self.control_value if self.control_reckoned else None
            self.control_value = self.fixed_set_entropy(self.control_set, first_order)
            self.control_reckoned = False
            first_order.reduce(self.dist)
            self.control_gradient = first_order.grad if every > 1 else None
            return self.control_value, None if reckoned is None else self.control_value - reckoned
        first_order.grad = self.control_gradient
        first_order.ready = True
        return self.control_value, None

    def _param_directional(self, batch: Batch, step: int) -> ParamDirection:
        """Parameter-space per-token contributions before the update (docs/theory.md §5).

        One forward of this rank's rows and a backward pass from it give ``grad Hbar`` (the batch's
        token-mean entropy), summed over micro-batches and ranks; with a control set (``--control-prompts``)
        ``Hbar`` is the control set's token-mean entropy instead, from a forward and backward of its fixed
        contexts (docs/theory.md §5.6b; reused for ``control_gradient_every`` steps, §5.6c), and the batch's
        forward is a no-grad one unless ``g_all`` needs it.
        Under AdamW or gradient clipping a second backward from the same forward gives ``g_all`` (below);
        the expected clip factor ``min(1, grad_clip / ||f g_all||)`` scales ``G`` and the linearisation point
        (eq. 5.2c). The
        optimiser's coming step ``dtheta = drift_step - G g`` is read from its state
        (:func:`~entrotheory.param_space.optimizer_step_direction`). SGD's map is exact. AdamW's is
        linearised about the expected gradient of the selection, ``f g_all`` (eq. 5.2b: ``f`` the last step's
        accepted fraction, ``g_all`` the loss gradient with every sample accepted, a second backward pass from
        the same forward), which also covers its first step and parameters this batch touches for the first
        time. (Holding ``vhat`` fixed instead saves that backward but predicted 4-26x the change in the first
        steps on SmolLM2, and linearising about the last update's gradient 1.3-7.6x; docs/theory.md §5.2b.)
        With ``--fused-update`` (:meth:`_fusable`) the forward and ``g_all`` are the update's own: the update
        adds the rejected samples' correction to ``g_all`` (:meth:`_fused_update`) instead of a forward and
        backward of the whole batch.
        Every token's ``s_t`` is the directional derivative of its log-prob along ``G grad Hbar``
        (:func:`~entrotheory.param_space.logit_directional_derivative`): ``fd``, a central difference of two
        no-grad forwards at ``theta +- h G grad Hbar``; ``forward``, one forward at ``theta + h G grad Hbar``
        against the logits of the forward above; ``h <grad Hbar, G grad Hbar>`` = ``PARAM_FD_CHANGE`` resp.
        ``PARAM_FORWARD_CHANGE`` nats."""
        cfg, d = self.cfg, self.dist
        local_mask = batch.local_mask
        B, T = local_mask.shape
        m_total = float(batch.mask.sum())
        adv = batch.advantages[batch.rows]
        norm = torch.tensor(batch.mini_batch_tokens, device=self.device)[batch.mini_batch[batch.rows]].unsqueeze(-1)
        first_order = FirstOrder(self.params, sharded=False, start=self._buffers("start"))
        adam = isinstance(self.optimizer, torch.optim.Adam)
        fused = self._fusable()
        one = cfg.one_backward  # the forward is the update's own, kept with its graph; no loss gradient here
        loss_grad = (FirstOrder(self.params, sharded=False, keep_start=False)
                     if (adam or cfg.grad_clip > 0 or fused) and not one else None)
        chunks = torch.arange(B, device=self.device).split(cfg.micro_batch_size)
        centre, graphs = [], [] if one else None
        self.model.eval()
        control, reckoning_error = None, None
        if self.control_set is not None:  # the controlled entropy is the control set's: its value and gradient
            control, reckoning_error = self._control_direction(first_order, step)
        t_update = 0.0
        for rows in chunks:
            t0 = self._clock()
            with torch.enable_grad() if control is None or loss_grad is not None or one else torch.no_grad():
                logits = self._plain_logits(self.model, batch, rows)
                t_forward = self._clock() - t0
                if one:
                    graphs.append(logits)
                    t_update += t_forward
                if control is None:
                    first_order.accumulate(masked_token_mean(policy_entropy(logits), local_mask[rows], m_total))
                if loss_grad is not None:
                    t1 = self._clock()
                    lp = response_log_probs(logits, batch.roll.tokens[rows])
                    loss_grad.accumulate(torch.where(local_mask[rows], -adv[rows] * lp / norm[rows], 0.0).sum())
                    if fused:  # the update's own forward and whole-batch backward, done here
                        t_update += t_forward + self._clock() - t1
            centre.append(logits.detach())
        first_order.reduce(d)
        reference, clip, whole, before = None, 1.0, None, None
        if loss_grad is not None:
            loss_grad.reduce(d)
            reference = [self.last_accepted_fraction * g for g in loss_grad.grad]
            if fused:
                whole = loss_grad.grad
                before = _Before(torch.zeros(B, T, device=self.device), torch.zeros(B, T, device=self.device),
                                 first_order)
                for rows, z in zip(chunks, centre):
                    before.store(rows, response_log_probs(z, batch.roll.tokens[rows]), z, batch, None, m_total)
            del loss_grad
            clip = self._expected_clip_factor(reference)
            for g in reference:
                g.mul_(clip)
        elif one:
            clip = self._last_clip_factor()
        direction, drift = optimizer_step_direction(self.optimizer, self.params, first_order.grad, reference,
                                                    out=self._buffers("direction"))
        del reference
        if clip != 1.0:
            for x in direction:
                x.mul_(clip)
        curvature = float(first_order_entropy_change(first_order.grad, direction))  # <grad H, G grad H> >= 0
        method = cfg.param_derivative
        change = PARAM_FORWARD_CHANGE if method == "forward" else PARAM_FD_CHANGE
        h = change / curvature if curvature > 0 else 0.0
        # only rows with a non-zero advantage: a token's share of the step's change is A_t s_t / N, so the plan
        # weighs no other row's s_t (a plan that trains on one anyway gets it in _complete_directional)
        live = (adv != 0).any(-1)
        s = torch.zeros(B, T, device=self.device)
        for rows, z in zip(chunks, centre):
            keep = live[rows]
            if bool(keep.any()):
                s[rows[keep]] = self._directional_rows(batch, rows[keep], direction, h, z[keep])
        return ParamDirection(d.gather_rows(s), drift, first_order, clip, control, reckoning_error, whole, before,
                              t_update, graphs=graphs, computed=d.gather_rows(live), direction=direction, step_h=h)

    def _directional_rows(self, batch: Batch, rows: torch.Tensor, direction, h: float,
                          base: torch.Tensor | None) -> torch.Tensor:
        """``s_t`` ``[len(rows), T]`` of this rank's ``rows`` along ``direction`` (``G grad Hbar``), zero at
        padding: the directional derivative of each token's log-prob (``--param-derivative``; ``base``, the
        rows' logits at the current weights, is the one-sided difference's base; None: a no-grad forward)."""
        method = self.cfg.param_derivative
        if base is None:  # the log-prob tangent (and the one-sided difference) need the policy at these weights
            with torch.no_grad():
                base = self._plain_logits(self.model, batch, rows)
        tangent = logit_directional_derivative(
            lambda ps: self._functional_logits(ps, batch, rows), self.params, direction, method,
            h if method != "jvp" else None, base=base if method == "forward" else None,
            workspace=self._buffers("displaced") if method != "jvp" else None)
        tokens = batch.roll.tokens[rows]
        return torch.where(batch.local_mask[rows], log_prob_tangent(base, tangent, tokens).float(), 0.0)

    def _complete_directional(self, batch: Batch, advantages: torch.Tensor) -> None:
        """``s_t`` of the rows a plan trains on (non-zero ``advantages`` ``[B, T]``, global) that the predictor
        skipped for their zero advantage (e.g. a method that weighs raw rewards), before the update: the
        weights are still those the direction was taken at. Every rank enters (the plan is global)."""
        param = batch.param
        needed = (advantages != 0).any(-1) & ~param.computed
        if not bool(needed.any()):
            return
        B, T = batch.local_mask.shape
        rows = torch.arange(B, device=self.device)[needed[batch.rows]]
        s = torch.zeros(B, T, device=self.device)
        self.model.eval()
        for chunk in rows.split(self.cfg.micro_batch_size):
            s[chunk] = self._directional_rows(batch, chunk, param.direction, param.step_h, None)
        param.directional = param.directional + self.dist.gather_rows(s)
        param.computed = param.computed | needed

    def _buffers(self, name: str) -> list[torch.Tensor]:
        """Model-sized scratch tensors of the parameter-space predictor (``start``: the weights before the
        update; ``direction``: ``G grad Hbar``; ``displaced``: the weights of the tangent's forward), made once
        and reused every step: a fresh model-sized allocation costs about as much as a pass over the weights."""
        if name not in self.scratch:
            self.scratch[name] = [torch.empty_like(p.detach()) for p in self.params]
        return self.scratch[name]

    def _last_clip_factor(self) -> float:
        """``--one-backward``'s expected clip factor ``min(1, grad_clip / ||g_prev||)``, from the last update's
        gradient norm before clipping (after ``--adam-warm-start``, its batches' mean; 1 before any gradient):
        the coming gradient is not known before the selection (docs/theory.md §5.5b)."""
        if self.cfg.grad_clip <= 0 or self.last_grad_norm is None:
            return 1.0
        return self._clip_factor(self.last_grad_norm)

    def _expected_clip_factor(self, reference: list[torch.Tensor]) -> float:
        """``min(1, grad_clip / ||g0||)`` for the expected gradient ``g0`` of the selection: the factor by which
        gradient clipping is expected to scale the coming gradient (docs/theory.md §5.2c)."""
        if self.cfg.grad_clip <= 0:
            return 1.0
        norm = math.sqrt(float(first_order_entropy_change(reference, reference)))  # <g0, g0>, summed in float64
        return self._clip_factor(norm)

    def _clip_factor(self, norm: float) -> float:
        """``min(1, grad_clip / ||g||)``: the factor by which the clip scales a gradient of norm ``norm``."""
        return min(1.0, self.cfg.grad_clip / (norm + CLIP_NORM_EPS))

    # ---------------------------------------------------------- 2. plan
    def _plan(self, step: int, batch: Batch) -> _Planned:
        """On the GLOBAL batch (identical on every rank): per-token contributions -> the method's plan, and the
        predicted change of the token-mean entropy for the advantages the plan trains on."""
        cfg = self.cfg
        mask, stats, adv_tok, n_tok = batch.mask, batch.stats, batch.advantages, batch.n_tokens
        entropy = masked_mean(stats.entropy, mask)
        scale = self._normaliser_scale(batch)
        lr_now = self.optimizer.param_groups[0]["lr"]
        control, extra = self._control_entropy(batch, entropy)
        if is_relative_spec(cfg.schedule):
            if self.schedule_anchor is None:  # the first plan of a fresh run: at the initial weights
                self.anchor_schedule(control)
            extra["schedule_anchor"] = self.schedule_anchor
        drift = 0.0
        if batch.param is not None:
            # c_t = (A_t / N_m) s_t is token t's share of the step's change (nats); the methods take contributions
            # per unit lr of the batch's token-mean entropy (docs/theory.md §4.4), so that k ~ lr
            drift = batch.param.drift
            contrib = adv_tok * batch.param.directional * (scale / n_tok) / lr_now
            extra["predicted_drift"] = drift
            extra["predicted_clip_factor"] = batch.param.clip_factor
        else:
            contrib = token_mean_contributions(stats, adv_tok, mask, rule=cfg.rule, normalizer=n_tok) * scale
        # the known drift is moved to the entropy side: the sampler chooses samples for target - H - drift
        aimed = control + drift
        if cfg.momentum_projection:
            aimed = self._momentum_projection(step, control, drift, extra)
        plan = self.method.prepare(advantages=adv_tok, log_probs=stats.log_prob, old_log_probs=stats.log_prob,
                                   mask=mask, entropy=aimed, step=step, contributions=contrib,
                                   rewards=batch.rewards.reshape(-1).to(self.device))
        accepted = float(plan.diagnostics.get("accepted_fraction", 1.0))
        self.last_accepted_fraction = max(accepted, MIN_ACCEPTED_FRACTION)
        # per-position (logit-space) prediction of the token-mean entropy change for the advantages actually
        # trained on, under the token-mean loss with the whole batch's normaliser (docs/theory.md eq. 3.3)
        c_plan = token_mean_contributions(stats, plan.advantages, mask, rule=cfg.rule, normalizer=n_tok) * scale
        logit_pred = lr_now * float(c_plan.sum())
        if batch.param is None:
            return _Planned(plan, entropy, lr_now, extra, logit_pred, None)
        # parameter space (eq. 5.3): drift + sum_t (A_t / N_m) s_t
        self._complete_directional(batch, plan.advantages)
        param_pred = drift + float((plan.advantages * batch.param.directional * scale / n_tok).sum())
        return _Planned(plan, entropy, lr_now, extra, param_pred, logit_pred)

    def anchor_schedule(self, entropy: float) -> None:
        """Anchor a relative ``--schedule`` (``H0`` terms, docs/theory.md §4.1) at ``entropy``, the entropy the
        method controls before the first update (the control set's, the state estimate's or the batch's), and
        build the method with it (the provisional one has no state yet). Every rank plans on the same global
        values, so every rank anchors at the same number."""
        self.method = build_method(self.cfg, verbose=False, anchor=float(entropy))
        self.schedule_anchor = float(entropy)

    def _momentum_projection(self, step: int, control: float, drift: float, extra: dict) -> float:
        """``--momentum-projection``: the entropy to hand the predictive sampler so that it aims the projected
        entropy, not the next one (docs/theory.md eq. 5.2e).

        The coming step's momentum moves the entropy by ``drift + C`` now (``C`` the selected samples' part)
        and by ``W (drift + C)`` over its life (:func:`~entrotheory.param_space.momentum_carry_factor`, the
        learning-rate schedule included). Aiming ``H + W (drift + C)`` at ``target(t + W)``, the schedule
        ``W - 1`` steps after the next (on a steady ramp the entropy trails its projection by ``W - 1`` steps'
        change), asks this step for ``C = (target(t + W) - H) / W - drift``. The sampler, which asks
        ``C = target(t + 1) - aimed`` (its calibration unchanged), gets
        ``aimed = target(t + 1) - (target(t + W) - H) / W + drift``. (A decoupled weight decay's part of the
        drift recurs at every step instead of decaying with the momentum; ``W`` is exact for it only at
        ``weight_decay = 0``, the default.)"""
        group = self.optimizer.param_groups[0]
        beta1 = group["betas"][0] if "betas" in group else group.get("momentum", 0.0)
        adam = isinstance(self.optimizer, torch.optim.Adam)
        taken = int(max((float(st["step"]) for st in self.optimizer.state.values() if "step" in st), default=0.0))
        lam, now = self.scheduler.lr_lambdas[0], self.scheduler.last_epoch
        carry = momentum_carry_factor(taken, beta1, bias_correction=adam, lr_factors=lambda k: lam(now + k))
        sampler = self.method.sampler
        t = step + sampler.step_offset
        lead = sampler.target_entropy(t + carry)
        aimed = sampler.target_entropy(t + 1) - (lead - control) / carry + drift
        extra.update(momentum_carry=carry, projected_entropy=control + carry * drift, lead_target=lead)
        if aimed < 0:  # the sampler takes an entropy >= 0: a request for more than it can hold is capped
            extra["projection_capped"] = aimed
        return max(0.0, aimed)

    def _normaliser_scale(self, batch: Batch) -> torch.Tensor | float:
        """``N / N_m`` per row ``[B, 1]`` (1.0 with one mini-batch). Each token's loss is normalised by its
        mini-batch's token count ``N_m``; scaling contributions by ``N / N_m`` lets the sampler and the
        prediction keep the whole batch's normaliser ``N`` (docs/scaling.md)."""
        if self.cfg.mini_batches == 1:
            return 1.0
        n_mb = torch.tensor(batch.mini_batch_tokens, device=self.device).clamp(min=1)
        return (batch.n_tokens / n_mb)[batch.mini_batch].unsqueeze(-1)

    def _control_entropy(self, batch: Batch, entropy: float) -> tuple[float, dict[str, float]]:
        """The entropy the method controls: the batch entropy, with ``--entropy-estimate`` the state estimate
        updated by it (and the estimate's metrics), with ``--control-prompts`` the control set's entropy before
        the update (measured by the predictor)."""
        if batch.param is not None and batch.param.control_entropy is not None:
            extra = {"control_entropy": batch.param.control_entropy}
            if batch.param.control_reckoning_error is not None:
                extra["control_reckoning_error"] = batch.param.control_reckoning_error
            return batch.param.control_entropy, extra
        if self.estimate is None:
            return entropy, {}
        mask = batch.mask
        groups = torch.arange(mask.shape[0], device=mask.device) // self.cfg.samples_per_prompt
        _, var = batch_entropy_variance(batch.stats.entropy, mask, groups)
        control = self.estimate.update(entropy, float(var))
        return control, {"entropy_estimate": control, "entropy_estimate_std": math.sqrt(self.estimate.variance),
                         "batch_entropy_std": math.sqrt(float(var)), "estimate_gain": self.estimate.gain}

    # ---------------------------------------------------------- 3. update
    def _update(self, batch: Batch, plan: MethodPlan) -> _Updated:
        """``ppo_epochs`` x ``mini_batches`` optimiser steps on this rank's rows, gradients summed over ranks by
        DDP/FSDP, each mini-batch's loss normalised by its token count over all ranks. Stops at the first
        non-finite loss or gradient (that optimiser step is not taken)."""
        cfg, d = self.cfg, self.dist
        if batch.param is not None and batch.param.whole_gradient is not None:
            whole, batch.param.whole_gradient = batch.param.whole_gradient, None
            if not (plan.detach is not None or plan.kl_mask is not None or plan.importance_ratio != "token"
                    or plan.entropy_coef or self.method.needs_token_entropy):
                batch.param.fused = True
                return self._fused_update(batch, plan, whole)
        retained = None
        if batch.param is not None and batch.param.graphs is not None:  # --one-backward: the forward is done
            retained, batch.param.graphs, batch.param.fused = batch.param.graphs, None, True
        before, separate = self._old_policy(batch)
        plan_local = plan.rows(batch.rows)
        minib = batch.mini_batch[batch.rows]
        groups = [(minib == m).nonzero().squeeze(-1) for m in range(cfg.mini_batches)]
        totals = _UpdateTotals(steps=cfg.ppo_epochs * cfg.mini_batches)
        finite = True
        self.model.eval()  # dropout off: old log-probs, the update and the measured change see one policy
        for epoch, (m, idx) in itertools.product(range(cfg.ppo_epochs), enumerate(groups)):
            first = epoch == 0 and not separate  # this pass also records the old policy
            self.optimizer.zero_grad(set_to_none=True)
            nan = self._accumulate(batch, plan, plan_local, before, idx, batch.mini_batch_tokens[m], first, totals,
                                   retained if epoch == 0 and m == 0 else None)
            finite = self._clip_gradients(nan, totals)
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                break
            if first and before.first_order is not None:  # one mini-batch: its gradient is complete now
                before.first_order.reduce(d)
            self.optimizer.step()
        if finite:
            self.last_grad_norm = totals.grad_norm
        loss, clipped, kl_ref = d.sum(totals.loss, totals.clipped, totals.kl_ref)
        metrics = {"loss": loss, "clip_fraction": clipped, "grad_norm": totals.grad_norm}
        if self.ref_model is not None:
            metrics["kl_ref"] = kl_ref
        if before.first_order is not None and finite:
            metrics["exact_predicted_entropy_change"] = before.first_order.predicted(d)
        return _Updated(before, finite, metrics)

    def _fused_update(self, batch: Batch, plan: MethodPlan, whole: list[torch.Tensor]) -> _Updated:
        """The optimiser step of ``--fused-update`` (one process, one epoch, one mini-batch): the gradient of the
        plan's loss from the predictor's whole-batch gradient ``g_all`` (every sample accepted) and a correction
        back-propagated through the rows whose advantages the plan changed.

        On-policy (ratio 1) the clipped surrogate's gradient is ``-(1/N) sum_t A'_t grad log pi(y_t)`` for the
        plan's advantages ``A'``, so ``g = g_all + (1/N) sum_t (A_t - A'_t) grad log pi(y_t)``: a forward and
        backward of the changed rows only (none when the plan keeps every sample). Plans that detach tokens,
        add KL or entropy terms or use sequence ratios take the usual update (:meth:`_update`)."""
        cfg = self.cfg
        local_mask, n_tok = batch.local_mask, float(batch.mini_batch_tokens[0])
        plan_local = plan.rows(batch.rows)
        before = batch.param.before
        delta = torch.where(local_mask, batch.advantages[batch.rows] - plan_local.advantages, 0.0)
        changed = delta.ne(0).any(-1).nonzero().squeeze(-1)
        totals = _UpdateTotals(steps=1)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.params, whole):
            p.grad = g
        nan = False
        self.model.eval()
        for rows in changed.split(cfg.micro_batch_size) if changed.numel() else ():
            logits = self._logits(self.train_forward, batch, rows)
            correction = masked_token_mean(delta[rows] * response_log_probs(logits, batch.roll.tokens[rows]),
                                           local_mask[rows], n_tok)
            nan |= not (all_finite(logits) and bool(torch.isfinite(correction)))
            if not nan:
                correction.backward()
        finite = self._clip_gradients(nan, totals)
        if finite:
            self.optimizer.step()
            self.last_grad_norm = totals.grad_norm
        else:
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # the loss and clip fraction at ratio 1, as the usual update reports them
            loss_tok = self.method.token_loss(plan_local, before.log_prob, before.log_prob, local_mask)
            loss = float(masked_token_mean(loss_tok, local_mask, n_tok))
            clipped = ppo_clipped(before.log_prob, before.log_prob, plan_local.advantages, plan.eps_low, plan.eps_high)
        metrics = {"loss": loss, "clip_fraction": float((clipped & local_mask).sum()) / n_tok,
                   "grad_norm": totals.grad_norm}
        if finite:
            metrics["exact_predicted_entropy_change"] = before.first_order.predicted(self.dist)
        return _Updated(before, finite, metrics)

    def _old_policy(self, batch: Batch) -> tuple[_Before, bool]:
        """The record of the pre-update policy, and whether it is taken in a pass of its own before the first
        optimiser step (later mini-batches see an updated policy, and FSDP's entropy gradient needs a
        backward of its own); otherwise the first epoch's forwards fill it in."""
        cfg = self.cfg
        B, T = batch.local_mask.shape
        first_order = None
        if batch.param is not None:
            first_order = batch.param.first_order  # grad Hbar of the parameter-space predictor, complete
        elif cfg.exact_first_order:
            first_order = FirstOrder(self.params, self.sharded, self.loss_scale)
        before = _Before(torch.zeros(B, T, device=self.device), torch.zeros(B, T, device=self.device), first_order)
        separate = cfg.mini_batches > 1 or (self.sharded and before.needs_gradient)
        if separate:
            self._record_before(batch, torch.arange(B, device=self.device), before,
                                n_tok=sum(batch.mini_batch_tokens))
            if before.first_order is not None:
                before.first_order.reduce(self.dist)
        return before, separate

    def _accumulate(self, batch: Batch, plan: MethodPlan, plan_local: MethodPlan, before: _Before,
                    idx: torch.Tensor, n_tok: float, first: bool, totals: _UpdateTotals,
                    retained: list[torch.Tensor] | None = None) -> bool:
        """Forward and backward of one mini-batch (this rank's rows ``idx``) micro-batch by micro-batch, its
        loss normalised by its token count ``n_tok``; on the ``first`` pass the old policy is recorded too.
        ``retained``: the micro-batches' logits already computed with their graphs (``--one-backward``), used
        instead of a forward. Returns whether a logit or the loss was not finite (the backward still joins
        DDP's)."""
        cfg = self.cfg
        local_mask = batch.local_mask
        nan = False
        chunks = idx.split(cfg.micro_batch_size)
        if retained is not None and len(retained) != len(chunks):
            raise RuntimeError(f"{len(retained)} retained forwards for {len(chunks)} micro-batches")
        for c, rows in enumerate(chunks):
            with self._gradient_sync(c == len(chunks) - 1):
                logits = retained[c] if retained is not None else self._logits(self.train_forward, batch, rows)
                if not all_finite(logits):  # skipped like a NaN loss; the backward still joins DDP's
                    nan = True
                    (logits.sum() * 0.0).backward()
                    continue
                lp = response_log_probs(logits, batch.roll.tokens[rows])
                tok_ent = None
                if self.method.needs_token_entropy or (first and before.needs_gradient):
                    tok_ent = policy_entropy(logits)  # differentiable: the bonus and <dH/dtheta, .>
                if first:
                    before.store(rows, lp.detach(), logits, batch, tok_ent, n_tok)
                mrows = local_mask[rows]
                loss_tok = self.method.token_loss(plan_local.rows(rows), lp, before.log_prob[rows], mrows,
                                                  token_entropy=tok_ent)
                if self.ref_model is not None:
                    kl_tok = self._kl_to_reference(batch, rows, lp)
                    loss_tok = loss_tok + cfg.kl_coef * kl_tok
                    totals.kl_ref += float(torch.where(mrows, kl_tok.detach(), 0.0).sum()) / n_tok / totals.steps
                loss = masked_token_mean(loss_tok, mrows, n_tok)
                nan |= not bool(torch.isfinite(loss))
                (loss * self.loss_scale).backward()
            totals.loss += float(loss.detach()) / cfg.ppo_epochs / cfg.mini_batches  # mean per optimiser step
            clip = ppo_clipped(lp.detach(), before.log_prob[rows], plan_local.advantages[rows],
                               plan.eps_low, plan.eps_high)
            totals.clipped += float((clip & mrows).sum()) / n_tok / totals.steps
        return nan

    def _kl_to_reference(self, batch: Batch, rows: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
        """Per-token k3 estimate ``exp(d) - d - 1``, ``d = log pi_ref - log pi``, of KL(pi || pi_ref) ``[b, T]``."""
        with torch.no_grad():
            ref_lp = response_log_probs(self._plain_logits(self.ref_model, batch, rows), batch.roll.tokens[rows])
        dlp = ref_lp - log_prob
        return torch.exp(dlp) - dlp - 1.0

    def _clip_gradients(self, nan: bool, totals: _UpdateTotals) -> bool:
        """Agree over ranks whether the mini-batch was finite; if so clip the gradient norm (``grad_clip``) and
        add it to the step's mean. Returns whether the optimiser step may be taken."""
        cfg = self.cfg
        nan = self.dist.any(nan, self.device)
        if nan:
            return False
        limit = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        totals.grad_norm += norm / totals.steps  # the mean over this step's optimiser steps
        return math.isfinite(norm)

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

    # ---------------------------------------------------------- 4. measure
    @torch.no_grad()
    def _measure(self, batch: Batch, updated: _Updated) -> dict[str, float]:
        """Theory against practice: the entropy of the updated policy on the same contexts, and the KL of the
        old to the new policy there; the change is fed back to the method. With a control set the measured
        change is the control set's (the entropy controlled and predicted), the batch's is logged beside it.
        With ``--control-reckoning`` the control set is not measured: its entropy is advanced by the step's
        first-order change ``<grad Hbar, dtheta>`` (``reckoned_entropy_change``), which is fed back instead,
        until the next gradient refresh measures it (docs/theory.md §5.6c)."""
        before = updated.before
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
        kl_old_new = self._global_mean(torch.exp(log_ratio) - 1.0 - log_ratio, local_mask)
        out = {"kl_old_new": kl_old_new}
        control = batch.param.control_entropy if batch.param is not None else None
        drift = batch.param.drift if batch.param is not None else 0.0
        rescale = self._clip_rescale(batch, updated, out)
        if control is not None:
            out["measured_batch_entropy_change"] = measured
            if self.cfg.control_reckoning:
                change = updated.metrics["exact_predicted_entropy_change"]
                self.control_value, self.control_reckoned = control + change, True
                self.method.observe((change - drift) * rescale)
                return {**out, "reckoned_entropy_change": change}
            self.control_value = self.fixed_set_entropy(self.control_set)
            measured = self.control_value - control
        # the sampler is calibrated on the sample-dependent part: the known drift is taken off (see _plan)
        self.method.observe((measured - drift) * rescale)
        return {**out, "measured_entropy_change": measured}

    def _clip_rescale(self, batch: Batch, updated: _Updated, out: dict[str, float]) -> float:
        """``--clip-corrected-calibration``: ``c_pred / c_real``, the clip factor the prediction assumed over
        the one the update applied, ``min(1, grad_clip / ||g||)`` (its gradient norm before clipping; logged as
        ``realised_clip_factor``). The sample-dependent part of the step is linear in the clip factor (AdamW's
        map with ``vhat`` held fixed, docs/theory.md §5.2c), so the measured part times this ratio is what the
        step would have done with the predicted clip: the calibration then fits what the first-order
        prediction misses, not how far the coming gradient's norm was from its estimate. 1 otherwise."""
        if not self.cfg.clip_corrected_calibration or batch.param is None:
            return 1.0
        realised = self._clip_factor(updated.metrics["grad_norm"])
        out["realised_clip_factor"] = realised
        return batch.param.clip_factor / realised

    def _advance_estimate(self, change: float) -> None:
        """Process step of the entropy estimate: the policy moved by the last update's change."""
        if self.estimate is not None and self.estimate.initialised:
            self.estimate.predict(change, self.cfg.estimate_process_std ** 2)

    # ---------------------------------------------------------- 5. metrics
    def _metrics(self, step: int, batch: Batch, planned: _Planned, updated: _Updated | None,
                 measured: dict[str, float] | None) -> dict[str, float | str]:
        """The step's row of ``metrics.jsonl`` (the phase times are added by :meth:`train_step`)."""
        cfg = self.cfg
        P, G = cfg.prompts_per_step, cfg.samples_per_prompt
        diag = planned.plan.diagnostics
        groups_correct = batch.correct.reshape(P, G)
        keys = batch.answer_keys
        distinct = [len({keys[p * G + g] for g in range(G) if groups_correct[p, g]}) for p in range(P)]
        row: dict[str, float | str] = {
            "step": step,
            "entropy": planned.entropy,
            "reward_mean": float(batch.rewards.mean()),
            "accuracy": float(batch.correct.float().mean()),
            "signal_fraction": 1.0 - float(batch.advantage_info["zero_signal_groups"]) / P,
            "distinct_correct": sum(distinct) / P,
            "response_length": batch.n_tokens / (P * G),
            "accepted_fraction": float(diag.get("accepted_fraction", 1.0)),
            "accepted_pos_fraction": float(diag.get("accepted_pos_fraction", 1.0)),
            "accepted_neg_fraction": float(diag.get("accepted_neg_fraction", 1.0)),
            "lr": planned.lr,
        }
        for key in PLAN_DIAGNOSTICS:
            if key in diag:
                row[SAMPLER_DIAGNOSTICS.get(key, key)] = diag[key]
        if "calibration_k" in row:  # the calibration factor k / lr (--calibration-factor is its start)
            row["calibration_factor"] = float(row["calibration_k"]) / planned.lr
        row.update(planned.control)
        row["predicted_entropy_change"] = planned.predicted
        if planned.predicted_logit is not None:
            row["predicted_entropy_change_logit"] = planned.predicted_logit
        if updated is None:  # nothing to train on
            row.update(skipped="all_rejected" if diag.get("all_rejected") else "no_signal",
                       measured_entropy_change=0.0, predicted_entropy_change=0.0)
            return row
        row.update(updated.metrics)
        if not updated.finite:
            row.update(skipped="nan_loss", measured_entropy_change=0.0, nan_streak=self.nan_streak)
        elif measured is not None:
            row.update(measured)
            pred = planned.predicted
            if "measured_entropy_change" in measured:
                row["measured_over_predicted"] = (measured["measured_entropy_change"] / pred if pred != 0
                                                  else float("nan"))
        return row

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
                 "last_accepted_fraction": self.last_accepted_fraction, "schedule_anchor": self.schedule_anchor,
                 "last_grad_norm": self.last_grad_norm,
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
        """Restore everything :meth:`save_checkpoint` wrote; returns the step to continue from. The control set's
        reused gradient and last measured entropy (``--control-gradient-every``) are not saved: the first step
        after the load takes them afresh."""
        from safetensors.torch import load_file, load_model

        self.control_value = self.control_gradient = None
        self.control_reckoned = False

        try:
            if self.sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                weights = load_file(str(ckpt / "model.safetensors"))
                missing = set(self.model.state_dict()) - set(weights)
                if missing - _tied_duplicates(self.model):
                    raise KeyError(f"missing weights {sorted(missing)[:MISSING_WEIGHTS_SHOWN]}")
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
        anchor = state.get("schedule_anchor")
        if is_relative_spec(self.cfg.schedule) and anchor is not None:
            self.anchor_schedule(anchor)  # the method of the run, anchored where it was, before its state
        elif is_relative_spec(self.cfg.schedule) and int(state["next_step"]) > 0:
            raise UserError(f"checkpoint {str(ckpt)!r} has no anchor for the relative --schedule "
                            f"{self.cfg.schedule!r} (it was written by a run with an absolute schedule)")
        try:
            self.method.load_state_dict(state["method"])
        except (ValueError, KeyError) as exc:
            raise UserError(f"checkpoint {str(ckpt)!r} holds state for another method: {exc}") from None
        self.nan_streak = int(state["nan_streak"])
        if self.estimate is not None and state.get("estimate"):
            self.estimate.load_state_dict(state["estimate"])
        self.last_accepted_fraction = float(state.get("last_accepted_fraction", 1.0))
        self.last_grad_norm = state.get("last_grad_norm")
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["next_step"])


# ---------------------------------------------------------------------- the command line
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
        summary = _train(cfg, run_dir, ckpt, dist)
        dist.barrier()  # no rank leaves the group while another still has collectives in flight
        return summary
    finally:
        shutdown(dist)


def _train(cfg: TrainConfig, run_dir: Path, ckpt: Path | None, dist: DistContext) -> dict[str, float]:
    main_rank = dist.is_main
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, dist)
    start = trainer.load_checkpoint(ckpt) if ckpt is not None else 0
    if ckpt is None and cfg.adam_warm_start:
        if main_rank:
            print(f"AdamW warm start: the second moment from {cfg.adam_warm_start} batches", file=sys.stderr)
        trainer.warm_start_optimizer()
    kept = [r for r in read_rows(run_dir / "metrics.jsonl") if r["step"] < start]  # drop what the checkpoint lacks
    dist.barrier()  # every rank has read the old metrics before rank 0 rewrites them
    if main_rank:
        save_yaml(cfg, run_dir / "config.yaml")
    step = start
    done_here = 0
    finished = start >= cfg.steps
    bar = _progress(cfg, start) if main_rank else None
    try:
        with MetricsLog(run_dir, kept, write=main_rank, tensorboard=cfg.tensorboard) as log, _StopFlag() as stop:
            for step in range(start, cfg.steps):
                row: dict = {}
                if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                    row.update(trainer.evaluate(step))
                if cfg.probe_every and step % cfg.probe_every == 0:
                    row.update(trainer.probe_entropy())
                row = {**trainer.train_step(step), **row}
                log.append(row)
                done_here += 1
                if bar is not None:
                    _show_progress(bar, row)
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
                    _plot(log.rows, run_dir, cfg)
                finished = step + 1 == cfg.steps
                # every rank stops at the same step, whichever received the interrupt
                if dist.any(stop.requested or bool(cfg.stop_after and done_here >= cfg.stop_after),
                            trainer.device):
                    break
            if finished:
                log.append({"step": cfg.steps, "final": True, **trainer.evaluate(cfg.steps),
                            **trainer.probe_entropy()})
                trainer.save_checkpoint(cfg.steps)
            else:
                trainer.save_checkpoint(step + 1)
                if main_rank:
                    print(f"stopped after step {step}; checkpoint in {run_dir / 'checkpoint'} "
                          f"(continue with --resume {run_dir})", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()
    summary = summarize(log.rows)
    if main_rank:
        write_summary(summary, run_dir / "summary.json")
        if cfg.plot:
            _plot(log.rows, run_dir, cfg)
    return summary


def _show_progress(bar, row: dict) -> None:
    post = {"R": f"{row['reward_mean']:+.2f}", "H": f"{row['entropy']:.3f}", "acc": f"{row['accepted_fraction']:.2f}"}
    if "target_entropy" in row:
        post["tgt"] = f"{float(row['target_entropy']):.3f}"
    if "pass_at_1" in row:
        post["p@1"] = f"{row['pass_at_1']:.2f}"
    bar.set_postfix(post, refresh=False)
    bar.update(1)


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
