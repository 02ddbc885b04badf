"""Experiment 4 — schedule study: which entropy schedule gives the best final pass@1 / pass@k?

Entrocraft (predictive mode, which tracks its schedule in this toy, see schedule-control) with
several schedules, against vanilla GRPO, on the bandit in both reward regimes. Schedules are set
relative to the initial entropy ``H0``; the paper's recommendation is "linear annealing, starting
high and decaying to a slightly lower target".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from entrotheory import entropy

from ..envs import BanditConfig, make_bandit
from ..training import TrainConfig, train
from .common import plt, save_figure, setup_style, sns

NAME = "schedule-study"


def schedule_specs(h0: float, steps: int) -> dict[str, str | None]:
    """Candidate schedules relative to the initial entropy ``h0`` (None = vanilla, no control)."""

    def f(x: float) -> str:
        return f"{x * h0:.4f}"

    return {
        "vanilla (none)": None,
        "constant high (0.9)": f"constant:{f(0.9)}",
        "constant mid (0.6)": f"constant:{f(0.6)}",
        "constant low (0.3)": f"constant:{f(0.3)}",
        "linear 0.9->0.7 (paper)": f"linear:{f(0.9)}->{f(0.7)}",
        "linear 0.9->0.3": f"linear:{f(0.9)}->{f(0.3)}",
        "cosine 0.9->0.7": f"cosine:{f(0.9)}->{f(0.7)}",
        "exponential 0.9->0.7": f"exponential:{f(0.9)}->{f(0.7)}",
        "step 0.9->0.7": f"piecewise:0:{f(0.9)},{steps // 2}:{f(0.7)}",
        "rising 0.6->0.9": f"linear:{f(0.6)}->{f(0.9)}",
    }


def run(fast: bool = False, seed: int = 0, out: Path = Path("runs/toy_envs"),
        figures: Path | None = None) -> dict[str, Any]:
    figures = figures or out
    steps = 60 if fast else 200
    rows = []
    regimes = ("correlated", "uncorrelated")
    jobs = []
    for regime in regimes:
        cfg = BanditConfig(n_arms=100, n_prompts=32 if fast else 64, n_seeds=2 if fast else 4, regime=regime)
        h0 = float(entropy(make_bandit(cfg, seed)[0].logits.detach()).mean())
        jobs += [(regime, cfg, h0, name, spec) for name, spec in schedule_specs(h0, steps).items()]
    for regime, cfg, h0, name, spec in tqdm(jobs, desc=NAME):
        policy, task = make_bandit(cfg, seed)
        method, opts = ("vanilla", {}) if spec is None else ("entrocraft-predictive", {"schedule": spec})
        res = train(policy, task, TrainConfig(steps=steps, lr=1.0, method=method, method_options=opts,
                                              seed=seed, eval_every=0))
        rows.append({"regime": regime, "schedule": name, "spec": spec, "h0": h0,
                     "final_entropy": float(res.history["entropy_after"][-1].mean()),
                     **{f"final_{k}": float(np.mean(v)) for k, v in res.final.items()},
                     **{f"final_{k}_seed_std": float(np.std(v)) for k, v in res.final.items()}})
    df = pd.DataFrame(rows)
    winners = {}
    for regime in regimes:
        sub = df[df["regime"] == regime]
        winners[regime] = {m: str(sub.loc[sub[f"final_{m}"].idxmax(), "schedule"])
                           for m in ("pass@1", "pass@8", "pass@64", "distinct")}
    _figure(df, figures / "toy_schedule_study.png")
    return {"experiment": NAME, "fast": fast, "seed": seed, "steps": steps, "lr": 1.0, "runs": rows,
            "winners": winners}


def _figure(df: pd.DataFrame, path: Path) -> None:
    setup_style()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, metric in zip(axes, ("final_pass@1", "final_pass@8", "final_distinct")):
        sns.barplot(data=df, y="schedule", x=metric, hue="regime", ax=ax, orient="h")
        ax.set_title(metric.replace("final_", "final "))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
