"""Theory-validation suite for entrotheory.core against independent ground truth.

Ground truths: torch autograd and central finite differences (derivatives), the exact
finite-step change ``H(z + eta dz) - H(z)`` in float64 (Taylor orders), exact enumeration
over actions (expectations). Tolerances follow from the order of each approximation.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrotheory as et

F64 = torch.float64


def random_state(seed: int, k: int = 7, n: int = 5, batch: tuple[int, ...] = (3,), scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*batch, k, generator=g, dtype=F64) * scale
    y = torch.randint(0, k, (*batch, n), generator=g)
    a = torch.randn(*batch, n, generator=g, dtype=F64)
    return z, y, a


# ----------------------------------------------------------------------------- entropy and gradient
def test_entropy_matches_definition_and_limits():
    z, _, _ = random_state(0)
    p = torch.softmax(z, -1)
    assert torch.allclose(et.entropy(z), -(p * p.log()).sum(-1), atol=1e-12)
    k = 11
    assert math.isclose(float(et.entropy(torch.zeros(k, dtype=F64))), math.log(k), rel_tol=1e-12)
    peaked = torch.tensor([1e4, 0.0, -1e4])
    assert float(et.entropy(peaked)) == 0.0


def test_entropy_gradient_equals_autograd_and_finite_differences():
    z, _, _ = random_state(1)
    zg = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(et.entropy(zg).sum(), zg)
    closed = et.entropy_gradient(z)
    assert torch.allclose(closed, auto, atol=1e-12)
    # central differences: error O(h^2) ~ 1e-10 with h = 1e-5
    h = 1e-5
    fd = torch.zeros_like(z)
    for a in range(z.shape[-1]):
        e = torch.zeros_like(z)
        e[..., a] = h
        fd[..., a] = (et.entropy(z + e) - et.entropy(z - e)) / (2 * h)
    assert torch.allclose(closed, fd, atol=1e-8)
    assert torch.allclose(closed.sum(-1), torch.zeros(z.shape[:-1], dtype=F64), atol=1e-12)


def test_predicted_change_is_minus_covariance():
    z, _, _ = random_state(2)
    dz = torch.randn_like(z)
    p = torch.softmax(z, -1)
    logp = p.log()
    cov = (p * logp * dz).sum(-1) - (p * logp).sum(-1) * (p * dz).sum(-1)
    assert torch.allclose(et.predicted_entropy_change(z, dz), -cov, atol=1e-12)


# ----------------------------------------------------------------------------- logit update
@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_logit_update_is_the_gradient_of_the_sample_objective(rule):
    """pg: dz = grad_z of mean_i A_i log pi(y_i); npg: dz = F^+ grad, checked as A e_y / pi_y."""
    z, y, a = random_state(3)
    dz = et.logit_update(z, y, a, rule)
    if rule == "pg":
        zg = z.clone().requires_grad_(True)
        objective = (a * torch.log_softmax(zg, -1).gather(-1, y)).mean(-1).sum()
        (grad,) = torch.autograd.grad(objective, zg)
        assert torch.allclose(dz, grad, atol=1e-12)
    else:
        p = torch.softmax(z, -1)
        expected = torch.zeros_like(z)
        for i in range(y.shape[-1]):
            onehot = torch.nn.functional.one_hot(y[..., i], z.shape[-1]).to(F64)
            expected += a[..., i : i + 1] * onehot / p.gather(-1, y[..., i : i + 1])
        assert torch.allclose(dz, expected / y.shape[-1], atol=1e-12)
        # natural gradient property: F dz = grad for the Fisher F = diag(p) - p p^T
        fisher_dz = p * dz - p * (p * dz).sum(-1, keepdim=True)
        pg = et.logit_update(z, y, a, "pg")
        assert torch.allclose(fisher_dz, pg, atol=1e-12)


# ----------------------------------------------------------------------------- contributions
@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 40),
    n=st.integers(1, 12),
    seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 8.0),
    rule=st.sampled_from(["pg", "npg"]),
)
def test_contribution_sum_identity(k, n, seed, scale, rule):
    z, y, a = random_state(seed, k=k, n=n, batch=(2,), scale=scale)
    c = et.entropy_change_contributions(z, y, a, rule)
    total = et.predicted_entropy_change(z, et.logit_update(z, y, a, rule))
    assert c.shape == y.shape
    assert torch.allclose(c.sum(-1), total, atol=1e-9 * (1 + total.abs().max()))


@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_expected_change_equals_enumeration_over_actions(rule):
    """E_{y~pi}[c(y, A_y)] with one sample enumerates the exact expected gradient step."""
    g = torch.Generator().manual_seed(4)
    k = 9
    z = torch.randn(k, generator=g, dtype=F64) * 2
    adv = torch.randn(k, generator=g, dtype=F64)
    p = torch.softmax(z, -1)
    enumerated = sum(
        p[y] * et.entropy_change_contributions(z, torch.tensor([y]), adv[y : y + 1], rule)[0] for y in range(k)
    )
    assert math.isclose(float(et.expected_entropy_change(z, adv, rule)), float(enumerated), abs_tol=1e-12)
    logp = p.log()
    target = adv if rule == "npg" else p * (adv - (p * adv).sum())
    cov = (p * logp * target).sum() - (p * logp).sum() * (p * target).sum()
    assert math.isclose(float(et.expected_entropy_change(z, adv, rule)), float(-cov), abs_tol=1e-12)


# ----------------------------------------------------------------------------- Taylor orders
def _order_ratio(approx_fn, seed: int, rule: str, eta: float):
    z, y, a = random_state(seed, k=6, n=4, batch=())
    dz = et.logit_update(z, y, a, rule)
    dz = dz / dz.abs().max()  # unit step size in the max norm; eta is then the step length
    errs = [float((et.exact_entropy_change(z, e * dz) - approx_fn(z, e * dz)).abs()) for e in (eta, eta / 2)]
    return errs[0] / errs[1]


def _first(z, dz):
    return et.predicted_entropy_change(z, dz)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_first_order_error_is_quadratic(seed, rule):
    """err(eta) = c2 eta^2 + O(eta^3): halving eta divides the error by 4 (1 + O(eta))."""
    ratio = _order_ratio(_first, seed, rule, eta=2e-3)
    assert abs(ratio - 4.0) < 0.1, ratio


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_second_order_error_is_cubic(seed, rule):
    """err(eta) = c3 eta^3 + O(eta^4): halving eta divides the error by 8 (1 + O(eta))."""
    ratio = _order_ratio(et.second_order_entropy_change, seed, rule, eta=2e-2)
    assert abs(ratio - 8.0) < 0.4, ratio


def test_second_order_term_equals_autograd_hessian():
    z, _, _ = random_state(5, batch=())
    dz = torch.randn_like(z)
    hess = torch.autograd.functional.hessian(et.entropy, z)
    expected = et.predicted_entropy_change(z, dz) + 0.5 * dz @ hess @ dz
    assert math.isclose(float(et.second_order_entropy_change(z, dz)), float(expected), abs_tol=1e-12)


# ----------------------------------------------------------------------------- symmetries
def test_invariance_to_constant_logit_shift():
    z, y, a = random_state(6)
    shifted = z + 123.456
    for fn in (et.entropy, et.entropy_gradient):
        assert torch.allclose(fn(z), fn(shifted), atol=1e-9)
    for rule in ("pg", "npg"):
        assert torch.allclose(
            et.entropy_change_contributions(z, y, a, rule),
            et.entropy_change_contributions(shifted, y, a, rule),
            atol=1e-9,
        )
    dz = torch.randn_like(z)
    # a constant added to the step does not move the policy
    assert torch.allclose(et.predicted_entropy_change(z, dz), et.predicted_entropy_change(z, dz + 5.0), atol=1e-9)


def test_permutation_equivariance():
    z, y, a = random_state(7, k=8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    zp = z[..., perm]  # action j of the new labelling is action perm[j] of the old
    yp = inv[y]
    assert torch.allclose(et.entropy(z), et.entropy(zp), atol=1e-12)
    assert torch.allclose(et.entropy_gradient(z)[..., perm], et.entropy_gradient(zp), atol=1e-12)
    for rule in ("pg", "npg"):
        assert torch.allclose(
            et.entropy_change_contributions(z, y, a, rule), et.entropy_change_contributions(zp, yp, a, rule)
        )
        assert torch.allclose(et.logit_update(z, y, a, rule)[..., perm], et.logit_update(zp, yp, a, rule))


@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_zero_advantages_give_zero_change(rule):
    z, y, a = random_state(8)
    zero = torch.zeros_like(a)
    assert torch.count_nonzero(et.logit_update(z, y, zero, rule)) == 0
    assert torch.count_nonzero(et.entropy_change_contributions(z, y, zero, rule)) == 0
    assert torch.count_nonzero(et.expected_entropy_change(z, torch.zeros_like(z), rule)) == 0


# ----------------------------------------------------------------------------- sign rules (docs §2.3)
def test_sign_rule_npg_geometric_mean():
    """npg: a positive-advantage update on y lowers entropy iff log pi_y > -H (pi_y > e^{-H})."""
    z, _, _ = random_state(9, k=10, batch=())
    h = float(et.entropy(z))
    logp = torch.log_softmax(z, -1)
    for y in range(10):
        c = float(et.entropy_change_contributions(z, torch.tensor([y]), torch.tensor([1.0], dtype=F64), "npg"))
        likely = float(logp[y]) > -h
        assert (c < 0) == likely
        c_neg = float(
            et.entropy_change_contributions(z, torch.tensor([y]), torch.tensor([-1.0], dtype=F64), "npg")
        )
        assert (c_neg > 0) == likely
        # and the exact finite step agrees in sign for a small step
        dz = et.logit_update(z, torch.tensor([y]), torch.tensor([1.0], dtype=F64), "npg")
        assert (float(et.exact_entropy_change(z, 1e-4 * dz)) < 0) == likely


def test_sign_rule_pg_uses_the_pi_weighted_baseline():
    """pg: sign of c is -A * (pi_y (log pi_y + H) - sum_b pi_b^2 (log pi_b + H))."""
    z, _, _ = random_state(10, k=10, batch=())
    p = torch.softmax(z, -1)
    h = et.entropy(z)
    score = p * (p.log() + h)
    baseline = (p * score).sum()
    for y in range(10):
        dz = et.logit_update(z, torch.tensor([y]), torch.tensor([1.0], dtype=F64), "pg")
        exact = float(et.exact_entropy_change(z, 1e-4 * dz))
        assert (exact < 0) == bool(score[y] > baseline)


@pytest.mark.parametrize("seed", range(5))
def test_constant_advantage_batch_first_order_zero_second_order_drift(seed):
    """A constant advantage c on samples y ~ pi: E[dz] = c (E[e_y] - pi) = 0 under pg, so the
    expected first-order change is 0 and the expected exact change is the second-order drift
    eta^2/2 E[dz^T Hess dz] + O(eta^3): the residual after the drift shrinks 8x when eta halves."""
    g = torch.Generator().manual_seed(seed)
    k = 6
    z = torch.randn(k, generator=g, dtype=F64) * 2
    p = torch.softmax(z, -1)
    c = torch.tensor([1.0], dtype=F64)
    steps = [et.logit_update(z, torch.tensor([y]), c, "pg") for y in range(k)]
    first = sum(float(p[y] * et.predicted_entropy_change(z, steps[y])) for y in range(k))
    assert abs(first) < 1e-14

    def residual(eta: float) -> float:
        exact = sum(float(p[y] * et.exact_entropy_change(z, eta * steps[y])) for y in range(k))
        second = sum(float(p[y] * et.second_order_entropy_change(z, eta * steps[y])) for y in range(k))
        return abs(exact - second)

    ratio = residual(2e-2) / residual(1e-2)
    assert abs(ratio - 8.0) < 0.4, ratio


# ----------------------------------------------------------------------------- numerics
def test_extreme_logits_and_large_vocabulary_bfloat16():
    g = torch.Generator().manual_seed(11)
    v = (1 << 17) + 3
    z = (torch.randn(2, v, generator=g) * 1e4).to(torch.bfloat16)
    h = et.entropy(z)
    assert h.dtype == torch.float32 and torch.isfinite(h).all() and (h >= 0).all()
    grad = et.entropy_gradient(z)
    assert torch.isfinite(grad).all()
    y = torch.randint(0, v, (2, 4), generator=g)
    a = torch.randn(2, 4, generator=g)
    for rule in ("pg", "npg"):
        c = et.entropy_change_contributions(z, y, a, rule)
        assert torch.isfinite(c).all()
    # bfloat16 input is computed in float32: equal to the float64 computation on the same
    # (bf16-rounded) values up to float32 rounding (relative 1e-6 per op, V-term sums)
    moderate = (torch.randn(2, v, generator=g) * 3).to(torch.bfloat16)
    a16 = a.to(torch.bfloat16)
    c16 = et.entropy_change_contributions(moderate, y, a16, "npg")
    c64 = et.entropy_change_contributions(moderate.double(), y, a16.double(), "npg")
    assert c16.dtype == torch.float32
    assert torch.allclose(c16.double(), c64, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_problem():
    z, y, a = random_state(12)
    with pytest.raises(ValueError, match="shape"):
        et.logit_update(z, y, a[..., :-1])
    with pytest.raises(ValueError, match="leading"):
        et.logit_update(z, y[:2], a[:2])
    with pytest.raises(ValueError, match="out of range"):
        et.entropy_change_contributions(z, y + 100, a)
    with pytest.raises(ValueError, match="out of range"):
        et.entropy_change_contributions(z, y - 100, a)
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="advantages.*NaN"):
        et.logit_update(z, y, bad)
    zb = z.clone()
    zb[1, 2] = float("inf")
    with pytest.raises(ValueError, match="logits.*NaN/inf"):
        et.entropy(zb)
    with pytest.raises(ValueError, match="empty sample set"):
        et.logit_update(z, y[..., :0], a[..., :0])
    with pytest.raises(ValueError, match="empty"):
        et.entropy(torch.zeros(0))
    with pytest.raises(ValueError, match="unknown rule 'adam'"):
        et.logit_update(z, y, a, rule="adam")
    with pytest.raises(TypeError, match="integer dtype"):
        et.logit_update(z, y.double(), a)
    with pytest.raises(TypeError, match="floating dtype"):
        et.entropy(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        et.entropy([0.0, 1.0])
    with pytest.raises(ValueError, match="npg logit update overflows"):
        et.logit_update(torch.tensor([1e4, 0.0, -1e4]), torch.tensor([2]), torch.tensor([1.0]), "npg")
    with pytest.raises(ValueError, match="delta_logits shape"):
        et.predicted_entropy_change(z, z[..., :-1])


def test_all_finite_fast_path_is_exact():
    from entrotheory.core import all_finite

    x = torch.randn(1000)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[17] = bad
        assert not all_finite(y)
    y = x.clone()
    y[1], y[2] = float("inf"), float("-inf")  # the sum is NaN, the exact check decides
    assert not all_finite(y)
    huge = torch.full((10,), 3e38)  # finite entries whose float32 sum overflows
    assert all_finite(huge)
    assert all_finite(huge.to(torch.bfloat16))
