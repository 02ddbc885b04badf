"""Every ```python block in the guide and the README runs; the docs site builds strictly."""

from __future__ import annotations

import math
import os
import re
import statistics
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


BIG_TASK_RUNS = [
    "vanilla|linear:H0->H0-0.2|{data}/llm_control_big_vanilla_metrics.jsonl",
    "logit (default)|linear:H0->H0-0.2|{data}/llm_control_big_logit_metrics.jsonl",
    "400 distinct, relative|linear:H0->H0-0.2|{data}/llm_control_big_falling_metrics.jsonl",
    "400 distinct, reckoning|linear:H0->H0-0.2|{data}/llm_control_big_reckon_metrics.jsonl",
    "400 distinct, reckoning, seed 1|linear:H0->H0-0.2|{data}/llm_control_big_reckon_seed1_metrics.jsonl",
    "400 distinct, one backward|linear:H0->H0-0.2|{data}/llm_control_big_one_metrics.jsonl",
    "vanilla|linear:H0->H0+0.15|{data}/llm_control_big_vanilla_metrics.jsonl|30",
    "logit (default)|linear:H0->H0+0.15|{data}/llm_control_big_logit_rising_metrics.jsonl",
    "400 distinct, relative|linear:H0->H0+0.15|{data}/llm_control_big_rising_metrics.jsonl",
    "400 distinct, reckoning|linear:H0->H0+0.15|{data}/llm_control_big_reckon_rising_metrics.jsonl",
    "400 distinct, one backward|linear:H0->H0+0.15|{data}/llm_control_big_one_rising_metrics.jsonl",
]


BIG800_RUNS = [
    "800 distinct, seed 0|linear:H0->H0-0.2|{data}/llm_control_big800_one_metrics.jsonl",
    "800 distinct, seed 1|linear:H0->H0-0.2|{data}/llm_control_big800_one_seed1_metrics.jsonl",
    "800 distinct, seed 0|linear:H0->H0+0.15|{data}/llm_control_big800_one_rising_metrics.jsonl",
    "800 distinct, seed 1|linear:H0->H0+0.15|{data}/llm_control_big800_one_rising_seed1_metrics.jsonl",
]

BIG800CC_RUNS = [
    "clip-corrected, seed 0|linear:H0->H0-0.2|{data}/llm_control_big800cc_metrics.jsonl",
    "clip-corrected, seed 1|linear:H0->H0-0.2|{data}/llm_control_big800cc_seed1_metrics.jsonl",
    "clip-corrected, seed 0|linear:H0->H0+0.15|{data}/llm_control_big800cc_rising_metrics.jsonl",
    "clip-corrected, seed 1|linear:H0->H0+0.15|{data}/llm_control_big800cc_rising_seed1_metrics.jsonl",
]


def before_vs_after(gen: dict, name: str) -> float:
    """Correlation of a saved run's prediction made before each update with ``<grad Hbar_C, dtheta>`` after it
    (docs/data/llm_control_{name}_metrics.jsonl; ``gen``: docs/gen_control_table.py's namespace)."""
    rows = [r for r in gen["_rows"](str(ROOT / "docs" / "data" / f"llm_control_{name}_metrics.jsonl"))
            if "exact_predicted_entropy_change" in r]
    return statistics.correlation([r["predicted_entropy_change"] for r in rows],
                                  [r["exact_predicted_entropy_change"] for r in rows])


@pytest.mark.parametrize("runs", [CONTROL_RUNS, WARMUP_RUNS, WARMSTART_RUNS, RELATIVE_RUNS, DISTINCT128_RUNS,
                                  BIG_TASK_RUNS, BIG800_RUNS, BIG800CC_RUNS],
                         ids=["no-warmup", "warmup", "warm-start", "relative", "distinct128", "big-task", "big800",
                              "big800cc"])
