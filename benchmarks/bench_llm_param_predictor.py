"""Cost of ``llm.train --predictor param`` (docs/theory.md §5.5) as a share of its training step.

Trainers of the same configuration in three groups run one after the other, each group in one process with its
own ``--predictor logit`` trainer and its steps interleaved (unfused, param, control, logit, unfused, ...; then
reckoning, one-backward, logit, reckoning, ...; then one-backward and logit on docs/llm.md table 6's task and
control set; two warm-up steps each, then the timed ones). Six at once do not fit in 24 GiB: each holds a 135M
model, AdamW's moments and the predictor's model-sized buffers.

* ``--predictor param --no-fused-update --param-derivative fd`` (``unfused``): the parameter-space contributions
  before the update, as a separate phase: a forward and a backward for ``grad Hbar``, a second backward for
  AdamW's reference gradient, the optimiser's step direction, two no-grad forwards for the central difference;
  the update then runs its own forward and backward;
* ``--predictor param --param-derivative forward`` (``param``): the update reuses the predictor's forward and
  whole-batch gradient and back-propagates only the rejected samples' correction (``--fused-update``), and the
  tangent is a one-sided difference (one no-grad forward against the logits of that forward);
* the same with ``--control-prompts 32 --control-gradient-every 4`` (``control``): the gradient of a fixed
  control set's entropy, taken every 4 steps (its forward and backward), and the set's entropy measured after
  each update (a no-grad forward);
* the same with ``--control-reckoning`` (``reckoning``): the control set is evaluated only at the gradient
  refreshes; after the other updates its entropy is advanced by the step's first-order change;
* the same with ``--one-backward`` (``one-backward``, after ``--adam-warm-start 4``, which it needs and which
  changes no step's cost): the update's forward runs before the selection and serves as the tangent's base, and
  the plan's loss is back-propagated through it once; AdamW's map holds ``vhat`` fixed, so there is no
  whole-batch gradient and no correction pass;
* ``--predictor logit``: the per-position contributions, which cost nothing beyond the token statistics;
* the group ``table-6``: ``one-backward`` and ``logit`` on the addition of 0-49 (``--arith-high 49``) with a
  control set of 400 prompts x 1 response, the configuration of docs/llm.md table 6, whose gradient refresh
  (a forward and backward of the 400 prompts every 4 steps) costs several of the cpu-demo set's.

Configuration: the ``cpu-demo`` preset (the embedded SmolLM2-135M in float32, 8 prompts x 8 samples, at most 4
new tokens, AdamW) without evaluation, probe, checkpoints or figures; the smoke mode
(``ENTROCRAFT_BENCH_SMOKE=1``) uses the ``smoke`` preset (a tiny random Llama) for a few steps.

Recorded (means over the timed steps, a whole number of control-gradient periods): the predictor phase's share
of each param trainer's step (``time_predictor / time_step``, the trainer's own phase clock, which books the
update's forward and whole-batch backward, done early for the update, to the update), and the extra time of
each param step over the logit step as a share of the param step, ``(t_param - t_logit) / t_param``: what the
parameter-space contributions cost, whatever phase pays it. Run:
``python -m pytest benchmarks/bench_llm_param_predictor.py --benchmark-only -q -s`` (about 20 minutes).
"""

from __future__ import annotations

import gc
import statistics

import pytest
import torch
from common import SMOKE, record_ratio

pytest.importorskip("transformers")

WARMUP_STEPS, TIMED_STEPS = (1, 2) if SMOKE else (2, 8)
CONTROL_GRADIENT_EVERY = 2 if SMOKE else 4  # divides TIMED_STEPS: every period timed whole


def make_trainer(predictor: str, out_dir, extra: dict | None = None):
    from llm.config import PRESETS, TrainConfig
    from llm.train import Trainer

    options = dict(PRESETS["smoke" if SMOKE else "cpu-demo"])
    if predictor == "one-backward":
        options.update(one_backward=True, adam_warm_start=2 if SMOKE else 4)
    if predictor in ("control", "reckoning", "one-backward"):
        options.update(control_reckoning=predictor != "control",
                       control_prompts=4 if SMOKE else 32, control_gradient_every=CONTROL_GRADIENT_EVERY)
    if predictor == "unfused":
        options.update(fused_update=False, param_derivative="fd")
    elif predictor != "logit":
        options.update(param_derivative="forward")
    options.update(predictor="logit" if predictor == "logit" else "param", method="entrocraft-predictive",
                   schedule="linear:0.85->0.65",
                   steps=WARMUP_STEPS + TIMED_STEPS, eval_every=0, probe_every=0, checkpoint_every=0, plot=False,
                   progress=False, tensorboard=False, output_dir=str(out_dir))
    # the group's task for every trainer, its control set for the param ones
    options.update({k: v for k, v in (extra or {}).items() if predictor != "logit" or not k.startswith("control")})
    trainer = Trainer(TrainConfig(**options), out_dir)
    if trainer.cfg.adam_warm_start:
        trainer.warm_start_optimizer()
    return trainer


