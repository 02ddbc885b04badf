"""Entropy control on a single softmax "state" (docs/theory.md §4.4 and §4.7).

One state = one softmax over K actions; each step draws N samples from the policy, rewards
them, computes advantages, lets the sampler select, and takes one plain SGD step on the logits
(``logit_update(..., rule="pg")``: the exact gradient of the mean-over-N policy-gradient loss,
rejected samples at zero advantage and still counted in the mean). The measured entropy change
(exact) is fed back with ``observe``. Figures are printed (run ``pytest -s`` to see them) and asserted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from entrotheory import entropy, entropy_change_contributions, logit_update
from entrotheory.advantages import compute_advantages
from entrotheory.rejection import EntropyRejectionSampler
from entrotheory.schedules import Band, parse_band, parse_schedule

STEPS, N = 200, 256
DT = torch.float64


def ramp_logits(k: int, h0: float) -> torch.Tensor:
    """Logits ``-beta * a`` (a = 0..K-1, a geometric policy) with entropy ``h0`` (bisection on beta)."""
    base = -torch.arange(k, dtype=DT)
    lo, hi = 1e-4, 1e2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if float(entropy(base * mid)) > h0 else (lo, mid)
    return base * math.sqrt(lo * hi)


def pg_factor(z: torch.Tensor) -> torch.Tensor:
    """``pi_a (log pi_a + H) - sum_b pi_b^2 (log pi_b + H)``: a sample's pg contribution is ``-A`` times it / N."""
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    g = p * (lp - (p * lp).sum())
    return g - (p * g).sum()


RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def fixed_rewards(q: torch.Tensor) -> RewardFn:
    """Reward 1 with probability ``q[a]`` (else 0); GRPO advantages over the batch (one group)."""

    def fn(z, actions, g):
        r = (torch.rand(actions.shape[0], generator=g, dtype=DT) < q[actions]).to(DT)
        return compute_advantages(r, "grpo")[0]

    return fn


def premise_rewards(z, actions, g):
    """The premise-holding construction (§4.7): only samples of actions with a positive pg factor
    (the likely ones) carry a reward, a fair coin per sample; the other samples get advantage 0."""
    live = (pg_factor(z) > 0)[actions]
    adv = torch.zeros(actions.shape[0], dtype=DT)
    if int(live.sum()) > 1:
        coin = (torch.rand(int(live.sum()), generator=g, dtype=DT) < 0.5).to(DT)
        adv[live] = compute_advantages(coin, "grpo")[0]
    return adv


def simulate(z0, reward_fn: RewardFn, target, mode: str, lr: float, seed: int = 0):
    """Run STEPS steps; returns entropies H_0..H_STEPS, per-step regimes and diagnostics."""
    z = z0.clone()
    g = torch.Generator().manual_seed(seed)
    sampler = EntropyRejectionSampler(target, mode=mode, lr=lr)
    hs, regimes, saturated, accepted = [float(entropy(z))], [], 0, []
    for t in range(STEPS):
        actions = torch.multinomial(torch.softmax(z, -1), N, replacement=True, generator=g)
        adv = reward_fn(z, actions, g)
        h = float(entropy(z))
        contrib = entropy_change_contributions(z, actions, adv, "pg")
        sel = sampler.select(adv, h, t, contributions=contrib)
        regimes.append(sel.diagnostics["regime"])
        saturated += int(sel.diagnostics["saturated"])
        accepted.append(sel.diagnostics["accepted_fraction"])
        if not sel.empty:
            z = z + lr * logit_update(z, actions, sel.advantages, "pg")
            sampler.observe(float(entropy(z)) - h)
        hs.append(float(entropy(z)))
    return {"H": hs, "regimes": regimes, "saturated": saturated, "accepted": sum(accepted) / len(accepted),
            "k": sampler.k}