def test_control_table_is_regenerated_from_the_saved_metrics(runs):
    """docs/llm.md quotes the control tables that docs/gen_control_table.py makes from docs/data."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    text = gen["table"]([r.format(data=ROOT / "docs" / "data") for r in runs])
    assert text in (ROOT / "docs" / "llm.md").read_text()


def test_big_task_tracking_quoted_in_the_guide_is_the_saved_one():
    """docs/llm.md's table-6 bullet (and README, theory) quote the held-out and control-set tracking errors of the
    saved big-task runs, vanilla's and today's default's, the reckoning runs' errors and times, the one-backward
    runs' errors, times and before-vs-after prediction correlations (also in theory §5.5b), and the second seed's
    miss, and the claims hold for them: seed 0's held-out entropy is within the issue's 5% of the range over the
    whole run on both schedules (measured, reckoned, or with one backward), where vanilla and the default are not,
    and seed 1's is not."""
    import runpy

    from llm.tasks import ArithmeticTask

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    gen_drift = runpy.run_path(str(ROOT / "docs" / "gen_set_drift.py"))
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    cols = {(label, spec): gen["column"](rows, spec) for label, spec, rows in  # the table's own numbers
            (gen["_run"](arg.format(data=ROOT / "docs" / "data")) for arg in BIG_TASK_RUNS)}
    scores = {}
    for key, col in cols.items():
        held_out = col["held-out (probe) entropy vs schedule: RMS / mean |error|, % of range"].split("%")[0]
        control = col["control-set entropy vs schedule: RMS, % of range"].rstrip("%")
        scores[key] = (float(held_out), float(control) if control != "-" else math.nan)
    falling, rising = "linear:H0->H0-0.2", "linear:H0->H0+0.15"
    ours = [scores["400 distinct, relative", s] for s in (falling, rising)]
    vanilla = [scores["vanilla", s][0] for s in (falling, rising)]
    quoted = (f"held-out entropy tracks both schedules within the 5% target: {ours[0][0]:.1f}% falling and "
              f"{ours[1][0]:.1f}% rising")
    assert quoted in text, quoted
    assert f"the control set {ours[0][1]:.1f}% / {ours[1][1]:.1f}%" in text
    assert f"vanilla {vanilla[0]:.1f}% / {vanilla[1]:.1f}%" in text
    assert all(o[0] < 5 for o in ours) and all(v > 5 for v in vanilla)
    default = [scores["logit (default)", s][0] for s in (falling, rising)]
    assert f"today's default (logit contributions on the batch entropy) {default[0]:.1f}% / {default[1]:.1f}%" in text
    assert all(d > 5 for d in default)
    reckoned = [scores["400 distinct, reckoning", s] for s in (falling, rising)]
    assert (f"measured only at its gradient refreshes (`--control-reckoning`), {reckoned[0][0]:.1f}% / "
            f"{reckoned[1][0]:.1f}% (control set {reckoned[0][1]:.1f}% / {reckoned[1][1]:.1f}%)") in text
    assert all(r[0] < 5 for r in reckoned)
    errors = [cols["400 distinct, reckoning", s]["control set, measured minus reckoned entropy at the refreshes: "
                                                  "RMS / largest (nats)"].split(" / ") for s in (falling, rising)]
    largest = max((e[1] for e in errors), key=lambda x: abs(float(x)))
    assert (f"the refreshes found it off by {errors[0][0]} / {errors[1][0]} nats RMS (at most "
            f"{abs(float(largest)):.4f} nats") in text
    seconds = [cols[label, s]["seconds per step"] for label in ("400 distinct, reckoning", "400 distinct, relative")
               for s in (falling, rising)]
    assert f"{seconds[0]} / {seconds[1]} s per step against {seconds[2]} / {seconds[3]} s" in text
    one = [scores["400 distinct, one backward", s] for s in (falling, rising)]
    one_seconds = [cols["400 distinct, one backward", s]["seconds per step"] for s in (falling, rising)]
    assert (f"{one[0][0]:.1f}% / {one[1][0]:.1f}% (control set {one[0][1]:.1f}% / {one[1][1]:.1f}%), at "
            f"{one_seconds[0]} / {one_seconds[1]} s per step") in text
    assert all(o[0] < 5 for o in one)

    corr = [before_vs_after(gen, f"big_{n}") for n in ("one", "one_rising", "reckon", "reckon_rising")]
    assert (f"{corr[0]:.2f} / {corr[1]:.2f} over the runs (with the reference gradient: {corr[2]:.2f} / "
            f"{corr[3]:.2f})") in text
    assert f"correlated {corr[0]:.2f} / {corr[1]:.2f} over the falling and rising runs" in " ".join(
        (ROOT / "docs" / "theory.md").read_text().split())
    second = cols["400 distinct, reckoning, seed 1", falling]
    held = second["held-out (probe) entropy vs schedule: RMS / mean |error|, % of range"].split("%")[0]
    gap = second["held-out minus control-set entropy at the same weights, first -> last probe (nats)"].split(" -> ")
    assert float(held) > 5  # the claim: the second seed misses the target
    assert (f"held its control set within {second['control-set entropy vs schedule: RMS, % of range']} of the "
            f"range, but its held-out entropy was off by {held}%") in text
    assert f"parted from the control set's by {abs(float(gap[1]) - float(gap[0])):.3f} nats" in text
    assert f"went from {float(gap[0]):.3f} to {float(gap[1]):.3f} nats" in text
    theory = " ".join((ROOT / "docs" / "theory.md").read_text().split())
    assert (f"off by {errors[0][0]} and {errors[1][0]} nats RMS (falling, rising; at most "
            f"{abs(float(largest)):.4f})") in theory
    assert f"tracked within {reckoned[0][0]:.1f}% and {reckoned[1][0]:.1f}% of the range" in theory
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"is off by {default[0]:.1f}% / {default[1]:.1f}% and vanilla GRPO by {vanilla[0]:.1f}%" in readme
    assert f"(`--control-reckoning`) keeps seed 0's tracking ({reckoned[0][0]:.1f}% / {reckoned[1][0]:.1f}%)" in readme
    assert f"tracks within {one[0][0]:.1f}% / {one[1][0]:.1f}% (seed 0)" in readme
    held, train = (len(gen_drift["every_problem"](ArithmeticTask(0, 49), side)) for side in (True, False))
    assert f"2,500 problems, {held} held out and {train:,} to train on" in text
    falling_rows = gen["_rows"](str(ROOT / "docs" / "data" / "llm_control_big_falling_metrics.jsonl"))
    start = next(r["pass_at_1"] for r in falling_rows if "pass_at_1" in r)
    assert f"held-out pass@1 {start:.2f} at the start" in text
    both = f"tracks within {ours[0][0]:.1f}% falling and {ours[1][0]:.1f}% rising"
    for doc in ("README.md", "docs/theory.md"):
        assert both in " ".join((ROOT / doc).read_text().split()), doc


