"""Every ```python block in the guide and the README runs; the docs site builds strictly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "docs" / "guide.md", ROOT / "README.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


BLOCKS = [(p, i, code) for p in FILES for i, code in enumerate(python_blocks(p))]


def test_guide_has_snippets():
    assert len(python_blocks(ROOT / "docs" / "guide.md")) >= 3


@pytest.mark.parametrize("path,index,code", BLOCKS, ids=[f"{p.name}-{i}" for p, i, _ in BLOCKS])
def test_snippet_runs(path, index, code):
    exec(compile(code, f"{path.name}[{index}]", "exec"), {"__name__": "__snippet__"})


def test_docs_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_llm_results_table_is_regenerated_from_the_saved_metrics():
    """docs/llm.md quotes the table that docs/gen_llm_table.py makes from docs/data (cannot drift)."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_llm_table.py"))
    data = ROOT / "docs" / "data"
    text = gen["table"]([f"Entrocraft (predictive)={data / 'llm_entrocraft_metrics.jsonl'}",
                         f"vanilla GRPO={data / 'llm_vanilla_metrics.jsonl'}",
                         f"Entrocraft (band rule)={data / 'llm_band_metrics.jsonl'}"])
    assert text in (ROOT / "docs" / "llm.md").read_text()


CONTROL_RUNS = [
    "vanilla|linear:0.85->0.65|{data}/llm_control_vanilla_metrics.jsonl",
    "logit (default)|linear:0.85->0.65|{data}/llm_control_logit_metrics.jsonl",
    "param + estimate|linear:0.85->0.65|{data}/llm_control_param_metrics.jsonl",
    "param + control set|linear:0.85->0.65|{data}/llm_control_set_metrics.jsonl",
    "control set, cheap|linear:0.85->0.65|{data}/llm_control_set_cheap_metrics.jsonl",
    "vanilla|linear:0.8->0.95|{data}/llm_control_vanilla_metrics.jsonl|30",
    "logit (default)|linear:0.8->0.95|{data}/llm_control_logit_rising_metrics.jsonl",
    "param + estimate|linear:0.8->0.95|{data}/llm_control_param_rising_metrics.jsonl",
    "param + control set|linear:0.8->0.95|{data}/llm_control_set_rising_metrics.jsonl",
    "control set, cheap|linear:0.8->0.95|{data}/llm_control_set_cheap_rising_metrics.jsonl",
]
WARMUP_RUNS = [
    "vanilla|linear:0.85->0.65|{data}/llm_control_warmup_vanilla_metrics.jsonl",
    "logit (default)|linear:0.85->0.65|{data}/llm_control_warmup_logit_metrics.jsonl",
    "param + control set|linear:0.85->0.65|{data}/llm_control_warmup_set_metrics.jsonl",
]

WARMSTART_RUNS = [
    "control set, cheap|linear:0.85->0.65|{data}/llm_control_set_cheap_metrics.jsonl",
    "+ AdamW warm start|linear:0.85->0.65|{data}/llm_control_set_cheap_warm_metrics.jsonl",
    "+ warm start + momentum projection|linear:0.85->0.65|{data}/llm_control_set_cheap_warm_proj_metrics.jsonl",
    "control set, cheap|linear:0.8->0.95|{data}/llm_control_set_cheap_rising_metrics.jsonl",
    "+ AdamW warm start|linear:0.8->0.95|{data}/llm_control_set_cheap_warm_rising_metrics.jsonl",
    "+ warm start + momentum projection|linear:0.8->0.95|{data}/llm_control_set_cheap_warm_proj_rising_metrics.jsonl",
]


RELATIVE_RUNS = [
    "warm start, relative, seed 0|linear:H0->H0-0.2|{data}/llm_control_set_cheap_warm_relative_metrics.jsonl",
    "warm start, relative, seed 1|linear:H0->H0-0.2|{data}/llm_control_set_cheap_warm_relative_seed1_metrics.jsonl",
    "warm start, relative, seed 0|linear:H0->H0+0.15|{data}/llm_control_set_cheap_warm_relative_rising_metrics.jsonl",
]


DISTINCT128_RUNS = [
    "128 distinct, relative, seed 0|linear:H0->H0-0.2|{data}/llm_control_set128_warm_relative_metrics.jsonl",
    "128 distinct, relative, seed 1|linear:H0->H0-0.2|{data}/llm_control_set128_warm_relative_seed1_metrics.jsonl",
    "128 distinct, relative, seed 0|linear:H0->H0+0.15|{data}/llm_control_set128_warm_relative_rising_metrics.jsonl",
]


@pytest.mark.parametrize("runs", [CONTROL_RUNS, WARMUP_RUNS, WARMSTART_RUNS, RELATIVE_RUNS, DISTINCT128_RUNS],
                         ids=["no-warmup", "warmup", "warm-start", "relative", "distinct128"])
