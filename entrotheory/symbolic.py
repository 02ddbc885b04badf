"""Symbolic (sympy) derivations of the entropy dynamics of a K-action softmax policy.

These derive, from the definition ``H(z) = -sum_a softmax(z)_a log softmax(z)_a`` alone,
the formulas that :mod:`entrotheory.core` implements in closed form (docs/theory.md §1-2).
They are independent of the tensor code: sympy differentiates the definition itself, and
the tests evaluate both at random points and compare.

Every function returns a :class:`Derivation` holding the sympy symbols and expressions, so
callers can ``sympy.lambdify`` them or print LaTeX (``docs/theory.md`` shows the output of
:func:`derivation_latex`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

__all__ = [
    "Derivation",
    "softmax_entropy",
    "entropy_gradient_derivation",
    "covariance_form",
    "contribution_derivation",
    "second_order_derivation",
    "derivation_latex",
]


@dataclass
class Derivation:
    """Symbols and expressions of one derivation.

    ``symbols`` maps a name ("z", "dz", "A", ...) to a tuple of sympy symbols;
    ``derived`` is what sympy obtained by differentiating the definition;
    ``closed_form`` is the formula the library states (same value, compact form).
    """

    symbols: dict[str, tuple[sp.Symbol, ...]]
    derived: sp.Expr | list[sp.Expr]
    closed_form: sp.Expr | list[sp.Expr]
    notes: dict[str, str] = field(default_factory=dict)


def _check_k(k: int) -> int:
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"the number of actions K must be an int >= 2, got {k!r}")
    return k


def softmax_entropy(k: int) -> tuple[tuple[sp.Symbol, ...], list[sp.Expr], sp.Expr]:
    """Symbols ``z_1..z_K``, the softmax ``pi`` and the entropy ``H`` as sympy expressions."""
    _check_k(k)
    z = sp.symbols(f"z1:{k + 1}", real=True)
    norm = sum(sp.exp(zi) for zi in z)
    pi = [sp.exp(zi) / norm for zi in z]
    h = -sum(p * sp.log(p) for p in pi)
    return z, pi, h


def _closed_entropy_pieces(z, pi):
    logpi = [sp.log(p) for p in pi]
    h = -sum(p * lp for p, lp in zip(pi, logpi))
    return logpi, h


def entropy_gradient_derivation(k: int) -> Derivation:
    """``dH/dz_a`` by differentiation vs the closed form ``-pi_a (log pi_a + H)`` (eq. 1.2)."""
    z, pi, h = softmax_entropy(k)
    logpi, hh = _closed_entropy_pieces(z, pi)
    derived = [sp.diff(h, zi) for zi in z]
    closed = [-p * (lp + hh) for p, lp in zip(pi, logpi)]
    return Derivation({"z": z}, derived, closed)


def covariance_form(k: int) -> Derivation:
    """Directional derivative of H along ``dz`` vs ``-Cov_pi(log pi, dz)`` (eq. 1.3)."""
    z, pi, h = softmax_entropy(k)
    dz = sp.symbols(f"dz1:{k + 1}", real=True)
    t = sp.Symbol("t", real=True)
    shifted = h.subs({zi: zi + t * di for zi, di in zip(z, dz)}, simultaneous=True)
    derived = sp.diff(shifted, t).subs(t, 0)
    logpi, _ = _closed_entropy_pieces(z, pi)
    e_log = sum(p * lp for p, lp in zip(pi, logpi))
    e_dz = sum(p * d for p, d in zip(pi, dz))
    cov = sum(p * (lp - e_log) * (d - e_dz) for p, lp, d in zip(pi, logpi, dz))
    return Derivation({"z": z, "dz": dz}, derived, -cov)


def contribution_derivation(k: int, rule: str = "pg", sample: int = 0) -> Derivation:
    """Entropy change per unit learning rate of one sample ``y = sample`` with advantage ``A``.

    Derived as ``<dH/dz, dz>`` with the update of the rule applied to the symbolic entropy:

    * pg:  ``dz = A (e_y - pi)`` (gradient of ``A log pi_y``), closed form
      ``-A [pi_y (log pi_y + H) - sum_b pi_b^2 (log pi_b + H)]`` (eq. 2.4);
    * npg: ``dz = A e_y / pi_y``, closed form ``-A (log pi_y + H)`` (eq. 2.3).
    """
    if rule not in ("pg", "npg"):
        raise ValueError(f"unknown rule {rule!r}; expected 'pg' or 'npg'")
    z, pi, h = softmax_entropy(k)
    if not 0 <= sample < k:
        raise ValueError(f"sample index {sample} out of range [0, {k})")
    a = sp.Symbol("A", real=True)
    logp_y = sp.log(pi[sample])
    if rule == "pg":
        dz = [a * sp.diff(logp_y, zi) for zi in z]
    else:
        dz = [a * (1 if i == sample else 0) / pi[sample] for i in range(k)]
    derived = sum(sp.diff(h, zi) * d for zi, d in zip(z, dz))
    logpi, hh = _closed_entropy_pieces(z, pi)
    if rule == "npg":
        closed = -a * (logpi[sample] + hh)
    else:
        base = sum(p * p * (lp + hh) for p, lp in zip(pi, logpi))
        closed = -a * (pi[sample] * (logpi[sample] + hh) - base)
    return Derivation({"z": z, "A": (a,)}, derived, closed, {"rule": rule, "sample": str(sample)})


def second_order_derivation(k: int) -> Derivation:
    """``1/2 d^2/dt^2 H(z + t dz)`` at t = 0 vs the closed form of eq. 1.4.

    Closed form: ``-1/2 (E_pi[(log pi + H) u^2] + E_pi[u^2])`` with ``u = dz - E_pi[dz]``.
    """
    z, pi, h = softmax_entropy(k)
    dz = sp.symbols(f"dz1:{k + 1}", real=True)
    t = sp.Symbol("t", real=True)
    shifted = h.subs({zi: zi + t * di for zi, di in zip(z, dz)}, simultaneous=True)
    derived = sp.Rational(1, 2) * sp.diff(shifted, t, 2).subs(t, 0)
    logpi, hh = _closed_entropy_pieces(z, pi)
    e_dz = sum(p * d for p, d in zip(pi, dz))
    u = [d - e_dz for d in dz]
    closed = -sp.Rational(1, 2) * (
        sum(p * (lp + hh) * ui**2 for p, lp, ui in zip(pi, logpi, u)) + sum(p * ui**2 for p, ui in zip(pi, u))
    )
    return Derivation({"z": z, "dz": dz}, derived, closed)


def derivation_latex() -> dict[str, str]:
    """LaTeX of the general-K closed forms, built from sympy indexed sums (for docs/theory.md)."""
    k = sp.Symbol("K", integer=True, positive=True)
    a, b = sp.symbols("a b", integer=True)
    pi = sp.IndexedBase(r"\pi")
    dz = sp.IndexedBase(r"\delta z")
    h = sp.Symbol("H")
    adv = sp.Symbol("A")
    y = sp.Symbol("y")
    entropy = -sp.Sum(pi[a] * sp.log(pi[a]), (a, 1, k))
    grad = -pi[a] * (sp.log(pi[a]) + h)
    first = -sp.Sum(pi[a] * (sp.log(pi[a]) + h) * dz[a], (a, 1, k))
    npg = -adv * (sp.log(pi[y]) + h)
    pg = -adv * (pi[y] * (sp.log(pi[y]) + h) - sp.Sum(pi[b] ** 2 * (sp.log(pi[b]) + h), (b, 1, k)))
    return {
        "entropy": sp.latex(entropy),
        "gradient": sp.latex(grad),
        "first_order": sp.latex(first),
        "npg_contribution": sp.latex(npg),
        "pg_contribution": sp.latex(pg),
    }
