"""The entropy-control table and figure of docs/llm.md from metrics.jsonl files of `python -m llm.train` runs.

Usage: python docs/gen_control_table.py [--figure OUT.png] "LABEL|SCHEDULE|metrics.jsonl[|STEPS]" ...

``STEPS`` scores only the run's first ``STEPS`` updates (:func:`truncate`): vanilla's trajectory does not depend
on the horizon, so its first 30 steps are a 30-step vanilla run.

Tracking error: at every step ``t >= 1`` with a held-out probe (``--probe-every``; the run's last line is
the policy after its last update), ``e_t = probe_entropy(t) - schedule(t)``, where ``probe_entropy(t)`` is
the entropy of the policy after ``t`` updates on fixed held-out prompts (llm/train.py
``Trainer.probe_entropy``). Reported as the root mean square and the mean of ``|e_t|``, in % of the
schedule's range ``|schedule(0) - schedule(T)|``; as the mean signed error (nats), which holds the
probe set's own offset (a few held-out prompts are not the training distribution: their entropy
differs by a constant the controller cannot see); and as the standard deviation of ``e_t`` (% of the
range), the error with that constant removed. A run that controls a fixed control set (``--control-prompts``)
is also scored on that set's entropy before each update (``control_entropy``), the quantity it aims at the
schedule; its per-position prediction, which is of the batch's own contexts, is scored against the batch's
measured change (``measured_batch_entropy_change``, :func:`llm.metrics.measured_pairs`). The "from step 10"
row scores the steps ``t >= 10`` alone, after AdamW's first steps, whose size the sampler cannot choose
(docs/llm.md). A run without a schedule (vanilla) is scored against the schedule named for it. The "held-out minus
control-set" row is the difference of the two fixed sets' entropies at the same weights (both read before update
``t``) at the first and the last probe: the level offset that the controller cannot see, and how it drifts.
With ``--control-reckoning`` the control set's entropy between gradient refreshes is reckoned, not measured
(docs/theory.md eq. 5.6c): the "measured minus reckoned" row is what the refreshes found
(``control_reckoning_error``), and such a run has no measured change of the set to score its prediction on.

A relative schedule (``H0`` in its spec, docs/theory.md §4.1) asks every set to move by the schedule's change
from where it starts, so each series is scored against its own step-0 value plus that change:
``e_t = x(t) - x(0) - (schedule(t) - schedule(0))`` (for the control set ``x(0)`` is the run's
``schedule_anchor``; the held-out probe's level offset is then no error, its drift is).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from entrotheory.schedules import anchor_schedule_spec, is_relative_spec, parse_schedule
from llm.train import summarize

SETTLED = 10  # the first step the "from step" row scores: AdamW's first steps are over (docs/llm.md)


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def truncate(rows: list[dict], steps: int) -> list[dict]:
    """The metrics of the run's first ``steps`` updates: the steps ``< steps`` and, as the final line, what
    was evaluated on the policy after ``steps`` updates (the evaluation and probe of step ``steps``)."""
    head = [r for r in rows if int(r["step"]) < steps and not r.get("final")]
    at = [r for r in rows if int(r["step"]) == steps]
    final = {"step": steps, "final": True}
    for r in at:
        final.update({k: v for k, v in r.items() if k.startswith(("pass_", "eval_", "probe_"))})
    return head + [final]


def tracking(rows: list[dict], spec: str, key: str = "probe_entropy", first: int = 1,
             steps: int | None = None) -> dict[str, float]:
    """Errors of ``key`` against ``spec`` over the steps ``t >= first`` where it was measured (see module doc);
    ``steps`` is the schedule's horizon, by default the last step of ``rows``."""
    steps = max(int(r["step"]) for r in rows) if steps is None else steps
    if is_relative_spec(spec):  # each series against its own start plus the schedule's change
        start = [float(r[key]) for r in rows if int(r["step"]) == 0 and isinstance(r.get(key), (int, float))]
        if not start:
            return {"rms": math.nan, "mae": math.nan, "bias": math.nan, "std": math.nan, "n": 0.0}
        spec = anchor_schedule_spec(spec, start[0])
    schedule = parse_schedule(spec, steps)
    span = abs(schedule(0) - schedule(steps))
    errors = [float(r[key]) - schedule(int(r["step"])) for r in rows
              if isinstance(r.get(key), (int, float)) and int(r["step"]) >= first]
    if not errors or span == 0:
        return {"rms": math.nan, "mae": math.nan, "bias": math.nan, "std": math.nan, "n": float(len(errors))}
    rms = math.sqrt(_mean([e * e for e in errors]))
    bias = _mean(errors)
    std = math.sqrt(max(rms * rms - bias * bias, 0.0))
    return {"rms": 100 * rms / span, "mae": 100 * _mean([abs(e) for e in errors]) / span, "bias": bias,
            "std": 100 * std / span, "n": float(len(errors)), "span": span}