def test_control_table_is_regenerated_from_the_saved_metrics(runs):
    """docs/llm.md quotes the control tables that docs/gen_control_table.py makes from docs/data."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    text = gen["table"]([r.format(data=ROOT / "docs" / "data") for r in runs])
    assert text in (ROOT / "docs" / "llm.md").read_text()


def test_tracking_error_of_a_run_on_its_schedule_is_zero():
    """The tracking error is computed against the schedule at the step the probe saw: a probe that equals
    the schedule scores 0, one offset by a constant scores that constant as bias with zero spread."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    from entrotheory.schedules import parse_schedule

    sched = parse_schedule("linear:0.9->0.7", 10)
    rows = [{"step": t, "probe_entropy": sched(t)} for t in range(0, 11, 2)]
    exact = gen["tracking"](rows, "linear:0.9->0.7")
    assert exact["rms"] == pytest.approx(0.0, abs=1e-9) and exact["bias"] == pytest.approx(0.0, abs=1e-12)
    shifted = gen["tracking"]([{**r, "probe_entropy": r["probe_entropy"] + 0.05} for r in rows], "linear:0.9->0.7")
    assert shifted["bias"] == pytest.approx(0.05) and shifted["rms"] == pytest.approx(25.0)
    assert shifted["std"] == pytest.approx(0.0, abs=1e-6)
    cut = gen["truncate"]([{"step": t, "entropy": 1.0, "probe_entropy": 0.5} for t in range(6)], 4)
    assert [r["step"] for r in cut] == [0, 1, 2, 3, 4] and cut[-1] == {"step": 4, "final": True, "probe_entropy": 0.5}


@pytest.mark.parametrize(("saved_table", "min_rows"),
                         [("benchmark_results.md", 20), ("benchmark_param_predictor.md", 4)])
def test_performance_page_shows_the_saved_benchmark_table(saved_table, min_rows):
    """docs/performance.md quotes, line for line, the tables benchmarks/conftest.py wrote for the runs it describes
    (the full run, and the run of the parameter-space predictor's benchmark)."""
    saved = (ROOT / "docs" / "data" / saved_table).read_text().splitlines()
    rows = [line for line in saved if line.startswith("|")]
    assert len(rows) > min_rows  # header rows plus the groups and the recorded ratios of the run
    page = (ROOT / "docs" / "performance.md").read_text().splitlines()
    missing = [row for row in rows if row not in page]
    assert not missing, missing[:3]


def test_fixed_set_level_errors_quoted_in_the_guide_are_the_saved_ones():
    """docs/llm.md quotes the levels and bootstrap standard errors that docs/gen_level_error.py saved."""
    import json

    saved = json.loads((ROOT / "docs" / "data" / "fixed_set_levels.json").read_text())
    text = (ROOT / "docs" / "llm.md").read_text()
    probe, control, wide, big = (saved[k] for k in ("probe 46 x 2", "control 32 x 2", "probe 46 x 8", "control 64 x 2"))
    for x in (probe["standard_error"], control["standard_error"], control["difference_standard_error"],
              wide["standard_error"], big["difference_from_probe"]):
        assert f"{abs(x):.3f}" in text, x
    # the claims: ten times 5% of the falling range (0.01 nats), fourteen times 5% of the rising one (0.0075)
    assert int(control["difference_standard_error"] / 0.01) == 10
    assert int(control["difference_standard_error"] / 0.0075) == 14


def test_tracking_error_of_a_relative_schedule_is_against_each_series_own_start():
    """For linear:H0->H0-0.2 each series is scored against its own step-0 value plus the schedule's change: a
    probe 0.05 nats above the control set that moves with the schedule scores 0 (an absolute schedule would
    score the 0.05 as bias); a probe whose change falls short by 0.01 nats per 10 steps scores that drift."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    change = [-0.2 * t / 10 for t in range(11)]
    rows = [{"step": t, "control_entropy": 0.8 + change[t], "probe_entropy": 0.85 + change[t]} for t in range(11)]
    for key in ("control_entropy", "probe_entropy"):
        exact = gen["tracking"](rows, "linear:H0->H0-0.2", key=key)
        assert exact["rms"] == pytest.approx(0.0, abs=1e-9) and exact["n"] == 10
    assert gen["tracking"](rows, "linear:0.8->0.6")["bias"] == pytest.approx(0.05)
    drifting = [{**r, "probe_entropy": r["probe_entropy"] + 0.001 * r["step"]} for r in rows]
    got = gen["tracking"](drifting, "linear:H0->H0-0.2")
    assert got["bias"] == pytest.approx(0.001 * 5.5) and got["span"] == pytest.approx(0.2)
    assert gen["tracking"]([r for r in rows if r["step"] > 0], "linear:H0->H0-0.2")["n"] == 0  # no start: no score


def test_set_drift_enumerates_each_side_of_the_split_and_keeps_the_first_responses():
    """docs/gen_set_drift.py's population sets are every problem on each side of the held-out split (together the
    whole problem space, the held-out side the problems eval_set draws), and its per-prompt sums keep each
    prompt's first ``samples`` responses in whatever order the rows come."""
    import runpy
    from types import SimpleNamespace

    import torch

    from llm.tasks import ArithmeticTask

    gen = runpy.run_path(str(ROOT / "docs" / "gen_set_drift.py"))
    task = ArithmeticTask(0, 14)
    held, train = gen["every_problem"](task, True), gen["every_problem"](task, False)
    assert len(held) + len(train) == 15 * 15
    assert {p.prompt for p in held} == {p.prompt for p in task.eval_set(len(held) + 10)}
    assert not {p.prompt for p in held} & {p.prompt for p in train}
    fixed = SimpleNamespace(roll=SimpleNamespace(prompt_index=torch.tensor([1, 0, 1, 0, 1, 0])))
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0], dtype=torch.float64)
    assert gen["by_prompt"](x, fixed).tolist() == [101010.0, 10101.0]
    assert gen["by_prompt"](x, fixed, 2).tolist() == [1010.0, 101.0]


