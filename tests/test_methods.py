"""Registry contract and the first-order entropy effect of each method on a softmax policy.

The state: one softmax over K = 6 actions with two equally likely actions (0 correct, 1 wrong)
and a rare tail; the batch has 5 rewarded samples of action 0 and 3 failing samples of action 1,
so every sample is likely (its pg contribution factor ``pi_y (log pi_y + H) - sum_b pi_b^2 (log pi_b + H)``
is positive) and the rewarded ones outnumber the failing ones. A batch is B samples of T = 1 token.
Each test runs the method's ``prepare`` / ``token_loss`` / ``masked_token_mean`` on
``log_softmax(z)`` and takes SGD steps on z; the measured change is the exact entropy change.
docs/theory.md §4.6 states the predictions.
"""

import math

import pytest
import torch

from entrotheory import entropy, entropy_change_contributions
from entrotheory.advantages import compute_advantages
from entrotheory.methods import METHODS, MethodPlan, make_method, masked_token_mean, token_covariance

LOGITS = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
ACTIONS = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
REWARDS = torch.tensor([1.0, 1, 1, 1, 1, -1, -1, -1], dtype=torch.float64)  # most samples rewarded, all likely
# an asymmetric state (action 0 likelier than 1) for the covariance methods, which need lp to vary
COV_STATE = dict(logits=torch.tensor([1.5, 0.8, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64),
                 actions=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
                 adv=torch.tensor([1.0, 1, 1, 1, -1, -1, -1, -1], dtype=torch.float64))


def entropy_change(method, logits=LOGITS, actions=ACTIONS, adv=REWARDS, lr=0.1, epochs=1, step=0, steps=1):
    """Exact entropy change after ``steps`` batches x ``epochs`` SGD epochs (PPO-style re-use)."""
    z = logits.clone()
    h_start = float(entropy(z))
    b = actions.shape[0]
    mask = torch.ones(b, 1, dtype=torch.bool)
    for s in range(steps):
        old = torch.log_softmax(z, -1)[actions].unsqueeze(-1)
        h = float(entropy(z))
        contrib = entropy_change_contributions(z, actions, adv, "pg").unsqueeze(-1)  # per unit lr of H
        plan = method.prepare(adv.unsqueeze(-1), old, old, mask, h, step + s, contributions=contrib,
                              rewards=adv)
        if plan.skip:
            continue
        h_before = h
        for _ in range(epochs):
            zg = z.clone().requires_grad_()
            lp = torch.log_softmax(zg, -1)[actions].unsqueeze(-1)
            tok_h = entropy(zg).expand(b).unsqueeze(-1)  # every token sits in this state
            loss = masked_token_mean(method.token_loss(plan, lp, old, mask, token_entropy=tok_h), mask)
            (grad,) = torch.autograd.grad(loss, zg)
            z = (z - lr * grad).detach()
        method.observe(float(entropy(z)) - h_before)
    return float(entropy(z)) - h_start


def test_registry_names_and_contract():
    expected = {"vanilla", "entropy-bonus", "adaptive-entropy-bonus", "clip-higher", "clip-cov", "kl-cov", "nsr",
                "w-reinforce", "raft++", "entropic", "entrocraft-band", "entrocraft-predictive"}
    assert set(METHODS) == expected
    for name in METHODS:
        m = make_method(name, total_steps=10)
        assert m.name == name and isinstance(m.needs_token_entropy, bool)
        m.load_state_dict(m.state_dict())
    assert make_method("entropy-bonus").needs_token_entropy and not make_method("vanilla").needs_token_entropy
    with pytest.raises(ValueError, match="unknown method"):
        make_method("grpo++")
    with pytest.raises(TypeError, match="unknown option"):
        make_method("vanilla", coef=0.1)


def test_vanilla_token_loss_is_the_ppo_surrogate():
    m = make_method("vanilla")
    adv = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    old = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.3]]))
    lp = old + torch.tensor([[0.5, 0.5], [-0.5, 0.1]])  # ratios e^0.5 = 1.65 (clipped for A>0), ...
    mask = torch.tensor([[True, True], [True, False]])
    plan = m.prepare(adv, lp, old, mask, 0.7, 0)
    loss = m.token_loss(plan, lp, old, mask)
    r = torch.exp(lp - old)
    expect = -torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
    assert torch.allclose(loss[mask], expect[mask]) and loss[1, 1] == 0
    assert loss[0, 0].item() == pytest.approx(-1.2)  # clipped
    assert loss[0, 1].item() == pytest.approx(math.exp(0.5))  # A < 0: unclipped side is the max
    # normaliser: the whole batch's masked tokens, also for a micro-batch
    micro = m.token_loss(plan.rows(0), lp[:1], old[:1], mask[:1])
    total = masked_token_mean(micro, mask[:1], 3) + masked_token_mean(
        m.token_loss(plan.rows(slice(1, 2)), lp[1:], old[1:], mask[1:]), mask[1:], 3)
    assert total.item() == pytest.approx(masked_token_mean(loss, mask).item())
    zero = masked_token_mean(loss, torch.zeros_like(mask))
    assert zero.item() == 0.0 and not torch.isnan(zero)


