"""End-to-end tests of ``python -m llm.train`` with the smoke preset (tiny random model, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from entrotheory.methods import METHODS  # noqa: E402
from llm import train as train_mod  # noqa: E402
from llm.errors import UserError  # noqa: E402
from llm.train import main  # noqa: E402

VOLATILE = ("time_", "tokens_per_s")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def run_cli(tmp_path: Path, name: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / name
    code = main(["--preset", "smoke", "--output-dir", str(out), *extra])
    return code, out


def test_full_train_step_end_to_end(tmp_path, capsys):
    code, out = run_cli(tmp_path, "run", "--steps", "2", "--method", "entrocraft-band",
                        "--schedule", "linear:1.5->1.0..linear:2.5->2.0", "--plot")
    assert code == 0, capsys.readouterr().err
    got = rows(out)
    assert [r["step"] for r in got] == [0, 1, 2] and got[-1]["final"] is True
    first = got[0]
    for key in ("step", "entropy", "target_entropy", "predicted_entropy_change", "measured_entropy_change",
                "reward_mean", "accepted_fraction", "pass_at_1", "pass_at_k", "tokens_per_s", "signal_fraction",
                "calibration_factor", "kl_old_new", "time_generate"):
        assert key in first, key
    assert first.get("skipped") is None and first["measured_entropy_change"] != 0.0
    assert 0.0 <= got[-1]["pass_at_1"] <= got[-1]["pass_at_k"] <= 1.0
    ckpt = out / "checkpoint"
    for f in ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.yaml"):
        assert (ckpt / f).exists(), f
    assert (out / "config.yaml").exists() and (out / "figure.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_measured"] >= 1
    assert "entropy_end=" in capsys.readouterr().out


def test_resume_reproduces_uninterrupted_run(tmp_path):
    args = ("--steps", "4", "--method", "entrocraft-predictive", "--schedule", "linear:2.0->1.5", "--eval-every", "2")
    code, full = run_cli(tmp_path, "full", *args)
    assert code == 0
    code, part = run_cli(tmp_path, "part", *args, "--stop-after", "2")
    assert code == 0
    assert [r["step"] for r in rows(part)] == [0, 1]
    assert main(["--resume", str(part)]) == 0
    a, b = rows(full), rows(part)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        assert stable(ra) == stable(rb), (ra["step"], stable(ra), stable(rb))
    from safetensors.torch import load_file

    wa, wb = load_file(full / "checkpoint" / "model.safetensors"), load_file(part / "checkpoint" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_runs(tmp_path, method):
    code, out = run_cli(tmp_path, method, "--steps", "2", "--method", method, "--eval-prompts", "0",
                        "--ppo-epochs", "2")
    assert code == 0
    got = [r for r in rows(out) if not r.get("final")]
    assert len(got) == 2
    assert all(0.0 <= r["accepted_fraction"] <= 1.0 for r in got)
    trained = [r for r in got if not r.get("skipped")]
    assert trained, "no step trained"
    for r in trained:  # a real update happened and was measured
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert math.isfinite(r["measured_entropy_change"]) and math.isfinite(r["predicted_entropy_change"])


def test_all_rejected_step_is_skipped(tmp_path):
    # raw advantages, every reward positive, band far above the entropy: only negatives would be kept
    code, out = run_cli(tmp_path, "rej", "--steps", "2", "--method", "entrocraft-band", "--estimator", "raw",
                        "--reward-wrong", "0.5", "--reward-correct", "1.0", "--schedule", "constant:8..constant:9",
                        "--eval-prompts", "0")
    assert code == 0
    got = [r for r in rows(out) if not r.get("final")]
    assert all(r["skipped"] == "all_rejected" and r["accepted_fraction"] == 0.0 for r in got)
    assert all(r["measured_entropy_change"] == 0.0 for r in got)


def test_nan_loss_is_skipped_then_stops(tmp_path, monkeypatch, capsys):
    def nan_mean(loss_tok, mask, normalizer=None):
        return (loss_tok * mask).sum() * float("nan")

    monkeypatch.setattr(train_mod, "masked_token_mean", nan_mean)
    code, out = run_cli(tmp_path, "nan", "--steps", "6", "--max-nan-steps", "2", "--eval-prompts", "0",
                        "--estimator", "raw")
    err = capsys.readouterr().err
    assert code == 2
    assert "NaN" in err and "checkpoint" in err and "Traceback" not in err
    got = rows(out)
    assert [r["skipped"] for r in got] == ["nan_loss", "nan_loss"]
    assert (out / "checkpoint" / "model.safetensors").exists()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--schedule", "linear:0.7->", "--method", "entrocraft-band"], "linear:0.7->"),
        (["--micro-batch-size", "7"], "micro_batch_size 7"),
        (["--steps", "ten"], "'ten'"),
        (["--method", "no-such-method"], "no-such-method"),
        (["--estimator", "magic"], "magic"),
        (["--task", "dataset"], "--dataset"),
        (["--dataset", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
        (["--config", "/no/such/config.yaml"], "/no/such/config.yaml"),
        (["--resume", "/no/such/run"], "/no/such/run"),
        (["--bogus-flag", "1"], "--bogus-flag"),
        (["--method", "vanilla", "--schedule", "linear:0.7->0.5"], "vanilla"),
        (["--pass-k", "9"], "pass_k 9"),
        # choices are checked when the config is made, before any model is loaded (the path is never read)
        (["--model", "/no/such/model", "--optimizer", "adam"], "optimizer must be one of adamw, sgd, got 'adam'"),
        (["--model", "/no/such/model", "--rule", "npg2"], "rule must be one of pg, npg, got 'npg2'"),
        (["--model", "/no/such/model", "--predictor", "params"], "predictor must be one of logit, param"),
        (["--model", "/no/such/model", "--task", "algebra"], "task must be one of arithmetic, countdown, dataset"),
        (["--model", "/no/such/model", "--method", "entrocraft-x"], "unknown method 'entrocraft-x'"),
        (["--method-options", "[1, 2]"], "method_options must be a mapping"),
        (["--calibration-factor", "-1"], "calibration_factor must be >= 0"),
    ],
)
def test_bad_input_one_line_errors(tmp_path, capsys, argv, needle):
    code = main(["--preset", "smoke", "--output-dir", str(tmp_path / "bad"), *argv])
    assert code == 2
    assert needle in one_line_error(capsys)


def test_malformed_dataset_lines(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = [json.dumps({"question": f"{i} + 1 =", "answer": f"#### {i + 1}"}) for i in range(12)]
    data.write_text("\n".join([good[0], "{not json", good[1], json.dumps({"question": "x"}), *good[2:]]) + "\n")
    code = main(["--preset", "smoke", "--output-dir", str(tmp_path / "strict"), "--dataset", str(data),
                 "--dataset-errors", "error"])
    assert code == 2
    assert "data.jsonl:2" in one_line_error(capsys)
    code = main(["--preset", "smoke", "--output-dir", str(tmp_path / "skip"), "--dataset", str(data),
                 "--steps", "1", "--eval-prompts", "2"])
    err = capsys.readouterr().err
    assert code == 0
    assert "data.jsonl:2" in err and "data.jsonl:4" in err


def test_existing_output_dir_is_refused(tmp_path, capsys):
    code, out = run_cli(tmp_path, "twice", "--steps", "1", "--eval-prompts", "0")
    assert code == 0
    code, _ = run_cli(tmp_path, "twice", "--steps", "1")
    assert code == 2 and "--resume" in one_line_error(capsys)


def test_config_file_and_flags(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 1\nsamples_per_prompt: 8\nmicro_batch_size: 8\neval_prompts: 0\n")
    code, out = run_cli(tmp_path, "cfg", "--config", str(cfg), "--lr", "0.002")
    assert code == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["steps"] == 1 and saved["samples_per_prompt"] == 8 and saved["lr"] == 0.002


def test_method_options_are_a_mapping_in_the_saved_config(tmp_path):
    code, out = run_cli(tmp_path, "opts", "--steps", "1", "--eval-prompts", "0", "--method", "entropy-bonus",
                        "--method-options", "{coef: 0.003}")
    assert code == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_options"] == {"coef": 0.003}
    assert "calibration_prior" not in saved and saved["calibration_factor"] == 0.0


def test_configs_saved_with_old_names_and_text_options_still_load(tmp_path):
    """A run directory written before ``calibration_prior`` became ``calibration_factor`` and
    ``method_options`` a mapping resumes with the same values."""
    import dataclasses

    from llm.config import TrainConfig, build_parser, config_from_args, load_yaml

    old = {**dataclasses.asdict(TrainConfig(model="smoke")), "method_options": "{coef: 0.003}"}
    del old["calibration_factor"]
    old["calibration_prior"] = 2e7
    cfg = config_from_args(build_parser().parse_args(["--resume", "x"]), base=old)
    assert cfg.calibration_factor == 2e7 and cfg.method_options == {"coef": 0.003}
    path = tmp_path / "old.yaml"
    path.write_text("calibration_prior: 5.0\nmethod_options: ''\n")
    assert load_yaml(path) == {"calibration_factor": 5.0, "method_options": {}}
    path.write_text("calibration_prior: 5.0\ncalibration_factor: 6.0\n")
    with pytest.raises(UserError, match="both 'calibration_prior' and its new name 'calibration_factor'"):
        load_yaml(path)


def test_config_converts_and_checks_itself_when_made():
    from llm.config import TrainConfig

    cfg = TrainConfig(steps="3", lr="1e-3", plot="no", method="grpo", method_options="{coef: 1}")
    assert (cfg.steps, cfg.lr, cfg.plot, cfg.method, cfg.method_options) == (3, 1e-3, False, "vanilla", {"coef": 1})
    with pytest.raises(UserError, match="dataset_errors must be one of skip, error, got 'warn'"):
        TrainConfig(dataset_errors="warn")
    with pytest.raises(UserError, match="unknown estimator 'magic'; expected one of grpo"):
        TrainConfig(estimator="magic")
    with pytest.raises(UserError, match="--task dataset needs --dataset FILE"):
        TrainConfig(task="dataset")
    with pytest.raises(UserError, match="--control-prompts 4 needs --predictor param"):
        TrainConfig(control_prompts=4)
    with pytest.raises(UserError, match="--control-prompts and --entropy-estimate are two choices"):
        TrainConfig(control_prompts=4, predictor="param", entropy_estimate=True)
    with pytest.raises(UserError, match="--control-gradient-every 4 reuses the control set's gradient"):
        TrainConfig(control_gradient_every=4, predictor="param")
    with pytest.raises(UserError, match="it needs --control-prompts and --measure-entropy-change"):
        TrainConfig(control_gradient_every=4, predictor="param", control_prompts=4, measure_entropy_change=False)
    with pytest.raises(UserError, match="--adam-warm-start 2 fills AdamW's second moment: it needs --optimizer adamw"):
        TrainConfig(adam_warm_start=2, optimizer="sgd")
    with pytest.raises(UserError, match="--momentum-projection projects the parameter-space prediction"):
        TrainConfig(momentum_projection=True)
    with pytest.raises(UserError, match="needs --predictor param and --method entrocraft-predictive"):
        TrainConfig(momentum_projection=True, predictor="param", method="vanilla")
    with pytest.raises(UserError, match="it needs --ppo-epochs 1 and --mini-batches 1"):
        TrainConfig(momentum_projection=True, predictor="param", ppo_epochs=2)
    with pytest.raises(UserError, match="estimates the second moment from whole-batch gradients"):
        TrainConfig(adam_warm_start=2, mini_batches=2)
    with pytest.raises(UserError, match="adam_warm_start must be >= 0, got -1"):
        TrainConfig(adam_warm_start=-1)
    with pytest.raises(UserError, match="probe_samples must be >= 1, got 0"):
        TrainConfig(probe_samples=0)
    with pytest.raises(UserError, match="control_samples must be >= 1, got 0"):
        TrainConfig(control_samples=0)


def test_kl_reference_exact_prediction_and_full_forward(tmp_path):
    code, out = run_cli(tmp_path, "kl", "--steps", "1", "--kl-coef", "0.01", "--exact-first-order",
                        "--eval-prompts", "2", "--no-share-prompt-prefix")
    assert code == 0
    first = rows(out)[0]
    assert first.get("skipped") is None
    assert "kl_ref" in first and "exact_predicted_entropy_change" in first and "pass_at_1" in first


def test_countdown_task_runs(tmp_path):
    code, out = run_cli(tmp_path, "cd", "--steps", "1", "--task", "countdown", "--max-new-tokens", "3",
                        "--eval-prompts", "2")
    assert code == 0
    assert rows(out)[-1]["final"] is True


def test_ctrl_c_writes_a_checkpoint_that_resumes(tmp_path):
    """A real SIGINT to a running `python -m llm.train`: the step finishes, a checkpoint is written,
    and --resume continues from it."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llm.train", "--preset", "smoke", "--steps", "50",
                             "--eval-every", "0", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    done = [r["step"] for r in rows(out)]
    assert 1 <= len(done) < 50
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert main(["--resume", str(out), "--steps", str(len(done) + 1)]) == 0
    after = rows(out)
    assert [r["step"] for r in after if not r.get("final")] == list(range(len(done) + 1))
    assert after[-1].get("final") and after[-1]["step"] == len(done) + 1


