"""The run figure: entropy against its target, predicted vs measured entropy change, reward and pass@k.

``python -m llm.plotting RUN_DIR [RUN_DIR ...] --labels A B --out fig.png`` compares runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from entrotheory import fit_measured_on_predicted

from .metrics import measured_pairs

__all__ = ["plot_runs", "main"]

DEFAULT_DPI = 80  # PNG resolution: a 10 x 7 inch figure of 800 x 560 pixels, small enough to commit
ACCURACY_WINDOW = 5  # train accuracy is shown as the running mean over this many steps ...
ACCURACY_SMOOTH_FROM = 15  # ... once a run has at least this many steps (shorter runs: the raw values)


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _series(rows: list[dict], key: str, include_final: bool = False) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if _num(r.get(key)) and (include_final or not r.get("final"))]
    return [x for x, _ in pts], [y for _, y in pts]


def plot_runs(runs: dict[str, list[dict]], path: str | Path, title: str | None = None,
              dpi: int = DEFAULT_DPI) -> Path:
    """A 2 x 2 figure for one or more runs (``{label: metrics rows}``), written to ``path`` (PNG).

    Panels: token entropy with the target band; measured vs per-position (logit-space) predicted change;
    measured vs exact first-order (parameter-space) predicted change; train reward and held-out pass@k.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    palette = sns.color_palette("deep", max(len(runs), 3))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax_h, ax_p, ax_e, ax_r = axes.ravel()
    for (label, rows), color in zip(runs.items(), palette):
        x, h = _series(rows, "entropy")
        ax_h.plot(x, h, color=color, lw=1.0, alpha=0.8, label=f"{label}: batch entropy")
        xl, lo = _series(rows, "lower")
        xu, up = _series(rows, "upper")
        xt, tgt = _series(rows, "target_entropy")
        if lo and up and len(lo) == len(up):
            ax_h.fill_between(xl, lo, up, color=color, alpha=0.15, label=f"{label}: target band")
        elif tgt:
            ax_h.plot(xt, tgt, color=color, ls="--", lw=1, label=f"{label}: target")
        xe, he = _series(rows, "eval_entropy", include_final=True)
        if he:
            ax_h.plot(xe, he, color=color, marker="o", ms=3, ls=":", lw=1, label=f"{label}: held-out entropy")
        for ax, key in ((ax_p, "predicted_entropy_change"), (ax_e, "exact_predicted_entropy_change")):
            px, my = measured_pairs(rows, key)
            if px:
                r = fit_measured_on_predicted(px, my).correlation
                ax.scatter(px, my, s=12, color=color, alpha=0.7, label=f"{label} (r = {r:.2f})")
        xr, acc = _series(rows, "accuracy")
        if acc:
            w = ACCURACY_WINDOW if len(acc) >= ACCURACY_SMOOTH_FROM else 1
            smooth = [sum(acc[max(0, i - w + 1):i + 1]) / len(acc[max(0, i - w + 1):i + 1]) for i in range(len(acc))]
            ax_r.plot(xr, smooth, color=color, lw=1.0, label=f"{label}: train accuracy (mean of {w})")
        k = next((int(r["pass_k"]) for r in rows if _num(r.get("pass_k"))), 0)
        for key, marker, name in (("pass_at_1", "o", "pass@1"), ("pass_at_k", "s", f"pass@{k}")):
            xe, ye = _series(rows, key, include_final=True)
            if ye:
                ax_r.plot(xe, ye, color=color, marker=marker, ms=4, ls="--" if key == "pass_at_k" else ":",
                          lw=1, label=f"{label}: held-out {name}")
    ax_h.set(xlabel="step", ylabel="token entropy (nats)", title="entropy and its target")
    for ax, what in ((ax_p, "per-position prediction, eq. 3.3 (lr x sum c_t / N^2)"),
                     (ax_e, "exact first-order <dH/dtheta, dtheta>")):
        ax.axhline(0, color="0.5", lw=0.6)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.set(xlabel=what, ylabel="measured dH (same batch)")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    ax_p.set_title("measured vs per-position predicted change")
    ax_e.set_title("measured vs parameter-space predicted change")
    if not ax_e.collections:
        ax_e.text(0.5, 0.5, "not computed\n(--exact-first-order)", ha="center", va="center",
                  transform=ax_e.transAxes, color="0.4")
    ax_r.set(xlabel="step", ylabel="fraction correct", title="train accuracy and held-out pass@k", ylim=(0, 1.02))
    for ax in axes.ravel():
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m llm.plotting RUN_DIR [RUN_DIR ...] --out fig.png``: compare runs in one figure."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llm.plotting", description="compare llm.train runs")
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="*", default=None)
    parser.add_argument("--out", default="figure.png")
    parser.add_argument("--title", default=None)
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI)
    args = parser.parse_args(argv)
    runs = {}
    for i, d in enumerate(args.runs):
        path = Path(d) / "metrics.jsonl"
        if not path.exists():
            print(f"error: {path} does not exist")
            return 2
        label = args.labels[i] if args.labels and i < len(args.labels) else Path(d).name
        runs[label] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    print(plot_runs(runs, args.out, args.title, args.dpi))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