def test_plan_rows_keeps_dimensions():
    plan = MethodPlan(advantages=torch.arange(6.0).reshape(3, 2), accepted=torch.ones(3, 2, dtype=torch.bool),
                      detach=torch.zeros(3, 2, dtype=torch.bool))
    assert plan.rows(1).advantages.tolist() == [[2.0, 3.0]]
    assert plan.rows(torch.tensor([0, 2])).detach.shape == (2, 2)


def test_all_rejected_plan_is_skipped_without_nan():
    m = make_method("entrocraft-band", band="constant:0.5..constant:0.6", total_steps=10)
    adv = torch.ones(4, 3)
    lp = torch.full((4, 3), -1.0)
    plan = m.prepare(adv, lp, lp, torch.ones(4, 3, dtype=torch.bool), 0.1, 0)  # below: keep negatives (none)
    assert plan.skip and not plan.accepted.any() and plan.diagnostics["all_rejected"] == 1.0
    loss = masked_token_mean(m.token_loss(plan, lp.requires_grad_(), lp.detach(), torch.ones(4, 3, dtype=torch.bool)),
                             torch.ones(4, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and not torch.isnan(loss)


def test_cov_selection_is_over_the_whole_batch():
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    lp = torch.tensor([[-0.1, -0.2], [-3.0, -0.1]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    cov = token_covariance(adv, lp, mask)
    mean_lp = lp.mean()
    assert torch.allclose(cov, adv * (lp - mean_lp))
    plan = make_method("kl-cov", ratio=0.25).prepare(adv, lp, lp, mask, 0.5, 0)
    assert plan.kl_mask.tolist() == [[False, False], [True, False]]  # the single largest cov of the batch
    # the same micro-batch alone would pick a different token: selection must come from the whole batch
    assert plan.rows(0).kl_mask.sum() == 0


# ----------------------------------------------------------------- first-order entropy predictions
def test_vanilla_lowers_entropy_when_rewarded_samples_are_likely():
    assert entropy_change(make_method("vanilla")) < 0


def test_nsr_raises_and_raftpp_lowers():
    assert entropy_change(make_method("nsr")) > 0
    assert entropy_change(make_method("raft++")) < entropy_change(make_method("vanilla")) < 0


def test_w_reinforce_drops_less_than_vanilla():
    van = entropy_change(make_method("vanilla"))
    wr = entropy_change(make_method("w-reinforce"))
    assert wr > van
    assert entropy_change(make_method("w-reinforce", weight=1.0)) == pytest.approx(van)


def test_entropy_bonus_raises_entropy():
    van = entropy_change(make_method("vanilla"))
    assert entropy_change(make_method("entropy-bonus", coef=0.05)) > van
    zero = torch.zeros_like(REWARDS)  # bonus alone: pure entropy ascent
    assert entropy_change(make_method("entropy-bonus", coef=0.05), adv=zero) > 0
    assert entropy_change(make_method("vanilla"), adv=zero) == 0.0


def test_adaptive_entropy_bonus_updates_after_use():
    """Skywork-OR1: at step k the bonus is c_k if H_k < target else 0; then c_{k+1} = c_k + delta below the
    target, max(c_k - delta, 0) above it (c_0 = 0): the coefficient used is the one carried from before."""
    m = make_method("adaptive-entropy-bonus", target=0.5, delta=0.01)
    adv, lp, mask = torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool)
    used, state = [], []
    for step, h in enumerate([0.3, 0.3, 0.7, 0.7, 0.7, 0.2, 0.2]):
        plan = m.prepare(adv, lp, lp, mask, h, step)
        used.append(plan.entropy_coef)
        state.append(plan.diagnostics["coef_state"])
    assert used == pytest.approx([0.0, 0.01, 0.0, 0.0, 0.0, 0.0, 0.01])
    assert state == pytest.approx([0.01, 0.02, 0.01, 0.0, 0.0, 0.01, 0.02])
    assert make_method("adaptive-entropy-bonus", target=0.5, delta=0.01, coef_max=0.015).prepare(
        adv, lp, lp, mask, 0.3, 0).diagnostics["coef_state"] == pytest.approx(0.01)


def test_adaptive_entropy_bonus_acts_only_below_target():
    h = float(entropy(LOGITS))
    van = entropy_change(make_method("vanilla"), steps=5)
    below = make_method("adaptive-entropy-bonus", target=h + 0.5, delta=0.02)
    assert entropy_change(below, steps=5) > van and below.coef > 0
    above = make_method("adaptive-entropy-bonus", target=0.01, delta=0.02)
    assert entropy_change(above, steps=5) == pytest.approx(van) and above.coef == 0.0


def test_clip_higher_sign_follows_the_extra_positive_tokens():
    # Rare positive (action 3) beside likely negatives: the extra room above 1.2 moves mass to a
    # rare token, which raises entropy (its pg factor is negative) -> clip-higher ends higher.
    kw = dict(actions=torch.tensor([1, 1, 1, 3]), adv=torch.tensor([-1.0, -1, -1, 1], dtype=torch.float64),
              lr=0.5, epochs=10)
    assert entropy_change(make_method("clip-higher"), **kw) > entropy_change(make_method("vanilla"), **kw) + 0.01
    # When likely positive tokens (action 0) also hit the clip, the extra room pushes them up too,
    # which lowers entropy: the first-order sign is that of -A * factor(y) of the clipped tokens.
    kw = dict(actions=torch.tensor([0, 0, 1, 1, 1, 3]), adv=torch.tensor([1.0, 1, -1, -1, -1, 1], dtype=torch.float64),
              lr=0.2, epochs=10)
    assert entropy_change(make_method("clip-higher"), **kw) < entropy_change(make_method("vanilla"), **kw) - 0.01


def test_clip_cov_and_kl_cov_reduce_the_entropy_drop():
    kw = dict(lr=1.0, epochs=4, **COV_STATE)
    van = entropy_change(make_method("vanilla"), **kw)
    cc = entropy_change(make_method("clip-cov", ratio=0.25, lb=0.1, ub=5.0), **kw)
    assert van < 0 and cc > van
    # verl's KL-Cov trains every token on the unclipped -A r: its baseline is the same loss without the
    # penalty (kl_coef = 0), which drops further than clipped vanilla; the penalty reduces that drop
    kc = entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=1.0), **kw)
    kc0 = entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=0.0), **kw)
    assert kc0 < van and kc > kc0
    # with the clipped surrogate (verl_compat=False) the baseline is vanilla itself
    assert entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=1.0, verl_compat=False), **kw) > van
    # KL-Cov does nothing in the first, on-policy epoch (|log pi - log pi_old| = 0 has zero gradient, and
    # at r = 1 the unclipped and clipped surrogates have the same gradient)
    for verl in (True, False):
        assert entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=1.0, verl_compat=verl), lr=1.0,
                              **COV_STATE) == pytest.approx(entropy_change(make_method("vanilla"), lr=1.0, **COV_STATE))


