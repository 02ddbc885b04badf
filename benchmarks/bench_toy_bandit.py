"""Throughput of the toy training loop: bandit K=1000, 1024 prompts, G=8, 8 seeds.

Two ways to run the same 8 seeds, side by side in one pytest-benchmark group:

* ``vectorised``: one :func:`toy_envs.training.train` call on a policy batched over the 8 seeds;
* ``per-seed loop``: the straightforward alternative, 8 separate single-seed runs of the same
  loop one after the other (identical arithmetic per seed, so the ratio isolates batching).

Both use the plain policy-gradient loss, SGD, and no per-step evaluation (pass@k is not part of
a training step). ``test_bandit_speedup_ratio`` times both in the same process and stores the
ratio of steps/s in ``extra_info``; run with
``pytest benchmarks/bench_toy_bandit.py --benchmark-only -s``.
"""

from __future__ import annotations

import time

import pytest
import torch

from toy_envs.envs import BanditConfig, make_bandit
from toy_envs.policies import TabularBanditPolicy
from toy_envs.training import TrainConfig, train

K, PROMPTS, GROUP, SEEDS, STEPS = 1000, 1024, 8, 8, 3


def _run_vectorised(policy, task, cfg) -> None:
    train(policy, task, cfg)


def _run_per_seed(policy, task, cfg) -> None:
    for s in range(SEEDS):
        single = TabularBanditPolicy(policy.logits.detach()[s : s + 1])
        single_task = type(task)(task.correct[s : s + 1])
        train(single, single_task, cfg)


SIZES = {  # the size, and the size the experiments run at
    "K1000-P1024-G8-S8": (1000, 1024),
    "K100-P64-G8-S8": (100, 64),
}


def _setup_size(k: int, prompts: int):
    policy, task = make_bandit(BanditConfig(n_arms=k, n_prompts=prompts, n_seeds=SEEDS), seed=0)
    return policy, task, TrainConfig(steps=STEPS, group_size=GROUP, lr=0.5, eval_every=0)


@pytest.mark.parametrize("size", list(SIZES))
def test_bandit_vectorised(benchmark, size):
    benchmark.group = f"toy-bandit-{size}"
    policy, task, cfg = _setup_size(*SIZES[size])
    benchmark.pedantic(_run_vectorised, args=(policy, task, cfg), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["steps_per_s"] = STEPS / benchmark.stats.stats.mean


@pytest.mark.parametrize("size", list(SIZES))
def test_bandit_per_seed_loop_baseline(benchmark, size):
    benchmark.group = f"toy-bandit-{size}"
    policy, task, cfg = _setup_size(*SIZES[size])
    benchmark.pedantic(_run_per_seed, args=(policy, task, cfg), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["steps_per_s"] = STEPS / benchmark.stats.stats.mean


def test_bandit_speedup_ratio(benchmark):
    """Times both side by side (interleaved, best of 3) and reports vectorised / per-seed steps/s."""
    policy, task, cfg = _setup_size(K, PROMPTS)
    torch.set_num_threads(torch.get_num_threads())
    best = {"vectorised": float("inf"), "per_seed": float("inf")}
    for _ in range(3):
        for name, fn in (("vectorised", _run_vectorised), ("per_seed", _run_per_seed)):
            t0 = time.perf_counter()
            fn(policy, task, cfg)
            best[name] = min(best[name], time.perf_counter() - t0)
    rates = {k: STEPS / v for k, v in best.items()}
    ratio = rates["vectorised"] / rates["per_seed"]
    benchmark.extra_info.update({"steps_per_s_vectorised": rates["vectorised"],
                                 "steps_per_s_per_seed_loop": rates["per_seed"], "ratio": ratio})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nbandit K={K} P={PROMPTS} G={GROUP} S={SEEDS}: vectorised {rates['vectorised']:.2f} steps/s, "
          f"per-seed loop {rates['per_seed']:.2f} steps/s, ratio {ratio:.2f}x")
    assert ratio > 0