def test_set_drift_numbers_quoted_in_the_theory_are_the_saved_ones():
    """docs/theory.md §5.6b quotes the control-set sampling spreads and the population gaps that
    docs/gen_set_drift.py saved for the two falling runs of table 4, and the claims it draws hold for them."""
    import json

    saved = {r["run"]: r for r in json.loads((ROOT / "docs" / "data" / "fixed_set_drift.json").read_text())}
    runs = [saved["rel-cheap"], saved["rel-cheap-s1"]]
    text = " ".join((ROOT / "docs" / "theory.md").read_text().split())

    def pair(values):
        return " / ".join(f"{v:.3f}" for v in values)

    spread = [[r["random_control_sets"][k] for r in runs] for k in ("32 x 2", "128 x 2", "128 x 1")]
    for quoted in (pair(s["standard_deviation"] for s in spread[0]),
                   pair(s["standard_deviation_with_repeats"] for s in spread[0]),
                   pair(s["standard_deviation"] for s in spread[1]),
                   pair(s["standard_deviation_with_repeats"] for s in spread[1]),
                   pair(s["standard_deviation"] for s in spread[2]),
                   pair(r["training_minus_held_out_population"] for r in runs),
                   pair(r["probe_minus_held_out_population"] for r in runs)):
        assert quoted in text, quoted
    ends = " / ".join(f"{r['control_minus_held_out_population']:+.3f}" for r in runs)
    assert ends in text, ends
    gaps = [r["training_minus_held_out_population"] for r in saved.values() if "-step" not in r["run"]]
    assert len(gaps) == 5 and max(gaps) <= 0 and f"between {min(gaps):.3f} and {max(gaps):.3f} nats" in text
    allowed = 0.01 * 3 ** 0.5  # an end drift D has RMS D / sqrt(3): 0.01 nats RMS allows 0.017
    assert all(s["standard_deviation"] > allowed for s in spread[0])
    assert all(s["standard_deviation"] < allowed for s in spread[1])


def test_set_drift_numbers_quoted_in_the_guide_are_the_saved_ones():
    """docs/llm.md's table-5 bullet quotes the control-set, training- and held-out-population changes that
    docs/gen_set_drift.py saved, and its claim holds for them: the training population's change minus the
    held-out population's is never positive, on falling and rising runs alike."""
    import json

    saved = {r["run"]: r for r in json.loads((ROOT / "docs" / "data" / "fixed_set_drift.json").read_text())}
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    change = {run: {k: v["change"] for k, v in r["sets"].items()} for run, r in saved.items()}

    def pair(a, b):
        return f"{a:.3f} / {b:.3f}"

    for run in ("rel-d128-s1-step10", "rel-d128-s1-step20", "rel-d128-s0", "rel-d128-s1"):
        assert pair(change[run]["control"], change[run]["training population"]) in text, run
    rising = change["rel-d128-rising"]
    assert f"{rising['control']:+.3f} / {rising['training population']:+.3f}" in text
    for run in ("rel-d128-s1-step10", "rel-d128-s1-step20", "rel-d128-s0", "rel-d128-s1"):
        assert f"{change[run]['held-out population']:.3f}" in text, run
    assert f"{rising['held-out population']:+.3f} rising" in text
    assert f"{change['rel-d128-s1-step20']['probe']:.3f} against" in text
    gaps = {run: r["training_minus_held_out_population"] for run, r in saved.items()}
    for a, b in (("rel-cheap", "rel-cheap-s1"), ("rel-d128-s0", "rel-d128-s1")):
        assert f"{gaps[a]:.3f} / {gaps[b]:.3f}" in text, (a, b)
    assert f"{gaps['rel-d128-rising']:.3f} on the rising one" in text
    assert all(g <= 0 for g in gaps.values())