def _batch_error(rows: list[dict], spec: str) -> dict[str, float]:
    """The batch entropy of step ``t`` is the policy after ``t`` updates too, on that step's own samples."""
    return tracking([r for r in rows if not r.get("final")], spec, key="entropy")


def column(rows: list[dict], spec: str) -> dict[str, str]:
    s = summarize(rows)
    train = [r for r in rows if "entropy" in r and not r.get("final")]
    evals = [r for r in rows if "pass_at_1" in r]
    probe, batch = tracking(rows, spec), _batch_error(rows, spec)
    horizon = max(int(r["step"]) for r in rows)  # the run's, also for the control set (read before each update)
    trained = [r for r in rows if not r.get("final")]
    control = tracking(trained, spec, key="control_entropy", steps=horizon)
    late = tracking(rows, spec, first=SETTLED)
    control_late = tracking(trained, spec, key="control_entropy", first=SETTLED, steps=horizon)
    param = any("predicted_entropy_change_logit" in r for r in train)
    logit = s.get("correlation_logit" if param else "correlation", math.nan)
    predictor = [r.get("time_predictor", 0.0) for r in train]
    step_time = [r.get("time_step", 0.0) for r in train]
    k = [r["calibration_factor"] for r in train if "calibration_factor" in r]
    both = [float(r["probe_entropy"]) - float(r["control_entropy"]) for r in train
            if "probe_entropy" in r and "control_entropy" in r]  # the same weights: both read before update t
    reckoning = [float(r["control_reckoning_error"]) for r in train if "control_reckoning_error" in r]
    f = "{:.3f}".format
    return {
        "held-out (probe) entropy vs schedule: RMS / mean |error|, % of range": f"{probe['rms']:.1f}% / "
                                                                              f"{probe['mae']:.1f}%",
        "held-out entropy minus schedule, mean (nats)": f"{probe['bias']:+.3f}",
        "held-out entropy vs schedule, offset removed: std, % of range": f"{probe['std']:.1f}%",
        "control-set entropy vs schedule: RMS, % of range": "-" if math.isnan(control["rms"]) else
                                                             f"{control['rms']:.1f}%",
        f"from step {SETTLED}: held-out / control-set entropy vs schedule, RMS, % of range":
            f"{late['rms']:.1f}% / " + ("-" if math.isnan(control_late["rms"]) else f"{control_late['rms']:.1f}%"),
        "held-out minus control-set entropy at the same weights, first -> last probe (nats)":
            f"{both[0]:+.3f} -> {both[-1]:+.3f}" if both else "-",
        "batch entropy vs schedule: RMS, % of range": f"{batch['rms']:.1f}%",
        "probe entropy, first -> last": f"{f(next(r['probe_entropy'] for r in rows if 'probe_entropy' in r))} -> "
                                        f"{f(rows[-1].get('probe_entropy', math.nan))}",
        "the predictor's prediction vs measured change: correlation / slope":
            f"{s['correlation']:.2f} / {s['slope']:.3g}" if "correlation" in s else "-",
        "per-position (logit) prediction vs measured: correlation": f"{logit:.2f}",
        "exact <dH/dtheta, dtheta> vs measured: correlation": f"{s['correlation_exact']:.4f}"
                                                              if "correlation_exact" in s else "-",
        "control set, measured minus reckoned entropy at the refreshes: RMS / largest (nats)":
            f"{math.sqrt(_mean([e * e for e in reckoning])):.4f} / {max(reckoning, key=abs):+.4f}" if reckoning
            else "-",
        "calibration factor k / lr at the end": f"{k[-1]:.3g}" if k else "-",
        "mean accepted fraction of samples": f"{_mean([r['accepted_fraction'] for r in train]):.2f}",
        "held-out pass@1, first -> last evaluation": "-" if len(evals) < 2 else  # one evaluation: no "last"
            f"{f(evals[0]['pass_at_1'])} -> {f(evals[-1]['pass_at_1'])}",
        "predictor time, % of the step": f"{100 * sum(predictor) / sum(step_time):.0f}%" if param else "-",
        "seconds per step": f"{_mean(step_time):.1f}",
    }


