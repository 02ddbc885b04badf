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
        contrib = entropy_change_contributions(z, actions, adv, "pg").unsqueeze(-1) * b
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
    kc = entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=1.0), **kw)
    assert van < 0 and cc > van and kc > van
    # KL-Cov does nothing in the first, on-policy epoch (|log pi - log pi_old| = 0 has zero gradient)
    assert entropy_change(make_method("kl-cov", ratio=0.25, kl_coef=1.0), lr=1.0, **COV_STATE) == pytest.approx(
        entropy_change(make_method("vanilla"), lr=1.0, **COV_STATE))


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
