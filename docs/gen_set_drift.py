"""How far a fixed set's entropy change over a run parts from its population's: docs/data/fixed_set_drift.json.

Usage: python docs/gen_set_drift.py RUN_DIR [RUN_DIR ...] [--control-draw distinct|repeats ...] [--out FILE]
       [--across-out FILE]

Each ``RUN_DIR`` is a finished ``cpu-demo``-task run of docs/llm.md with its last checkpoint. The script rebuilds
the run's own fixed sets (the held-out probe and the control set, from the initial weights and the run's seed,
as the run built them) and two population sets: every training problem of the task with 4 responses each and
every held-out problem with 8. Their token-mean entropies are read at the initial weights and at the
checkpoint's. The change of a set's token-mean entropy is ``sum_i dS_i / sum_i n_i`` over its prompts ``i``
(``dS_i`` the change of prompt ``i``'s summed token entropy on its fixed responses, ``n_i`` their token count).
The spread of that change over random control sets of ``k`` training prompts, distinct as ``llm.train`` draws its
control set (and with repeats, as runs made before ``Task.distinct_train_set`` drew them), ``r`` responses each,
is the standard deviation of the ratio over ``DRAWS`` such draws from the training population's per-prompt values
(each drawn prompt keeps the population set's first ``r`` responses). ``--control-draw repeats`` rebuilds the
control set of such an earlier run.
A control set's entropy is what the controller steers; the gap between its change and the held-out
population's is what the controller cannot see.

Each set's change also gets its standard error as a sample of prompts (``change_standard_error``:
:func:`entrotheory.batch_entropy_variance` on the per-token changes, the prompt the unit). Each run's entry
keeps every training and held-out problem's own change (``per_prompt_change``, in :func:`every_problem`'s
order) and how many of the run's training batches drew each training problem (``training_visits``), and
splits the probe's error at the checkpoint into four terms that add up to it (``end_error_budget``, nats):
the control set's change minus the schedule's, the training population's minus the control set's, the
held-out population's minus the training population's, and the probe's minus the held-out population's.

Across runs (written to ``--across-out``, :func:`across_runs`): the correlation of the per-prompt changes of
every two runs, and, for two runs of one schedule and length with different seeds, the change of a
training problem per batch that drew it, from the paired regression of the difference of its two changes on
the difference of its two visit counts (a problem's own change is largely its own: it cancels in the
difference, which the correlation shows).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch

from entrotheory import batch_entropy_variance
from entrotheory import entropy as policy_entropy
from entrotheory.schedules import anchor_schedule_spec, parse_schedule
from llm.config import TrainConfig, load_yaml
from llm.tasks import ArithmeticTask, Problem
from llm.train import FixedSet, Trainer, derive_seed

DRAWS = 4000
SIZES = ((32, 2), (64, 2), (128, 2), (128, 1), (64, 4))  # (prompts, responses)
TRAIN_SAMPLES, HELD_OUT_SAMPLES = 4, 8


def every_problem(task: ArithmeticTask, held_out: bool) -> list[Problem]:
    """All problems of a two-operand arithmetic task on one side of its held-out split."""
    if task.operands != 2:
        raise SystemExit("gen_set_drift enumerates two-operand arithmetic tasks only (the cpu-demo task)")
    out = []
    for a in range(task.low, task.high + 1):
        for b in range(task.low, task.high + 1):
            for op in task.ops:
                draw = ((a, b), (op,))
                if task._is_eval(draw) == held_out:
                    out.append(task._problem(draw))
    return out


@torch.no_grad()
def per_token(trainer: Trainer, fixed: FixedSet) -> torch.Tensor:
    """``[rows, T]`` float64: the entropy (nats) at each response token of the fixed set, current weights (0 off
    the mask)."""
    trainer.model.eval()
    mask = fixed.roll.mask
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for rows in torch.arange(mask.shape[0]).split(trainer.cfg.micro_batch_size):
        ent = policy_entropy(trainer._plain_logits(trainer.model, fixed, rows))
        out[rows] = torch.where(mask[rows], ent, 0.0).double()
    return out


def training_visits(task: ArithmeticTask, cfg: TrainConfig, updates: int, problems: list[Problem]) -> list[int]:
    """How many of the run's first ``updates`` training batches drew each of ``problems`` (``llm.train``'s
    draw: ``train_batch(prompts_per_step, Random(derive_seed(seed, "data", step)))``)."""
    count = dict.fromkeys((p.prompt for p in problems), 0)
    for step in range(updates):
        for p in task.train_batch(cfg.prompts_per_step, random.Random(derive_seed(cfg.seed, "data", step))):
            count[p.prompt] += 1
    return [count[p.prompt] for p in problems]


def schedule_change(spec: str, steps: int, updates: int) -> float:
    """``schedule(updates) - schedule(0)`` of a run's schedule (a relative one anchored anywhere)."""
    schedule = parse_schedule(anchor_schedule_spec(spec, 10.0), steps)
    return schedule(updates) - schedule(0)


