"""Print the results table of docs/llm.md from metrics.jsonl files of `python -m llm.train` runs.

Usage: python docs/gen_llm_table.py LABEL=docs/data/llm_entrocraft_metrics.jsonl LABEL=... > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm.train import summarize


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def column(rows: list[dict]) -> dict[str, str]:
    s = summarize(rows)
    train = [r for r in rows if "entropy" in r and not r.get("final")]
    head, tail = train[:10], train[-10:]
    evals = [r for r in rows if "pass_at_1" in r]
    f = "{:.3f}".format
    k = [r["calibration_factor"] for r in train if "calibration_factor" in r]
    return {
        "batch token entropy, mean of first / last 10 steps": f"{f(_mean([r['entropy'] for r in head]))} / "
                                                              f"{f(_mean([r['entropy'] for r in tail]))}",
        "lowest batch entropy": f(min(r["entropy"] for r in train)),
        "held-out token entropy, first -> last evaluation": f"{f(evals[0]['eval_entropy'])} -> "
                                                            f"{f(evals[-1]['eval_entropy'])}",
        "target at the end": (f"{train[-1]['target_entropy']:.2f}" if "target_entropy" in train[-1] else "-")
        + (f" (band {train[-1]['lower']:.2f}-{train[-1]['upper']:.2f})" if "lower" in train[-1] else ""),
        "train accuracy, first / last 10 steps": f"{f(_mean([r['accuracy'] for r in head]))} / "
                                                 f"{f(_mean([r['accuracy'] for r in tail]))}",
        "held-out pass@1, first -> last evaluation": f"{f(evals[0]['pass_at_1'])} -> {f(evals[-1]['pass_at_1'])}",
        "held-out pass@8, first -> last evaluation": f"{f(evals[0]['pass_at_k'])} -> {f(evals[-1]['pass_at_k'])}",
        "distinct correct answers per held-out prompt": f"{evals[0]['eval_distinct_correct']:.2f} -> "
                                                        f"{evals[-1]['eval_distinct_correct']:.2f}",
        "groups with signal, first 10 / all / last 10 steps": f"{_mean([r['signal_fraction'] for r in head]):.2f} / "
        f"{_mean([r['signal_fraction'] for r in train]):.2f} / {_mean([r['signal_fraction'] for r in tail]):.2f}",
        "mean accepted fraction of samples": f"{_mean([r['accepted_fraction'] for r in train]):.2f}",
        "steps skipped (no signal, all rejected, NaN)": str(sum(1 for r in train if r.get("skipped"))),
        "per-position prediction (eq. 3.3) vs measured: correlation / sign agreement":
            f"{s.get('correlation', float('nan')):.2f} / {100 * s.get('sign_agreement', float('nan')):.0f}%",
        "slope measured / per-position prediction": f"{s.get('slope', float('nan')):.2g}",
        "calibration factor k / lr at the end": f"{k[-1]:.2g}" if k else "-",
        "exact <dH/dtheta, dtheta> vs measured: correlation / slope / sign agreement":
            f"{s.get('correlation_exact', float('nan')):.4f} / {s.get('slope_exact', float('nan')):.3f} / "
            f"{100 * s.get('sign_agreement_exact', float('nan')):.0f}%",
        "seconds per step": f"{s['seconds_per_step']:.1f}",
    }


def table(argv: list[str]) -> str:
    """The markdown table for ``LABEL=metrics.jsonl`` arguments."""
    labels, cols = [], []
    for arg in argv:
        label, _, path = arg.partition("=")
        labels.append(label)
        cols.append(column(_rows(path)))
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(c[key] for c in cols) + " |" for key in cols[0]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]), end="")