def test_larger_sets_tracking_quoted_in_the_guide_is_the_saved_one():
    """docs/llm.md's table-7 bullet and README quote the held-out and control-set tracking errors of the runs with
    800 control prompts and the whole held-out split as the probe, their seconds per step and their prediction's
    correlation with <grad H_C, dtheta>; and the claims hold for them: with both sets larger, three of the four
    runs' held-out entropy is within the issue's 5% of the range over the whole run, seed 1's falling run (9.3%
    with table 6's 400-prompt sets) among them, and the fourth's miss comes with its control set's own."""
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    held, control, seconds = {}, {}, {}
    for arg in BIG800_RUNS:
        label, spec, rows = gen["_run"](arg.format(data=ROOT / "docs" / "data"))
        col = gen["column"](rows, spec)
        key = (label[-1], spec.endswith("+0.15"))  # (seed, rising)
        held[key] = float(col["held-out (probe) entropy vs schedule: RMS / mean |error|, % of range"].split("%")[0])
        control[key] = float(col["control-set entropy vs schedule: RMS, % of range"].rstrip("%"))
        seconds[key] = col["seconds per step"]
    order = [("0", False), ("1", False), ("0", True), ("1", True)]
    quoted = ("held-out entropy within {:.1f}% / {:.1f}% falling (seeds 0 / 1) and {:.1f}% / {:.1f}% rising"
              .format(*(held[k] for k in order)))
    assert quoted in text, quoted
    assert quoted in readme, quoted
    assert "(control set {:.1f}% / {:.1f}% and {:.1f}% / {:.1f}%)".format(*(control[k] for k in order)) in text
    assert "at {} / {} and {} / {} s per step".format(*(seconds[k] for k in order)) in text
    # the claims: three of four within 5% (seed 1's falling run among them, 9.3% in table 6); the fourth misses
    # because its control set itself lagged the schedule (the controller's own miss, not the sets')
    assert all(held[k] < 5 for k in order[:3]) and held[order[3]] > 5
    assert control[order[3]] > 3 * max(control[k] for k in order[:3])

    corr = [before_vs_after(gen, n) for n in ("big800_one", "big800_one_seed1", "big800_one_rising",
                                              "big800_one_rising_seed1")]
    assert "`<grad Hbar_C, dtheta>` {:.2f} / {:.2f} falling and {:.2f} / {:.2f} rising".format(*corr) in text


