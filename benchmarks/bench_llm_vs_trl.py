"""``llm.train`` against TRL's ``GRPOTrainer`` (the baseline) on the same GRPO work, side by side in one run.

The same work for both, in one process:

* model: the embedded SmolLM2-135M in float32 (``--model embedded``, llm/models.py), one copy per trainer made
  from the same weights; the smoke mode (``ENTROCRAFT_BENCH_SMOKE=1``) uses llm.train's ``smoke`` model instead
  (a tiny random Llama built with ``from_config``) and its character tokenizer;
* prompts: few-shot addition of llm/tasks.py, the prompts llm.train draws at step ``k`` (a pure function of the
  seed and ``k``) handed to TRL as its dataset in order (``shuffle_dataset=False``): step ``k`` of both trains
  on the same 16 prompts (checked), 8 samples each, temperature 1, no top-p/top-k;
* stop rule: llm.train stops a response at EOS, the pad token or any token whose text contains a newline
  (llm/rollout.py); TRL gets exactly that set of token ids as ``eos_token_id`` in ``generation_kwargs`` and on the
  model's generation config (TRL masks each completion after the first of the model's eos ids), and the same
  ``max_completion_length`` as llm.train's ``max_new_tokens``;
* one optimiser step per 128 samples: llm.train in two micro-batches of 64 rows; TRL with
  ``per_device_train_batch_size=64``, ``gradient_accumulation_steps=2`` (so ``steps_per_generation=2``:
  ``generation_batch_size`` 128, one ``generate`` call for all 128, as llm.train), ``num_iterations=1``;
* AdamW (torch's, betas 0.9/0.999, no weight decay), the same constant learning rate, gradient clipping at norm
  1, ``beta=0`` (no KL, no reference model), no vLLM; TRL's ``loss_type="dapo"`` (clipped token loss over the
  global token count), the token-mean loss with the whole batch's token count of llm.train;
* the same torch threads (``torch.set_num_threads``, checked inside every step).

llm.train runs its default method (``cpu-demo``: ``entrocraft-predictive`` with its schedule), so its steps
include the entropy instrumentation; what differs from TRL's loss: its advantages are the sampler's selection of
the GRPO advantages (rejected samples get advantage 0, which changes no amount of compute), TRL's are the plain
GRPO ones ((r - mean) / (std + 1e-4) per group); on the first, on-policy epoch both clipped losses are the plain
policy gradient. llm.train's measurement forward (``measure_entropy_change``: entropy of the updated policy) is
kept on but its time (``time_measure``) is taken off llm.train's step for the comparison and reported on its own.

Interleaved: TRL runs its own ``train()`` loop; at the end of each of its optimiser steps a callback runs one
``Trainer.train_step`` of llm.train, so the order is TRL, ours, TRL, ours, ... (one warm-up step each, then the
timed steps). TRL's step time is the wall time its loop spent between two of our steps (its logging, data
loading and callbacks included); ours is the wall time of ``train_step`` less ``time_measure``.

Phases, timed by wrapping, from this module, the functions each trainer calls (no installed file is changed):

* generation: TRL's ``model.generate``; llm.train's ``generate`` (llm/rollout.py, as llm/train.py calls it);
* log-prob forwards: TRL's ``_get_per_token_logps_and_entropies`` (its fused LM head gives log-probs and entropy);
  llm.train's ``response_logits`` + ``response_log_probs``. Those running with gradients are the training
  forward; those without are scoring forwards (old/reference policy; neither trainer runs one here: both take
  the old log-probs from the on-policy training forward; llm.train's measurement forward is counted apart);
* backward + clip + optimiser step: ``torch.Tensor.backward``, ``torch.nn.utils.clip_grad_norm_`` and the
  optimiser step (torch's global optimiser step hooks);
* other: the rest of the step (rewards, advantages, loss arithmetic, llm.train's entropy instrumentation,
  TRL's bookkeeping and logging).

llm.train's entropy instrumentation (its share of the step is recorded): ``token_entropy_stats`` while sampling
(llm/rollout.py) and on the training forward's logits (llm/train.py, with gradients enabled; without them it is
the measurement's), ``token_mean_contributions`` (llm/train.py), the
method's ``prepare`` (the rejection sampler's selection and plan) and ``policy_entropy`` where the method needs it.

Run (minutes; on an otherwise idle machine): ``python -m pytest benchmarks/bench_llm_vs_trl.py --benchmark-only
-q -s``. Smoke (seconds): ``ENTROCRAFT_BENCH_SMOKE=1 python -m pytest benchmarks/bench_llm_vs_trl.py
--benchmark-disable -q``; there the rewards are +1 for each group's first sample and -1 for the others (a random
model rarely answers, and a group of equal rewards has no gradient), and llm.train runs ``vanilla``.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from common import SMOKE, record_ratio

pytest.importorskip("transformers")
pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import llm.rollout  # noqa: E402
import llm.train  # noqa: E402
from llm.config import PRESETS, TrainConfig, validate  # noqa: E402
from llm.tasks import Problem  # noqa: E402
from llm.train import Trainer, derive_seed  # noqa: E402

PROMPTS, SAMPLES = (2, 2) if SMOKE else (16, 8)
MAX_NEW_TOKENS = 4 if SMOKE else 8
MICRO_BATCH = 2 if SMOKE else 64
WARMUP_STEPS, TIMED_STEPS = 1, (1 if SMOKE else 2)
LR = 2e-6
THREADS = int(os.environ.get("ENTROCRAFT_BENCH_THREADS", "0")) or min(2, os.cpu_count() or 1)

PHASES = ("generation", "logprob_forward_grad", "logprob_forward_nograd", "backward_clip_optimizer", "other")
INSTRUMENTS = ("stats_sampling", "stats_training_forward", "contributions", "method_prepare", "policy_entropy")


class Clock:
    """Seconds per (trainer, bucket), accumulated by the wrappers while ``owner`` is the trainer running."""

    def __init__(self) -> None:
        self.owner = "trl"
        self.seconds: dict[str, dict[str, float]] = {"trl": defaultdict(float), "ours": defaultdict(float)}
        self.threads_seen: set[int] = set()

    def take(self, owner: str) -> dict[str, float]:
        """The buckets of ``owner`` since the last take, reset."""
        out = dict(self.seconds[owner])
        self.seconds[owner] = defaultdict(float)
        return out

    def timed(self, fn, bucket):
        """``fn`` wrapped to add its run time to ``bucket`` (a name, or a function of the grad mode to a name)."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = bucket(torch.is_grad_enabled()) if callable(bucket) else bucket
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[self.owner][name] += time.perf_counter() - t0
                self.threads_seen.add(torch.get_num_threads())

        return wrapper


