"""Throughput of the toy training loop batched over seeds, against a loop over single-seed runs.

Two ways to train the same ``S = 8`` seeds, side by side in one pytest-benchmark group per size:

* ``vectorised``: one :func:`toy_envs.training.train` call on a policy batched over the 8 seeds;
* ``per_seed_loop_baseline``: the straightforward alternative, 8 separate single-seed runs of the same
  loop one after the other (identical arithmetic per seed, so the ratio isolates batching).

Sizes: the bandit at ``K`` in {100, 1000} arms x ``P`` in {64, 1024} prompts (``K=100, P=64`` is the size
the experiments run at), and the token environment (tabular ``V=8, L=3`` at the experiments' 32 prompts and
a larger tabular ``V=16, L=3, P=256``; the neural policy at ``V=8, L=3, P=32``). All use G = 8, the plain
policy-gradient loss, SGD and no per-step evaluation (pass@k is not part of a training step). A timed run is
one ``train`` call of 3 steps on a fresh copy of the same initial environment, so its time per step includes a
third of the call's setup and of the one evaluation after the last step.

``test_speedup_ratio[<size>]`` times both ways interleaved (best of 3) in the same process and records
(``common.record_ratio``) the speed-up ``per-seed loop time / batched time`` (above 1: batching is faster),
and prints the milliseconds per step both ways and the batched time per step per ``K * P * S`` logit
(ns per element, with ``S * P * G * T * V`` teacher-forced logits for the token environment; constant when
the cost is linear in the size). Run with
``python -m pytest benchmarks/bench_toy_bandit.py --benchmark-only -q -s``.
``ENTROCRAFT_BENCH_SMOKE=1`` shrinks every size to seconds (one round).
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from common import SMOKE, record_ratio

from toy_envs.envs import BanditConfig, BanditTask, SequenceTask, TokenConfig, make_bandit, make_token_env
from toy_envs.policies import TabularBanditPolicy, TabularTokenPolicy
from toy_envs.training import TrainConfig, train

GROUP = 8
SEEDS = 2 if SMOKE else 8
STEPS = 1 if SMOKE else 3
ROUNDS = 1 if SMOKE else 3  # interleaved rounds of test_speedup_ratio (best of)
GROUP_ROUNDS = 1 if SMOKE else 5  # rounds of each pytest-benchmark group member (median)

#: name -> (environment, size options); the bandit's K x P grid and the token environment
SIZES: dict[str, tuple[str, dict]] = {
    "bandit-K100-P64": ("bandit", {"n_arms": 100, "n_prompts": 64}),  # the experiments' size
    "bandit-K100-P1024": ("bandit", {"n_arms": 100, "n_prompts": 1024}),
    "bandit-K1000-P64": ("bandit", {"n_arms": 1000, "n_prompts": 64}),
    "bandit-K1000-P1024": ("bandit", {"n_arms": 1000, "n_prompts": 1024}),
    "token-tabular-V8-L3-P32": ("token", {"vocab": 8, "seq_len": 3, "n_prompts": 32}),
    "token-tabular-V16-L3-P256": ("token", {"vocab": 16, "seq_len": 3, "n_prompts": 256}),
    "token-neural-V8-L3-P32": ("token", {"vocab": 8, "seq_len": 3, "n_prompts": 32, "policy": "neural"}),
}
if SMOKE:
    SIZES = {
        "bandit-K20-P8": ("bandit", {"n_arms": 20, "n_prompts": 8}),
        "token-tabular-V4-L2-P4": ("token", {"vocab": 4, "seq_len": 2, "n_prompts": 4}),
        "token-neural-V4-L2-P4": ("token", {"vocab": 4, "seq_len": 2, "n_prompts": 4, "policy": "neural"}),
    }


def _setup(size: str):
    env, opts = SIZES[size]
    if env == "bandit":
        policy, task = make_bandit(BanditConfig(n_seeds=SEEDS, **opts), seed=0)
    else:
        policy, task = make_token_env(TokenConfig(n_seeds=SEEDS, **opts), seed=0)
    return policy, task, TrainConfig(steps=STEPS, group_size=GROUP, lr=0.5, eval_every=0)


def _elements_per_step(policy) -> int:
    """Logits a step works on: ``S * P * K`` (bandit) or ``S * P * G * T * V`` (token, teacher-forced)."""
    n = policy.n_seeds * policy.n_prompts * policy.vocab
    return n if isinstance(policy, TabularBanditPolicy) else n * GROUP * policy.seq_len


def _single_seed(policy, task, s: int):
    """Seed ``s`` of a batched environment as a one-seed environment with copies of its parameters."""
    if isinstance(policy, TabularBanditPolicy):
        return TabularBanditPolicy(policy.logits.detach()[s : s + 1]), BanditTask(task.correct[s : s + 1])
    if isinstance(policy, TabularTokenPolicy):
        single = TabularTokenPolicy(policy.table.detach()[s : s + 1], policy.seq_len)
    else:  # neural: the same network with the seed's slice of every parameter
        single = copy.copy(policy)
        single.n_seeds = 1
        for name in ("prompt_emb", "pos_emb", "tok_emb", "w1", "b1", "w2", "b2"):
            setattr(single, name, getattr(policy, name).detach()[s : s + 1].clone().requires_grad_(True))
    return single, SequenceTask(task.answers[s : s + 1])


def _copy_env(policy, task):
    """A fresh copy of the initial environment, so that every timed run starts from the same parameters."""
    return copy.deepcopy(policy), task


def _run_vectorised(policy, task, cfg) -> None:
    train(*_copy_env(policy, task), cfg)


def _run_per_seed(policy, task, cfg) -> None:
    for s in range(policy.n_seeds):
        train(*_single_seed(policy, task, s), cfg)


@pytest.mark.parametrize("size", list(SIZES))
def test_vectorised(benchmark, size):
    benchmark.group = f"toy-{size}-G{GROUP}-S{SEEDS}"
    policy, task, cfg = _setup(size)
    benchmark.pedantic(_run_vectorised, args=(policy, task, cfg), rounds=GROUP_ROUNDS, iterations=1,
                       warmup_rounds=0 if SMOKE else 1)


@pytest.mark.parametrize("size", list(SIZES))
def test_per_seed_loop_baseline(benchmark, size):
    benchmark.group = f"toy-{size}-G{GROUP}-S{SEEDS}"
    policy, task, cfg = _setup(size)
    benchmark.pedantic(_run_per_seed, args=(policy, task, cfg), rounds=GROUP_ROUNDS, iterations=1,
                       warmup_rounds=0 if SMOKE else 1)


@pytest.mark.parametrize("size", list(SIZES))
def test_speedup_ratio(benchmark, size):
    """Both ways interleaved, best of ``ROUNDS``: ms per step, the speed-up, ns per logit element."""
    policy, task, cfg = _setup(size)
    best = {"vectorised": float("inf"), "per_seed": float("inf")}
    runs = {"vectorised": _run_vectorised, "per_seed": _run_per_seed}
    if not SMOKE:  # warm-up of both
        for fn in runs.values():
            fn(policy, task, cfg)
    for _ in range(ROUNDS):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(policy, task, cfg)
            best[name] = min(best[name], time.perf_counter() - t0)
    ms = {k: 1e3 * v / STEPS for k, v in best.items()}
    speedup = best["per_seed"] / best["vectorised"]
    elements = _elements_per_step(policy)
    ns_per_element = 1e6 * ms["vectorised"] / elements
    benchmark.extra_info.update({"ms_per_step_vectorised": ms["vectorised"], "ms_per_step_per_seed": ms["per_seed"],
                                 "speedup": speedup, "ns_per_element_vectorised": ns_per_element})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    note = (f"{size}, G={GROUP}, S={SEEDS}, {STEPS} steps: batched {ms['vectorised']:.2f} ms/step, per-seed loop "
            f"{ms['per_seed']:.2f} ms/step, batched {ns_per_element:.2f} ns per step per logit (S*P*K or S*P*G*T*V)")
    record_ratio(f"toy-{size}", speedup, f"per-seed loop time / batched time (best of {ROUNDS}, interleaved)", note)
    print(f"\n{note}, speed-up x{speedup:.2f}")
    assert speedup > 0 and torch.get_num_threads() >= 1
