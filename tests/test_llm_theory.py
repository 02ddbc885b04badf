"""Theory against practice on the smoke model: the predicted and measured entropy change agree in sign
on a step constructed to lower entropy and on one constructed to raise it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from llm.config import PRESETS, TrainConfig  # noqa: E402
from llm.errors import UserError  # noqa: E402
from llm.models import make_smoke_model, make_smoke_tokenizer  # noqa: E402
from llm.rollout import encode_prompts, generate, response_log_probs, response_logits  # noqa: E402
from llm.train import Trainer  # noqa: E402


def constructed_rewards(direction: str):
    """Rewards whose GRPO advantages make every sample's predicted contribution point one way.

    With a positive advantage, a sample lowers entropy when its tokens are likelier than the
    per-position baseline (``pi(y)(log pi(y) + H) > sum_b pi_b^2 (log pi_b + H)``) and raises it
    otherwise; a negative advantage reverses both. Reward +1 where that term is positive gives a
    step that lowers entropy; the opposite rewards give one that raises it.
    """

    def rewards(roll):
        st, m = roll.stats, roll.mask
        term = st.log_prob.exp() * (st.log_prob + st.entropy) - st.pg_baseline
        s = torch.where(m, term, 0.0).sum(1)
        r = torch.where(s > 0, 1.0, -1.0)
        return r if direction == "lower" else -r

    return rewards


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.01), ("adamw", 1e-4)])
@pytest.mark.parametrize("seed", [0, 1])
def test_predicted_and_measured_change_agree_in_sign(tmp_path, optimizer, lr, seed):
    for direction, sign in (("lower", -1.0), ("raise", 1.0)):
        cfg = TrainConfig(**{**PRESETS["smoke"], "optimizer": optimizer, "lr": lr, "seed": seed, "eval_prompts": 0})
        row = Trainer(cfg, Path(tmp_path), reward_fn=constructed_rewards(direction)).train_step(0)
        assert row.get("skipped") is None
        assert row["predicted_entropy_change"] * sign > 0, (direction, row)
        assert row["measured_entropy_change"] * sign > 0, (direction, row)


@pytest.mark.parametrize("shared_head", ["", "1 + 2 = 3\n14 + 4 = 18\n"])
def test_prompt_prefix_sharing_matches_full_forward(shared_head, monkeypatch):
    """Each prompt run once per group, and (few-shot examples) a prefix common to every prompt run once in all:
    logits and gradients equal the plain forward of prompt + response, row by row."""
    import llm.rollout as rollout

    seen = []
    common_prefix = rollout._common_prefix
    monkeypatch.setattr(rollout, "_common_prefix", lambda *a: seen.append(common_prefix(*a)[0]) or common_prefix(*a))
    tok = make_smoke_tokenizer()
    model = make_smoke_model(len(tok), seed=3)
    ids, mask = encode_prompts(tok, [shared_head + p for p in ["1 + 2 = ", "13 + 4 = ", "9 = "]], torch.device("cpu"))
    gens = [torch.Generator().manual_seed(i) for i in range(ids.shape[0])]
    roll = generate(model, tok, ids, mask, 4, 3, 1.0, 1.0, gens, True)
    shared = response_logits(model, ids, mask, roll.prompt_index, roll.tokens, share_prefix=True)
    full = response_logits(model, ids, mask, roll.prompt_index, roll.tokens, share_prefix=False)
    m = roll.mask
    assert torch.allclose(shared[m], full[m], atol=1e-5)
    # the statistics gathered while sampling are those of the same policy
    lp = response_log_probs(full, roll.tokens)
    assert torch.allclose(lp[m], roll.stats.log_prob[m], atol=1e-5)
    grads = []
    for share in (True, False):
        model.zero_grad()
        lp = response_log_probs(response_logits(model, ids, mask, roll.prompt_index, roll.tokens, share), roll.tokens)
        torch.where(m, lp, 0.0).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-4, rtol=1e-3)
    n_head = len(tok(shared_head, add_special_tokens=False)["input_ids"])
    assert (max(seen) >= n_head >= rollout.MIN_COMMON_PREFIX) == bool(shared_head), (seen, n_head)
    # no common prefix with a sliding attention window (pads between prefix and suffix would count towards it)
    assert rollout._may_share(model)
    model.config.use_sliding_window = True
    assert not rollout._may_share(model)


@pytest.mark.parametrize("direction", ["lower", "raise"])
def test_exact_first_order_prediction_matches_measured_change(tmp_path, direction):
    """<dH/dtheta, dtheta> of the actual small SGD update predicts the measured change closely,
    while the per-position (logit-space) prediction has the right sign but a much smaller scale."""
    cfg = TrainConfig(**{**PRESETS["smoke"], "optimizer": "sgd", "lr": 1e-3, "exact_first_order": True,
                         "eval_prompts": 0})
    row = Trainer(cfg, Path(tmp_path), reward_fn=constructed_rewards(direction)).train_step(0)
    measured, exact = row["measured_entropy_change"], row["exact_predicted_entropy_change"]
    assert exact == pytest.approx(measured, rel=0.1)
    assert 1 < measured / row["predicted_entropy_change"]


def test_nan_logits_in_the_update_skip_the_step(tmp_path, monkeypatch):
    """NaN/inf logits in the training forward are routed to the NaN-skip path (no exception, no update)."""
    cfg = TrainConfig(**{**PRESETS["smoke"], "eval_prompts": 0})
    trainer = Trainer(cfg, Path(tmp_path))
    before = [p.detach().clone() for p in trainer.params]
    real = Trainer._logits

    def broken(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(Trainer, "_logits", broken)
    trainer.reward_fn = lambda roll: torch.tensor([1.0, -1.0]).repeat(roll.mask.shape[0] // 2)
    row = trainer.train_step(0)
    assert row["skipped"] == "nan_loss" and trainer.nan_streak == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params))


# JVP: float32 rounding of sums over the parameters (measured 5e-7); central difference with its step of
# PARAM_FD_CHANGE = 1e-2 nats along the direction: truncation O(h^2) plus rounding amplified by 1/h (measured
# 2e-4 on this model; 2.2e-3 at 3e-2 nats, where the truncation dominates)
@pytest.mark.parametrize("derivative,rel", [("jvp", 1e-5), ("fd", 1e-3)])
@pytest.mark.parametrize("grad_clip", [0.0, 2.0])
@pytest.mark.parametrize("control_prompts", [0, 3])
def test_param_predictor_equals_the_first_order_change_of_an_sgd_step(tmp_path, derivative, rel, grad_clip,
                                                                      control_prompts):
    """Under plain SGD, with or without gradient clipping, on the first (on-policy) epoch, the parameter-space
    prediction made BEFORE the update, drift + sum_t (A_t / N) s_t, is exactly <grad Hbar, dtheta> of the step
    taken (computed after it from the weights): the two differ only by the directional derivative's error
    (JVP: float rounding; central difference: O(h^2) plus rounding amplified by 1/h). With a control set,
    Hbar is the control set's entropy, on contexts the update does not train on."""
    from llm.config import TrainConfig
    from llm.train import Trainer

    cfg = TrainConfig(model="smoke", arith_high=4, fewshot=2, prompts_per_step=4, samples_per_prompt=8,
                      max_new_tokens=2, micro_batch_size=16, optimizer="sgd", lr=0.05, grad_clip=grad_clip,
                      method="vanilla", predictor="param", param_derivative=derivative, eval_prompts=0,
                      control_prompts=control_prompts, plot=False, progress=False, tensorboard=False)
    trainer = Trainer(cfg, tmp_path)
    rows = [trainer.train_step(t) for t in range(3)]
    trained = [r for r in rows if not r.get("skipped")]
    assert trained
    for r in trained:
        assert r["predicted_drift"] == 0.0  # SGD without momentum: nothing is known but the samples' part
        assert r["predicted_entropy_change"] == pytest.approx(r["exact_predicted_entropy_change"], rel=rel)
        # vanilla trains on every sample, so the expected clip factor is the clip's own (docs/theory.md §5.2c)
        assert r["predicted_clip_factor"] == (1.0 if not grad_clip else
                                              pytest.approx(min(1.0, grad_clip / r["grad_norm"]), rel=1e-5))
    assert not grad_clip or min(r["predicted_clip_factor"] for r in trained) < 0.8  # the clip acted
    if control_prompts:  # the controlled, predicted and measured entropy are the control set's
        for a, b in zip(rows, rows[1:]):
            assert b["control_entropy"] == pytest.approx(a["control_entropy"] + a["measured_entropy_change"],
                                                         abs=1e-6)
        assert trainer.fixed_set_entropy(trainer.control_set) == pytest.approx(
            rows[-1]["control_entropy"] + rows[-1]["measured_entropy_change"], abs=1e-6)
        assert all("measured_batch_entropy_change" in r for r in trained)
    else:
        assert all("control_entropy" not in r for r in rows)