def test_rising_seed1_lag_diagnosis_quoted_in_the_guide_is_the_saved_one():
    """docs/llm.md's account of table 7's rising seed-1 lag: each number it quotes is read back from the saved
    metrics (the runs clipped at norm 1, llm.train's default): the step-4 clip factor expected from step 3's norm
    against the one applied, the calibration factor's fall and ranges, the step-5 and steps 6-9 numbers, and how
    often the one-backward clip factor was off by 2x or more on each rising run."""
    import json

    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())

    def rows(name):
        return [json.loads(line) for line in (ROOT / "docs" / "data" / f"llm_control_{name}_metrics.jsonl").open()]

    def applied(r):
        return min(1.0, 1.0 / (r["grad_norm"] + 1e-6))

    s1, s0 = rows("big800_one_rising_seed1"), rows("big800_one_rising")
    r3, r4, r5 = s1[3], s1[4], s1[5]
    assert f"taken from step 3's gradient norm ({r3['grad_norm']:.2f}, one group with signal), was 1" in text
    assert r3["signal_fraction"] == 1 / 8 and r4["predicted_clip_factor"] == pytest.approx(applied(r3))
    assert applied(r3) == 1.0
    assert f"The update's norm was {r4['grad_norm']:.2f}, so the clip applied {applied(r4):.2f}." in text
    assert (f"The plan expected {r4['calibrated_predicted_change']:+.3f} nats (calibrated) and the set rose "
            f"{r4['reckoned_entropy_change']:.3f}.") in text
    assert (r4["calibrated_predicted_change"] / r4["reckoned_entropy_change"]) == pytest.approx(3.6, abs=0.05)
    band1 = [r["calibration_factor"] for r in s1[5:17]]
    band0 = [r["calibration_factor"] for r in s0[5:17]]
    assert (f"Its factor fell from {r4['calibration_factor']:.2f} to {r5['calibration_factor']:.2f} and stayed at "
            f"{min(band1):.2f}-{max(band1):.2f} up to step 16; seed 0's stayed at {min(band0):.2f}-{max(band0):.2f}"
            ) in text
    # target_entropy is the target of the step after the update
    ahead = r5["control_entropy"] - r5["target_entropy"]
    assert f"had already reached the next step's target ({ahead:+.4f} nats)" in text
    assert round(r5["predicted_drift"], 3) == 0.006 and round(r5["desired_change"], 3) == -0.006
    assert round(r5["reckoned_entropy_change"], 3) == -0.006
    steps = s1[6:10]
    assert steps[0].get("skipped") and steps[0]["signal_fraction"] == 0
    assert steps[2]["signal_fraction"] == steps[3]["signal_fraction"] == 1 / 8
    assert (f"expected at {steps[1]['predicted_clip_factor']:.2f} and applied at {applied(steps[1]):.2f}") in text
    planned = [r["calibrated_predicted_change"] for r in steps]
    asked = [r["desired_change"] for r in steps]
    moved = [r["reckoned_entropy_change"] for r in steps[1:]]
    assert (f"The plans expected {min(planned):+.3f} to {max(planned):+.3f} nats, short of the "
            f"{min(asked):.3f}-{max(asked):.3f} asked, and the set moved {min(moved):+.4f} to {max(moved):+.4f}"
            ) in text
    assert all(p < a for p, a in zip(planned, asked))

    def off(run):
        trained = [r for r in run if r.get("grad_norm")]
        ratios = [r["predicted_clip_factor"] / applied(r) for r in trained]
        return sum(x >= 2 or x <= 0.5 for x in ratios), len(trained)

    assert "off by a factor of 2 or more at {} of {} trained steps ({} of {} on seed 0's rising run)".format(
        *off(s1), *off(s0)) in text


