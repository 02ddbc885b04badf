"""The entropy state estimate (docs/theory.md §5.6) against Monte Carlo ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrotheory.state_estimate import EntropyStateEstimate, batch_entropy_variance

SEEDS, STEPS = 3000, 30
Q, R = 0.01**2, 0.15**2  # one update moves entropy ~0.01, a batch swings ~0.15 (issue 12's numbers)


def simulate(seed_offset: int = 0):
    """Random walk x_{k+1} = x_k + d_k + w_k (d_k known, w_k ~ N(0, Q)), observed as y_k = x_k + N(0, R)."""
    rng = np.random.default_rng(1234 + seed_offset)
    x = 1.0 + 0.3 * rng.standard_normal(SEEDS)
    d = -0.02 * np.ones(STEPS)
    errs_filter, errs_raw, post_var = np.zeros((STEPS, SEEDS)), np.zeros((STEPS, SEEDS)), np.zeros(STEPS)
    filters = [EntropyStateEstimate() for _ in range(SEEDS)]
    for k in range(STEPS):
        y = x + math.sqrt(R) * rng.standard_normal(SEEDS)
        for s, f in enumerate(filters):
            if k:
                f.predict(d[k - 1], Q)
            f.update(float(y[s]), R)
            errs_filter[k, s] = f.mean - x[s]
        errs_raw[k] = y - x
        post_var[k] = filters[0].variance
        x = x + d[k] + math.sqrt(Q) * rng.standard_normal(SEEDS)
    return errs_filter, errs_raw, post_var


def test_filter_error_variance_matches_kalman_posterior_and_beats_raw_observation():
    errs, raw, post = simulate()
    mse = (errs**2).mean(1)
    # each step's MSE over n seeds estimates P_k with relative std sqrt(2 / n) (chi-square); 5 sigma
    tol = 5 * math.sqrt(2 / SEEDS)
    np.testing.assert_array_less(np.abs(mse / post - 1), tol)
    # unbiased: the mean error is within 5 standard errors of 0 at every step
    np.testing.assert_array_less(np.abs(errs.mean(1)), 5 * np.sqrt(post / SEEDS))
    # the raw observation's error variance is R; the filter's is far lower after a few steps
    assert abs((raw**2).mean() / R - 1) < 5 * math.sqrt(2 / raw.size)
    assert mse[-1] < 0.25 * R
    # steady state: the posterior variance converges to the Riccati fixed point
    # P = (P + Q) R / (P + Q + R)  =>  P = (-Q + sqrt(Q^2 + 4 Q R)) / 2
    p_inf = (-Q + math.sqrt(Q * Q + 4 * Q * R)) / 2
    assert post[-1] == pytest.approx(p_inf, rel=0.05)


def test_batch_entropy_variance_matches_the_sampling_variance_of_the_token_mean():
    """Batches of rows with random lengths and random per-row entropy levels: the estimated variance of the
    batch token-mean, averaged over batches, equals its Monte Carlo variance (tolerance from the sample size)."""
    g = torch.Generator().manual_seed(0)
    n_batches, rows, t_max = 4000, 16, 6
    level = 1.0 + 0.4 * torch.randn(n_batches, rows, 1, generator=g)
    tok_h = (level + 0.3 * torch.randn(n_batches, rows, t_max, generator=g)).clamp(min=0).double()
    lengths = torch.randint(1, t_max + 1, (n_batches, rows), generator=g)
    mask = torch.arange(t_max)[None, None, :] < lengths[..., None]
    means, variances = [], []
    for b in range(n_batches):
        m, v = batch_entropy_variance(tok_h[b], mask[b])
        means.append(float(m))
        variances.append(float(v))
    means_np = np.array(means)
    mc_var = means_np.var(ddof=1)
    # the MC variance has relative std sqrt(2 / (n - 1)); the mean estimate's std is small beside it.
    # The estimator itself is first order in 1/rows (ratio estimator): allow that bias on top (1/rows).
    tol = 4 * math.sqrt(2 / (n_batches - 1)) + 1.0 / rows
    assert abs(np.mean(variances) / mc_var - 1) < tol, (np.mean(variances), mc_var)
    # token mean as computed by hand
    assert means[0] == pytest.approx(float(tok_h[0][mask[0]].mean()), rel=1e-12)


def test_groups_are_the_independent_units():
    """Rows of one prompt share its entropy level: treating them as independent underestimates the variance."""
    g = torch.Generator().manual_seed(1)
    prompts, per, t = 8, 8, 3
    n_batches = 3000
    est_rows, est_groups, means = [], [], []
    groups = torch.arange(prompts).repeat_interleave(per)
    mask = torch.ones(prompts * per, t, dtype=torch.bool)
    for _ in range(n_batches):
        level = 1.0 + 0.3 * torch.randn(prompts, 1, 1, generator=g)
        h = (level + 0.1 * torch.randn(prompts, per, t, generator=g)).reshape(prompts * per, t).double()
        m, v_rows = batch_entropy_variance(h, mask)
        _, v_groups = batch_entropy_variance(h, mask, groups)
        means.append(float(m))
        est_rows.append(float(v_rows))
        est_groups.append(float(v_groups))
    mc = np.var(means, ddof=1)
    tol = 4 * math.sqrt(2 / (n_batches - 1)) + 1.0 / prompts
    assert abs(np.mean(est_groups) / mc - 1) < tol
    assert np.mean(est_rows) < 0.5 * mc


def test_state_dict_round_trip_and_prior():
    f = EntropyStateEstimate()
    assert not f.initialised
    assert f.update(1.2, 0.04) == 1.2 and f.variance == 0.04  # no prior: the first observation is the estimate
    f.predict(-0.1, 0.01)
    f.update(0.9, 0.04)
    k = 0.05 / 0.09
    assert f.mean == pytest.approx(1.1 + k * (0.9 - 1.1)) and f.variance == pytest.approx((1 - k) * 0.05)
    g = EntropyStateEstimate()
    g.load_state_dict(f.state_dict())
    assert g.state_dict() == f.state_dict()
    h = EntropyStateEstimate(mean=2.0, variance=0.0)  # a certain prior ignores observations
    assert h.update(0.0, 1.0) == 2.0


def test_clear_errors():
    f = EntropyStateEstimate()
    with pytest.raises(ValueError, match="variance"):
        f.update(1.0, -0.1)
    with pytest.raises(ValueError, match="finite"):
        f.update(float("nan"), 0.1)
    with pytest.raises(ValueError, match="variance"):
        f.predict(0.0, float("nan"))
    with pytest.raises(ValueError, match=">= 0"):
        EntropyStateEstimate(variance=-1.0)
    with pytest.raises(KeyError):
        f.load_state_dict({"mean": 1.0})
    with pytest.raises(ValueError, match="at least 2"):
        batch_entropy_variance(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask shape"):
        batch_entropy_variance(torch.ones(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        batch_entropy_variance(torch.full((2, 3), float("nan")), torch.ones(2, 3, dtype=torch.bool))