def _require(obj, name: str):
    if not hasattr(obj, name):
        raise AttributeError(f"{getattr(obj, '__name__', type(obj).__name__)} has no {name!r}: the benchmark times "
                             f"it; update bench_llm_vs_trl.py to the trainer's new structure")
    return getattr(obj, name)


def stop_token_ids(tokenizer) -> list[int]:
    """llm.train's stop rule (llm/rollout.py) as a set of ids: EOS, pad, and every token whose text has a newline."""
    eos = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    return sorted(i for i in range(len(tokenizer)) if i in eos or "\n" in tokenizer.decode([i]))


def ours_config(out_dir: Path) -> TrainConfig:
    """llm.train's default run (the cpu-demo preset: entrocraft-predictive and its schedule) at this size."""
    base = dict(PRESETS["cpu-demo"])
    if SMOKE:
        base.update(model="smoke", arith_high=4, fewshot=2, method="vanilla", schedule="", calibration_factor=0.0)
    base.update(prompts_per_step=PROMPTS, samples_per_prompt=SAMPLES, max_new_tokens=MAX_NEW_TOKENS,
                micro_batch_size=MICRO_BATCH, lr=LR, optimizer="adamw", weight_decay=0.0, grad_clip=1.0,
                warmup_steps=0, kl_coef=0.0, ppo_epochs=1, mini_batches=1, temperature=1.0, top_p=1.0,
                measure_entropy_change=True, exact_first_order=False, eval_prompts=0, probe_every=0,
                checkpoint_every=0, plot=False, progress=False, tensorboard=False, threads=THREADS, device="cpu",
                output_dir=str(out_dir))
    return validate(TrainConfig(**base))