def tracking_error(hs, schedule) -> float:
    """Mean |H_t - target(t)| over t = 1..STEPS, as a fraction of the schedule's range."""
    errs = [abs(hs[t] - schedule(t)) for t in range(1, STEPS + 1)]
    return sum(errs) / len(errs) / schedule.value_range


def band_figures(hs, band: Band) -> dict[str, float]:
    """Fraction of steps inside the band after its first entry, and the mean distance outside it."""
    inside = [band.contains(hs[t], t) for t in range(STEPS + 1)]
    first = next((t for t, x in enumerate(inside) if x), None)
    if first is None:
        return {"inside": 0.0, "distance": sum(band.distance(hs[t], t) for t in range(STEPS + 1)) / (STEPS + 1),
                "first_entry": float("nan")}
    rest = range(first, STEPS + 1)
    return {"inside": sum(inside[t] for t in rest) / len(rest),
            "distance": sum(band.distance(hs[t], t) for t in rest) / len(rest), "first_entry": float(first)}


def wrong_way_below(run) -> float:
    """Fraction of the band rule's 'below' steps (NSR-like: keep negatives) that LOWERED entropy."""
    hs, reg = run["H"], run["regimes"]
    steps = [t for t, r in enumerate(reg) if r == "below"]
    return sum(hs[t + 1] < hs[t] for t in steps) / len(steps) if steps else float("nan")


# -------------------------------------------------------------------------------- tracking
# The state: K = 10 actions, a geometric policy whose likely actions are the poor ones
# (q from 0.1 for the likeliest to 0.9 for the rarest), so both directions stay reachable.
K_TRACK = 10
Q_TRACK = torch.linspace(0.1, 0.9, K_TRACK, dtype=DT)


@pytest.mark.parametrize("spec", ["linear:1.6->0.8", "linear:0.8->1.6"])
def test_predictive_tracks_linear_schedules(spec):
    schedule = parse_schedule(spec, STEPS)
    run = simulate(ramp_logits(K_TRACK, schedule(0)), fixed_rewards(Q_TRACK), schedule, "predictive", lr=1.0)
    err = tracking_error(run["H"], schedule)
    print(f"\n[tracking] {spec}: mean |H - target| = {100 * err:.3f}% of range, accepted "
          f"{100 * run['accepted']:.1f}% of samples, saturated steps {run['saturated']}, k = {run['k']:.3f}")
    assert err < 0.02
    assert run["accepted"] > 0.5  # it controls by rejecting a minority, not by starving the update


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predictive_tracks_a_falling_schedule_with_random_rewards(seed):
    schedule = parse_schedule("linear:1.6->0.8", STEPS)
    q = torch.rand(K_TRACK, generator=torch.Generator().manual_seed(100 + seed), dtype=DT)
    run = simulate(ramp_logits(K_TRACK, schedule(0)), fixed_rewards(q), schedule, "predictive", lr=1.0, seed=seed)
    err = tracking_error(run["H"], schedule)
    print(f"\n[tracking] random q seed {seed}, falling: {100 * err:.3f}% of range")
    assert err < 0.02


def test_out_of_reach_targets_are_reported_as_saturated():
    # Rewards independent of the action: rising needs mass on near-zero-probability actions, which plain
    # SGD on logits barely moves (their gradient is proportional to pi). The sampler says so.
    schedule = parse_schedule("linear:0.8->2.2", STEPS)
    flat = torch.full((K_TRACK,), 0.5, dtype=DT)
    run = simulate(ramp_logits(K_TRACK, 0.8), fixed_rewards(flat), schedule, "predictive", lr=1.0)
    err = tracking_error(run["H"], schedule)
    print(f"\n[tracking] out of reach (0.8 -> 2.2, flat rewards): error {100 * err:.1f}% of range, "
          f"saturated on {run['saturated']} of {STEPS} steps")
    assert run["saturated"] > 20 and err > 0.02
    assert run["H"][-1] > 1.2  # still moved the right way as far as it could


