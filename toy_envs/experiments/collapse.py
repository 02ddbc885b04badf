"""Experiment 2 — entropy collapse and saturation under vanilla GRPO.

Vanilla GRPO (``make_method("vanilla")``, SGD) on the bandit (correct arms correlated with the
initial policy, and uncorrelated: many prompts where the correct arms are rarely sampled) and on
the tabular token task. Records entropy, reward, exact pass@1 / pass@8 / pass@64 and the expected
number of distinct correct answers in 64 samples, per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..envs import BanditConfig, TokenConfig, make_bandit, make_token_env
from ..training import TrainConfig, train
from .common import plt, save_figure, setup_style

NAME = "collapse"
METRICS = ("entropy", "reward", "pass@1", "pass@8", "pass@64", "distinct")


def environments(fast: bool) -> dict[str, tuple[Any, Any]]:
    s = 2 if fast else 4
    p = 32 if fast else 128
    return {
        "bandit K=100 correlated": make_bandit(BanditConfig(n_arms=100, n_prompts=p, n_seeds=s)),
        "bandit K=1000 uncorrelated": make_bandit(BanditConfig(n_arms=1000, n_prompts=p, n_seeds=s,
                                                               regime="uncorrelated")),
        "token V=8 L=3 tabular": make_token_env(TokenConfig(vocab=8, seq_len=3, n_prompts=p // 2, n_seeds=s)),
    }


def half_life(entropy: np.ndarray) -> int | None:
    """First step at which the seed-mean entropy is below half its initial value."""
    below = np.nonzero(entropy < 0.5 * entropy[0])[0]
    return int(below[0]) if below.size else None


def run(fast: bool = False, seed: int = 0, out: Path = Path("runs/toy_envs"),
        figures: Path | None = None) -> dict[str, Any]:
    figures = figures or out
    steps = 80 if fast else 300
    curves: dict[str, dict[str, np.ndarray]] = {}
    summary: dict[str, Any] = {}
    for name, (policy, task) in tqdm(environments(fast).items(), desc=NAME):
        cfg = TrainConfig(steps=steps, lr=1.0, optimizer="sgd", method="vanilla", estimator="grpo", seed=seed)
        res = train(policy, task, cfg)
        h = res.history
        curves[name] = {k: res.mean(k) for k in METRICS}
        final_h = float(np.mean(h["entropy_after"][-1]))
        summary[name] = {
            "initial": {k: float(curves[name][k][0]) for k in METRICS},
            "final": {"entropy": final_h, "reward": float(np.mean(h["reward"][-10:])),
                      **{k: float(np.mean(v)) for k, v in res.final.items()}},
            "steps_to_half_entropy": half_life(curves[name]["entropy"]),
            "zero_signal_fraction_last10": float(np.mean(h["zero_signal_groups"][-10:]) / policy.n_prompts),
        }
    _figure(curves, figures / "toy_collapse.png")
    return {"experiment": NAME, "fast": fast, "seed": seed, "steps": steps, "lr": 1.0, "results": summary}


def _figure(curves: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    setup_style()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for name, c in curves.items():
        x = np.arange(len(c["entropy"]))
        axes[0].plot(x, c["entropy"], label=name)
        axes[1].plot(x, c["pass@1"], label=name)
        axes[2].plot(x, c["pass@64"], label=name)
        axes[3].plot(x, c["distinct"], label=name)
    for ax, title in zip(axes, ("token-mean entropy (nats)", "pass@1 (exact)", "pass@64 (exact)",
                                "distinct correct answers in 64 samples")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.suptitle("Vanilla GRPO: entropy collapses, reward and pass@k saturate, diversity shrinks")
    fig.tight_layout()
    save_figure(fig, path)