def _cov_batch():
    """Six one-token samples with exact covariances: A = (1, 1, 1, -1, -1, -1) (mean 0), log pi - mean =
    (1, 2, 3, -6, 0.5, -0.5) (mean -4), so cov = A (log pi - mean) = (1, 2, 3, 6, -0.5, 0.5)."""
    adv = torch.tensor([1.0, 1, 1, -1, -1, -1], dtype=torch.float64).unsqueeze(-1)
    lp = torch.tensor([-3.0, -2, -1, -10, -3.5, -4.5], dtype=torch.float64).unsqueeze(-1)
    return adv, lp, torch.ones(6, 1, dtype=torch.bool)


def test_clip_cov_matches_verl_strict_bounds_and_skips_ppo_clipped_tokens():
    adv, lp, mask = _cov_batch()
    assert torch.equal(token_covariance(adv, lp, mask).squeeze(-1), torch.tensor([1.0, 2, 3, 6, -0.5, 0.5],
                                                                                   dtype=torch.float64))
    # token 2 ran ahead: r = e^0.5 > 1 + eps_high with A > 0, so PPO already clips it (zero gradient)
    old = lp.clone()
    old[2] -= 0.5
    # ratio 1: the budget max(1, int(ratio * 6)) = 6 covers every candidate, so detach = the candidate set
    verl = make_method("clip-cov", ratio=1.0, lb=1.0, ub=6.0).prepare(adv, lp, old, mask, 0.5, 0)
    assert verl.detach.squeeze(-1).tolist() == [False, True, False, False, False, False]  # 1 < cov < 6, unclipped
    assert verl.diagnostics["num_candidates"] == 1.0 and verl.diagnostics["num_ppo_clipped"] == 1.0
    ours = make_method("clip-cov", ratio=1.0, lb=1.0, ub=6.0, verl_compat=False).prepare(adv, lp, old, mask, 0.5, 0)
    assert ours.detach.squeeze(-1).tolist() == [True, True, True, True, False, False]  # 1 <= cov <= 6
    # a detached token has no gradient, the others keep theirs
    m = make_method("clip-cov", ratio=1.0, lb=1.0, ub=6.0)
    lp_g = lp.clone().requires_grad_()
    (grad,) = torch.autograd.grad(masked_token_mean(m.token_loss(verl, lp_g, old, mask), mask), lp_g)
    assert grad[1].item() == 0.0 and grad[0].item() != 0.0 and grad[3].item() != 0.0
    # the budget is drawn from the whole batch: ratio 1/6 -> one token among the candidates
    one = make_method("clip-cov", ratio=1 / 6, lb=0.0, ub=10.0).prepare(adv, lp, lp, mask, 0.5, 0)
    assert int(one.detach.sum()) == 1 and one.diagnostics["num_candidates"] == 5.0  # cov in (0, 10)