def smoke_rewards(n: int) -> list[float]:
    """+1 for each group's first sample, -1 for the others (rows are grouped by prompt)."""
    return [1.0 if i % SAMPLES == 0 else -1.0 for i in range(n)]


class Comparison:
    """Both trainers on the same prompts, interleaved; per-step times, phases, lengths and checks."""

    def __init__(self, work: Path, monkeypatch) -> None:
        torch.set_num_threads(THREADS)
        self.clock = Clock()
        self.cfg = ours_config(work / "ours")
        self.ours = Trainer(self.cfg, work / "ours")
        self.task = self.ours.task
        self.tokenizer = self.ours.tokenizer
        self.steps = WARMUP_STEPS + TIMED_STEPS
        self.problems = [self.task.train_batch(PROMPTS, random.Random(derive_seed(self.cfg.seed, "data", k)))
                         for k in range(self.steps)]
        self.stop_ids = stop_token_ids(self.tokenizer)
        trl_model = copy.deepcopy(self.ours.model)  # the same weights; TRL patches its copy's forward
        trl_model.generation_config.eos_token_id = list(self.stop_ids)
        trl_model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self.start = {"ours": self._weights(self.ours.model), "trl": self._weights(trl_model)}
        self.rows: list[dict] = []  # llm.train's metrics per step
        self.records: dict[str, list[dict]] = {"trl": [], "ours": []}
        self.trl_prompts: list[list[str]] = []
        self.ours_prompts: list[list[str]] = []
        self.trl_lengths: list[tuple[float, int]] = []  # (mean completion tokens, decoding positions)
        self.ours_positions: list[int] = []
        self._last_trl_positions = 0
        self.threads_ok = True
        self.mark = time.perf_counter()
        self.trl = self._trl_trainer(trl_model, work / "trl")
        self._wrap(monkeypatch)

    @staticmethod
    def _weights(model) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.parameters()]

    def _trl_trainer(self, model, out_dir: Path) -> GRPOTrainer:
        rows = [p for step in self.problems for p in step]
        data = Dataset.from_dict({"prompt": [p.prompt for p in rows], "answer": [p.answer for p in rows]})
        cfg, task = self.cfg, self.task

        def arithmetic_reward(prompts, completions, answer, **kwargs):
            if SMOKE:
                return smoke_rewards(len(completions))
            return [cfg.reward_correct if task.score(Problem(p, a), c) else cfg.reward_wrong
                    for p, c, a in zip(prompts, completions, answer)]

        args = GRPOConfig(
            output_dir=str(out_dir), per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO_BATCH, num_generations=SAMPLES,
            num_iterations=1, max_completion_length=MAX_NEW_TOKENS, max_steps=self.steps, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2, weight_decay=0.0, max_grad_norm=cfg.grad_clip, beta=0.0, loss_type="dapo",
            scale_rewards="group", temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
            generation_kwargs={"eos_token_id": list(self.stop_ids)}, use_vllm=False, shuffle_dataset=False,
            use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1, save_strategy="no",
            seed=cfg.seed, dataloader_num_workers=0, disable_dropout=True, log_completions=False, disable_tqdm=True)
        trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=args, train_dataset=data,
                              processing_class=self.tokenizer, callbacks=[_Interleave(self)])
        accumulation = args.gradient_accumulation_steps
        if args.generation_batch_size != PROMPTS * SAMPLES or args.steps_per_generation != accumulation:
            raise AssertionError(f"TRL would not take one optimiser step per generation batch of {PROMPTS * SAMPLES}: "
                                 f"generation_batch_size {args.generation_batch_size}, steps_per_generation "
                                 f"{args.steps_per_generation}, gradient_accumulation_steps "
                                 f"{args.gradient_accumulation_steps}")
        if sorted(trainer.eos_token_ids) != self.stop_ids:
            raise AssertionError("TRL's completion mask would not end at llm.train's stop tokens")
        return trainer

    # ------------------------------------------------------------------ wrappers
    def _wrap(self, mp) -> None:
        c = self.clock
        logprob = lambda grad: "logprob_forward_grad" if grad else "logprob_forward_nograd"  # noqa: E731
        # TRL
        model = self.trl.model
        mp.setattr(model, "generate", self._trl_generate(c.timed(_require(model, "generate"), "generation")))
        mp.setattr(self.trl, "_get_per_token_logps_and_entropies",
                   c.timed(_require(self.trl, "_get_per_token_logps_and_entropies"), logprob))
        mp.setattr(self.trl, "_generate_and_score_completions",
                   self._trl_batch(_require(self.trl, "_generate_and_score_completions")))
        # llm.train (module-level names as llm/train.py and llm/rollout.py call them)
        measure_or = lambda name: (lambda grad: name if grad else "measure")  # noqa: E731
        mp.setattr(llm.train, "generate", self._ours_generate(c.timed(_require(llm.train, "generate"), "generation")))
        mp.setattr(llm.train, "response_logits",
                   c.timed(_require(llm.train, "response_logits"), measure_or("logprob_forward_grad")))
        mp.setattr(llm.train, "response_log_probs",
                   c.timed(_require(llm.train, "response_log_probs"), measure_or("logprob_forward_grad")))
        mp.setattr(llm.rollout, "token_entropy_stats", c.timed(_require(llm.rollout, "token_entropy_stats"),
                                                                "stats_sampling"))
        mp.setattr(llm.train, "token_entropy_stats", c.timed(_require(llm.train, "token_entropy_stats"),
                                                              measure_or("stats_training_forward")))
        mp.setattr(llm.train, "token_mean_contributions",
                   c.timed(_require(llm.train, "token_mean_contributions"), "contributions"))
        mp.setattr(llm.train, "policy_entropy", c.timed(_require(llm.train, "policy_entropy"), "policy_entropy"))
        mp.setattr(self.ours.method, "prepare", c.timed(_require(self.ours.method, "prepare"), "method_prepare"))
        # both
        mp.setattr(torch.Tensor, "backward", c.timed(torch.Tensor.backward, "backward_clip_optimizer"))
        mp.setattr(torch.nn.utils, "clip_grad_norm_", c.timed(torch.nn.utils.clip_grad_norm_,
                                                              "backward_clip_optimizer"))

    def _optimizer_hooks(self) -> list:
        """Time every optimiser step (torch's global step hooks); the handles remove them."""
        c = self.clock
        started: list[float] = []

        def pre(opt, args, kwargs):
            started.append(time.perf_counter())

        def post(opt, args, kwargs):
            c.seconds[c.owner]["backward_clip_optimizer"] += time.perf_counter() - started.pop()

        return [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]

    def _trl_generate(self, fn):
        def generate(*args, **kwargs):
            out = fn(*args, **kwargs)
            self._last_trl_positions = out.shape[1] - kwargs["input_ids"].shape[1]
            return out

        return generate

    def _trl_batch(self, fn):
        def generate_and_score(inputs):
            out = fn(inputs)
            if self.trl.model.training:
                self.trl_prompts.append(sorted({x["prompt"] for x in inputs}))
                mask = out["completion_mask"]
                self.trl_lengths.append((float(mask.sum()) / mask.shape[0], self._last_trl_positions))
            return out

        return generate_and_score

    def _ours_generate(self, fn):
        def generate(model, tokenizer, prompt_ids, prompt_mask, *args, **kwargs):
            roll = fn(model, tokenizer, prompt_ids, prompt_mask, *args, **kwargs)
            self.ours_prompts.append(sorted({tokenizer.decode(row[m.bool()].tolist())
                                             for row, m in zip(prompt_ids, prompt_mask)}))
            self.ours_positions.append(int(roll.tokens.shape[1]))
            return roll

        return generate

    # ------------------------------------------------------------------ the interleaved run
    def trl_step_done(self, step: int) -> None:
        now = time.perf_counter()
        self.records["trl"].append({"step": step, "wall": now - self.mark, **self.clock.take("trl")})

    def run_ours(self, step: int) -> None:
        self.clock.owner = "ours"
        self.clock.take("ours")
        try:
            t0 = time.perf_counter()
            self.ours.reward_fn = (lambda roll: torch.tensor(smoke_rewards(roll.tokens.shape[0]))) if SMOKE else None
            row = self.ours.train_step(step)
            wall = time.perf_counter() - t0
        finally:
            self.clock.owner = "trl"
        self.rows.append(row)
        self.records["ours"].append({"step": step, "wall": wall, **self.clock.take("ours")})
        self.threads_ok &= torch.get_num_threads() == THREADS
        self.mark = time.perf_counter()

    def run(self) -> dict:
        hooks = self._optimizer_hooks()
        try:
            self.mark = time.perf_counter()
            self.trl.train()
        finally:
            for h in hooks:
                h.remove()
        return self.summary()

    # ------------------------------------------------------------------ results
    def summary(self) -> dict:
        if len(self.records["trl"]) != self.steps or len(self.rows) != self.steps:
            raise AssertionError(f"expected {self.steps} steps each, got TRL {len(self.records['trl'])}, "
                                 f"llm.train {len(self.rows)}")
        out: dict = {"steps": {}}
        for who in ("trl", "ours"):
            steps = []
            for k, rec in enumerate(self.records[who][WARMUP_STEPS:], start=WARMUP_STEPS):
                s = dict(rec)
                if who == "ours":
                    row = self.rows[k]
                    s["measure_metric"] = float(row.get("time_measure", 0.0))
                    s["step"] = s["wall"] - s["measure_metric"]  # the measurement forward taken off
                    s["response_length"] = float(row["response_length"])
                    s["positions"] = self.ours_positions[k]
                else:
                    s["step"] = s["wall"]
                    s["response_length"], s["positions"] = self.trl_lengths[k]
                s["measure"] = s.get("measure", 0.0)
                named = sum(s.get(p, 0.0) for p in PHASES[:-1])
                s["other"] = s["step"] - named
                s["instrumentation"] = sum(s.get(i, 0.0) for i in INSTRUMENTS)
                steps.append(s)
            out["steps"][who] = steps
        total = {who: {key: sum(s.get(key, 0.0) for s in steps) / len(steps)
                       for key in (*PHASES, "step", "measure", "measure_metric", "instrumentation", *INSTRUMENTS,
                                   "response_length", "positions")}
                 for who, steps in out["steps"].items()}
        out["mean"] = total
        return out