def test_clip_corrected_rising_runs_quoted_in_the_guide_are_the_saved_ones():
    """docs/llm.md's table-8 bullet quotes the clip-corrected rising runs' held-out and control-set errors (whole
    run and from step 10) beside table 7's, the calibration factor's ranges and seed 1's largest control-set
    errors; and its claims hold: every error is smaller than table 7's, seed 1's whole-run held-out error is
    still above 5%, and the calibration factor moves over a narrower range."""
    import json
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_control_table.py"))
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    data = ROOT / "docs" / "data"
    held, held10, control, factors, seconds = {}, {}, {}, {}, {}
    for new, old in zip(BIG800CC_RUNS[2:], BIG800_RUNS[2:]):
        for key, arg in (("new", new), ("old", old)):
            label, spec, rows = gen["_run"](arg.format(data=data))
            col = gen["column"](rows, spec)
            seed = label[-1]
            held[key, seed] = float(col["held-out (probe) entropy vs schedule: RMS / mean |error|, % of range"]
                                    .split("%")[0])
            late = col["from step 10: held-out / control-set entropy vs schedule, RMS, % of range"]
            held10[key, seed] = float(late.split("%")[0])
            control[key, seed] = float(col["control-set entropy vs schedule: RMS, % of range"].rstrip("%"))
            seconds[key, seed] = col["seconds per step"]
            cfs = [r["calibration_factor"] for r in rows if "control_entropy" in r][1:]
            factors[key, seed] = (min(cfs), max(cfs))
    for name, values in (("Held-out error", held), ("From step 10 on it is", held10),
                         ("The control set's error is", control)):
        quoted = "{} {:.1f}% / {:.1f}%".format(name, values["new", "0"], values["new", "1"])
        assert quoted in text, quoted
        assert "against {:.1f}% / {:.1f}%".format(values["old", "0"], values["old", "1"]) in text
        assert all(values["new", k] < values["old", k] for k in "01")
    assert held["new", "1"] > 5  # still a miss
    falling = {}
    for arg in BIG800CC_RUNS[:2] + BIG800_RUNS[:2]:
        label, spec, rows = gen["_run"](arg.format(data=data))
        col = gen["column"](rows, spec)
        cfs = [r["calibration_factor"] for r in rows if "control_entropy" in r][1:]
        falling[label[0], label[-1]] = (
            float(col["held-out (probe) entropy vs schedule: RMS / mean |error|, % of range"].split("%")[0]),
            float(col["control-set entropy vs schedule: RMS, % of range"].rstrip("%")), min(cfs), max(cfs),
            col["held-out minus control-set entropy at the same weights, first -> last probe (nats)"],
            col["seconds per step"])
    new0, new1, old0, old1 = (falling[k] for k in (("c", "0"), ("c", "1"), ("8", "0"), ("8", "1")))
    quoted = [f"{x[0]:.1f}%" for x in (new0, new1, old0, old1)]
    assert "keeps both runs within the target: {} / {}, against {} / {} in table 7".format(*quoted) in text
    assert new0[0] < 5 and new1[0] < 5
    sets = [f"{x[1]:.1f}%" for x in (new0, new1, old0, old1)]
    assert "track within {} / {} (table 7: {} / {})".format(*sets) in text
    assert ("at {:.2f}-{:.2f} / {:.2f}-{:.2f} after the first step (table 7: {:.2f}-{:.2f} / {:.2f}-{:.2f})"
            .format(*new0[2:4], *new1[2:4], *old0[2:4], *old1[2:4])) in text
    first, last = new1[4].split(" -> ")
    assert f"went from {float(first):.3f} to {float(last):.3f} nats" in text
    assert new1[1] < old1[1] and new1[0] > old1[0]  # the set tracked closer, the held-out entropy did not
    assert f"at {new0[5]} / {new1[5]} s per step" in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "the rising runs track within {:.1f}% / {:.1f}%".format(held["new", "0"], held["new", "1"]) in readme
    assert ("stays at {:.2f}-{:.2f} / {:.2f}-{:.2f} after the first step. In table 7 it swung over "
            "{:.2f}-{:.2f} / {:.2f}-{:.2f}").format(*factors["new", "0"], *factors["new", "1"],
                                                    *factors["old", "0"], *factors["old", "1"]) in text
    assert all(factors["new", k][1] - factors["new", k][0] < factors["old", k][1] - factors["old", k][0]
               for k in "01")
    assert "{} / {} s per step on the shared clock".format(seconds["new", "0"], seconds["new", "1"]) in text

    def errors(name):  # control-set entropy minus the schedule at the step it was measured
        rows = [json.loads(line) for line in (data / f"llm_control_{name}_metrics.jsonl").open()]
        one_step = rows[0]["target_entropy"] - rows[0]["control_entropy"]  # target_entropy is the next step's
        return {r["step"]: r["control_entropy"] - r["target_entropy"] + one_step
                for r in rows if "control_entropy" in r}

    new, old = errors("big800cc_rising_seed1"), errors("big800_one_rising_seed1")
    behind, ahead = min(new, key=new.get), max(new, key=new.get)
    lag_before = -min(old.values())
    assert f"fell behind by at most {-new[behind]:.3f} nats, at step {behind} (table 7: {lag_before:.3f})" in text
    assert f"by up to {new[ahead]:.3f} nats at step {ahead}" in text
    ratio = {}
    for line in (data / "llm_control_big800cc_rising_seed1_metrics.jsonl").open():
        r = json.loads(line)
        if r.get("realised_clip_factor"):
            ratio[r["step"]] = r["realised_clip_factor"] / r["predicted_clip_factor"]
    assert f"At steps 2 and 3 the clip applied {ratio[2]:.1f}x and {ratio[3]:.1f}x the factor" in text


