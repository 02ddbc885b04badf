"""sympy derivations (from the definition of H) equal the tensor closed forms."""

from __future__ import annotations

import pytest
import sympy as sp
import torch

import entrotheory as et
from entrotheory import symbolic

K = 4
POINTS = [torch.tensor(v, dtype=torch.float64) for v in ([0.3, -1.2, 2.0, 0.1], [1.5, 1.5, -0.7, -3.0])]
STEPS = [torch.tensor(v, dtype=torch.float64) for v in ([0.2, -0.5, 1.0, 0.3], [-1.0, 0.4, 0.0, 0.9])]


def _num(expr, subs) -> float:
    return float(sp.N(expr.subs(subs), 30))


@pytest.mark.parametrize("i", range(2))
def test_gradient_derivation_matches_tensor(i):
    d = symbolic.entropy_gradient_derivation(K)
    z = POINTS[i]
    subs = dict(zip(d.symbols["z"], z.tolist()))
    grad = et.entropy_gradient(z)
    for a in range(K):
        assert abs(_num(d.derived[a], subs) - float(grad[a])) < 1e-12
        assert abs(_num(d.closed_form[a], subs) - float(grad[a])) < 1e-12


@pytest.mark.parametrize("i", range(2))
def test_covariance_form_and_second_order_match_tensor(i):
    z, dz = POINTS[i], STEPS[i]
    cov = symbolic.covariance_form(K)
    subs = dict(zip(cov.symbols["z"], z.tolist())) | dict(zip(cov.symbols["dz"], dz.tolist()))
    first = float(et.predicted_entropy_change(z, dz))
    assert abs(_num(cov.derived, subs) - first) < 1e-12
    assert abs(_num(cov.closed_form, subs) - first) < 1e-12
    sec = symbolic.second_order_derivation(K)
    subs2 = dict(zip(sec.symbols["z"], z.tolist())) | dict(zip(sec.symbols["dz"], dz.tolist()))
    second = float(et.second_order_entropy_change(z, dz)) - first
    assert abs(_num(sec.derived, subs2) - second) < 1e-12
    assert abs(_num(sec.closed_form, subs2) - second) < 1e-12


@pytest.mark.parametrize("rule", ["pg", "npg"])
@pytest.mark.parametrize("y", [0, 2])
def test_contribution_derivation_matches_tensor(rule, y):
    d = symbolic.contribution_derivation(K, rule, sample=y)
    z = POINTS[1]
    adv = -0.8
    subs = dict(zip(d.symbols["z"], z.tolist())) | {d.symbols["A"][0]: adv}
    c = float(
        et.entropy_change_contributions(z, torch.tensor([y]), torch.tensor([adv], dtype=torch.float64), rule)[0]
    )
    assert abs(_num(d.derived, subs) - c) < 1e-12
    assert abs(_num(d.closed_form, subs) - c) < 1e-12


def test_symbolic_identity_holds_exactly_for_k2():
    """For K = 2 sympy can prove derived == closed form exactly (simplify to 0)."""
    d = symbolic.entropy_gradient_derivation(2)
    for der, closed in zip(d.derived, d.closed_form):
        assert sp.simplify(der - closed) == 0


def test_latex_and_bad_k():
    tex = symbolic.derivation_latex()
    assert set(tex) == {"entropy", "gradient", "first_order", "npg_contribution", "pg_contribution"}
    assert r"\log" in tex["gradient"]
    with pytest.raises(ValueError, match="K must be"):
        symbolic.softmax_entropy(1)
    with pytest.raises(ValueError, match="unknown rule"):
        symbolic.contribution_derivation(3, "adam")