def by_prompt(x: torch.Tensor, fixed: FixedSet, samples: int | None = None) -> torch.Tensor:
    """Sum ``x`` ``[rows]`` over each prompt's responses (only the first ``samples`` of each when given)."""
    index = fixed.roll.prompt_index
    keep = torch.ones_like(index, dtype=torch.bool)
    if samples is not None:
        rank = torch.zeros_like(index)
        seen: dict[int, int] = {}
        for r, p in enumerate(index.tolist()):
            rank[r] = seen.get(p, 0)
            seen[p] = rank[r] + 1
        keep = rank < samples
    out = torch.zeros(int(index.max()) + 1, dtype=torch.float64)
    return out.index_add_(0, index[keep], x[keep])


def drift_of_run(run: Path, control_draw: str = "distinct") -> dict[str, object]:
    values = load_yaml(run / "config.yaml")
    cfg_fields = dict(values, eval_prompts=0, tensorboard=False, plot=False, progress=False, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{**cfg_fields, "output_dir": tmp})
        trainer = Trainer(cfg, Path(tmp))
        task = trainer.task
        control_set = trainer.control_set
        if control_draw == "repeats":  # the control set of a run made before distinct_train_set
            problems = task.train_batch(cfg.control_prompts, random.Random(derive_seed(cfg.seed, "control")))
            control_set = trainer._fixed_set(problems, cfg.control_samples, "control")
        sets = {
            "probe": (trainer.probe_set, cfg.probe_samples),
            "control": (control_set, cfg.control_samples),
            "training population": (trainer._fixed_set(every_problem(task, False), TRAIN_SAMPLES, "drift-train"),
                                    TRAIN_SAMPLES),
            "held-out population": (trainer._fixed_set(every_problem(task, True), HELD_OUT_SAMPLES, "drift-held"),
                                    HELD_OUT_SAMPLES),
        }
        before = {k: per_token(trainer, f) for k, (f, _) in sets.items()}
        updates = trainer.load_checkpoint(run / "checkpoint")
        after = {k: per_token(trainer, f) for k, (f, _) in sets.items()}
        visits = training_visits(task, cfg, updates, sets["training population"][0].problems)
    out: dict[str, object] = {"run": run.name, "seed": cfg.seed, "schedule": cfg.schedule,
                              "control_prompts": cfg.control_prompts, "control_draw": control_draw,
                              "updates": updates, "schedule_change": schedule_change(cfg.schedule, cfg.steps, updates),
                              "sets": {}}
    sums = {}
    for k, (fixed, samples) in sets.items():
        mask = fixed.roll.mask
        s0, s1, n = before[k].sum(-1), after[k].sum(-1), mask.sum(-1).double()
        sums[k] = (s0, s1, n)
        _, variance = batch_entropy_variance(after[k] - before[k], mask, groups=fixed.roll.prompt_index)
        out["sets"][k] = {"prompts": len(fixed.problems), "responses_per_prompt": samples, "tokens": int(n.sum()),
                          "before": float(s0.sum() / n.sum()), "after": float(s1.sum() / n.sum()),
                          "change": float((s1 - s0).sum() / n.sum()),
                          "change_standard_error": float(variance.sqrt())}
    out["per_prompt_change"] = {}
    for k in ("training population", "held-out population"):
        s0, s1, n = sums[k]
        fixed = sets[k][0]
        out["per_prompt_change"][k] = (by_prompt(s1 - s0, fixed) / by_prompt(n, fixed)).tolist()
    out["training_visits"] = visits
    # random control sets of k training prompts, r responses each: distinct (as llm.train draws them) and with repeats
    train_fixed = sets["training population"][0]
    s0, s1, n = sums["training population"]
    gen = torch.Generator().manual_seed(0)
    spread = {}
    for k, r in SIZES:
        ds, nk = by_prompt(s1 - s0, train_fixed, r), by_prompt(n, train_fixed, r)
        idx = torch.randint(len(ds), (DRAWS, k), generator=gen)
        with_repeats = ds[idx].sum(-1) / nk[idx].sum(-1)
        idx = torch.rand(DRAWS, len(ds), generator=gen).argsort(-1)[:, :k]
        distinct = ds[idx].sum(-1) / nk[idx].sum(-1)
        spread[f"{k} x {r}"] = {"mean": float(distinct.mean()), "standard_deviation": float(distinct.std()),
                                "standard_deviation_with_repeats": float(with_repeats.std())}
    out["random_control_sets"] = spread
    held = out["sets"]["held-out population"]["change"]
    out["control_minus_held_out_population"] = out["sets"]["control"]["change"] - held
    out["probe_minus_held_out_population"] = out["sets"]["probe"]["change"] - held
    out["training_minus_held_out_population"] = out["sets"]["training population"]["change"] - held
    change = {k: v["change"] for k, v in out["sets"].items()}
    out["end_error_budget"] = {
        "control minus schedule": change["control"] - out["schedule_change"],
        "training population minus control": change["training population"] - change["control"],
        "held-out population minus training population": held - change["training population"],
        "probe minus held-out population": change["probe"] - held,
        "probe minus schedule": change["probe"] - out["schedule_change"],
    }
    return out


