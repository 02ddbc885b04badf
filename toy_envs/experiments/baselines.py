"""Experiment 5 — baselines explained: each method's entropy curve next to the first-order theory.

Every method of the registry on the same bandit (correlated regime, SGD, two PPO updates per
batch so that ratio clipping and KL-Cov act). The prediction of each step is the first-order
change of the update(s) actually applied (entrotheory contributions of the effective advantages
``-dLoss/dlog pi``, plus the entropy-bonus term), so it includes whatever the method's surrogate
did; ``predicted_vanilla`` is the same for the plain GRPO advantages of that batch. The figure
shows the measured entropy and the cumulative first-order prediction ``H_0 + sum_t predicted_t``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from entrotheory.methods import METHODS

from ..envs import BanditConfig, make_bandit
from ..training import TrainConfig, train
from .common import fit_stats, plt, save_figure, setup_style

NAME = "baselines"
SCHEDULE = "linear:2.2->1.4"


def options(name: str) -> dict[str, Any]:
    """Toy-scale options (targets for the controllers; bonus coefficients for this loss scale)."""
    return {
        "entropy-bonus": {"coef": 0.05},
        "adaptive-entropy-bonus": {"schedule": SCHEDULE, "delta": 0.01, "coef_max": 2.0},
        "entropic": {"schedule": SCHEDULE},
        "entrocraft-band": {"schedule": SCHEDULE, "width": 0.2},
        "entrocraft-predictive": {"schedule": SCHEDULE},
    }.get(name, {})


def run(fast: bool = False, seed: int = 0, out: Path = Path("runs/toy_envs"),
        figures: Path | None = None) -> dict[str, Any]:
    figures = figures or out
    steps = 30 if fast else 150
    lr = 0.5
    results, curves = {}, {}
    for name in tqdm(list(METHODS), desc=NAME):
        policy, task = make_bandit(BanditConfig(n_arms=100, n_prompts=16 if fast else 64,
                                                n_seeds=2 if fast else 4), seed)
        res = train(policy, task, TrainConfig(steps=steps, lr=lr, method=name, method_options=options(name),
                                              updates_per_batch=2, seed=seed, eval_every=0))
        h = res.history
        results[name] = {
            **fit_stats(h["predicted"], h["measured"]),
            "entropy_initial": float(h["entropy"][0].mean()),
            "entropy_final": float(h["entropy_after"][-1].mean()),
            "total_measured": float(h["measured"].sum(0).mean()),
            "total_predicted": float(h["predicted"].sum(0).mean()),
            "mean_predicted_minus_vanilla": float((h["predicted"] - h["predicted_vanilla"]).mean()),
            "final_pass@1": float(res.final["pass@1"].mean()),
            "skipped_fraction": float(h["skipped"].mean()),
        }
        curves[name] = (res.mean("entropy"), h["entropy"][0].mean() + np.cumsum(res.mean("predicted")))
    _figure(curves, results, figures / "toy_baselines.png")
    return {"experiment": NAME, "fast": fast, "seed": seed, "steps": steps, "lr": lr, "updates_per_batch": 2,
            "schedule_for_controllers": SCHEDULE, "methods": results}


def _figure(curves: dict, results: dict, path: Path) -> None:
    setup_style()
    names = list(curves)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.5 * rows), sharex=True, sharey=True)
    for ax, name in zip(axes.ravel(), names):
        meas, pred = curves[name]
        ax.plot(meas, label="measured")
        ax.plot(np.concatenate([[meas[0]], pred[:-1]]), "--", label="first-order (cumulative)")
        r = results[name]
        ax.set_title(f"{name}\nR²={r.get('r2', float('nan')):.3f} slope={r.get('slope', float('nan')):.2f}",
                     fontsize=8)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.supylabel("token-mean entropy (nats)")
    fig.supxlabel("step")
    fig.tight_layout()
    save_figure(fig, path)