def test_clip_factor_errors_quoted_in_the_theory_are_the_saved_runs():
    """docs/theory.md §5.2c: over the one-backward runs of docs/llm.md tables 6 and 7 (clip at norm 1), the clip
    factor from the last step's gradient norm is off by a factor of 2 or more in 40% of the steps, and the
    geometric mean of the last 5 norms does no better (log-RMS error 0.75 against 0.85)."""
    import json
    import math

    text = " ".join((ROOT / "docs" / "theory.md").read_text().split())

    def factor(norm):
        return min(1.0, 1.0 / (norm + 1e-6))

    last, mean5 = [], []
    names = ["big_one", "big_one_rising", "big800_one", "big800_one_seed1", "big800_one_rising",
             "big800_one_rising_seed1"]
    for name in names:
        rows = [json.loads(line) for line in (ROOT / "docs" / "data" / f"llm_control_{name}_metrics.jsonl").open()]
        norms = [r["grad_norm"] for r in rows if r.get("grad_norm")]
        for i in range(1, len(norms)):
            real = factor(norms[i])
            last.append(math.log(factor(norms[i - 1]) / real))
            mean5.append(math.log(factor(math.exp(sum(math.log(x) for x in norms[max(0, i - 5):i])
                                                  / len(norms[max(0, i - 5):i]))) / real))

    def rms(xs):
        return math.sqrt(sum(x * x for x in xs) / len(xs))

    share = sum(abs(x) >= math.log(2) for x in last) / len(last)
    assert (f"a factor of 2 or more in {100 * share:.0f}% of the one-backward steps of docs/llm.md tables 6 and 7 "
            f"({len(last)} steps)") in text
    assert f"(log-RMS error {rms(mean5):.2f} against {rms(last):.2f})" in text


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

    # the control set is read before each update, so the run's last line has none: it is scored against the
    # run's horizon (10 steps; gen_control_table.column passes it), not a schedule squeezed into 9 steps
    trained = [{"step": t, "control_entropy": sched(t)} for t in range(10)]
    on_horizon = gen["tracking"](trained, "linear:0.9->0.7", key="control_entropy", steps=10)
    assert on_horizon["rms"] == pytest.approx(0.0, abs=1e-9)
    assert gen["tracking"](trained, "linear:0.9->0.7", key="control_entropy")["rms"] > 1.0


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


def test_set_drift_visits_and_schedule_change_follow_the_trainer():
    """docs/gen_set_drift.py counts the training batches that drew each problem as llm.train draws them (every
    draw lands on an enumerated problem, the counts follow the per-step seeds), and a relative schedule's change
    does not depend on where it is anchored."""
    import random
    import runpy
    from types import SimpleNamespace

    from llm.tasks import ArithmeticTask
    from llm.train import derive_seed

    gen = runpy.run_path(str(ROOT / "docs" / "gen_set_drift.py"))
    task = ArithmeticTask(0, 14)
    train = gen["every_problem"](task, False)
    cfg = SimpleNamespace(seed=3, prompts_per_step=8)
    visits = gen["training_visits"](task, cfg, 5, train)
    assert sum(visits) == 5 * 8
    drawn = [p.prompt for step in range(5) for p in task.train_batch(8, random.Random(derive_seed(3, "data", step)))]
    assert visits == [drawn.count(p.prompt) for p in train]
    assert visits != gen["training_visits"](task, SimpleNamespace(seed=4, prompts_per_step=8), 5, train)
    assert abs(gen["schedule_change"]("linear:H0->H0-0.2", 50, 25) + 0.1) < 1e-12
    assert abs(gen["schedule_change"]("linear:H0->H0+0.15", 30, 30) - 0.15) < 1e-12


def test_paired_visit_effect_recovers_a_known_slope():
    """The paired regression of docs/gen_set_drift.py recovers a planted per-visit effect (within 4 of its own
    standard errors) under a per-problem effect 30x larger that the pairing cancels, agrees with numpy's
    least-squares fit, and refuses visit counts that never differ."""
    import runpy

    import numpy as np
    import pytest

    gen = runpy.run_path(str(ROOT / "docs" / "gen_set_drift.py"))
    rng = np.random.default_rng(0)
    own = rng.normal(0.0, 0.2, 200)
    va, vb = rng.poisson(2.2, 200), rng.poisson(2.2, 200)
    for slope in (-0.006, 0.0):
        ca = own + slope * va + rng.normal(0.0, 0.01, 200) - 0.02
        cb = own + slope * vb + rng.normal(0.0, 0.01, 200)
        fit = gen["paired_visit_effect"](ca.tolist(), cb.tolist(), va.tolist(), vb.tolist())
        assert abs(fit["per_visit"] - slope) < 4 * fit["standard_error"] < 0.004
        np_slope, np_intercept = np.polyfit(va - vb, ca - cb, 1)
        assert fit["per_visit"] == pytest.approx(np_slope, abs=1e-12)
        assert fit["intercept"] == pytest.approx(np_intercept, abs=1e-12)
    with pytest.raises(ValueError, match="visit counts differ"):
        gen["paired_visit_effect"]([0.1, 0.2, 0.3], [0.0, 0.1, 0.1], [1, 2, 3], [0, 1, 2])


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


