import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotheory import entropy_change_contributions
from entrotheory.advantages import ESTIMATORS, compute_advantages
from entrotheory.rejection import EntropyRejectionSampler, Selection, StepSizeCalibrator
from entrotheory.schedules import parse_band, parse_schedule

BAND = "linear:0.6->0.4..linear:0.7->0.5"


def band_sampler(**kw):
    return EntropyRejectionSampler(BAND, mode="band", total_steps=100, **kw)


# ------------------------------------------------------------------------------------------ band
def test_band_regimes_on_a_hand_built_batch():
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0])
    s = band_sampler()
    above = s.select(adv, 0.9, 0)  # upper(0) = 0.7
    assert above.accepted.tolist() == [True, False, True, False, False]
    assert above.advantages.tolist() == [1.0, 0.0, 0.5, 0.0, 0.0]
    d = above.diagnostics
    assert d["regime"] == "above" and d["accepted_pos_fraction"] == 1.0 and d["accepted_neg_fraction"] == 0.0
    assert d["accepted_fraction"] == pytest.approx(2 / 5)
    below = s.select(adv, 0.3, 0)
    assert below.accepted.tolist() == [False, True, False, True, False]
    assert below.diagnostics["regime"] == "below"
    inside = s.select(adv, 0.65, 0)
    assert inside.accepted.all() and torch.equal(inside.advantages, adv)
    # the band moves: at step 100 the band is [0.4, 0.5], so 0.65 is above
    assert s.select(adv, 0.65, 100).diagnostics["regime"] == "above"


def test_band_per_token_with_mask_rejects_whole_rows():
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0], [0.5, 0.5, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    sel = band_sampler().select(adv, 0.9, 0, mask=mask)
    assert sel.accepted.tolist() == [[True, True, False], [False, False, False], [True, False, False]]
    assert sel.advantages.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]
    assert sel.diagnostics["num_samples"] == 3.0


def released_rule(rewards, entropy, step, total_steps=100):
    """Independent transcription of the released grpo_range_linear rule (reference.md)."""
    lower = 0.6 + (0.4 - 0.6) * step / total_steps
    upper = 0.7 + (0.5 - 0.7) * step / total_steps
    if entropy > upper:
        return rewards.clamp(min=0)
    if entropy < lower:
        return rewards.clamp(max=0)
    out = torch.zeros_like(rewards)
    for i, g in enumerate(rewards):
        if g.numel() == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = g.mean(), g.std(unbiased=True)
        out[i] = (g - mean) / (std + 1e-6)
    return out


@given(
    st.lists(st.sampled_from([-1.0, 1.0]), min_size=8, max_size=8),
    st.floats(0.0, 1.2),
    st.integers(0, 100),
)
@settings(max_examples=80, deadline=None)
def test_exact_reference_reproduces_the_released_rule(rewards, entropy, step):
    r = torch.tensor(rewards, dtype=torch.float64).reshape(2, 4)
    grpo, _ = compute_advantages(r, "grpo")
    sel = band_sampler(exact_reference=True).select(grpo.reshape(-1), entropy, step, rewards=r.reshape(-1))
    expected = released_rule(r, entropy, step).reshape(-1)
    assert torch.allclose(sel.advantages, expected, atol=1e-12)
    assert not torch.isnan(sel.advantages).any()


def test_exact_reference_differs_from_default_outside_the_band_only():
    r = torch.tensor([1.0, 1.0, 1.0, -1.0])
    adv, _ = compute_advantages(r, "grpo")
    ref = band_sampler(exact_reference=True).select(adv, 0.9, 0, rewards=r)
    ours = band_sampler().select(adv, 0.9, 0)
    assert torch.equal(ref.accepted, ours.accepted)
    assert torch.equal(ref.advantages, torch.tensor([1.0, 1.0, 1.0, 0.0]))  # raw reward
    assert not torch.equal(ours.advantages, ref.advantages)  # group-normalised 0.5
    inside_ref = band_sampler(exact_reference=True).select(adv, 0.65, 0, rewards=r)
    assert torch.equal(inside_ref.advantages, adv)
    with pytest.raises(ValueError, match="raw rewards"):
        band_sampler(exact_reference=True).select(adv, 0.9, 0)