def test_kl_cov_matches_verl_unclipped_surrogate():
    adv, lp, mask = _cov_batch()
    old = lp - 0.5  # every ratio e^0.5 = 1.65, outside the clip range
    m = make_method("kl-cov", ratio=1 / 6, kl_coef=0.1)
    plan = m.prepare(adv, lp, old, mask, 0.5, 0)
    assert plan.kl_mask.squeeze(-1).tolist() == [False, False, False, True, False, False]  # top covariance
    loss = m.token_loss(plan, lp, old, mask)
    r = math.exp(0.5)
    expect = -adv * r + 0.1 * 0.5 * plan.kl_mask  # verl: -A r everywhere (no clip), + kl_coef |log r| on top-cov
    assert torch.allclose(loss, expect, atol=1e-12)
    clipped = make_method("kl-cov", ratio=1 / 6, kl_coef=0.1, verl_compat=False)
    loss_c = clipped.token_loss(clipped.prepare(adv, lp, old, mask, 0.5, 0), lp, old, mask)
    assert loss_c[0].item() == pytest.approx(-1.2) and loss_c[3].item() == pytest.approx(r + 0.05)
    with pytest.raises(ValueError, match="no PPO clip"):
        make_method("kl-cov", eps_high=0.28)
    make_method("kl-cov", eps_high=0.28, verl_compat=False)
    with pytest.raises(TypeError, match="verl_compat"):
        make_method("clip-cov", verl_compat="yes")