class _Interleave(TrainerCallback):
    """After each TRL optimiser step: close its timing, then run one llm.train step."""

    def __init__(self, comparison: Comparison) -> None:
        self.comparison = comparison

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step - 1
        self.comparison.trl_step_done(step)
        self.comparison.run_ours(step)
        return control


def _table(res: dict) -> str:
    trl, ours = res["mean"]["trl"], res["mean"]["ours"]
    lines = [f"llm.train vs TRL GRPOTrainer: {PROMPTS} prompts x {SAMPLES} samples, max {MAX_NEW_TOKENS} new tokens, "
             f"float32, {THREADS} threads, mean of {TIMED_STEPS} interleaved step(s) after {WARMUP_STEPS} warm-up",
             f"{'phase':34s} {'TRL s':>9s} {'ours s':>9s} {'ours/TRL':>9s}"]
    for key in (*PHASES, "step"):
        ratio = ours[key] / trl[key] if trl[key] > 0 else float("nan")
        lines.append(f"{key:34s} {trl[key]:9.3f} {ours[key]:9.3f} {ratio:9.3f}")
    lines.append(f"{'mean response length (tokens)':34s} {trl['response_length']:9.2f} {ours['response_length']:9.2f}")
    lines.append(f"{'decoding positions':34s} {trl['positions']:9.1f} {ours['positions']:9.1f}")
    lines.append(f"llm.train measurement forward (excluded above): {ours['measure_metric']:.3f} s = "
                 f"{ours['measure_metric'] / ours['step']:.1%} of its step")
    lines.append(f"llm.train entropy instrumentation: {ours['instrumentation']:.3f} s = "
                 f"{ours['instrumentation'] / ours['step']:.1%} of its step ("
                 + ", ".join(f"{i} {ours[i]:.3f} s" for i in INSTRUMENTS) + ")")
    return "\n".join(lines)


