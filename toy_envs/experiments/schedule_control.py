"""Experiment 3 — schedule control: can each method make entropy follow a schedule?

On the bandit (K = 100), five schedules (constant, linear, cosine, exponential, step) and two
reward regimes (correct arms correlated with the initial policy's likelihoods, and
uncorrelated). Methods aiming at the same target: Entrocraft band (the schedule +- 0.1 nats)
and predictive, the adaptive entropy bonus and EntroPIC; the fixed entropy bonus and vanilla
GRPO have no target and are shown for reference. Tracking error = mean over steps and seeds of
``|H_t - target(t)|``; for band mode also the fraction of steps inside the band.

The bonus methods' released coefficients (0.003 / step 0.001) are tuned for an LLM's loss
scale; here they use toy-scale values (fixed coef 0.05, adaptive step 0.01 up to 2.0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from entrotheory.schedules import parse_schedule

from ..envs import BanditConfig, make_bandit
from ..training import TrainConfig, train
from .common import plt, save_figure, setup_style, sns

NAME = "schedule-control"
BAND_WIDTH = 0.2


def schedules(steps: int) -> dict[str, str]:
    a, b = steps // 3, 2 * steps // 3
    return {
        "constant": "constant:1.8",
        "linear": "linear:2.2->1.4",
        "cosine": "cosine:2.2->1.4",
        "exponential": "exponential:2.2->1.4",
        "step": f"piecewise:0:2.2,{a}:1.8,{b}:1.4",
    }


def method_grid(spec: str) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "entrocraft-band": ("entrocraft-band", {"schedule": spec, "width": BAND_WIDTH}),
        "entrocraft-predictive": ("entrocraft-predictive", {"schedule": spec}),
        "adaptive-entropy-bonus": ("adaptive-entropy-bonus", {"schedule": spec, "delta": 0.01, "coef_max": 2.0}),
        "entropic": ("entropic", {"schedule": spec}),
        "entropy-bonus": ("entropy-bonus", {"coef": 0.05}),
        "vanilla": ("vanilla", {}),
    }


def run(fast: bool = False, seed: int = 0, out: Path = Path("runs/toy_envs"),
        figures: Path | None = None) -> dict[str, Any]:
    figures = figures or out
    steps = 40 if fast else 150
    regimes = ("correlated", "uncorrelated")
    sched = schedules(steps)
    if fast:
        sched = {k: sched[k] for k in ("linear", "step")}
    rows, curves = [], {}
    jobs = [(r, s, m) for r in regimes for s in sched for m in method_grid(sched[s])]
    for regime, sname, mname in tqdm(jobs, desc=NAME):
        spec = sched[sname]
        method, opts = method_grid(spec)[mname]
        policy, task = make_bandit(BanditConfig(n_arms=100, n_prompts=16 if fast else 64,
                                                n_seeds=2 if fast else 4, regime=regime), seed)
        res = train(policy, task, TrainConfig(steps=steps, lr=1.0, method=method, method_options=opts,
                                              seed=seed, eval_every=0))
        target = parse_schedule(spec, steps)
        tgt = np.array([target(t) for t in range(steps)])[:, None]
        h = res.history["entropy"]
        err = np.abs(h - tgt)
        rng = target.value_range
        row = {"regime": regime, "schedule": sname, "method": mname,
               "tracking_error": float(err.mean()),
               "tracking_error_rel_range": float(err.mean() / rng) if rng > 0 else float("nan"),
               "final_error": float(err[-10:].mean()),
               "in_band_fraction": float(np.mean(err <= BAND_WIDTH / 2)),
               "skipped_fraction": float(res.history["skipped"].mean()),
               "final_pass@1": float(res.final["pass@1"].mean())}
        rows.append(row)
        curves[(regime, sname, mname)] = (res.mean("entropy"), tgt[:, 0])
    df = pd.DataFrame(rows)
    _figure(df, curves, sched, regimes, figures / "toy_schedule_control.png")
    table = df.pivot_table(index=["regime", "method"], columns="schedule", values="tracking_error")
    return {"experiment": NAME, "fast": fast, "seed": seed, "steps": steps, "lr": 1.0,
            "band_width": BAND_WIDTH, "schedules": sched, "runs": rows,
            "mean_tracking_error": {f"{r}/{m}": float(v) for (r, m), v in table.mean(axis=1).items()}}


def _figure(df: pd.DataFrame, curves: dict, sched: dict[str, str], regimes: tuple[str, ...], path: Path) -> None:
    setup_style()
    methods = list(dict.fromkeys(df["method"]))
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    fig, axes = plt.subplots(len(regimes) + 1, len(sched), figsize=(3.2 * len(sched), 2.8 * (len(regimes) + 1)))
    for i, regime in enumerate(regimes):
        for j, sname in enumerate(sched):
            ax = axes[i, j]
            for m in methods:
                h, tgt = curves[(regime, sname, m)]
                ax.plot(h, color=palette[m], lw=1.2, label=m)
            ax.plot(tgt, "k--", lw=1.0, label="target")
            ax.fill_between(np.arange(len(tgt)), tgt - BAND_WIDTH / 2, tgt + BAND_WIDTH / 2, color="k", alpha=0.08)
            ax.set_title(f"{regime} / {sname}", fontsize=8)
            ax.set_ylim(0, 3.0)
            if j == 0:
                ax.set_ylabel("entropy")
    axes[0, 0].legend(fontsize=6)
    for j, regime in enumerate(regimes):
        ax = axes[-1, j]
        sub = df[df["regime"] == regime]
        sns.barplot(data=sub, x="tracking_error", y="method", hue="schedule", ax=ax, orient="h")
        ax.set_title(f"tracking error, {regime}", fontsize=8)
        ax.legend(fontsize=5)
    for j in range(len(regimes), len(sched)):
        axes[-1, j].axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=75)