LABELS = {
    "unfused": "llm.train --predictor param --no-fused-update (central difference)",
    "param": "llm.train --predictor param (fused update, one-sided difference)",
    "control": f"llm.train --predictor param --control-prompts (fused, one-sided, gradient every "
               f"{CONTROL_GRADIENT_EVERY} steps)",
    "reckoning": f"llm.train --predictor param --control-prompts --control-reckoning (fused, one-sided, gradient "
                 f"every {CONTROL_GRADIENT_EVERY} steps)",
    "one-backward": f"llm.train --predictor param --control-prompts --control-reckoning --one-backward (one-sided, "
                    f"gradient every {CONTROL_GRADIENT_EVERY} steps)",
}
# groups, each timed against its own interleaved logit trainer: six 135M trainers with AdamW and the
# predictor's model-sized buffers do not fit in 24 GiB at once. "table-6": docs/llm.md table 6's task (addition
# of 0-49) and control set (400 prompts x 1 response), whose refreshes cost more than the cpu-demo set's 32 x 2
TABLE_6 = (dict(arith_high=4, control_prompts=8, control_samples=1) if SMOKE else
           dict(arith_high=49, control_prompts=400, control_samples=1))
GROUPS = {"whole-batch": (("unfused", "param", "control", "logit"), {}),
          "reckoned": (("reckoning", "one-backward", "logit"), {}),
          "table-6": (("one-backward", "logit"), TABLE_6)}


@pytest.mark.parametrize("group", list(GROUPS))
def test_param_predictor_share_of_a_step(benchmark, tmp_path, group):
    threads = torch.get_num_threads()
    names, extra = GROUPS[group]
    trainers = {name: make_trainer(name, tmp_path / name, extra) for name in names}
    rows: dict[str, list[dict]] = {name: [] for name in trainers}

    def run() -> None:
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            for name, trainer in trainers.items():
                row = trainer.train_step(step)
                assert torch.get_num_threads() == threads
                if step >= WARMUP_STEPS:
                    rows[name].append(row)

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    trainers.clear()  # the next group's trainers need the memory
    gc.collect()
    step = {name: statistics.mean(r["time_step"] for r in rs) for name, rs in rows.items()}
    param_names = [name for name in names if name != "logit"]
    predictor = {name: statistics.mean(r["time_predictor"] for r in rows[name]) for name in param_names}
    size = "cpu-demo (SmolLM2-135M fp32, 8x8 samples, <= 4 tokens)" if not SMOKE else "smoke model"
    for name in param_names:
        label = LABELS[name] + (f", table 6's task and {extra['control_prompts']} x {extra['control_samples']} "
                                f"control set" if extra else "")
        record_ratio(f"{label}: predictor / its step", predictor[name] / step[name],
                     "time of the predictor phase / the whole step (means)", size)
        record_ratio(f"{label}: extra over the logit step / its step", (step[name] - step["logit"]) / step[name],
                     "(param step - logit step) / param step (means, interleaved)", size)
        record_ratio(f"{label} vs logit: whole step", step[name] / step["logit"],
                     "param step time / logit step time (means, interleaved)", size)
    benchmark.extra_info.update(step_s=step, predictor_s=predictor)
    print(f"\n{group}: steps (s): {step}; predictor phases (s): {predictor}")
    if "param" in rows:
        assert all(r.get("predicted_entropy_change") is not None for r in rows["param"])
    controlled = [r for name in ("control", "reckoning", "one-backward") for r in rows.get(name, [])]
    assert all("control_entropy" in r for r in controlled)
    assert all("reckoned_entropy_change" in r for name in ("reckoning", "one-backward") for r in rows.get(name, [])
               if not r.get("skipped"))
    assert all(0 < predictor[n] < step[n] for n in predictor)
