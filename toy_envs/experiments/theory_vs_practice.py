"""Experiment 1 — theory vs practice: predicted vs measured per-step entropy change.

For each environment (tabular bandit, tabular token policy, neural token policy), update rule
(pg, npg) and optimiser (SGD, Adam), and a range of learning rates, train with the plain
policy-gradient loss (GRPO advantages) and record, per step and seed, the first-order prediction
(:mod:`entrotheory` contributions of the update actually applied, times lr) and the measured
change of the batch's token-mean entropy on the same states. Report R^2 and slope of measured
on predicted per configuration; the agreement should be exact to first order for tabular + SGD
and decay as the learning rate grows, with Adam (the prediction is the SGD-equivalent one) and
with function approximation (an update on one prefix moves the others).

The neural token policy runs twice per (optimiser, lr): with the per-position (logit-space)
contributions and with the parameter-space ones (``predictor="param"``, docs/theory.md §5), which
follow the shared network and the optimiser's preconditioner. :func:`neural_table` renders that
comparison as the markdown table of docs/validation.md; ``run`` writes it next to the JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..envs import BanditConfig, TokenConfig, make_bandit, make_token_env
from ..training import TrainConfig, train
from .common import fit_stats, plt, save_figure, setup_style, sns

NAME = "theory-vs-practice"

PG_LRS = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
NPG_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
ADAM_LRS = [1e-3, 1e-2, 1e-1]
NEURAL_SGD_LRS = [1e-5, 1e-4, 1e-3, 1e-2]
NEURAL_ADAM_LRS = [1e-4, 1e-3, 1e-2]


def configurations(fast: bool) -> list[dict[str, Any]]:
    """(environment, optimiser, rule, lr) grid; ``fast`` keeps the extremes and the middle."""

    def pick(lrs: list[float]) -> list[float]:
        return [lrs[0], lrs[len(lrs) // 2], lrs[-1]] if fast and len(lrs) > 3 else lrs

    out = []
    for env in ("bandit", "token-tabular", "token-neural"):
        grid = [("sgd", "pg", NEURAL_SGD_LRS if env == "token-neural" else PG_LRS)]
        if env != "token-neural":
            grid.append(("sgd", "npg", NPG_LRS))
        grid.append(("adam", "pg", NEURAL_ADAM_LRS if env == "token-neural" else ADAM_LRS))
        predictors = ("logit", "param") if env == "token-neural" else ("logit",)
        for opt, rule, lrs in grid:
            for predictor in predictors:
                for lr in pick(lrs):
                    out.append({"env": env, "optimizer": opt, "rule": rule, "lr": lr, "predictor": predictor})
    return out


def build_env(env: str, fast: bool, seed: int) -> tuple[Any, Any]:
    seeds = 2 if fast else 4
    if env == "bandit":
        return make_bandit(BanditConfig(n_arms=100, n_prompts=32 if fast else 64, n_seeds=seeds), seed)
    policy = "tabular" if env == "token-tabular" else "neural"
    return make_token_env(TokenConfig(vocab=8, seq_len=3, n_prompts=16 if fast else 32, n_seeds=seeds,
                                      policy=policy), seed)


def run_one(cfg: dict[str, Any], fast: bool, seed: int) -> dict[str, Any]:
    """Train one configuration; returns its fit statistics and the (predicted, measured) pairs."""
    policy, task = build_env(cfg["env"], fast, seed)
    tc = TrainConfig(steps=12 if fast else 40, group_size=8, lr=cfg["lr"], optimizer=cfg["optimizer"],
                     rule=cfg["rule"], estimator="grpo", method=None, seed=seed,
                     predictor=cfg.get("predictor", "logit"))
    try:
        res = train(policy, task, tc)
    except FloatingPointError:  # the largest learning rates can overflow the logits (npg: A / pi_y)
        nan = float("nan")
        return {**cfg, **fit_stats(np.zeros(0), np.zeros(0)), "diverged": True, "predicted": np.zeros(0),
                "measured": np.zeros(0), "entropy_start": nan, "entropy_end": nan}
    pred, meas = res.history["predicted"], res.history["measured"]
    return {**cfg, **fit_stats(pred, meas), "diverged": False, "predicted": pred.ravel(), "measured": meas.ravel(),
            "entropy_start": float(res.history["entropy"][0].mean()),
            "entropy_end": float(res.history["entropy_after"][-1].mean())}


def run(fast: bool = False, seed: int = 0, out: Path = Path("runs/toy_envs"),
        figures: Path | None = None) -> dict[str, Any]:
    """Run the grid, write ``toy_theory_vs_practice.png`` and return the JSON payload."""
    figures = figures or out
    rows = []
    for cfg in tqdm(configurations(fast), desc=NAME):
        rows.append(run_one(cfg, fast, seed))
    payload = {
        "experiment": NAME, "fast": fast, "seed": seed,
        "configs": [{k: v for k, v in r.items() if k not in ("predicted", "measured")} for r in rows],
    }
    _figure(rows, figures / "toy_theory_vs_practice.png")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}-neural.md").write_text(neural_table(payload))
    return payload


def neural_table(payload: dict[str, Any]) -> str:
    """Markdown table of the neural token policy: R^2 and slope of measured on predicted per-step change,
    logit-space vs parameter-space contributions, per optimiser and lr (from ``run``'s payload)."""
    rows = [r for r in payload["configs"] if r["env"] == "token-neural"]
    lines = ["| optimiser | lr | R² logit-space | slope logit-space | R² param-space | slope param-space |",
             "|---|---|---|---|---|---|"]

    def fmt(x: Any, spec: str) -> str:
        return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)

    for opt in ("sgd", "adam"):
        for lr in sorted({r["lr"] for r in rows if r["optimizer"] == opt}):
            by = {r["predictor"]: r for r in rows if r["optimizer"] == opt and r["lr"] == lr}
            lo, pa = by.get("logit", {}), by.get("param", {})
            name = "SGD" if opt == "sgd" else "Adam"
            lines.append(f"| {name} | {lr:g} | {fmt(lo.get('r2'), '.3f')} | {fmt(lo.get('slope'), '.3g')} | "
                         f"{fmt(pa.get('r2'), '.4f')} | {fmt(pa.get('slope'), '.3f')} |")
    return "\n".join(lines) + "\n"