def test_entropic_pushes_toward_its_target():
    h = float(entropy(LOGITS))
    van = entropy_change(make_method("vanilla"))
    assert entropy_change(make_method("entropic", target=h + 0.3)) > van  # below target: weight negatives
    assert entropy_change(make_method("entropic", target=h - 0.3)) < van  # above target: weight positives
    m = make_method("entropic", target=h - 0.3)
    entropy_change(m)
    assert m.alpha == pytest.approx(0.3) and m.integral == pytest.approx(0.003)  # kp = 1, ki = 0.01


def test_entrocraft_band_and_predictive_push_toward_the_band():
    h = float(entropy(LOGITS))
    above = make_method("entrocraft-band", band=f"constant:{h - 0.3}..constant:{h - 0.2}", total_steps=10)
    below = make_method("entrocraft-band", band=f"constant:{h + 0.2}..constant:{h + 0.3}", total_steps=10)
    assert entropy_change(above) < 0 and entropy_change(below) > 0
    up = make_method("entrocraft-predictive", schedule=f"constant:{h + 0.02}", total_steps=10)
    down = make_method("entrocraft-predictive", schedule=f"constant:{h - 0.02}", total_steps=10)
    assert entropy_change(up) > 0 and entropy_change(down) < 0
    with pytest.raises(ValueError, match="needs contributions"):
        up.prepare(torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool),
                   0.5, 0)


def test_acceptance_diagnostics_use_the_signs_of_what_is_trained_on():
    # an all-correct group (GRPO advantage 0, raw +1) and a 2/4 group
    r = torch.tensor([1.0, 1, 1, 1, 1, -1, -1, 1], dtype=torch.float64)
    adv = compute_advantages(r.reshape(2, 4), "grpo")[0].reshape(-1, 1)
    lp, mask = torch.zeros(8, 1, dtype=torch.float64), torch.ones(8, 1, dtype=torch.bool)
    ref = make_method("entrocraft-band", band="constant:0.5..constant:0.6", total_steps=10, exact_reference=True)
    plan = ref.prepare(adv, lp, lp, mask, 0.9, 0, rewards=r)  # above the band: raw rewards, negatives zeroed
    assert plan.advantages.squeeze(-1).tolist() == [1.0, 1, 1, 1, 1, 0, 0, 1]
    d = plan.diagnostics
    assert (d["num_pos"], d["num_neg"], d["accepted_pos_fraction"], d["accepted_neg_fraction"]) == (6.0, 2.0, 1.0, 0.0)
    inside = ref.prepare(adv, lp, lp, mask, 0.55, 0, rewards=r)  # inside: the GRPO advantages are trained on
    assert (inside.diagnostics["num_pos"], inside.diagnostics["num_neg"]) == (2.0, 2.0)
    nsr = make_method("nsr", source="rewards").prepare(adv, lp, lp, mask, 0.5, 0, rewards=r)
    d = nsr.diagnostics
    assert (d["num_pos"], d["accepted_pos_fraction"], d["accepted_neg_fraction"]) == (6.0, 0.0, 1.0)