def test_param_predictor_takes_s_only_where_a_plan_can_weigh_it(tmp_path, monkeypatch):
    """The predictor takes s_t only on rows with a non-zero advantage (the others' A_t s_t is zero); a plan that
    trains on a zero-advantage row anyway (NSR on the raw rewards: an all-wrong group has advantage 0 and
    reward -1) gets those rows' s_t before the update, so the prediction is still <grad Hbar, dtheta> of the
    SGD step taken. Without the completion the rows' terms would be missing from the prediction."""
    cfg = TrainConfig(model="smoke", arith_high=4, fewshot=2, prompts_per_step=4, samples_per_prompt=8,
                      max_new_tokens=2, micro_batch_size=16, optimizer="sgd", lr=0.05, grad_clip=0.0, method="nsr",
                      method_options={"source": "rewards"}, predictor="param", param_derivative="jvp",
                      eval_prompts=0, plot=False, progress=False, tensorboard=False)
    trainer = Trainer(cfg, tmp_path)
    taken, completed = [], []
    rows_fn, complete_fn = trainer._directional_rows, trainer._complete_directional

    def counting_rows(batch, rows, *args):
        taken.append(len(rows))
        return rows_fn(batch, rows, *args)

    def counting_complete(batch, advantages):
        before = int(batch.param.computed.sum())
        complete_fn(batch, advantages)
        completed.append((before, int(batch.param.computed.sum()), batch))

    monkeypatch.setattr(trainer, "_directional_rows", counting_rows)
    monkeypatch.setattr(trainer, "_complete_directional", counting_complete)
    rows = [trainer.train_step(t) for t in range(3)]
    trained = [r for r in rows if not r.get("skipped")]
    assert trained
    skipped_rows = [(before, after, b) for before, after, b in completed if after > before]
    assert skipped_rows, "no step had a zero-advantage row that NSR trained on: the test shows nothing"
    for before, _, b in completed:  # the first pass took exactly the rows with a non-zero advantage
        assert before == int((b.advantages != 0).any(-1).sum())
    assert sum(taken) == sum(after for _, after, _ in completed)  # and the completion only the rows trained on
    for r in trained:
        assert r["predicted_entropy_change"] == pytest.approx(r["exact_predicted_entropy_change"], rel=1e-5)