def table(argv: list[str]) -> str:
    """The markdown table for ``LABEL|SCHEDULE|metrics.jsonl`` arguments."""
    labels, cols = [], []
    for arg in argv:
        label, spec, rows = _run(arg)
        labels.append(f"{label} ({spec})")
        cols.append(column(rows, spec))
    lines = ["| | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(c[key] for c in cols) + " |" for key in cols[0]]
    return "\n".join(lines) + "\n"


def _run(arg: str) -> tuple[str, str, list[dict]]:
    label, spec, path, *steps = arg.split("|")
    rows = _rows(path)
    return label, spec, truncate(rows, int(steps[0])) if steps else rows


def figure(argv: list[str], out: Path) -> Path:
    """Probe and batch entropy against each run's schedule, one panel per schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [_run(arg) for arg in argv]
    specs = list(dict.fromkeys(spec for _, spec, _ in runs))
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(label for label, _, _ in runs))}
    fig, axes = plt.subplots(1, len(specs), figsize=(6.5 * len(specs), 4.2), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        steps = None
        for label, s, rows in runs:
            if s != spec:
                continue
            steps = max(int(r["step"]) for r in rows)
            color = colours[label]
            pts = [(r["step"], r["probe_entropy"]) for r in rows if "probe_entropy" in r]
            ax.plot(*zip(*pts), "o-", color=color, lw=1.8, ms=3.5, label=f"{label}: held-out probe")
            train = [r for r in rows if "entropy" in r and not r.get("final")]
            ax.plot([r["step"] for r in train], [r["entropy"] for r in train], color=color, lw=0.7, alpha=0.45)
            if any("control_entropy" in r for r in train):
                ax.plot([r["step"] for r in train], [r["control_entropy"] for r in train], "-.", color=color,
                        lw=1.2, label=f"{label}: control set")
            if any("entropy_estimate" in r for r in train):
                ax.plot([r["step"] for r in train], [r["entropy_estimate"] for r in train], ":", color=color,
                        lw=1.2, label=f"{label}: state estimate")
        if is_relative_spec(spec):  # anchored at the control set (the controller's) and at the probe's start
            # of the first run of the panel that has each (a vanilla run has no control set)
            panel = [run_rows for _, s, run_rows in runs if s == spec]
            starts = {what: next((r[key] for rows in panel for r in rows if key in r), None)
                      for what, key in (("control set", "schedule_anchor"), ("held-out probe", "probe_entropy"))}
            for (what, h0), style in zip(starts.items(), ("k--", "k:")):
                if h0 is None:
                    continue
                sched = parse_schedule(anchor_schedule_spec(spec, h0), steps)
                ax.plot(range(steps + 1), [sched(t) for t in range(steps + 1)], style, lw=1.3,
                        label=f"schedule {spec}, H0 of the {what}")
        else:
            sched = parse_schedule(spec, steps)
            ax.plot(range(steps + 1), [sched(t) for t in range(steps + 1)], "k--", lw=1.3, label=f"schedule {spec}")
        ax.set(title=f"schedule {spec}", xlabel="step (updates so far)", ylabel="token entropy (nats)")
        ax.legend(fontsize=7)
    fig.suptitle("thin lines: batch entropy of each step's own samples", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--figure"]:
        figure(args[2:], Path(args[1]))
        args = args[2:]
    print(table(args), end="")