def test_methods_make_no_tensor_on_the_default_device():
    """With the default device set to 'meta', a tensor made without ``device=`` would be a meta tensor and
    mixing it with the CPU batch raises: every method keeps to the batch's device."""
    adv, lp, mask = _cov_batch()
    old = lp - 0.1
    c = -adv * 0.01
    r = adv.squeeze(-1).sign()
    tok_h = torch.ones(6, 1, dtype=torch.float64)
    for name in METHODS:
        m = make_method(name, total_steps=10, ratio=0.5) if name in ("clip-cov", "kl-cov") else make_method(
            name, total_steps=10)
        with torch.device("meta"):
            plan = m.prepare(adv, lp, old, mask, 0.55, 0, contributions=c, rewards=r)
            loss = m.token_loss(plan, lp, old, mask, token_entropy=tok_h)
            m.observe(-0.001)
        assert loss.device.type == "cpu" and plan.accepted.device.type == "cpu", name


# ----------------------------------------------------------------------------- fidelity to verl / TRL / the release
def test_dual_clip_bounds_negative_advantage_tokens_hand_computed():
    from entrotheory.methods import clipped_surrogate

    lp = torch.log(torch.tensor([[5.0, 2.0, 5.0, 0.5]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[-1.0, -1.0, 1.0, -2.0]])
    # r = 5, A = -1: max(-A r, -A clip(r)) = max(5, 1.2) = 5, dual clip min(5, 3) = 3
    # r = 2, A = -1: max(2, 1.2) = 2 < 3; r = 5, A = +1: -min(5, 1.2) = -1.2; r = 0.5, A = -2: max(1, 1.6) = 1.6
    dual = clipped_surrogate(lp, old, adv, 0.2, 0.2, clip_ratio_c=3.0)
    assert torch.allclose(dual, torch.tensor([[3.0, 2.0, -1.2, 1.6]]))
    plain = clipped_surrogate(lp, old, adv, 0.2, 0.2)
    assert torch.allclose(plain, torch.tensor([[5.0, 2.0, -1.2, 1.6]]))
    # the method's default (verl's clip_ratio_c = 3) is in the token loss; None switches it off
    mask = torch.ones(1, 4, dtype=torch.bool)
    for c, expected in ((3.0, dual), (None, plain)):
        m = make_method("vanilla", clip_ratio_c=c)
        plan = m.prepare(adv, lp, old, mask, 1.0, 0)
        assert torch.allclose(m.token_loss(plan, lp, old, mask), expected)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        make_method("vanilla", clip_ratio_c=1.0)


def test_release_clip_cov_configuration_is_accepted():
    """The release's Clip-Cov run: clip 1.0 / 1.0 and clip_ratio_c 10 (verl's clip_cov ignores the dual clip)."""
    m = make_method("clip-cov", eps_low=1.0, eps_high=1.0, clip_ratio_c=10.0)
    lp = torch.log_softmax(COV_STATE["logits"], -1)[COV_STATE["actions"]].unsqueeze(-1)
    mask = torch.ones_like(lp, dtype=torch.bool)
    plan = m.prepare(COV_STATE["adv"].unsqueeze(-1), lp, lp, mask, 1.0, 0)
    assert plan.eps_low == 1.0 and plan.eps_high == 1.0 and plan.clip_ratio_c is None
    assert torch.isfinite(m.token_loss(plan, lp, lp, mask)).all()
    with pytest.raises(ValueError, match="eps_low"):
        make_method("clip-cov", eps_low=1.5)


def test_loss_aggregation_modes_hand_computed():
    from entrotheory.methods import LOSS_AGG_MODES, aggregate_loss

    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    expected = {
        "token-mean": (1 + 2 + 3 + 4) / 4, "bnpo": 10 / 4, "token-sum": 10.0,
        "seq-mean-token-sum": (6 + 4) / 2, "seq-mean-token-mean": (2 + 4) / 2, "seq-mean-token-sum-norm": 5 / 3,
        "grpo": (2 + 4 + 0) / 3, "dr_grpo": 10 / (3 * 3),
    }
    assert set(expected) == set(LOSS_AGG_MODES)
    for mode, value in expected.items():
        assert float(aggregate_loss(loss, mask, mode)) == pytest.approx(value), mode
    assert float(aggregate_loss(loss, mask, "dr_grpo", horizon=8)) == pytest.approx(10 / 24)
    # whole-batch counts: micro-batch losses add up to the batch loss (§4.5); own counts do not
    for mode, kw in (("token-mean", {"num_tokens": 4}), ("seq-mean-token-mean", {"num_sequences": 2})):
        parts = sum(float(aggregate_loss(loss[i:i + 1], mask[i:i + 1], mode, **kw)) for i in range(3))
        assert parts == pytest.approx(expected[mode])
    own = sum(float(aggregate_loss(loss[i:i + 1], mask[i:i + 1], "token-mean")) for i in range(3))
    assert own == pytest.approx(2.0 + 4.0)  # the release's per-micro-batch normaliser: each row its own mean
    assert float(aggregate_loss(loss, torch.zeros_like(mask), "token-mean")) == 0.0
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate_loss(loss, mask, "seq-sum")


def test_gspo_sequence_ratio_value_and_gradient():
    from entrotheory.methods import sequence_log_ratio

    torch.manual_seed(0)
    lp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    lr = sequence_log_ratio(lp, old, mask)
    seq = torch.stack([(lp - old)[b][mask[b]].mean() for b in range(3)]).detach()
    assert torch.allclose(lr.detach(), seq.unsqueeze(-1).expand(3, 4))
    # gradient: d/d lp of sum(w * lr) is w (the sg trick keeps grad log pi_t)
    w = torch.randn(3, 4, dtype=torch.float64)
    (g,) = torch.autograd.grad((w * lr).sum(), lp)
    assert torch.allclose(g, w)
    # the method's token loss with importance_ratio="sequence": -min(s A, clip(s) A), no dual clip
    adv = torch.tensor([[1.0], [-1.0], [2.0]], dtype=torch.float64).expand(3, 4) * mask
    m = make_method("entrocraft-band", importance_ratio="sequence", total_steps=10)
    plan = m.prepare(adv, lp.detach(), old, mask, 0.65, 0)
    s = seq.exp().unsqueeze(-1)
    hand = -torch.minimum(s * plan.advantages, s.clamp(0.8, 1.2) * plan.advantages)
    assert torch.allclose(m.token_loss(plan, lp, old, mask), torch.where(mask, hand, torch.zeros_like(hand)))


def test_entropic_weights_raw_rewards_on_request():
    adv = torch.tensor([[0.5], [-1.5]])
    rewards = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1, dtype=torch.bool)
    lp = torch.zeros(2, 1)
    for source, base in (("advantages", adv), ("rewards", rewards.unsqueeze(-1))):
        m = make_method("entropic", target=0.5, source=source)
        plan = m.prepare(adv, lp, lp, mask, 0.7, 0, rewards=rewards)  # e = 0.2: alpha = kp e = 0.2
        assert torch.allclose(plan.advantages, base * torch.tensor([[1.2], [0.8]]))