# ------------------------------------------------------------------------------- band mode
def band_below_start(h0: float) -> Band:
    """Upper bound 0.05 below the start, width 0.2, both falling by 0.3 over the run."""
    u0 = h0 - 0.05
    l0 = u0 - 0.2
    return parse_band(f"linear:{l0:.6f}->{l0 - 0.3:.6f}..linear:{u0:.6f}->{u0 - 0.3:.6f}", STEPS)


PREMISE_LOGITS = torch.tensor([0.0] * 4 + [-4.0] * 60, dtype=DT)
RAMP20 = -0.35 * torch.arange(20, dtype=DT)
STATES = {
    "premise holds": (PREMISE_LOGITS, premise_rewards),
    "uncorrelated rewards": (RAMP20, fixed_rewards(torch.rand(20, generator=torch.Generator().manual_seed(5),
                                                              dtype=DT))),
    "rare failures": (RAMP20, fixed_rewards(torch.tensor([1.0] * 4 + [0.0] * 16, dtype=DT))),
}


@pytest.fixture(scope="module")
def band_runs():
    out = {}
    for name, (z0, reward_fn) in STATES.items():
        band = band_below_start(float(entropy(z0)))
        for mode in ("band", "predictive"):
            for lr in (1.0, 0.2):
                run = simulate(z0, reward_fn, band, mode, lr=lr)
                out[name, mode, lr] = {**run, **band_figures(run["H"], band), "band": band}
    return out


def test_band_mode_where_the_premise_holds(band_runs):
    b = band_runs["premise holds", "band", 1.0]
    print(f"\n[band] premise holds, band below the start (RAFT++ side), lr 1.0: band mode inside "
          f"{100 * b['inside']:.1f}% after first entry (step {b['first_entry']:.0f}), "
          f"mean distance {b['distance']:.5f}")
    assert b["inside"] >= 0.8
    assert band_runs["premise holds", "predictive", 1.0]["inside"] >= 0.8
    # the NSR side: start below a band, the rule keeps the (likely) failures and raises entropy
    h0 = float(entropy(PREMISE_LOGITS))
    band = parse_band(f"constant:{h0 + 0.05:.6f}..constant:{h0 + 0.25:.6f}", STEPS)
    run = simulate(PREMISE_LOGITS, premise_rewards, band, "band", lr=1.0)
    fig = band_figures(run["H"], band)
    print(f"[band] premise holds, band above the start (NSR side), lr 1.0: inside {100 * fig['inside']:.1f}% "
          f"after first entry (step {fig['first_entry']:.0f}); "
          f"below-steps lowering H {100 * wrong_way_below(run):.0f}%")
    assert fig["inside"] >= 0.8 and wrong_way_below(run) == 0.0


@pytest.mark.parametrize("state", ["uncorrelated rewards", "rare failures"])
def test_band_mode_loses_where_the_premise_fails_and_predictive_tracks(band_runs, state):
    for lr in (1.0, 0.2):
        b, p = band_runs[state, "band", lr], band_runs[state, "predictive", lr]
        centre_err = sum(abs(p["H"][t] - p["band"].centre(t)) for t in range(1, STEPS + 1)) / STEPS
        print(f"\n[band] {state}, lr {lr}: band mode inside {100 * b['inside']:.1f}% (distance {b['distance']:.3f}, "
              f"final H {b['H'][-1]:.3f}, below-steps lowering H {100 * wrong_way_below(b):.0f}%); predictive "
              f"inside {100 * p['inside']:.1f}% (distance {p['distance']:.4f}, mean |H - centre| {centre_err:.4f})")
        assert b["inside"] < 0.5 and b["distance"] > 0.05
        assert p["inside"] >= 0.95 and p["distance"] < 0.005 and centre_err < 0.02
    if state == "rare failures":
        # the sign flip: keeping only the (rare) failures while below the band lowers entropy further
        assert wrong_way_below(band_runs[state, "band", 0.2]) > 0.9