# ---------------------------------------------------------------------------------- all rejected
def test_all_rejected_is_an_empty_valid_selection():
    s = band_sampler()
    adv = torch.tensor([1.0, 0.5, 0.0])  # no negatives, entropy below the band
    sel = s.select(adv, 0.1, 0)
    assert isinstance(sel, Selection) and sel.empty
    assert not sel.accepted.any() and torch.equal(sel.advantages, torch.zeros(3))
    assert sel.diagnostics["all_rejected"] == 1.0 and "skip" in sel.diagnostics["note"]
    assert sel.diagnostics["accepted_neg_fraction"] == 1.0  # vacuous: no negative sample was rejected
    for v in sel.diagnostics.values():
        assert isinstance(v, str) or v == v  # no NaN
    # predictive: entropy too low, every contribution pushes down -> keeps nothing, says saturated
    p = EntropyRejectionSampler("constant:1.0", mode="predictive", total_steps=10)
    sel = p.select(adv, 0.5, 0, contributions=torch.tensor([-0.1, -0.2, 0.0]))
    assert sel.empty and sel.diagnostics["saturated"] == 1.0
    assert torch.equal(sel.advantages, torch.zeros(3))
    assert p.observe(0.0) == p.k  # skipped step: nothing to calibrate


def test_zero_mask_batch():
    sel = band_sampler().select(torch.ones(2, 3), 0.65, 0, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert sel.empty and not sel.accepted.any() and "empty batch" in sel.diagnostics["note"]


# ------------------------------------------------------------------------------------ predictive
def test_predictive_hand_built_known_answer():
    # target(1) - H = 0.995 - 1.0 = -0.005; with k = 1 the goal is a contribution sum of -0.005.
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    c = torch.tensor([-0.01, 0.02, -0.005, 0.001])  # sum 0.006: too high
    s = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=100, lr=1.0)
    sel = s.select(adv, 1.0, 0, contributions=c)
    # prefixes of wrong-way items sorted (0.02, 0.001): sums 0.006, -0.014, -0.015 -> errors .011 .009 .010
    assert sel.accepted.tolist() == [True, False, True, True]
    assert sel.diagnostics["predicted_change"] == pytest.approx(-0.014, abs=1e-7)
    assert sel.diagnostics["wrong_way_rejected"] == 1.0 and sel.diagnostics["saturated"] == 0.0
    # tolerance: 0.0111 nats of slack makes "reject nothing" good enough
    s2 = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=100, tolerance=0.0111)
    assert s2.select(adv, 1.0, 0, contributions=c).accepted.all()


def test_predictive_rising_rejects_the_most_negative_first():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    c = torch.tensor([-0.03, -0.001, 0.01, 0.002])
    s = EntropyRejectionSampler("constant:1.02", mode="predictive", total_steps=10)
    sel = s.select(adv, 1.0, 0, contributions=c)  # desired +0.02, out of reach: best is 0.012
    assert sel.accepted.tolist() == [False, False, True, True]  # every down-pusher rejected, up-pushers kept
    assert sel.diagnostics["regime"] == "below" and sel.diagnostics["saturated"] == 1.0
    sel = s.select(adv, 1.0 + 0.0125, 0, contributions=c)  # desired +0.0075: rejecting -0.03 suffices
    assert sel.accepted.tolist() == [False, True, True, True] and sel.diagnostics["saturated"] == 0.0


def test_predictive_token_input_is_normalised_by_masked_tokens():
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    c = torch.tensor([[-0.3, -0.3], [0.3, 9.0]])  # the off-mask 9.0 must be ignored
    s = EntropyRejectionSampler("constant:2.0", mode="predictive", total_steps=10)
    sel = s.select(adv, 2.0, 0, contributions=c, mask=mask)  # desired 0: keep both (sum -0.3/3)
    assert sel.diagnostics["predicted_change_all"] == pytest.approx(-0.3 / 3)
    assert sel.accepted.tolist() == [[True, True], [True, False]]
    tok = EntropyRejectionSampler("constant:2.0", mode="predictive", total_steps=10, unit="token")
    sel = tok.select(adv, 2.0, 0, contributions=c, mask=mask)
    # per token: sum -0.3; rejecting one -0.3/3 token reaches exactly 0
    assert int(sel.accepted.sum()) == 2 and sel.diagnostics["predicted_change"] == pytest.approx(0.0, abs=1e-7)


