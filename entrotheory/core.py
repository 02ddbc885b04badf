"""Entropy of a softmax policy and its first- and second-order dynamics.

Every function here works on logits ``z`` of shape ``[..., K]`` (a batch of states over
leading dimensions, ``K`` actions or tokens in the last one) and returns values in nats.
Inputs may be float16/bfloat16/float32/float64; computation happens in float32, or in
float64 when the input is float64.  Equation numbers refer to ``docs/theory.md``.

Conventions (docs/theory.md, section 1):

* ``pi = softmax(z)``, ``l = log pi``, ``H = -sum_a pi_a l_a``.
* A policy-gradient step with learning rate ``eta`` moves the logits by ``eta * dz``;
  every "per unit learning rate" quantity below is the coefficient of ``eta``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "RULES",
    "entropy",
    "entropy_gradient",
    "logit_update",
    "predicted_entropy_change",
    "entropy_change_contributions",
    "expected_entropy_change",
    "second_order_entropy_change",
    "exact_entropy_change",
]

RULES = ("pg", "npg")


# ----------------------------------------------------------------------------- validation
def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 otherwise ("float32 or better")."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def all_finite(x: Tensor) -> bool:
    """True when every entry is finite. One reduction, no temporary: a NaN or inf makes the sum
    non-finite; only when the sum is not finite (which a huge finite tensor can also cause) do we
    run the exact element-wise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_float_tensor(x: object, name: str, *, allow_empty: bool = False) -> Tensor:
    """Validate a floating tensor: type, dtype, finiteness. Returns it unchanged."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); shape {tuple(x.shape)}")
    return x


def check_logits(logits: object, name: str = "logits") -> Tensor:
    x = check_float_tensor(logits, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (the actions), got a scalar")
    return x


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    return rule


def check_samples(logits: Tensor, actions: object, advantages: object) -> tuple[Tensor, Tensor]:
    """Validate ``actions`` [..., N] (int, in range) and ``advantages`` [..., N] against logits."""
    if not isinstance(actions, Tensor):
        raise TypeError(f"actions must be a torch.Tensor, got {type(actions).__name__}")
    if actions.dtype.is_floating_point or actions.dtype.is_complex or actions.dtype == torch.bool:
        raise TypeError(f"actions must have an integer dtype, got {actions.dtype}")
    if actions.ndim != logits.ndim:
        raise ValueError(
            f"actions must have shape [..., N] matching logits [..., K]; got actions "
            f"{tuple(actions.shape)} and logits {tuple(logits.shape)}"
        )
    if actions.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"leading dimensions differ: actions {tuple(actions.shape)} vs logits {tuple(logits.shape)}"
        )
    if actions.shape[-1] == 0:
        raise ValueError("empty sample set: actions has N = 0 samples per state")
    k = logits.shape[-1]
    if bool((actions < 0).any()) or bool((actions >= k).any()):
        lo, hi = int(actions.min()), int(actions.max())
        raise ValueError(f"actions out of range [0, {k}): min {lo}, max {hi}")
    adv = check_float_tensor(advantages, "advantages")
    if adv.shape != actions.shape:
        raise ValueError(
            f"advantages shape {tuple(adv.shape)} must equal actions shape {tuple(actions.shape)}"
        )
    return actions.long(), adv


def check_same_shape(logits: Tensor, delta: object) -> Tensor:
    d = check_float_tensor(delta, "delta_logits")
    if d.shape != logits.shape:
        raise ValueError(
            f"delta_logits shape {tuple(d.shape)} must equal logits shape {tuple(logits.shape)}"
        )
    return d


# ----------------------------------------------------------------------------- primitives
def log_policy_and_entropy(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(log pi, pi, H)`` in the compute dtype; stable for any finite logits."""
    z = logits.to(compute_dtype(logits))
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    h = -(p * logp).sum(-1)
    return logp, p, h


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy of ``softmax(logits)`` over the last dimension (eq. 1.1).

    ``H = -sum_a pi_a log pi_a``. Shape ``[..., K] -> [...]``, nats.
    """
    check_logits(logits)
    return log_policy_and_entropy(logits)[2]


def entropy_gradient(logits: Tensor) -> Tensor:
    """Gradient of the entropy with respect to the logits (eq. 1.2).

    ``dH/dz_a = -pi_a (log pi_a + H)``. Shape ``[..., K] -> [..., K]``; sums to zero.
    """
    check_logits(logits)
    logp, p, h = log_policy_and_entropy(logits)
    return -p * (logp + h.unsqueeze(-1))


def logit_update(logits: Tensor, actions: Tensor, advantages: Tensor, rule: str = "pg") -> Tensor:
    """Change of the logits per unit learning rate of one policy-gradient step (eq. 2.1-2.2).

    N samples ``actions`` [..., N] with ``advantages`` [..., N] of one state ``logits`` [..., K]:

    * ``rule="pg"`` (vanilla softmax PG, mean over samples): ``dz = mean_i A_i (e_{y_i} - pi)``.
    * ``rule="npg"`` (natural PG of a tabular softmax): ``dz = mean_i A_i e_{y_i} / pi_{y_i}``.

    Returns ``[..., K]`` in the compute dtype.
    """
    check_logits(logits)
    check_rule(rule)
    actions, adv = check_samples(logits, actions, advantages)
    logp, p, _ = log_policy_and_entropy(logits)
    adv = adv.to(p.dtype)
    n = actions.shape[-1]
    if rule == "pg":
        weights = adv / n
        dz = torch.zeros_like(p).scatter_add_(-1, actions, weights)
        return dz - weights.sum(-1, keepdim=True) * p
    inv_p = torch.exp(-logp.gather(-1, actions))
    dz = torch.zeros_like(p).scatter_add_(-1, actions, adv * inv_p / n)
    if not all_finite(dz):
        worst = float(logp.gather(-1, actions).min())
        raise ValueError(
            f"npg logit update overflows {p.dtype}: a sampled action has log pi = {worst:.1f}, so 1/pi is "
            "not representable; use rule='pg', float64 logits, or less extreme logits"
        )
    return dz


def predicted_entropy_change(logits: Tensor, delta_logits: Tensor) -> Tensor:
    """First-order entropy change for a logit step ``dz`` (eq. 1.3).

    ``dH ~= <dH/dz, dz> = -Cov_{a~pi}(log pi_a, dz_a)``. Shapes ``[..., K], [..., K] -> [...]``.
    """
    check_logits(logits)
    dz = check_same_shape(logits, delta_logits)
    logp, p, h = log_policy_and_entropy(logits)
    return -(p * (logp + h.unsqueeze(-1)) * dz.to(p.dtype)).sum(-1)


def entropy_change_contributions(
    logits: Tensor, actions: Tensor, advantages: Tensor, rule: str = "pg"
) -> Tensor:
    """Per-sample first-order entropy contributions per unit learning rate (eq. 2.3-2.4).

    Their sum over the last dimension equals
    ``predicted_entropy_change(logits, logit_update(logits, actions, advantages, rule))``:

    * npg: ``c_i = -A_i (log pi_{y_i} + H) / N``
    * pg:  ``c_i = -A_i [pi_{y_i} (log pi_{y_i} + H) - sum_b pi_b^2 (log pi_b + H)] / N``

    Shapes: logits ``[..., K]``, actions/advantages ``[..., N]`` -> ``[..., N]``.
    """
    check_logits(logits)
    check_rule(rule)
    actions, adv = check_samples(logits, actions, advantages)
    logp, p, h = log_policy_and_entropy(logits)
    centred = logp + h.unsqueeze(-1)  # log pi_a + H
    lp_y = logp.gather(-1, actions)
    n = actions.shape[-1]
    adv = adv.to(p.dtype)
    if rule == "npg":
        return -adv * (lp_y + h.unsqueeze(-1)) / n
    baseline = (p * p * centred).sum(-1, keepdim=True)
    return -adv * (lp_y.exp() * centred.gather(-1, actions) - baseline) / n


def expected_entropy_change(logits: Tensor, action_advantages: Tensor, rule: str = "pg") -> Tensor:
    """First-order entropy change of the exact expected gradient step (eq. 2.5-2.6).

    With per-action advantages ``A`` [..., K] (Cui et al. 2025, Theorems 1-2):

    * pg:  ``dz = pi * (A - E_pi A)``, ``dH = -Cov_pi(log pi, pi (A - E_pi A))``
    * npg: ``dz = A``,                 ``dH = -Cov_pi(log pi, A)``
    """
    check_logits(logits)
    check_rule(rule)
    adv = check_same_shape(logits, action_advantages)
    if rule == "npg":
        return predicted_entropy_change(logits, adv)
    _, p, _ = log_policy_and_entropy(logits)
    adv = adv.to(p.dtype)
    dz = p * (adv - (p * adv).sum(-1, keepdim=True))
    return predicted_entropy_change(logits, dz)


def second_order_entropy_change(logits: Tensor, delta_logits: Tensor) -> Tensor:
    """Second-order Taylor estimate of ``H(z + dz) - H(z)`` (eq. 1.4), no K x K Hessian.

    With ``u = dz - E_pi[dz]``:
    ``dH ~= -E_pi[(log pi + H) u] - 1/2 (E_pi[(log pi + H) u^2] + E_pi[u^2])``.
    """
    check_logits(logits)
    dz = check_same_shape(logits, delta_logits)
    logp, p, h = log_policy_and_entropy(logits)
    dz = dz.to(p.dtype)
    centred = logp + h.unsqueeze(-1)
    u = dz - (p * dz).sum(-1, keepdim=True)
    first = -(p * centred * u).sum(-1)
    curvature = -(p * centred * u * u).sum(-1) - (p * u * u).sum(-1)
    return first + 0.5 * curvature


def exact_entropy_change(logits: Tensor, delta_logits: Tensor) -> Tensor:
    """Ground truth ``H(z + dz) - H(z)`` (eq. 1.5), computed in float64 to avoid cancellation."""
    check_logits(logits)
    dz = check_same_shape(logits, delta_logits)
    z = logits.to(torch.float64)
    return entropy(z + dz.to(torch.float64)) - entropy(z)