def _correlation(x: list[float], y: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([x, y], dtype=torch.float64))[0, 1])


def paired_visit_effect(change_a: list[float], change_b: list[float], visits_a: list[int],
                        visits_b: list[int]) -> dict[str, float]:
    """Least-squares slope (nats per visit) and its standard error of ``change_a - change_b`` on
    ``visits_a - visits_b`` over the problems, with an intercept (the two runs' common shift)."""
    y = torch.tensor(change_a, dtype=torch.float64) - torch.tensor(change_b, dtype=torch.float64)
    x = torch.tensor(visits_a, dtype=torch.float64) - torch.tensor(visits_b, dtype=torch.float64)
    if len(y) < 3 or float(x.var()) == 0:
        raise ValueError("the paired regression needs at least 3 problems whose visit counts differ between runs")
    xc, yc = x - x.mean(), y - y.mean()
    slope = (xc * yc).sum() / (xc * xc).sum()
    residual = yc - slope * xc
    se = (residual.pow(2).sum() / (len(y) - 2) / (xc * xc).sum()).sqrt()
    return {"per_visit": float(slope), "standard_error": float(se), "intercept": float(y.mean() - slope * x.mean()),
            "problems": float(len(y))}


def across_runs(results: list[dict]) -> dict[str, object]:
    """Per-prompt change correlations of every two runs and the paired visit effect of every two runs with one
    schedule, one length and different seeds (module doc)."""
    pairs, effects = [], []
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            corr = {k: _correlation(a["per_prompt_change"][k], b["per_prompt_change"][k])
                    for k in ("training population", "held-out population")}
            pairs.append({"runs": [a["run"], b["run"]], "per_prompt_change_correlation": corr})
            if a["schedule"] == b["schedule"] and a["updates"] == b["updates"] and a["seed"] != b["seed"]:
                effect = paired_visit_effect(a["per_prompt_change"]["training population"],
                                             b["per_prompt_change"]["training population"],
                                             a["training_visits"], b["training_visits"])
                visits = [sum(r["training_visits"]) / len(r["training_visits"]) for r in (a, b)]
                effects.append({"runs": [a["run"], b["run"]], **effect, "mean_visits": visits})
    return {"pairs": pairs, "visit_effects": effects}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="docs/data/fixed_set_drift.json")
    parser.add_argument("--across-out", default="docs/data/fixed_set_across_runs.json")
    parser.add_argument("--control-draw", action="append", choices=("distinct", "repeats"),
                        help="how each run drew its control set (one per run, in order; default distinct)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draws = args.control_draw or ["distinct"] * len(args.runs)
    if len(draws) != len(args.runs):
        parser.error(f"{len(draws)} --control-draw for {len(args.runs)} runs")
    results = [drift_of_run(run, draw) for run, draw in zip(args.runs, draws)]
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    Path(args.across_out).write_text(json.dumps(across_runs(results), indent=1) + "\n")
    for r in results:
        print(r["run"], {k: round(v["change"], 4) for k, v in r["sets"].items()},
              {k: round(v["standard_deviation"], 4) for k, v in r["random_control_sets"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