@pytest.mark.parametrize("lr", [1e-3, 5e-4])
def test_control_set_first_order_change_matches_its_measured_change(tmp_path, lr):
    """The control set's entropy gradient is that of the value the trainer measures: after a small SGD step,
    <grad H_C, dtheta> (from the gradient) equals the measured change of H_C (from two evaluations) up to the
    second-order term, which shrinks in proportion to the step (measured 6.2% at lr 1e-3, 3.3% at 5e-4)."""
    cfg = TrainConfig(**{**PRESETS["smoke"], "optimizer": "sgd", "lr": lr, "grad_clip": 0.0, "eval_prompts": 0,
                         "method": "vanilla", "predictor": "param", "control_prompts": 4})
    trainer = Trainer(cfg, Path(tmp_path), reward_fn=constructed_rewards("lower"))
    row = trainer.train_step(0)
    assert row.get("skipped") is None
    measured, exact = row["measured_entropy_change"], row["exact_predicted_entropy_change"]
    assert abs(measured) > 1e-6
    assert exact == pytest.approx(measured, rel=0.1 * lr / 1e-3)


def test_control_set_is_distinct_training_prompts(tmp_path):
    """The trainer's control set holds distinct training prompts: asked for as many as the training split has
    (19 in the smoke task's 0..4 addition), it is the whole split, each prompt once, with control_samples responses."""
    import random

    trainer = Trainer(TrainConfig(**{**PRESETS["smoke"], "eval_prompts": 0, "predictor": "param",
                                     "control_prompts": 19, "control_samples": 2}), Path(tmp_path))
    split = {p.prompt for p in trainer.task.train_batch(3000, random.Random(0))}
    prompts = [p.prompt for p in trainer.control_set.problems]
    assert len(split) == 19 and len(prompts) == 19 and set(prompts) == split
    assert trainer.control_set.roll.prompt_index.bincount().tolist() == [2] * 19