def _label(r: dict[str, Any]) -> str:
    extra = f" {r['predictor']}" if r.get("predictor", "logit") != "logit" else ""
    return f"{r['env']} {r['optimizer']}-{r['rule']}{extra}"


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    setup_style()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    # (a) scatter for the smallest SGD-pg lr of each env and the largest tabular one
    ax = axes[0]
    chosen = []
    for env in ("bandit", "token-tabular", "token-neural"):
        cands = [r for r in rows if r["env"] == env and r["optimizer"] == "sgd" and r["rule"] == "pg"
                 and r.get("predictor", "logit") == "logit"]
        cands = [r for r in cands if not r["diverged"]]
        if cands:
            chosen.append(min(cands, key=lambda r: r["lr"]))
            if env != "token-neural":
                chosen.append(max(cands, key=lambda r: r["lr"]))
    param = [r for r in rows if r.get("predictor") == "param" and r["optimizer"] == "sgd" and not r["diverged"]]
    if param:
        chosen.append(max(param, key=lambda r: r["lr"]))
    for r in chosen:
        p, m = r["predicted"], r["measured"]
        ax.scatter(p / (np.max(np.abs(p)) or 1.0), m / (np.max(np.abs(m)) or 1.0), s=8, alpha=0.6,
                   label=f"{_label(r)} lr={r['lr']:g} (R²={r['r2']:.3f}, slope={r['slope']:.3g})")
    ax.plot([-1, 1], [-1, 1], "k--", lw=0.8)
    ax.set_xlabel("predicted ΔH / max|predicted|")
    ax.set_ylabel("measured ΔH / max|measured|")
    ax.set_title("(a) predicted vs measured, SGD-pg (each axis scaled per config)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("predicted", "measured")} | {"config": _label(r)}
                       for r in rows])
    sns.lineplot(data=df, x="lr", y="r2", hue="config", marker="o", ax=axes[1])
    axes[1].set_xscale("log")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_title("(b) R² of measured on predicted")
    axes[1].legend(fontsize=6)
    sns.lineplot(data=df, x="lr", y="slope", hue="config", marker="o", ax=axes[2], legend=False)
    axes[2].set_xscale("log")
    axes[2].set_yscale("symlog", linthresh=1.0)
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[2].set_title("(c) slope (1 = first-order theory exact)")
    fig.tight_layout()
    save_figure(fig, path)