def test_step_offset_reads_the_band_one_step_later():
    """The release counts steps from 1: a 0-based loop with step_offset=1 reads the band where the release does."""
    band = "linear:0.6->0.4..linear:0.7->0.5"
    ours = make_method("entrocraft-band", band=band, total_steps=10)
    release = make_method("entrocraft-band", band=band, total_steps=10, step_offset=1)
    adv, lp = torch.tensor([[1.0], [-1.0]]), torch.zeros(2, 1)
    mask = torch.ones(2, 1, dtype=torch.bool)
    d0 = ours.prepare(adv, lp, lp, mask, 0.5, 1).diagnostics
    d1 = release.prepare(adv, lp, lp, mask, 0.5, 0).diagnostics
    assert d1["lower"] == pytest.approx(0.58) and d1["upper"] == pytest.approx(0.68)  # l0 + (l1 - l0) 1/10
    assert (d0["lower"], d0["upper"], d0["regime"]) == (d1["lower"], d1["upper"], d1["regime"])
    with pytest.raises(ValueError, match="step_offset"):
        make_method("entrocraft-band", total_steps=10, step_offset=-1)


# ----------------------------------------------------------------------------- typed options
def test_typed_options_build_the_same_method_as_keywords():
    import dataclasses

    from entrotheory.methods import ClipCovOptions, EntrocraftOptions, KLCovOptions, MethodOptions

    g = torch.Generator().manual_seed(3)
    adv = torch.randn(16, 5, generator=g)
    lp = -torch.rand(16, 5, generator=g) * 3
    mask = torch.rand(16, 5, generator=g) > 0.2
    typed = make_method("clip-cov", options=ClipCovOptions(ratio=0.05, lb=-10.0, ub=10.0, seed=4))
    keyword = make_method("clip-cov", ratio=0.05, lb=-10.0, ub=10.0, seed=4)
    p1 = typed.prepare(adv, lp, lp, mask, 0.5, 0)
    p2 = keyword.prepare(adv, lp, lp, mask, 0.5, 0)
    assert p1.detach is not None and bool(p1.detach.any())
    assert torch.equal(p1.detach, p2.detach)
    # frozen, and every method's OPTIONS lists exactly its dataclass's fields and defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.options.ratio = 0.5  # type: ignore[misc]
    for cls in METHODS.values():
        assert issubclass(cls.Options, MethodOptions)
        assert cls.OPTIONS == {f.name: f.default for f in dataclasses.fields(cls.Options)}
    assert METHODS["clip-higher"].OPTIONS["eps_high"] == 0.28
    # the wrong options class, or both ways at once, are refused
    with pytest.raises(TypeError, match="takes KLCovOptions"):
        make_method("kl-cov", options=ClipCovOptions())
    with pytest.raises(TypeError, match="not both"):
        make_method("clip-cov", options=ClipCovOptions(), ratio=0.1)
    # KL-Cov: eps given under verl_compat is an error; without it they default to 0.2
    with pytest.raises(ValueError, match="eps_low"):
        KLCovOptions(eps_low=0.1)
    assert KLCovOptions(verl_compat=False).eps_low == 0.2
    # the Entrocraft options carry the sampler's, validated at once
    with pytest.raises(ValueError, match="unit"):
        EntrocraftOptions(unit="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only one of"):
        EntrocraftOptions(target=0.5, band="0.4..0.6")