@pytest.mark.parametrize("optimizer, lr, control_prompts", [("adamw", 1e-3, 0), ("sgd", 0.05, 0), ("sgd", 0.05, 3)])
def test_fused_update_equals_the_usual_update(tmp_path, optimizer, lr, control_prompts, monkeypatch):
    """--fused-update (the update reuses the predictor's forward and whole-batch gradient, adding the rejected
    samples' correction) takes the same optimiser steps as the usual update (its own forward and backward of
    the accepted samples): same selections and metrics to float32 rounding (AdamW, SGD), the same weights
    (SGD), with gradient clipping and an Entrocraft sampler that rejects samples (so the correction is
    exercised)."""
    calls = []
    fused = Trainer._fused_update

    def counted(self, batch, plan, whole):
        calls.append(bool((batch.advantages != plan.advantages).any()))  # rows to correct
        return fused(self, batch, plan, whole)

    monkeypatch.setattr(Trainer, "_fused_update", counted)
    runs = {}
    for on in (True, False):
        cfg = TrainConfig(**{**PRESETS["smoke"], "optimizer": optimizer, "lr": lr, "grad_clip": 0.5,
                             "eval_prompts": 0, "method": "entrocraft-predictive", "schedule": "constant:2.0",
                             "predictor": "param", "control_prompts": control_prompts, "fused_update": on})
        trainer = Trainer(cfg, Path(tmp_path) / str(on))
        rows = [trainer.train_step(t) for t in range(4)]
        runs[on] = (rows, [p.detach().clone() for p in trainer.params])
    (rows_f, w_f), (rows_u, w_u) = runs[True], runs[False]
    trained = sum(not r.get("skipped") for r in rows_f)
    assert trained >= 1 and len(calls) == trained and any(calls), calls  # fused, with a correction
    for a, b in zip(rows_f, rows_u):
        for key in ("accepted_fraction", "skipped"):
            assert a.get(key) == b.get(key), key
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
        if a.get("skipped"):
            continue
        for key in ("loss", "grad_norm", "clip_fraction", "predicted_entropy_change", "measured_entropy_change",
                    "exact_predicted_entropy_change"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    if optimizer == "sgd":  # the step is linear in the gradient: the weights agree to float32 rounding
        for p, q in zip(w_f, w_u):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # (Adam's first steps move every element by about lr * sign(g), so an element whose gradient is at the level of
    # float32 rounding, summed in another order by the two paths, may move either way: its weights are not compared)
    assert any(not torch.equal(p, q) for p, q in zip(w_f, Trainer(TrainConfig(**{
        **PRESETS["smoke"], "eval_prompts": 0}), Path(tmp_path) / "fresh").params))  # the steps moved the weights


def test_control_gradient_reused_between_refreshes(tmp_path, monkeypatch):
    """--control-gradient-every 3: the control set's entropy gradient is taken at steps 0 and 3 only; in between
    the predictor uses it with the entropy measured after the last update (the logged values still chain
    exactly), and the prediction made before an SGD step equals <grad H_C, dtheta> with that gradient."""
    taken = []
    original = Trainer.fixed_set_entropy

    def spy(self, fixed, first_order=None):
        if first_order is not None:
            taken.append(len(taken))
        return original(self, fixed, first_order)

    monkeypatch.setattr(Trainer, "fixed_set_entropy", spy)
    cfg = TrainConfig(**{**PRESETS["smoke"], "optimizer": "sgd", "lr": 0.05, "grad_clip": 0.0, "eval_prompts": 0,
                         "predictor": "param", "control_prompts": 3, "control_gradient_every": 3,
                         "param_derivative": "jvp"})
    trainer = Trainer(cfg, Path(tmp_path))
    rows = []
    for t in range(5):
        before = len(taken)
        rows.append(trainer.train_step(t))
        assert len(taken) - before == (1 if t % 3 == 0 else 0), t
    for a, b in zip(rows, rows[1:]):
        assert b["control_entropy"] == pytest.approx(a["control_entropy"] + a["measured_entropy_change"], abs=1e-6)
    trained = [r for r in rows if not r.get("skipped")]
    assert len(trained) >= 2
    for r in trained:
        assert r["predicted_entropy_change"] == pytest.approx(r["exact_predicted_entropy_change"], rel=1e-5)


def test_control_reckoning_measures_the_set_only_at_refreshes(tmp_path, monkeypatch):
    """--control-reckoning with the gradient every 3 steps: the control set is evaluated only at the refreshes
    (steps 0 and 3, with its gradient); in between its entropy is the last one plus each step's
    <grad H_C, dtheta>. Against a run that measures the set after every update (vanilla, so the two train the
    same weights): the refresh measures the same entropy, and the logged reckoning error equals the sum of the
    measuring run's (measured - first-order) changes over the period."""
    original = Trainer.fixed_set_entropy
    calls = []

    def spy(self, fixed, first_order=None):
        if fixed is self.control_set:
            calls.append((self.cfg.control_reckoning, first_order is not None))
        return original(self, fixed, first_order)

    monkeypatch.setattr(Trainer, "fixed_set_entropy", spy)
    base = {**PRESETS["smoke"], "optimizer": "sgd", "lr": 0.05, "grad_clip": 0.0, "eval_prompts": 0,
            "predictor": "param", "control_prompts": 3, "control_gradient_every": 3, "param_derivative": "jvp",
            "seed": 2}  # seed 2: every one of the 4 batches has a signal (an update at every step)
    runs = {}
    for reckon in (True, False):
        trainer = Trainer(TrainConfig(**{**base, "control_reckoning": reckon}), Path(tmp_path) / str(reckon))
        rows = []
        for t in range(4):
            before = len([c for c in calls if c[0] == reckon])
            rows.append(trainer.train_step(t))
            made = [c[1] for c in calls if c[0] == reckon][before:]
            if reckon:  # only the refresh's forward and backward, none after an update
                assert made == ([True] if t % 3 == 0 else []), (t, made)
            else:
                assert made == ([True, False] if t % 3 == 0 else [False]), (t, made)
        runs[reckon] = rows
    reckoned, measured = runs[True], runs[False]
    assert not any(r.get("skipped") for r in reckoned + measured)
    for r, m in zip(reckoned, measured):  # the same weights: the batches and first-order changes agree
        assert r["entropy"] == pytest.approx(m["entropy"], abs=1e-6)
        assert r["reckoned_entropy_change"] == pytest.approx(m["exact_predicted_entropy_change"], rel=1e-6, abs=1e-9)
        assert "measured_entropy_change" not in r and "measured_batch_entropy_change" in r
    for a, b in zip(reckoned[:2], reckoned[1:3]):  # chained by the first-order changes, exactly
        assert b["control_entropy"] == a["control_entropy"] + a["reckoned_entropy_change"]
    assert reckoned[3]["control_entropy"] == pytest.approx(measured[3]["control_entropy"], abs=1e-6)
    missed = sum(m["measured_entropy_change"] - m["exact_predicted_entropy_change"] for m in measured[:3])
    assert abs(missed) > 1e-6  # the first-order changes do miss something, which the refresh finds
    assert reckoned[3]["control_reckoning_error"] == pytest.approx(missed, rel=1e-3, abs=1e-7)
    assert all("control_reckoning_error" not in r for r in reckoned[:3] + measured)


def test_control_reckoning_needs_a_control_set():
    with pytest.raises(UserError, match="--control-reckoning"):
        TrainConfig(**{**PRESETS["smoke"], "predictor": "param", "control_reckoning": True})


def test_one_backward_trains_what_the_usual_update_trains(tmp_path, monkeypatch):
    """--one-backward under SGD without clipping (whose map needs no loss gradient, so the contributions and the
    plans are those of the usual unfused path): the same predictions, first-order and measured changes and the
    same weights after 4 steps as --no-fused-update, with one forward of the batch (two micro-batches) fewer per
    update (the update back-propagates through the predictor's forward)."""
    original = Trainer._logits
    forwards = {True: 0, False: 0}

    def spy(self, model, batch, rows):
        forwards[self.cfg.one_backward] += 1
        return original(self, model, batch, rows)

    monkeypatch.setattr(Trainer, "_logits", spy)
    base = {**PRESETS["smoke"], "optimizer": "sgd", "lr": 0.05, "grad_clip": 0.0, "eval_prompts": 0,
            "predictor": "param", "control_prompts": 3, "control_gradient_every": 2, "param_derivative": "forward",
            "fused_update": False, "method": "entrocraft-predictive", "schedule": "linear:H0->H0-1", "seed": 2}
    runs, weights = {}, {}
    for one in (True, False):
        trainer = Trainer(TrainConfig(**{**base, "one_backward": one}), Path(tmp_path) / str(one))
        runs[one] = [trainer.train_step(t) for t in range(4)]
        weights[one] = [p.detach().clone() for p in trainer.params]
    assert not any(r.get("skipped") for r in runs[True] + runs[False])
    for a, b in zip(runs[True], runs[False]):
        assert a["accepted_fraction"] == b["accepted_fraction"]
        for key in ("predicted_entropy_change", "exact_predicted_entropy_change", "measured_entropy_change", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    assert any(r["accepted_fraction"] < 1 for r in runs[True])  # a selection was made, not only whole batches
    for p, q in zip(weights[True], weights[False]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    micro_batches = base["prompts_per_step"] * base["samples_per_prompt"] // base["micro_batch_size"]
    assert micro_batches == 2 and forwards[False] - forwards[True] == 4 * micro_batches


def test_one_backward_clip_factor_is_the_last_gradient_norms(tmp_path):
    """--one-backward under AdamW: the expected clip factor of the first step is min(1, clip / the warm start's
    mean gradient norm), of each later step min(1, clip / the last update's norm); AdamW's map holds vhat
    fixed, so the drift and contributions need no loss gradient of the batch."""
    cfg = TrainConfig(**{**PRESETS["smoke"], "eval_prompts": 0, "predictor": "param", "control_prompts": 3,
                         "adam_warm_start": 2, "grad_clip": 0.05, "one_backward": True, "seed": 2})
    trainer = Trainer(cfg, Path(tmp_path))
    trainer.warm_start_optimizer()
    norm = trainer.last_grad_norm
    assert norm is not None and norm > cfg.grad_clip  # clipping is active, so the factor is informative
    rows = []
    for t in range(3):
        rows.append(trainer.train_step(t))
        assert rows[-1]["predicted_clip_factor"] == pytest.approx(min(1.0, cfg.grad_clip / norm), rel=1e-6)
        norm = rows[-1]["grad_norm"] if not rows[-1].get("skipped") else norm
    assert len({r["predicted_clip_factor"] for r in rows}) > 1


@pytest.mark.parametrize("reckoning", [False, True])
def test_clip_corrected_calibration_feeds_the_sample_part_at_the_predicted_clip(tmp_path, monkeypatch, reckoning):
    """--clip-corrected-calibration: the sampler observes the step's sample-dependent change (measured, or with
    --control-reckoning reckoned, minus the known drift) times predicted / realised clip factor, the realised one
    min(1, clip / the update's gradient norm); without the option it observes the change minus the drift."""
    observed = {True: [], False: []}
    runs = {}
    for corrected in (True, False):
        cfg = TrainConfig(**{**PRESETS["smoke"], "eval_prompts": 0, "predictor": "param", "control_prompts": 3,
                             "adam_warm_start": 2, "grad_clip": 0.05, "one_backward": True, "seed": 2,
                             "control_reckoning": reckoning, "clip_corrected_calibration": corrected})
        trainer = Trainer(cfg, Path(tmp_path) / str(corrected))
        trainer.warm_start_optimizer()
        monkeypatch.setattr(trainer.method, "observe", observed[corrected].append)
        runs[corrected] = [trainer.train_step(t) for t in range(3)]
    change = "reckoned_entropy_change" if reckoning else "measured_entropy_change"
    trained = [r for r in runs[True] if not r.get("skipped")]
    assert len(trained) == len(observed[True]) >= 2
    ratios = []
    for r, seen in zip(trained, observed[True]):
        realised = min(1.0, 0.05 / (r["grad_norm"] + 1e-6))
        assert r["realised_clip_factor"] == pytest.approx(realised, rel=1e-9)
        ratios.append(r["predicted_clip_factor"] / realised)
        assert seen == pytest.approx((r[change] - r["predicted_drift"]) * ratios[-1], rel=1e-9, abs=1e-15)
    assert max(abs(x - 1) for x in ratios) > 0.05  # the clip was mispredicted, so the correction acted
    for r, seen in zip([r for r in runs[False] if not r.get("skipped")], observed[False]):
        assert "realised_clip_factor" not in r
        assert seen == pytest.approx(r[change] - r["predicted_drift"], rel=1e-9, abs=1e-15)


def test_clip_corrected_calibration_needs_a_clip_and_one_optimiser_step():
    for options in ({"grad_clip": 0.0}, {"ppo_epochs": 2}, {"predictor": "logit"}):
        with pytest.raises(UserError, match="--clip-corrected-calibration"):
            TrainConfig(**{**PRESETS["smoke"], "predictor": "param", "clip_corrected_calibration": True, **options})


@pytest.mark.parametrize("options, message", [
    ({"control_prompts": 0}, "--control-prompts"),
    ({"adam_warm_start": 0}, "--adam-warm-start"),
    ({"mini_batches": 2}, "--mini-batches 1"),
])
def test_one_backward_refuses_what_it_cannot_do(options, message):
    cfg = {**PRESETS["smoke"], "predictor": "param", "control_prompts": 3, "adam_warm_start": 2,
           "one_backward": True, **options}
    with pytest.raises(UserError, match=message):
        TrainConfig(**cfg)


def test_adam_warm_start_fills_the_second_moment_only(tmp_path):
    """--adam-warm-start 2: AdamW's second moment is (1 - beta2^2) times the mean squared (clipped) loss gradient
    of two batches of the initial policy, recomputed here by autograd on the same rollouts; the step count is 2,
    the momentum zero, no weight moves, and the training batches are those of a run without it. Adam's linear
    map in the gradient, zero at a cold first step (sign-like), is then close to (1 - 1/3) of the frozen one."""
    from entrotheory.param_space import preconditioner_from_optimizer

    cfg = TrainConfig(**{**PRESETS["smoke"], "eval_prompts": 0, "adam_warm_start": 2, "grad_clip": 0.5})
    trainer = Trainer(cfg, Path(tmp_path))
    weights = [p.detach().clone() for p in trainer.params]
    expected = [torch.zeros_like(p) for p in trainer.params]
    scales = []
    for k in range(2):
        batch = trainer._sample(k, purpose="adam-warm-start")
        logits = trainer._plain_logits(trainer.model, batch, torch.arange(batch.mask.shape[0]))
        lp = response_log_probs(logits, batch.roll.tokens)
        loss = -(batch.advantages * lp)[batch.mask].sum() / batch.mask.sum()
        grads = torch.autograd.grad(loss, trainer.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(trainer.params, grads)]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        assert norm > 0
        scale = min(1.0, 0.5 / float(norm))
        scales.append(scale)
        assert batch.roll.texts != trainer._sample(k).roll.texts  # its own rollouts, not the training batch k
        for e, g in zip(expected, grads):
            e.add_((g * scale) ** 2 / 2)
    assert min(scales) < 1.0  # the clip is active: v is of the clipped gradients, as the update clips
    cold_batch = trainer._sample(0)
    trainer.warm_start_optimizer()
    beta2 = cfg.adam_beta2
    for p, w, e in zip(trainer.params, weights, expected):
        state = trainer.optimizer.state[p]
        assert torch.equal(p.detach(), w)
        assert float(state["step"]) == 2.0
        assert not state["exp_avg"].any()
        torch.testing.assert_close(state["exp_avg_sq"], e * (1 - beta2**2), rtol=1e-4, atol=1e-12)
    assert sum(float(e.sum()) for e in expected) > 0
    assert trainer._sample(0).roll.texts == cold_batch.roll.texts  # the training batches are unchanged
    # the gain of Adam's step about a reference gradient g0 = the mean warm-up gradient scale: with vhat = g0^2
    # the cold step's gain is 0; warm, it is (1 - b1)/bc1 P (1 - (1 - b2)/bc2 g0^2 P / sqrt(vhat)) > 0
    ref = [e.sqrt() for e in expected]
    warm = preconditioner_from_optimizer(trainer.optimizer, trainer.params, grads=ref)
    frozen = preconditioner_from_optimizer(trainer.optimizer, trainer.params)
    big = [e > e.max() * 1e-2 for e in expected]
    ratio = torch.cat([(a / b)[m] for a, b, m in zip(warm.gain, frozen.gain, big)])
    assert float(ratio.min()) > 0.5 and float(ratio.max()) < 1.0
    cold = Trainer(cfg, Path(tmp_path) / "cold")
    cold_gain = preconditioner_from_optimizer(cold.optimizer, cold.params, grads=ref).gain
    cold_ratio = torch.cat([(a / b)[m] for a, b, m in zip(cold_gain, warm.gain, big)])
    assert float(cold_ratio.abs().max()) < 1e-2  # eps / (|g0| + eps) of the warm one, where g0 is not tiny


def test_momentum_projection_asks_for_the_projected_change(tmp_path):
    """--momentum-projection: the sampler is asked for (target(t + W) - H) / W - drift, W the real optimiser's
    momentum carry factor (3.01 before AdamW's first step, 4.24 before its second), so that the projected entropy
    H + W (drift + C) lands on the schedule W - 1 steps after the next; with plain SGD (no momentum) W = 1 and
    the request is the usual target(t + 1) - H - drift."""
    from entrotheory.param_space import momentum_carry_factor
    from entrotheory.schedules import parse_schedule

    base = {**PRESETS["smoke"], "eval_prompts": 0, "predictor": "param", "control_prompts": 3,
            "method": "entrocraft-predictive",
            "schedule": "linear:0.9->0.5", "momentum_projection": True, "steps": 10}
    schedule = parse_schedule("linear:0.9->0.5", 10)
    for optimizer, warmup, carries in (("adamw", 0, (3.0096, 4.2425)), ("adamw", 3, (None, None)),
                                       ("sgd", 0, (1.0, 1.0))):
        cfg = TrainConfig(**{**base, "optimizer": optimizer, "warmup_steps": warmup})
        trainer = Trainer(cfg, Path(tmp_path) / f"{optimizer}{warmup}")
        for t, carry in enumerate(carries):
            row = trainer.train_step(t)
            if carry is not None:
                assert row["momentum_carry"] == pytest.approx(carry, abs=1e-4)
            # with a warm-up the learning rates of the coming steps rise: (t + k + 1) / warmup, capped at 1
            lr = (lambda k, t=t, w=warmup: min(1.0, (t + k + 1) / w)) if warmup else None
            assert row["momentum_carry"] == pytest.approx(momentum_carry_factor(t, 0.9 if optimizer == "adamw"
                                                                                else 0.0, lr_factors=lr))
            h, drift, carry = row["control_entropy"], row["predicted_drift"], row["momentum_carry"]
            assert row["lead_target"] == pytest.approx(schedule(t + carry))
            assert row["projected_entropy"] == pytest.approx(h + carry * drift)
            assert row["desired_change"] == pytest.approx((schedule(t + carry) - h) / carry - drift, abs=1e-9)
            if optimizer == "sgd":
                assert row["desired_change"] == pytest.approx(schedule(t + 1) - h - drift, abs=1e-9)