def test_held_out_resolution_numbers_quoted_in_the_theory_are_the_saved_ones():
    """docs/theory.md §5.6b "What the held-out probe can resolve" quotes what docs/gen_set_drift.py saved: the
    per-problem change correlations, the paired visit effects, the held-out set's standard errors and the end-of-run
    error budgets; the claims drawn from them hold (the effect of being trained on is negative and over 2 standard
    errors from zero, the held-out standard error exceeds the 5% target's end allowance, the budgets add up). The
    saved cross-run file is what :func:`across_runs` computes from the saved runs, and each set's standard error,
    scaled to k of the 179 training problems, matches the spread of random k-problem sets drawn from them."""
    import json
    import runpy

    gen = runpy.run_path(str(ROOT / "docs" / "gen_set_drift.py"))
    runs = json.loads((ROOT / "docs" / "data" / "fixed_set_drift.json").read_text())
    across = json.loads((ROOT / "docs" / "data" / "fixed_set_across_runs.json").read_text())
    assert gen["across_runs"](runs) == across
    saved = {r["run"]: r for r in runs}
    text = " ".join((ROOT / "docs" / "theory.md").read_text().split())

    def span(values):
        return f"{min(values):.2f}-{max(values):.2f}"

    same, other = [], []
    for pair in across["pairs"]:
        a, b = (saved[r] for r in pair["runs"])
        corr = pair["per_prompt_change_correlation"]
        if a["updates"] == b["updates"] == 50 and a["seed"] != b["seed"]:
            same.append(corr)
        elif {a["schedule"], b["schedule"]} == {"linear:H0->H0-0.2", "linear:H0->H0+0.15"} and \
                a["updates"] + b["updates"] == 80:
            other.append(corr)
    assert len(same) == 4 and len(other) == 4
    for group in (same, other):
        for key in ("training population", "held-out population"):
            assert span([c[key] for c in group]) in text, (key, span([c[key] for c in group]))
    effects = {tuple(e["runs"]): e for e in across["visit_effects"]}
    for pair in (("rel-cheap", "rel-cheap-s1"), ("rel-d128-s0", "rel-d128-s1")):
        e = effects[pair]
        assert f"{e['per_visit']:.4f} ± {e['standard_error']:.4f}" in text, pair
        assert e["per_visit"] < -2 * e["standard_error"]
        assert f"{e['mean_visits'][0]:.2f} draws per problem" in text
    ends = sorted(-effects[p]["per_visit"] * effects[p]["mean_visits"][0]
                  for p in (("rel-cheap", "rel-cheap-s1"), ("rel-d128-s0", "rel-d128-s1")))
    assert f"about {ends[0]:.3f}-{ends[1]:.3f} nats below" in text
    se = {run: r["sets"]["held-out population"]["change_standard_error"] for run, r in saved.items()}
    assert f"{se['rel-d128-s1-step10']:.3f}, {se['rel-d128-s1-step20']:.3f} and {se['rel-d128-s1']:.3f} nats" in text
    falling = [se[r] for r in ("rel-cheap", "rel-cheap-s1", "rel-d128-s0", "rel-d128-s1")]
    assert f"({min(falling):.3f}-{max(falling):.3f} at the end of each falling run, {se['rel-d128-rising']:.3f}" in text
    allow_falling, allow_rising = 0.05 * 0.2 * 3 ** 0.5, 0.05 * 0.15 * 3 ** 0.5  # RMS of a linear drift D is D/sqrt(3)
    assert f"{allow_falling:.3f} nats at the end" in text and f"{allow_rising:.3f} on the 0.15-nat" in text
    assert min(falling) > allow_falling and se["rel-d128-rising"] > allow_rising
    assert all(0.5 < allow / s < 0.7 for allow, s in [(allow_falling, f) for f in falling]
               + [(allow_rising, se["rel-d128-rising"])])  # "within about 0.6 standard errors"
    spread = [s * 46 ** 0.5 for s in falling]
    assert all(abs(x - 0.18) < 0.01 for x in spread)  # "about 0.18 nats"
    needed = [46 * (s / (allow_falling / 2)) ** 2 for s in falling]
    assert all(400 < n < 500 for n in needed)  # "about 450 problems"
    for run, label in (("rel-d128-s0", "seed 0"), ("rel-d128-s1", "seed 1"), ("rel-d128-rising", "rising")):
        budget = saved[run]["end_error_budget"]
        terms = [budget[k] for k in ("control minus schedule", "training population minus control",
                                     "held-out population minus training population",
                                     "probe minus held-out population")]
        assert abs(sum(terms) - budget["probe minus schedule"]) < 1e-12
        quoted = f"{', '.join(f'{t:+.3f}' for t in terms)} ({budget['probe minus schedule']:+.3f}, {label})"
        assert quoted in text, quoted
    for r in runs:  # the ratio estimator's standard error against the Monte Carlo spread of random distinct sets
        pop = r["sets"]["training population"]
        scaled = pop["change_standard_error"] * ((pop["prompts"] - 64) / 64) ** 0.5
        assert abs(scaled / r["random_control_sets"]["64 x 4"]["standard_deviation"] - 1) < 0.1, r["run"]