@given(
    st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=7),
    st.floats(-3.0, 3.0),
)
@settings(max_examples=150, deadline=None)
def test_predictive_guarantees_against_brute_force(contribs, goal):
    c = torch.tensor(contribs, dtype=torch.float64)
    adv = torch.ones_like(c)
    s = EntropyRejectionSampler("constant:5.0", mode="predictive", total_steps=10, lr=1.0)
    h = 5.0 - goal if goal <= 5.0 else 0.0
    goal = 5.0 - h
    sel = s.select(adv, h, 0, contributions=c)
    achieved = float(c[sel.accepted].sum())
    err = abs(achieved - goal)
    total = float(c.sum())
    sign = 1.0 if total > goal else -1.0
    wrong = sorted([float(x) for x in c if x * sign > 0], key=lambda x: -abs(x))
    prefix_errs = [abs(total - sum(wrong[:m]) - goal) for m in range(len(wrong) + 1)]
    # (1) closest among the prefix selections; (2) only wrong-way samples are rejected
    assert err <= min(prefix_errs) + 1e-9
    assert all(float(x) * sign > 0 for x in c[~sel.accepted])
    # (3) saturated <=> the best of ALL subsets on that side is still short of the goal
    best = max(sum(sub) * -sign for r in range(len(contribs) + 1)
                for sub in itertools.combinations(contribs, r))
    if sel.diagnostics["saturated"]:
        assert abs(achieved * -sign - best) < 1e-9 and best < goal * -sign + 1e-9
    # (4) fewest rejections: no subset with fewer rejections crosses the goal when we needed to cross
    n_rej = int((~sel.accepted).sum())
    if n_rej and (achieved - goal) * sign <= 0:
        for r in range(n_rej - 1):
            for sub in itertools.combinations(range(len(contribs)), r):
                kept = total - sum(contribs[i] for i in sub)
                assert (kept - goal) * sign > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_agnostic(estimator):
    """Same selection logic whatever produced the advantages (sign rule / contribution rule)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=g, dtype=torch.float64)
    actions = torch.multinomial(torch.softmax(logits, -1), 32, replacement=True, generator=g)
    rewards = (torch.rand(32, generator=g) < 0.4).double() * 2 - 1
    adv, _ = compute_advantages(rewards.reshape(4, 8), estimator)
    adv = adv.reshape(-1)
    sel = band_sampler().select(adv, 0.9, 0)
    assert torch.equal(sel.accepted, adv > 0)
    sel = band_sampler().select(adv, 0.3, 0)
    assert torch.equal(sel.accepted, adv < 0)
    c = entropy_change_contributions(logits, actions, adv, "pg")
    s = EntropyRejectionSampler("constant:1.0", mode="predictive", total_steps=10)
    total = float(c.sum())
    sel = s.select(adv, 1.0 - 0.5 * total, 0, contributions=c)  # desired change: half the full change
    achieved = float(c[sel.accepted].sum())
    assert abs(achieved - 0.5 * total) < 0.5 * abs(total)  # strictly closer than accepting everything
    assert (~sel.accepted).any()
    assert all(float(x) * total > 0 for x in c[~sel.accepted])  # only wrong-way samples rejected


# ----------------------------------------------------------------------------------- calibration
def test_calibration_learns_scale_offset_and_resists_outliers():
    g = torch.Generator().manual_seed(1)
    pairs = [1e-3 * (1 + float(torch.rand(1, generator=g))) for _ in range(60)]
    scale_only = StepSizeCalibrator(k_init=1e-6)
    for i, p in enumerate(pairs):
        scale_only.update(p, 1.0 if i in (30, 40) else 400e-6 * p)  # LLM-like 400x, two wild outliers
    assert scale_only.k == pytest.approx(400e-6, rel=0.05)  # unguarded LS would be ~1e3 times off
    drift = StepSizeCalibrator(k_init=1e-6)
    for p in pairs:
        drift.update(p, 400e-6 * p - 2e-7)  # plus a constant negative drift
    # the calibrated prediction is right over the observed range (the weak ridge prior on the
    # offset costs a little accuracy at the ends of the range)
    assert drift.predict(1.5e-3) == pytest.approx(400e-6 * 1.5e-3 - 2e-7, rel=0.03)
    for p in (1e-3, 2e-3):
        assert drift.predict(p) == pytest.approx(400e-6 * p - 2e-7, rel=0.10)
    assert drift.offset < 0
    origin = StepSizeCalibrator(k_init=1.0, fit_offset=False)
    for _ in range(5):
        origin.update(0.1, 0.3)
    assert origin.k == pytest.approx(3.0) and origin.offset == 0.0
    floor = StepSizeCalibrator(k_init=1.0)
    for _ in range(5):
        floor.update(0.1, -0.3)  # measured opposite to the prediction
    assert floor.k == pytest.approx(1e-3)  # positive floor


def test_sampler_observe_and_state_dict_round_trip():
    s = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=100, lr=0.1)
    assert s.k == pytest.approx(0.1)  # default before data: k = lr
    adv = torch.tensor([1.0, -1.0])
    for step in range(5):
        s.select(adv, 1.0, step, contributions=torch.tensor([-0.01, 0.004]))
        s.observe(3.0 * s.last_diagnostics["predicted_change"] / s.k)
    state = s.state_dict()
    t = EntropyRejectionSampler("linear:1.0->0.5", mode="predictive", total_steps=100, lr=0.1)
    t.load_state_dict(state)
    assert t.k == s.k and t.calibrator.offset == s.calibrator.offset
    sel_s = s.select(adv, 1.0, 7, contributions=torch.tensor([-0.01, 0.004]))
    sel_t = t.select(adv, 1.0, 7, contributions=torch.tensor([-0.01, 0.004]))
    assert sel_s.diagnostics == sel_t.diagnostics
    with pytest.raises(ValueError, match="mode"):
        band_sampler().load_state_dict(state)


# ----------------------------------------------------------------------------------- bad input
def test_bad_input_messages():
    with pytest.raises(ValueError, match="unknown mode"):
        EntropyRejectionSampler(BAND, mode="magic", total_steps=10)
    with pytest.raises(ValueError, match="total_steps is required"):
        EntropyRejectionSampler(BAND)
    with pytest.raises(ValueError, match="band mode needs a band"):
        EntropyRejectionSampler("linear:0.7->0.5", mode="band", total_steps=10)
    with pytest.raises(TypeError, match="unknown option"):
        EntropyRejectionSampler(BAND, total_steps=10, learning_rate=1.0)
    with pytest.raises(ValueError, match="exact_reference"):
        EntropyRejectionSampler("constant:0.5", mode="predictive", total_steps=10, exact_reference=True)
    p = EntropyRejectionSampler("constant:0.5", mode="predictive", total_steps=10)
    with pytest.raises(ValueError, match="needs contributions"):
        p.select(torch.ones(3), 0.5, 0)
    with pytest.raises(ValueError, match="contributions shape"):
        p.select(torch.ones(3), 0.5, 0, contributions=torch.ones(4))
    with pytest.raises(ValueError, match="mask shape"):
        p.select(torch.ones(3), 0.5, 0, contributions=torch.ones(3), mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        p.select(torch.tensor([1.0, float("nan")]), 0.5, 0, contributions=torch.ones(2))
    with pytest.raises(ValueError, match="entropy"):
        p.select(torch.ones(3), -0.5, 0, contributions=torch.ones(3))
    with pytest.raises(ValueError, match="step"):
        p.select(torch.ones(3), 0.5, -1, contributions=torch.ones(3))
    with pytest.raises(ValueError, match="measured_change"):
        p.observe(float("inf"))


def test_targets_accept_objects_and_centre_width():
    band = parse_band(BAND, 100)
    s = EntropyRejectionSampler(band, mode="predictive")
    assert s.target_entropy(0) == pytest.approx(0.65)  # predictive aims at the band centre
    s = EntropyRejectionSampler(parse_schedule("constant:0.6", 10), mode="band", width=0.2)
    assert s.band.lower(0) == pytest.approx(0.5) and s.band.upper(0) == pytest.approx(0.7)