def test_llm_train_vs_trl_grpo(benchmark, monkeypatch):
    """One interleaved run of both trainers; ratios llm.train / TRL per phase and for the whole step."""
    with tempfile.TemporaryDirectory() as tmp:
        comparison = Comparison(Path(tmp), monkeypatch)
        res = benchmark.pedantic(comparison.run, rounds=1, iterations=1, warmup_rounds=0)
        end = {"ours": comparison.ours.model, "trl": comparison.trl.model}
        # both trained: finite losses, weights moved, on the same prompts, with the same threads
        losses = [float(r["loss"]) for r in comparison.rows]
        trl_losses = [float(h["loss"]) for h in comparison.trl.state.log_history if "loss" in h]
        assert len(trl_losses) == comparison.steps and all(math.isfinite(x) for x in losses + trl_losses)
        assert not any(r.get("skipped") for r in comparison.rows), [r.get("skipped") for r in comparison.rows]
        for who, model in end.items():
            moved = [not torch.equal(a, b.detach()) for a, b in zip(comparison.start[who], model.parameters())]
            assert any(moved), f"{who}: no weight changed"
        expected = [sorted({p.prompt for p in step}) for step in comparison.problems]
        assert comparison.trl_prompts == expected, "TRL did not train on llm.train's prompts in order"
        assert comparison.ours_prompts == expected, "llm.train's generate saw other prompts than expected"
        assert comparison.clock.threads_seen == {THREADS} and comparison.threads_ok, comparison.clock.threads_seen
        for who in ("trl", "ours"):
            for s in res["steps"][who]:
                named = sum(s.get(p, 0.0) for p in PHASES[:-1])
                assert 0 < named <= s["step"] * 1.0001, (who, s)
                assert s.get("generation", 0.0) > 0 and s.get("logprob_forward_grad", 0.0) > 0, (who, s)
                assert 1 <= s["positions"] <= MAX_NEW_TOKENS and 1 <= s["response_length"] <= MAX_NEW_TOKENS
        for s in res["steps"]["ours"]:
            assert 0 < s["measure"] <= s["measure_metric"] and 0 < s["instrumentation"] < s["step"], s
    trl, ours = res["mean"]["trl"], res["mean"]["ours"]
    table = _table(res)
    print("\n" + table)
    benchmark.extra_info.update({"table": table, "threads": THREADS,
                                 "trl": {k: v for k, v in trl.items()}, "ours": {k: v for k, v in ours.items()}})
    note = (f"SmolLM2-135M fp32, {PROMPTS}x{SAMPLES} samples, <= {MAX_NEW_TOKENS} new tokens (mean length TRL "
            f"{trl['response_length']:.2f}, ours {ours['response_length']:.2f}), {THREADS} threads, "
            f"mean of {TIMED_STEPS} interleaved steps") if not SMOKE else "smoke sizes"
    record_ratio("llm.train vs TRL GRPOTrainer: whole step", ours["step"] / trl["step"],
                 "llm.train step time / TRL step time (measurement forward excluded)", note)
    for phase in PHASES:
        if trl[phase] > 0:
            record_ratio(f"llm.train vs TRL GRPOTrainer: {phase}", ours[phase] / trl[phase],
                         "llm.train phase time / TRL phase time", note)
    record_ratio("llm.train entropy instrumentation", ours["instrumentation"] / ours["step"],
                 "instrumentation time / llm.train step time", note)
    record_ratio("llm.train measurement forward", ours["measure_metric"] / ours["step"],
                 "time_measure / llm.train step time (without it)", note)