def test_held_out_resolution_numbers_quoted_in_the_guide_and_readme_are_the_saved_ones():
    """docs/llm.md's "out of reach" bullet and the README quote the saved visit effects, the held-out standard
    errors and table 5's end-of-run errors with the controller's own part of them."""
    import json

    runs = {r["run"]: r for r in json.loads((ROOT / "docs" / "data" / "fixed_set_drift.json").read_text())}
    across = json.loads((ROOT / "docs" / "data" / "fixed_set_across_runs.json").read_text())
    guide = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    readme = " ".join((ROOT / "README.md").read_text().split())
    effects = {tuple(e["runs"]): e for e in across["visit_effects"]}
    pairs = (("rel-cheap", "rel-cheap-s1"), ("rel-d128-s0", "rel-d128-s1"))
    quoted = " and ".join(f"{effects[p]['per_visit']:.4f} ± {effects[p]['standard_error']:.4f}" for p in pairs)
    assert quoted in guide, quoted
    rounded = sorted(f"{effects[p]['per_visit']:.3f}" for p in pairs)
    assert f"({rounded[1]} to {rounded[0]} nats each time a training batch drew a problem" in readme
    se = runs["rel-d128-s1"]["sets"]["held-out population"]["change_standard_error"]
    assert f"standard error of {se:.3f} nats at the end of a falling run" in guide
    assert f"({runs['rel-d128-rising']['sets']['held-out population']['change_standard_error']:.3f} rising)" in guide
    assert f"about {se:.3f} nats at the end of a falling run" in readme
    table5 = ("rel-d128-s0", "rel-d128-s1", "rel-d128-rising")
    ends = ", ".join(f"{runs[r]['end_error_budget']['probe minus schedule']:+.3f}" for r in table5)
    misses = ", ".join(f"{runs[r]['end_error_budget']['control minus schedule']:+.3f}" for r in table5)
    assert f"({ends} nats), the controller's own miss on its set is {misses}" in guide, (ends, misses)


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


def test_big_task_set_drift_quoted_in_the_guide_is_the_saved_one():
    """docs/llm.md's seed-1 bullet quotes the end-of-run error budget of both big-task falling runs that
    docs/gen_set_drift.py saved, the spread of random control sets and the probe's standard error, and its claims
    hold for them: each budget adds up to the probe's error, the controller's own miss is below 0.001 nats, and
    seed 1's probe part is more than one standard error where seed 0's is not."""
    import json

    runs = {r["run"]: r for r in json.loads((ROOT / "docs" / "data" / "fixed_set_drift_big.json").read_text())}
    text = " ".join((ROOT / "docs" / "llm.md").read_text().split())
    s0, s1 = runs["big-reckon"], runs["big-reckon-s1"]
    terms = ("control minus schedule", "training population minus control",
             "held-out population minus training population", "probe minus held-out population")
    for run in (s0, s1):
        budget = run["end_error_budget"]
        assert sum(budget[t] for t in terms) == pytest.approx(budget["probe minus schedule"], abs=1e-9)
        assert abs(budget["control minus schedule"]) < 1e-3
    for term in terms:
        quoted = f"{s0['end_error_budget'][term]:+.4f} / {s1['end_error_budget'][term]:+.4f}".replace("+", "")
        assert quoted in text.replace("+", ""), term
    assert (f"in all {s0['end_error_budget']['probe minus schedule']:.4f} / "
            f"{s1['end_error_budget']['probe minus schedule']:.4f}") in text
    spread = [r["random_control_sets"]["128 x 1"]["standard_deviation"] for r in (s0, s1)]
    assert f"by {spread[0]:.3f} / {spread[1]:.3f} nats (standard deviation over draws)" in text
    se = [r["sets"]["probe"]["change_standard_error"] for r in (s0, s1)]
    assert f"a standard error of {se[0]:.3f} / {se[1]:.3f} nats" in text
    ratio = [r["end_error_budget"]["probe minus held-out population"] / r["sets"]["probe"]["change_standard_error"]
             for r in (s0, s1)]
    assert abs(ratio[0]) < 1 < abs(ratio[1]) and f"({abs(ratio[1]):.1f} standard errors)" in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"the 400-prompt probe {abs(ratio[1]):.1f} standard errors off the whole held-out population" in readme
    ends = [r["sets"]["held-out population"]["change"] - r["schedule_change"] for r in (s0, s1)]
    assert all(e < 0 for e in ends)
    assert (f"ended {abs(ends[0]):.3f} / {abs(ends[1]):.3f} nats below the schedule ({abs(ends[0]) / 0.2:.0%} / "
            f"{abs(ends[1]) / 0.2:.0%} of its range)") in text
