"""Cost of ``llm.train --predictor param`` (docs/theory.md §5.5) as a share of its training step.

Two trainers of the same configuration, side by side in one process, steps interleaved (param, logit,
param, ...; two warm-up steps each, then the timed ones):

* ``--predictor param``: the parameter-space contributions before the update (a forward and backward for
  ``grad Hbar``, under AdamW a second backward for the reference gradient, the optimiser's step direction,
  two no-grad forwards for the central difference);
* ``--predictor param --control-prompts 32``: the same with the gradient of a fixed control set's entropy
  (its forward and backward; the batch's forward is then needed only for AdamW's reference gradient and
  the centre of the difference) in place of the batch's, and one more no-grad forward of the set after
  the update (its measured change, in the measure phase);
* ``--predictor logit``: the per-position contributions, which cost nothing beyond the token statistics.

Configuration: the ``cpu-demo`` preset (the embedded SmolLM2-135M in float32, 8 prompts x 8 samples, at most 4
new tokens, AdamW) without evaluation, probe, checkpoints or figures; the smoke mode
(``ENTROCRAFT_BENCH_SMOKE=1``) uses the ``smoke`` preset (a tiny random Llama) for a few steps.

Recorded (medians over the timed steps): the predictor phase's share of the param trainer's step
(``time_predictor / time_step``, the trainer's own phase clock), the whole param step over the whole logit step,
and the predictor over the rest of the param step; the first two also for the control-set trainer. Run:
``python -m pytest benchmarks/bench_llm_param_predictor.py --benchmark-only -q -s`` (about 5 minutes).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from common import SMOKE, record_ratio

pytest.importorskip("transformers")

WARMUP_STEPS, TIMED_STEPS = (1, 2) if SMOKE else (2, 4)


def make_trainer(predictor: str, out_dir):
    from llm.config import PRESETS, TrainConfig
    from llm.train import Trainer

    options = dict(PRESETS["smoke" if SMOKE else "cpu-demo"])
    if predictor == "control":
        options.update(control_prompts=4 if SMOKE else 32)
    options.update(predictor="logit" if predictor == "logit" else "param", method="entrocraft-predictive",
                   schedule="linear:0.85->0.65",
                   steps=WARMUP_STEPS + TIMED_STEPS, eval_every=0, probe_every=0, checkpoint_every=0, plot=False,
                   progress=False, tensorboard=False, output_dir=str(out_dir))
    return Trainer(TrainConfig(**options), out_dir)


def test_param_predictor_share_of_a_step(benchmark, tmp_path):
    threads = torch.get_num_threads()
    trainers = {name: make_trainer(name, tmp_path / name) for name in ("param", "control", "logit")}
    rows: dict[str, list[dict]] = {name: [] for name in trainers}

    def run() -> None:
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            for name, trainer in trainers.items():
                row = trainer.train_step(step)
                assert torch.get_num_threads() == threads
                if step >= WARMUP_STEPS:
                    rows[name].append(row)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    step = {name: statistics.median(r["time_step"] for r in rs) for name, rs in rows.items()}
    predictor = statistics.median(r["time_predictor"] for r in rows["param"])
    share = statistics.median(r["time_predictor"] / r["time_step"] for r in rows["param"])
    size = "cpu-demo (SmolLM2-135M fp32, 8x8 samples, <= 4 tokens)" if not SMOKE else "smoke model"
    record_ratio("llm.train --predictor param: predictor / its step", share,
                 "time of the predictor phase / the whole step (median)", size)
    record_ratio("llm.train --predictor param vs logit: whole step", step["param"] / step["logit"],
                 "param step time / logit step time (medians, interleaved)", size)
    rest = step["param"] - predictor
    record_ratio("llm.train --predictor param: predictor / the rest of its step", predictor / rest,
                 "predictor time / (step - predictor) (medians)", size)
    control_share = statistics.median(r["time_predictor"] / r["time_step"] for r in rows["control"])
    record_ratio("llm.train --predictor param --control-prompts: predictor / its step", control_share,
                 "time of the predictor phase / the whole step (median)", size)
    record_ratio("llm.train --predictor param --control-prompts vs logit: whole step",
                 step["control"] / step["logit"], "control-set step time / logit step time (medians, interleaved)",
                 size)
    benchmark.extra_info.update(step_param_s=step["param"], step_logit_s=step["logit"], predictor_s=predictor,
                                share=share, step_control_s=step["control"], control_share=control_share)
    print(f"\n--predictor param: step {step['param']:.2f} s (predictor {predictor:.2f} s, {share:.0%} of the step); "
          f"with a control set: step {step['control']:.2f} s ({control_share:.0%}); "
          f"--predictor logit: step {step['logit']:.2f} s")
    assert all(r.get("predicted_entropy_change") is not None for r in rows["param"])
    assert all("control_entropy" in r for r in rows["control"])
    assert 0 < share < 1