@pytest.mark.parametrize(("name", "options", "match"), [
    ("clip-cov", {"ratio": 2.0}, "ratio"),
    ("clip-cov", {"lb": 3.0, "ub": 1.0}, "lb <= ub"),
    ("entropy-bonus", {"coef": "big"}, "coef must be a number"),
    ("w-reinforce", {"weight": -1.0}, "weight"),
    ("nsr", {"source": "logits"}, "source"),
    ("vanilla", {"importance_ratio": "batch"}, "importance_ratio"),
    ("vanilla", {"clip_ratio_c": 0.5}, "clip_ratio_c"),
    ("vanilla", {"total_steps": 0}, "total_steps"),
    ("entrocraft-predictive", {"step_offset": -1}, "step_offset"),
    ("entrocraft-predictive", {"calibration_factor": 0.0}, "calibration_factor"),
])
def test_bad_options_name_the_method_and_the_option(name, options, match):
    with pytest.raises((TypeError, ValueError), match=match) as info:
        make_method(name, **options)
    assert name in str(info.value)


def test_sampler_options_typed_and_keyword_agree():
    from entrotheory.rejection import EntropyRejectionSampler, SamplerOptions

    opts = SamplerOptions(lr=0.1, calibration_factor=2.0, tolerance=0.01)
    a = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=10, options=opts)
    b = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=10, lr=0.1, calibration_factor=2.0,
                                tolerance=0.01)
    assert a.calibrator.k == pytest.approx(0.2) and b.calibrator.k == pytest.approx(0.2)
    assert a.options == b.options
    with pytest.raises(TypeError, match="unknown option"):
        EntropyRejectionSampler("linear:1.0->0.5", total_steps=10, k_scael=2.0)
    with pytest.raises(TypeError, match="fit_offset must be a bool"):
        SamplerOptions(fit_offset=1)  # type: ignore[arg-type]
