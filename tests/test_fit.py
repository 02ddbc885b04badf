"""entrotheory.fit_measured_on_predicted against numpy and scipy, and its degenerate cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from entrotheory import LineFit, fit_measured_on_predicted
from entrotheory.fit import MIN_FIT_PAIRS


@pytest.fixture
def noisy_line() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    p = rng.normal(size=200) * 1e-3
    return p, 1.7 * p + 2e-4 + rng.normal(size=200) * 5e-4


def test_ols_matches_scipy_linregress(noisy_line):
    p, m = noisy_line
    fit = fit_measured_on_predicted(p, m, line="ols")
    ref = stats.linregress(p, m)
    assert fit.n == 200
    assert fit.correlation == pytest.approx(ref.rvalue, rel=1e-12)
    assert fit.slope == pytest.approx(ref.slope, rel=1e-12)
    assert fit.intercept == pytest.approx(ref.intercept, rel=1e-10)
    assert fit.r2_identity == pytest.approx(1 - ((m - p) ** 2).sum() / ((m - m.mean()) ** 2).sum(), rel=1e-12)
    assert fit.sign_agreement == pytest.approx(np.mean(np.sign(p) == np.sign(m)), abs=0)
    assert 0.5 < fit.sign_agreement < 1.0  # the noise flips some signs: the statistic is not trivially 1


def test_origin_slope_is_least_squares_through_zero(noisy_line):
    p, m = noisy_line
    fit = fit_measured_on_predicted(p, m, line="origin")
    (slope,), *_ = np.linalg.lstsq(p[:, None], m, rcond=None)
    assert fit.slope == pytest.approx(slope, rel=1e-12)
    assert fit.intercept == 0.0
    # the intercept of the data pulls the two lines apart
    assert abs(fit.slope - fit_measured_on_predicted(p, m, line="ols").slope) > 1e-3
    assert fit.correlation == pytest.approx(np.corrcoef(p, m)[0, 1], rel=1e-12)


def test_sign_agreement_all_vs_nonzero():
    p = np.array([0.0, 1.0, -1.0, 2.0, 0.0, -3.0])
    m = np.array([0.0, 0.5, 0.2, 0.0, 1.0, -1.0])
    # all: (0,0) agrees, (1,.5) agrees, (-1,.2) no, (2,0) no, (0,1) no, (-3,-1) agrees -> 3/6
    assert fit_measured_on_predicted(p, m, signs="all").sign_agreement == 0.5
    # nonzero: only (1,.5), (-1,.2), (-3,-1) -> 2/3
    assert fit_measured_on_predicted(p, m, signs="nonzero").sign_agreement == pytest.approx(2 / 3)
    zeros = fit_measured_on_predicted(np.zeros(4), np.arange(4.0), signs="nonzero")
    assert math.isnan(zeros.sign_agreement)


def test_non_finite_pairs_are_dropped_and_inputs_any_array_like():
    p = [1.0, float("nan"), 2.0, 3.0, 4.0]
    m = [1.1, 2.0, 2.1, float("inf"), 3.9]
    fit = fit_measured_on_predicted(p, m)
    ref = fit_measured_on_predicted([1.0, 2.0, 4.0], [1.1, 2.1, 3.9])
    assert fit == ref and fit.n == 3
    assert fit_measured_on_predicted(torch.tensor(p), np.array(m)) == fit
    assert fit_measured_on_predicted(np.array(p).reshape(5, 1), m) == fit


def test_degenerate_inputs_give_nan_not_errors():
    nan_fields = ("correlation", "slope", "intercept", "r2_identity", "sign_agreement")
    few = fit_measured_on_predicted([1.0] * (MIN_FIT_PAIRS - 1), [2.0] * (MIN_FIT_PAIRS - 1))
    assert few.n == MIN_FIT_PAIRS - 1 and all(math.isnan(getattr(few, k)) for k in nan_fields)
    flat_m = fit_measured_on_predicted([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], line="ols")
    assert math.isnan(flat_m.correlation) and math.isnan(flat_m.r2_identity)
    assert flat_m.slope == 0.0 and flat_m.intercept == 5.0  # OLS is defined: a flat line
    flat_p = fit_measured_on_predicted([2.0, 2.0, 2.0], [1.0, 2.0, 4.0], line="origin")
    assert math.isnan(flat_p.correlation)
    assert flat_p.slope == pytest.approx(7 / 6)  # through the origin only sum p^2 > 0 is needed
    assert math.isnan(fit_measured_on_predicted([2.0, 2.0, 2.0], [1.0, 2.0, 4.0], line="ols").slope)
    assert math.isnan(fit_measured_on_predicted([0.0] * 3, [1.0, 2.0, 3.0], line="origin").slope)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="3 values but measured has 2"):
        fit_measured_on_predicted([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="line must be 'origin' or 'ols'"):
        fit_measured_on_predicted([1.0] * 3, [1.0] * 3, line="lad")
    with pytest.raises(ValueError, match="signs must be"):
        fit_measured_on_predicted([1.0] * 3, [1.0] * 3, signs="some")
    with pytest.raises(TypeError, match="predicted must be"):
        fit_measured_on_predicted(["a", "b", "c"], [1.0] * 3)


def test_as_dict_names_every_statistic():
    fit = fit_measured_on_predicted([1.0, 2.0, 3.0], [1.0, 2.0, 3.5])
    assert isinstance(fit, LineFit)
    assert set(fit.as_dict()) == {"n", "correlation", "slope", "intercept", "r2_identity", "sign_agreement"}