def test_probe_entropy_is_held_out_and_repeatable(tmp_path):
    """The probe set holds fixed contexts of held-out prompts, sampled once from the initial policy: its
    entropy is a function of the weights (the same value twice, and the value the sampling-time statistics
    gave, so the teacher-forced forward sees the contexts the policy sampled), a resumed run has the same
    set, and it is logged every probe_every steps and at the end."""
    from llm.config import TrainConfig
    from llm.train import Trainer

    cfg = TrainConfig(model="smoke", arith_high=4, fewshot=2, prompts_per_step=2, samples_per_prompt=4,
                      max_new_tokens=2, micro_batch_size=8, eval_prompts=0, probe_every=1, probe_prompts=3,
                      probe_samples=3, method="vanilla", lr=1e-2, plot=False, progress=False, tensorboard=False)
    trainer = Trainer(cfg, tmp_path, reward_fn=lambda roll: torch.tensor([1.0, -1.0]).repeat(roll.mask.shape[0] // 2))
    probe = trainer.probe_set
    first = trainer.probe_entropy()["probe_entropy"]
    assert trainer.probe_entropy()["probe_entropy"] == first and first > 0
    m = probe.roll.mask
    assert probe.roll.tokens.shape[0] == 3 * 3 and probe.n_tokens == float(m.sum())
    assert first == pytest.approx(float(probe.roll.stats.entropy[m].mean()), rel=1e-5)
    train_prompts = {p.prompt for p in trainer.task.train_batch(64, __import__("random").Random(0))}
    assert len(probe.problems) == 3 and not train_prompts & {p.prompt for p in probe.problems}
    assert trainer.train_step(0).get("skipped") is None
    trainer.save_checkpoint(1)
    again = Trainer(cfg, tmp_path)
    again.load_checkpoint(tmp_path / "checkpoint")
    assert torch.equal(again.probe_set.roll.tokens, probe.roll.tokens)
    # the sampling-time entropies are those of the initial weights: the set was not sampled again after the load
    assert torch.equal(again.probe_set.roll.stats.entropy, probe.roll.stats.entropy)
    assert again.probe_entropy()["probe_entropy"] == pytest.approx(trainer.probe_entropy()["probe_entropy"], abs=1e-6)
    assert again.probe_entropy()["probe_entropy"] != first  # the step moved it
    code, out = run_cli(tmp_path, "probe", "--steps", "2", "--probe-every", "2", "--probe-prompts", "2")
    assert code == 0
    got = rows(out)
    assert ["probe_entropy" in r for r in got] == [True, False, True]


def test_adam_warm_start_runs_once_and_not_on_resume(tmp_path):
    """--adam-warm-start 2 from the command line: AdamW's step count is 2 + the steps trained (the warm start
    ran once, before step 0); a resume restores the state from the checkpoint and does not warm-start again."""
    def adam_steps(out: Path) -> set[float]:
        state = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=False)
        state = state.get("state", state.get("optimizer", {}).get("state", {})) if isinstance(state, dict) else {}
        return {float(s["step"]) for s in state.values() if "step" in s}

    def updates(out: Path) -> int:  # optimiser steps taken: the trained rows that were not skipped
        return sum(1 for r in rows(out) if not r.get("final") and not r.get("skipped"))

    code, out = run_cli(tmp_path, "warm", "--steps", "4", "--adam-warm-start", "2", "--stop-after", "1",
                        "--eval-prompts", "0")
    assert code == 0 and updates(out) >= 1  # else a second warm start on resume would go unseen
    assert adam_steps(out) == {2.0 + updates(out)}
    assert main(["--resume", str(out)]) == 0
    assert updates(out) >= 2
    assert adam_steps(out) == {2.0 + updates(out)}


def test_relative_schedule_is_anchored_at_the_controlled_entropy_and_kept_on_resume(tmp_path):
    """--schedule linear:H0->H0-0.3: anchored at the entropy the method controls before the first update (here
    the control set's, measured at the initial weights), the targets are that anchor plus the schedule's change,
    and a resume keeps the anchor from the checkpoint instead of measuring the moved policy again."""
    T, drop = 4, 0.3
    code, out = run_cli(tmp_path, "rel", "--steps", str(T), "--method", "entrocraft-predictive", "--predictor",
                        "param", "--control-prompts", "2", "--schedule", "linear:H0->H0-0.3", "--stop-after", "2",
                        "--eval-prompts", "0")
    assert code == 0
    first = rows(out)
    anchor = first[0]["schedule_anchor"]
    assert anchor == first[0]["control_entropy"]  # the controlled entropy at the initial weights
    assert main(["--resume", str(out)]) == 0
    got = [r for r in rows(out) if not r.get("final")]
    assert [r["step"] for r in got] == list(range(T))
    assert got[2]["control_entropy"] != anchor  # the policy moved: a re-anchored resume would differ
    for r in got:
        assert r["schedule_anchor"] == anchor
        progress = min(r["step"] + 1, T) / T  # llm.train reads the schedule one step ahead (step_offset 1)
        assert r["target_entropy"] == pytest.approx(anchor - drop * progress, abs=1e-9)


def test_relative_schedule_anchored_below_zero_is_a_clear_error(tmp_path, capsys):
    code, out = run_cli(tmp_path, "rel-bad", "--steps", "2", "--method", "entrocraft-predictive",
                        "--schedule", "linear:H0->H0-100", "--eval-prompts", "0")
    err = capsys.readouterr().err
    assert code == 2
    assert "linear:H0->H0-100" in err and "anchored at the initial entropy H0 =" in err and "negative entropy" in err
