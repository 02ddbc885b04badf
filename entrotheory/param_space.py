"""Per-token entropy contributions in parameter space, before the update (docs/theory.md, section 5).

The per-position theory of :mod:`entrotheory.tokens` treats every position's logits as a free
table. A network shares its parameters ``theta`` between positions, so a step moves every
position's logits. This module works with ``theta`` itself. It needs only a callable
``logits_fn(params) -> logits [..., V]``, e.g. built with :func:`torch.func.functional_call`::

    names = [n for n, _ in model.named_parameters()]
    logits_fn = lambda ps: torch.func.functional_call(model, dict(zip(names, ps)), (ids,)).logits

Notation (eq. 5.1-5.3). ``Hbar(theta)`` is the token-mean entropy over the ``M`` masked positions; the
loss is ``L = -(1/N) sum_t A_t log pi(y_t)``; the optimiser's coming step is a linear map of the loss
gradient ``g``, ``dtheta = drift_step - G g`` (:class:`StepPreconditioner`; ``G = lr P`` for SGD,
``G = lr (1 - beta1) / bc1 P`` with ``P = 1 / (sqrt(vhat) + eps)`` for Adam). Then

    ``s_t = <G grad Hbar, grad log pi(y_t)>``,  ``c_t = (A_t / N) s_t``,  ``drift = <grad Hbar, drift_step>``,

and the first-order change of the step is ``dHbar ~= drift + sum_t c_t`` (exact for the linearised
step, error ``O(lr^2)``). All ``s_t`` come at once as the directional derivative of every
``log pi(y_t)`` along ``G grad Hbar``: one backward pass for ``grad Hbar``, then either a forward-mode
JVP (:func:`torch.func.jvp`) or a central finite difference of two no-grad forwards at
``theta +- h G grad Hbar`` (``method="fd"``, the default: it runs on any model, including attention
kernels without forward-mode AD, and costs two plain forwards).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .core import all_finite, check_float_tensor, log_policy_and_entropy, predicted_entropy_change

__all__ = [
    "DERIVATIVE_METHODS",
    "StepPreconditioner",
    "ParamSpaceContributions",
    "sgd_preconditioner",
    "adam_preconditioner",
    "preconditioner_from_optimizer",
    "optimizer_step_direction",
    "momentum_carry_factor",
    "log_prob_tangent",
    "masked_mean_entropy",
    "entropy_param_gradient",
    "logit_directional_derivative",
    "first_order_entropy_change",
    "inner_product",
    "policy_loss_gradient",
    "param_space_contributions",
]

#: how the directional derivative of the logits is taken
DERIVATIVE_METHODS = ("fd", "forward", "jvp")

#: default finite-difference step of :func:`param_space_contributions`, as the largest first-order change of
#: ``Hbar`` (nats) the perturbation can cause, ``h ||grad Hbar|| ||G grad Hbar|| = fd_step``, per dtype; chosen where
#: the measured FD error against the JVP is smallest (truncation ~ h^2, rounding ~ eps / h; docs/theory.md §5.4)
DEFAULT_FD_STEP = {torch.float64: 1e-4, torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}

LogitsFn = Callable[[tuple[Tensor, ...]], Tensor]


# ----------------------------------------------------------------------------- the optimiser step
@dataclass(frozen=True)
class StepPreconditioner:
    """The coming optimiser step as a linear map of the loss gradient (eq. 5.2).

    ``dtheta_i = drift_step_i - gain_i * g_i`` for every parameter tensor ``i`` (element-wise;
    ``gain_i`` broadcasts to ``theta_i``), where ``g`` is the gradient of the loss the step is taken
    on. ``gain = lr P`` (SGD: ``P = 1``; Adam: ``lr (1 - beta1) / bc1 / (sqrt(vhat) + eps)``, or the
    Jacobian of Adam's step about a reference gradient, which may have either sign) and
    ``drift_step`` is the part of the step known before the gradient (momentum, weight decay);
    ``None`` means zero.

    Attributes
    ----------
    kind : ``"sgd"`` or ``"adam"`` (what built it).
    gain : one tensor per parameter, broadcastable to it (units: parameter per unit gradient).
    drift_step : one tensor (the parameter's shape) or ``None`` per parameter.
    exact : True when the map is exactly the step the optimiser will take for any gradient (SGD
        always; Adam only when its second moment was given the step's own gradient, ``grads=``).
    """

    kind: str
    gain: tuple[Tensor, ...]
    drift_step: tuple[Tensor | None, ...]
    exact: bool

    def step(self, grads: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``dtheta`` of the linear map for loss gradients ``grads`` (one per parameter)."""
        if len(grads) != len(self.gain):
            raise ValueError(f"got {len(grads)} gradients for {len(self.gain)} parameters")
        return tuple((0 if d is None else d) - k * g for k, d, g in zip(self.gain, self.drift_step, grads))


def _check_params(params: Sequence[Tensor], name: str = "params") -> tuple[Tensor, ...]:
    if isinstance(params, Tensor) or not isinstance(params, Sequence) or len(params) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of tensors")
    out = []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating torch.Tensor, got {type(p).__name__}")
        if not all_finite(p.detach()):
            raise ValueError(f"{name}[{i}] (shape {tuple(p.shape)}) contains NaN/inf")
        out.append(p)
    return tuple(out)


def _matching(tensors: Sequence[Tensor | None] | None, params: tuple[Tensor, ...], name: str
              ) -> tuple[Tensor | None, ...]:
    if tensors is None:
        return (None,) * len(params)
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} entries for {len(params)} parameters")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.shape != p.shape:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] has shape {shape}, parameter has {tuple(p.shape)}")
        if not all_finite(t):
            raise ValueError(f"{name}[{i}] contains NaN/inf")
    return tuple(t.detach() if t is not None else None for t in tensors)


def _buffers(tensors: Sequence[Tensor], params: tuple[Tensor, ...], dtypes: Sequence[torch.dtype], name: str
             ) -> tuple[Tensor, ...]:
    """Output buffers of a caller: one contiguous tensor of each parameter's shape and the given dtype (their
    contents are overwritten, so they are not checked for NaN)."""
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} entries for {len(params)} parameters")
    for i, (t, p, dtype) in enumerate(zip(tensors, params, dtypes)):
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != dtype or not t.is_contiguous():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}] must be a contiguous {tuple(p.shape)} {dtype} tensor, got {got}")
    return tuple(tensors)


def _check_hyper(value: float, name: str, low: float = 0.0, high: float = math.inf, open_low: bool = False) -> float:
    if isinstance(value, Tensor):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (open_low and value == low):
        raise ValueError(f"{name} = {value} out of range")
    return float(value)


def sgd_preconditioner(
    params: Sequence[Tensor], lr: float, *, momentum: float = 0.0, dampening: float = 0.0,
    weight_decay: float = 0.0, nesterov: bool = False, momentum_buffer: Sequence[Tensor | None] | None = None,
) -> StepPreconditioner:
    """The next step of ``torch.optim.SGD`` as a linear map of the gradient (eq. 5.2, exact).

    torch's SGD takes ``d = g + wd theta``; ``b = d`` on the first step (no buffer) else
    ``b = mu b_old + (1 - dampening) d``; ``dtheta = -lr (d + mu b)`` (Nesterov) or ``-lr b``. Hence,
    with a buffer: ``gain = lr (1 - dampening)`` (Nesterov: ``lr (1 + mu (1 - dampening))``) and
    ``drift_step = -lr mu b_old - gain wd theta`` (Nesterov: ``-lr mu^2 b_old - gain wd theta``); without
    one: ``gain = lr`` (Nesterov: ``lr (1 + mu)``), ``drift_step = -gain wd theta``.

    Parameters
    ----------
    params : the parameter tensors, in the order ``logits_fn`` takes them.
    lr, momentum, dampening, weight_decay, nesterov : as ``torch.optim.SGD``.
    momentum_buffer : per parameter the ``momentum_buffer`` state, or ``None`` before the first step.
    """
    params = _check_params(params)
    lr = _check_hyper(lr, "lr", open_low=True)
    mu = _check_hyper(momentum, "momentum", high=1.0)
    damp = _check_hyper(dampening, "dampening", high=1.0)
    wd = _check_hyper(weight_decay, "weight_decay")
    bufs = _matching(momentum_buffer, params, "momentum_buffer")
    gains, drifts = [], []
    for p, b in zip(params, bufs):
        p = p.detach()
        if mu == 0.0 or b is None:
            gain = lr * (1.0 + mu) if (nesterov and mu > 0) else lr
            drift = None
        else:
            gain = lr * (1.0 + mu * (1.0 - damp)) if nesterov else lr * (1.0 - damp)
            drift = -lr * (mu * mu if nesterov else mu) * b
        if wd:
            drift = (0 if drift is None else drift) - gain * wd * p
        gains.append(torch.tensor(gain, dtype=p.dtype, device=p.device))
        drifts.append(drift)
    return StepPreconditioner("sgd", tuple(gains), tuple(drifts), exact=True)


def _per_model(x: float | Tensor, like: Tensor, name: str) -> Tensor:
    """A number, or a 1-D tensor indexed by ``like``'s first dim (one value per model), shaped to broadcast."""
    if isinstance(x, Tensor) and x.ndim > 0:
        if x.ndim != 1 or like.ndim == 0 or x.shape[0] != like.shape[0]:
            raise ValueError(f"{name} must be a number or a [{like.shape[0] if like.ndim else '?'}] tensor "
                             f"(one per model along the first dim), got shape {tuple(x.shape)}")
        return x.to(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
    return torch.as_tensor(float(x), dtype=like.dtype, device=like.device)


def _adam_frozen_gain(v: Tensor, taken: float | Tensor, lr: float, b1: float, b2: float, eps: float,
                      out: Tensor | None = None) -> Tensor:
    """``lr (1 - b1) / bc1 P`` with ``vhat = v / (1 - b2^taken)`` held fixed (eq. 5.2), in one tensor (``out``
    if given): ``P = 1 / (sqrt(vhat) + eps) = r / (sqrt(v) + eps r)`` with ``r = sqrt(1 - b2^taken)``."""
    r = torch.as_tensor(1 - b2**taken, dtype=torch.float64).sqrt()
    return torch.sqrt(v, out=out).add_(eps * r).reciprocal_().mul_(lr * (1 - b1) / (1 - b1 ** (taken + 1)) * r)


def _adam_linearised(u0: Tensor, m: Tensor, v: Tensor, lr: float, b1: float, b2: float, eps: float,
                     bc1: float | Tensor, bc2: float | Tensor, linearize_v: bool) -> tuple[Tensor, Tensor]:
    """``(gain, step0)`` of Adam's step about the effective reference gradient ``u0`` (eq. 5.2b): ``step0`` the
    step at ``u0``, ``gain = -d step / d u`` there (with ``vhat``'s dependence on ``u`` if ``linearize_v``)."""
    # the expressions written with in-place operations on new temporaries (it runs on cache-sized pieces too)
    root = (u0 * u0).mul_((1 - b2) / bc2).add_(v * (b2 / bc2)).sqrt_()
    precond = (root + eps).reciprocal_()
    numer = (u0 * (1 - b1)).add_(m * b1)  # b1 m + (1 - b1) u0
    step0 = (numer * precond).mul_(-lr / bc1)  # Adam's step at the reference gradient
    if not linearize_v:
        return precond.mul_(lr * (1 - b1) / bc1), step0
    # gain = lr / bc1 [(1 - b1) P - numer P^2 (1 - b2) u0 / (bc2 root)]; root = 0 only where u0 = 0, where the
    # second term is 0
    term = (numer.mul_(precond)).mul_(u0).div_(root.clamp_(min=torch.finfo(root.dtype).tiny))
    return term.mul_(-(1 - b2) / bc2).add_(1 - b1).mul_(precond).mul_(lr / bc1), step0


def adam_preconditioner(
    params: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], steps_taken: float | Tensor,
    lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
    decoupled_weight_decay: bool = True, grads: Sequence[Tensor] | None = None, linearize_v: bool = True,
) -> StepPreconditioner:
    """The next step of ``torch.optim.Adam``/``AdamW`` as a linear map of the gradient (eq. 5.2).

    With ``t = steps_taken + 1``, ``bc1 = 1 - beta1^t``, ``m`` = ``exp_avg`` and
    ``P = 1 / (sqrt(vhat) + eps)``, AdamW's step is
    ``dtheta = -lr wd theta - (lr / bc1) P (beta1 m + (1 - beta1) g)``, so
    ``gain = lr (1 - beta1) / bc1 P`` and ``drift_step = -lr beta1 / bc1 P m - lr wd theta``. Adam with
    L2 weight decay (``decoupled_weight_decay=False``) adds ``wd theta`` to ``g`` instead:
    ``drift_step = -lr / bc1 P (beta1 m + (1 - beta1) wd theta)``.

    Without ``grads``, ``vhat`` is held fixed within the step (the approximation of eq. 5.2) at the current
    bias-corrected estimate ``v / (1 - beta2^(t-1))`` -- the fixed point of Adam's update when the new
    ``g^2`` equals it, so the error is ``O((1 - beta2) / (1 - beta2^t))`` relative.

    With ``grads`` (a reference gradient ``g0``): ``linearize_v=True`` (default) takes the first-order
    Taylor expansion of Adam's whole step in ``g`` about ``g0``, including ``vhat``'s dependence on ``g``
    (eq. 5.2b): ``J = d dtheta / dg = -(lr / bc1) [(1 - beta1) P + (beta1 m + (1 - beta1) u0) dP/du]`` with
    ``u0`` the effective gradient, ``dP/du = -P^2 (1 - beta2) u0 / (bc2 sqrt(vhat))``; ``gain = -J``. Its
    error is second order in ``g - g0``; with ``g0`` the step's own gradient (known after its backward pass)
    the map gives the optimiser's step exactly, and with ``g0`` the expected gradient of a selection (e.g.
    the accepted fraction times the whole batch's gradient, :func:`policy_loss_gradient`) it is the best
    linear map for choosing one. ``linearize_v=False`` holds ``vhat = (beta2 v + (1 - beta2) u0^2) / bc2``
    fixed instead (also exact at ``g = g0``).

    Parameters
    ----------
    params, exp_avg, exp_avg_sq : parameter tensors and their Adam moments (same shapes).
    steps_taken : steps already taken (torch's ``state["step"]``); a number, or a 1-D tensor with one
        count per model along every parameter's first dim (seed-batched parameters).
    lr, betas, eps, weight_decay, decoupled_weight_decay : as the torch optimiser.
    grads : optional reference loss gradients ``g0``, one per parameter.
    linearize_v : with ``grads``, expand ``vhat``'s dependence on ``g`` too (see above).
    """
    params = _check_params(params)
    m_all = _matching(exp_avg, params, "exp_avg")
    v_all = _matching(exp_avg_sq, params, "exp_avg_sq")
    g_all = _matching(grads, params, "grads")
    if any(m is None for m in m_all) or any(v is None for v in v_all):
        raise ValueError("exp_avg and exp_avg_sq need a tensor for every parameter")
    lr = _check_hyper(lr, "lr", open_low=True)
    b1 = _check_hyper(betas[0], "beta1", high=1.0)
    b2 = _check_hyper(betas[1], "beta2", high=1.0)
    if b1 >= 1.0 or b2 >= 1.0:
        raise ValueError(f"betas must be < 1, got {betas}")
    eps = _check_hyper(eps, "eps")
    wd = _check_hyper(weight_decay, "weight_decay")
    gains, drifts = [], []
    for p, m, v, g in zip(params, m_all, v_all, g_all):
        p = p.detach()
        taken = _per_model(steps_taken, p, "steps_taken")
        if bool((taken < 0).any()):
            raise ValueError("steps_taken must be >= 0")
        t = taken + 1
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        if g is None:
            if bool((taken == 0).any()):
                raise ValueError(
                    "Adam has no second-moment estimate before its first step (steps_taken = 0): that step is "
                    "sign-like (dtheta ~ -lr sign(g)) and has no first-order per-token form without the step's "
                    "own gradient; take a warm-up step, or pass grads= after the backward pass"
                )
            gain = _adam_frozen_gain(v, taken, lr, b1, b2, eps)
            drift = gain * m * (-b1 / (1 - b1))  # -lr b1 / bc1 P m
            if wd:
                drift = drift - (lr * wd * p if decoupled_weight_decay else gain * wd * p)
        else:
            l2 = wd * p if (wd and not decoupled_weight_decay) else torch.zeros_like(p)
            gain, step0 = _adam_linearised(g + l2, m, v, lr, b1, b2, eps, bc1, bc2, linearize_v)
            # dtheta(g) ~= step0 - gain (g + l2 - u0) = [step0 + gain g0] - gain g
            drift = step0 + gain * g
            if wd and decoupled_weight_decay:
                drift = drift - lr * wd * p
        gains.append(gain)
        drifts.append(drift)
    return StepPreconditioner("adam", tuple(gains), tuple(drifts), exact=grads is not None)


def preconditioner_from_optimizer(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor] | None = None,
    linearize_v: bool = True,
) -> StepPreconditioner:
    """Read the next step of a real ``torch.optim.SGD``/``Adam``/``AdamW`` from its state (eq. 5.2).

    Hyperparameters come from each parameter's group (``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``momentum``, ``dampening``, ``nesterov``), moments from ``optimizer.state[p]`` (``exp_avg``,
    ``exp_avg_sq``, ``step``, ``momentum_buffer``). ``params`` are the optimiser's own parameter tensors,
    in the order ``logits_fn`` takes them; ``grads``, ``linearize_v`` as in :func:`adam_preconditioner`
    (ignored by SGD, whose map is exact anyway). Raises for any other optimiser and for options whose step
    is not of this form (``maximize``, ``amsgrad``).
    """
    params = _check_params(params)
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
        raise TypeError(f"unsupported optimizer {type(optimizer).__name__}: expected torch.optim.SGD, Adam or AdamW")
    group_of: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    missing = [i for i, p in enumerate(params) if id(p) not in group_of]
    if missing:
        raise ValueError(f"params {missing} are not managed by the optimizer (pass the optimizer's own tensors)")
    g_all = _matching(grads, params, "grads")
    parts: list[StepPreconditioner] = []
    for p, g in zip(params, g_all):
        group = group_of[id(p)]
        if group.get("maximize", False):
            raise ValueError("maximize=True optimizers are not supported (the step ascends the loss)")
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, torch.optim.SGD):
            parts.append(sgd_preconditioner(
                [p], group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                momentum_buffer=[state.get("momentum_buffer")]))
            continue
        if group.get("amsgrad", False):
            raise ValueError("amsgrad=True is not supported (its max over second moments is not held fixed)")
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        taken = float(state["step"]) if "step" in state else 0.0
        m = state.get("exp_avg", torch.zeros_like(p))
        v = state.get("exp_avg_sq", torch.zeros_like(p))
        parts.append(adam_preconditioner(
            [p], [m], [v], taken, group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"],
            decoupled, grads=None if g is None else [g], linearize_v=linearize_v))
    kinds = {x.kind for x in parts}
    return StepPreconditioner(
        kinds.pop(), tuple(x.gain[0] for x in parts), tuple(x.drift_step[0] for x in parts),
        exact=all(x.exact for x in parts))


# elements per piece of the one-parameter-at-a-time Adam map on the CPU: small enough for the piece's temporaries to
# stay in a core's cache (1 MiB of float32), large enough that the per-op overhead is negligible (on a GPU a
# parameter is one piece)
STEP_DIRECTION_CHUNK = 2**18


def _adam_step_direction(p: Tensor, v: Tensor, state: dict, group: dict, decoupled: bool, g0: Tensor | None,
                         linearize_v: bool, out: Tensor | None = None) -> tuple[Tensor, float]:
    """``G v`` and ``<v, drift_step>`` of one Adam/AdamW parameter, piece by piece (the same expressions as
    :func:`adam_preconditioner`, eq. 5.2 with ``vhat`` frozen, eq. 5.2b linearised about ``g0``)."""
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    taken = float(state["step"])
    bc1, bc2 = 1 - b1 ** (taken + 1), 1 - b2 ** (taken + 1)
    flat = {k: x.detach().reshape(-1) for k, x in
            (("p", p), ("vec", v), ("m", state["exp_avg"]), ("v2", state["exp_avg_sq"]), ("g0", g0)) if x is not None}
    out = torch.empty_like(flat["vec"]) if out is None else out.view(-1)
    drift = torch.zeros((), dtype=torch.float64, device=out.device)  # read once at the end (no sync per piece)
    chunk = STEP_DIRECTION_CHUNK if out.device.type == "cpu" else max(out.numel(), 1)

    def dot(x: Tensor, y: Tensor) -> Tensor:
        return torch.dot(x, y).to(torch.float64)

    for lo in range(0, out.numel(), chunk):
        c = {k: x[lo:lo + chunk] for k, x in flat.items()}
        d = out[lo:lo + chunk]
        if g0 is None:
            # drift_step = -lr b1 / bc1 P m (- wd terms)
            _adam_frozen_gain(c["v2"], taken, lr, b1, b2, eps, out=d).mul_(c["vec"])
            drift -= b1 / (1 - b1) * dot(d, c["m"])
            if wd:
                drift -= lr * wd * dot(c["vec"], c["p"]) if decoupled else wd * dot(d, c["p"])
            continue
        u0 = c["g0"] if (decoupled or not wd) else c["g0"] + wd * c["p"]
        gain, step0 = _adam_linearised(u0, c["m"], c["v2"], lr, b1, b2, eps, bc1, bc2, linearize_v)
        torch.mul(gain, c["vec"], out=d)
        # <v, drift_step> with drift_step = step0 + gain g0 (- lr wd theta decoupled)
        drift += dot(d, c["g0"]) + dot(step0, c["vec"])
        if wd and decoupled:
            drift -= lr * wd * dot(c["vec"], c["p"])
    return out.view_as(v), float(drift)


def optimizer_step_direction(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], vector: Sequence[Tensor],
    grads: Sequence[Tensor] | None = None, linearize_v: bool = True, out: Sequence[Tensor] | None = None,
) -> tuple[tuple[Tensor, ...], float]:
    """``G v`` and ``<v, drift_step>`` of the optimiser's coming step for a vector ``v`` (eq. 5.2, 5.3).

    The same map as :func:`preconditioner_from_optimizer` (``grads``, ``linearize_v`` as there), built one
    parameter at a time and, for Adam/AdamW, one cache-sized piece at a time, so that the gains and drifts
    of the whole model are never held: with ``v = grad Hbar`` this gives the direction ``G grad Hbar`` of the
    per-token contributions and the drift ``<grad Hbar, drift_step>`` (nats, summed in float64), at the
    memory of the direction itself. ``out``: contiguous tensors of the parameters' shapes to write the
    direction into (a caller's buffers, reused across steps instead of a model-sized allocation per step).
    """
    params = _check_params(params)
    vector = _matching(vector, params, "vector")
    g_all = _matching(grads, params, "grads")
    out_all = (None,) * len(params) if out is None else _buffers(out, params, [v.dtype for v in vector], "out")
    group_of = {id(q): group for group in optimizer.param_groups for q in group["params"]}
    direction, drift = [], 0.0
    for p, v, g, o in zip(params, vector, g_all, out_all):
        if v is None:
            raise ValueError(f"vector needs one tensor of each parameter's shape {tuple(p.shape)}")
        group, state = group_of.get(id(p)), optimizer.state.get(p, {})
        if (isinstance(optimizer, torch.optim.Adam) and group is not None and "exp_avg_sq" in state
                and (g is not None or float(state["step"]) > 0)
                and not group.get("maximize") and not group.get("amsgrad")):
            decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
            d, inner = _adam_step_direction(p, v, state, group, decoupled, g, linearize_v, o)
            direction.append(d)
            drift += inner
            continue
        one = preconditioner_from_optimizer(optimizer, [p], None if g is None else [g], linearize_v)
        direction.append(one.gain[0] * v if o is None else torch.mul(one.gain[0], v, out=o))
        if one.drift_step[0] is not None:
            drift += float(first_order_entropy_change([v], [one.drift_step[0]]))
    return tuple(direction), drift


def momentum_carry_factor(
    steps_taken: int, beta1: float, bias_correction: bool = True,
    lr_factors: Sequence[float] | Callable[[int], float] | None = None, tol: float = 1e-12,
) -> float:
    """``W``: the whole first-order effect of the coming step's momentum over its life, per unit of its
    effect now (docs/theory.md eq. 5.2e).

    The coming step (number ``tau = steps_taken + 1``) moves the weights by ``-lr_tau / bc1(tau) P m_tau``
    (Adam/AdamW; ``bc1(t) = 1 - beta1^t``, ``P`` its preconditioner) or ``-lr_tau m_tau`` (SGD with momentum
    ``beta1`` and no dampening, ``bias_correction=False``: ``bc1 = 1``). Without further gradients step
    ``tau + k`` moves them by ``-lr_(tau+k) / bc1(tau+k) P beta1^k m_tau``, so with ``P`` and the entropy
    gradient held fixed the entropy change that ``m_tau`` causes, now and later, is ``W`` times its change now:

        ``W = sum_(k >= 0) beta1^k (bc1(tau) / bc1(tau + k)) (lr_(tau+k) / lr_tau)``.

    Every part of ``m_tau`` (the selected samples' gradient and the stored momentum alike) carries the same
    ``W``: ``1 / (1 - beta1)`` once the bias correction has died out, less in the first steps (3.0 at
    ``tau = 1`` for ``beta1 = 0.9``), 1 without momentum.

    Parameters
    ----------
    steps_taken : optimiser steps already taken (torch's ``state["step"]``), ``>= 0``.
    beta1 : momentum coefficient in ``[0, 1)``.
    bias_correction : Adam's ``1 / bc1`` (True) or none (SGD momentum).
    lr_factors : the learning rate of steps ``tau, tau + 1, ...`` up to a common factor: a sequence (held at
        its last value beyond its end) or a callable of ``k``; None: constant.
    tol : the sum stops when ``beta1^k`` falls below it.
    """
    if isinstance(steps_taken, bool) or not isinstance(steps_taken, int) or steps_taken < 0:
        raise ValueError(f"steps_taken must be an int >= 0, got {steps_taken!r}")
    b1 = _check_hyper(beta1, "beta1", high=1.0)
    if b1 >= 1.0:
        raise ValueError(f"beta1 must be < 1, got {beta1}")
    if callable(lr_factors):
        factor = lr_factors
    elif lr_factors is not None:
        seq = [float(x) for x in lr_factors]
        if not seq:
            raise ValueError("lr_factors must not be empty")
        factor = lambda k: seq[min(k, len(seq) - 1)]  # noqa: E731
    else:
        factor = lambda k: 1.0  # noqa: E731
    lr0 = float(factor(0))
    if not (math.isfinite(lr0) and lr0 > 0):
        raise ValueError(f"the coming step's learning-rate factor must be > 0, got {lr0}")
    tau = steps_taken + 1
    bc_now = 1 - b1**tau if bias_correction else 1.0
    total, k, weight = 0.0, 0, 1.0
    while weight >= tol:
        bc = 1 - b1 ** (tau + k) if bias_correction else 1.0
        lr = float(factor(k))
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr_factors must be finite and >= 0, got {lr} at k = {k}")
        total += weight * bc_now / bc * lr / lr0
        k += 1
        weight *= b1
        if b1 == 0.0:
            break
    return total


# ----------------------------------------------------------------------------- tensor primitives
def log_prob_tangent(logits: Tensor, tangent: Tensor, tokens: Tensor) -> Tensor:
    """Directional derivative of ``log pi(y)`` for a logit direction (eq. 5.1).

    ``d/de log softmax(z + e dz)_y |_{e=0} = dz_y - sum_b pi_b dz_b``. Shapes ``[..., V], [..., V], [...]``
    -> ``[...]`` in the compute dtype (float64 for float64 logits, else float32).
    """
    logp, p, _ = log_policy_and_entropy(logits)
    dz = tangent.to(p.dtype)
    return dz.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - (p * dz).sum(-1)


def _reduce_positions(x: Tensor, batch_dims: int) -> Tensor:
    dims = tuple(range(batch_dims, x.ndim))
    return x.sum(dim=dims) if dims else x


def masked_mean_entropy(logits: Tensor, mask: Tensor, batch_dims: int = 0) -> Tensor:
    """Token-mean entropy ``Hbar = (1/M) sum_{t in mask} H_t`` (eq. 1.1 averaged; nats), with gradient.

    ``logits [..., V]``, ``mask [...]`` bool; the first ``batch_dims`` dims index independent models
    and get one ``Hbar`` each (shape ``mask.shape[:batch_dims]``). Raises if a model has no masked token.
    """
    _, _, h = log_policy_and_entropy(logits)
    m = mask.to(h.dtype)
    count = _reduce_positions(m, batch_dims)
    if bool((count == 0).any()):
        raise ValueError("empty mask: no token counts towards the token-mean entropy"
                         + (f" for model(s) {(count == 0).nonzero().tolist()}" if batch_dims else ""))
    return _reduce_positions(h * m, batch_dims) / count


def entropy_param_gradient(
    logits_fn: LogitsFn, params: Sequence[Tensor], mask: Tensor, batch_dims: int = 0
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """``(Hbar, grad_theta Hbar, logits)``: one forward with graph and one backward pass (eq. 5.1).

    With ``batch_dims`` > 0 the gradient of ``sum_b Hbar_b`` is taken, which is every model's own
    ``grad Hbar_b`` because models share no parameters. Unused parameters get zero gradients.
    ``logits`` are returned detached (for :func:`log_prob_tangent`).
    """
    return _entropy_param_gradient(logits_fn, params, mask, batch_dims, "mask")


def _entropy_param_gradient(logits_fn: LogitsFn, params: Sequence[Tensor], mask: Tensor, batch_dims: int,
                            name: str) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    params = _check_params(params)
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        logits = _call(logits_fn, leaves)
        _check_mask_shape(mask, logits, name)
        h_bar = masked_mean_entropy(logits, mask.to(torch.bool), batch_dims)
        grads = torch.autograd.grad(h_bar.sum(), leaves, allow_unused=True)
    grads = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads))
    return h_bar.detach(), grads, logits.detach()


def _call(logits_fn: LogitsFn, params: tuple[Tensor, ...]) -> Tensor:
    logits = logits_fn(params)
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 1:
        raise TypeError("logits_fn must return a floating tensor [..., V]")
    if not all_finite(logits.detach()):
        raise ValueError(f"logits_fn returned NaN/inf logits (shape {tuple(logits.shape)})")
    return logits


def _check_mask_shape(mask: Tensor, logits: Tensor, name: str = "mask") -> None:
    if not isinstance(mask, Tensor) or mask.shape != logits.shape[:-1]:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} shape {got} must equal the logits' leading shape {tuple(logits.shape[:-1])}")


def logit_directional_derivative(
    logits_fn: LogitsFn, params: Sequence[Tensor], direction: Sequence[Tensor], method: str = "fd",
    step: float | Tensor | None = None, batch_dims: int = 0, base: Tensor | None = None,
    workspace: Sequence[Tensor] | None = None,
) -> Tensor:
    """Directional derivative of all logits along ``direction``: ``d/de logits(theta + e d)`` (eq. 5.4).

    ``method="jvp"``: one forward-mode pass (:func:`torch.func.jvp`; exact, needs every op of the model to
    support forward AD). ``method="fd"``: ``(logits(theta + h d) - logits(theta - h d)) / (2 h)`` from two
    no-grad forwards with ``h = step`` (a number, or ``[S]`` per model when ``batch_dims`` = 1; required);
    error ``O(h^2)`` (third derivative) plus rounding ``O(eps_dtype / h)``. ``method="forward"``:
    ``(logits(theta + h d) - base) / h`` with ``base = logits(theta)`` (pass the logits a caller already has,
    e.g. those of the update's own forward, and it costs one no-grad forward); error ``O(h)`` (second
    derivative) plus rounding ``O(eps_dtype / h)``. ``workspace``: tensors of the parameters' shapes that
    hold the displaced weights ``theta +- h d`` (``fd``/``forward``; reused by a caller across calls instead of
    a model-sized allocation per call). Returns the logits' shape, float64 for float64 logits, else float32.
    """
    if method not in DERIVATIVE_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {DERIVATIVE_METHODS}")
    if batch_dims not in (0, 1):
        raise ValueError(f"batch_dims must be 0 or 1, got {batch_dims}")
    params = tuple(p.detach() for p in _check_params(params))
    direction = _matching(direction, params, "direction")
    direction = tuple(torch.zeros_like(p) if d is None else d.to(p.dtype) for p, d in zip(params, direction))
    if method == "jvp":
        _, tangent = torch.func.jvp(lambda *ps: _call(logits_fn, ps), params, direction)
        return tangent.to(torch.float64 if tangent.dtype == torch.float64 else torch.float32)
    if step is None:
        raise ValueError("method='fd' needs step= (the finite-difference step h)")
    h = torch.as_tensor(step, dtype=torch.float64)
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()) or (h.ndim and (batch_dims == 0 or h.ndim != 1)):
        raise ValueError(f"step must be finite, >= 0, and a number (or [S] with batch_dims=1), got {step!r}")

    def shaped(x: Tensor, like: Tensor) -> Tensor:
        x = x.to(dtype=like.dtype, device=like.device)
        return x.reshape((-1,) + (1,) * (like.ndim - 1)) if x.ndim else x

    if workspace is not None:
        workspace = _buffers(workspace, params, [p.dtype for p in params], "workspace")

    def displaced(sign: float) -> tuple[Tensor, ...]:
        """``theta + sign h d``, into ``workspace`` when given."""
        if h.ndim == 0:  # one step: p + (sign h) d in one pass
            alpha = sign * float(h)
            if workspace is None:
                return tuple(torch.add(p, d, alpha=alpha) for p, d in zip(params, direction))
            return tuple(torch.add(p, d, alpha=alpha, out=w) for p, d, w in zip(params, direction, workspace))
        return tuple(p + sign * shaped(h, p) * d for p, d in zip(params, direction))

    with torch.no_grad():
        plus = _call(logits_fn, displaced(1.0))
        if method == "forward":
            minus, h_total = (_call(logits_fn, params) if base is None else base.detach()), h
            if minus.shape != plus.shape:
                raise ValueError(f"base logits {tuple(minus.shape)} must have the logits' shape {tuple(plus.shape)}")
        else:
            minus, h_total = _call(logits_fn, displaced(-1.0)), 2 * h
        out_dtype = torch.float64 if plus.dtype == torch.float64 else torch.float32
        denom = shaped(h_total, plus.to(out_dtype))
        diff = plus.to(out_dtype) - minus.to(out_dtype)
        return torch.where(denom > 0, diff / denom.clamp(min=1e-300), torch.zeros_like(diff))


# elements per piece of an inner product on the CPU: each piece's products go to a cache-sized scratch tensor and
# are summed in the operands' dtype (torch's cascade summation: relative error about 1e-7 even where the terms
# cancel to 1e-4 of their magnitudes), the pieces' sums in float64; no temporary of the operands' size (on a GPU
# the whole tensor is one piece, summed in float64)
DOT_CHUNK = 2**16


def inner_product(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` of two tensors of one shape as a float64 scalar, in pieces of ``DOT_CHUNK`` elements."""
    x, y = x.reshape(-1), y.reshape(-1)
    if x.device.type != "cpu" or x.numel() <= DOT_CHUNK:
        return (x * y).sum(dtype=torch.float64)
    scratch = torch.empty(DOT_CHUNK, dtype=torch.promote_types(x.dtype, y.dtype))
    parts = []
    for lo in range(0, x.numel(), DOT_CHUNK):
        piece = x[lo:lo + DOT_CHUNK]
        parts.append(torch.mul(piece, y[lo:lo + DOT_CHUNK], out=scratch[:piece.numel()]).sum())
    return torch.stack(parts).sum(dtype=torch.float64)


def first_order_entropy_change(entropy_grad: Sequence[Tensor], delta: Sequence[Tensor], batch_dims: int = 0
                               ) -> Tensor:
    """``<grad_theta Hbar, dtheta>`` summed over parameter tensors (eq. 5.3; per model for ``batch_dims`` = 1).

    The exact first-order change of ``Hbar`` for a parameter step ``dtheta`` (known only after the step, or
    from :meth:`StepPreconditioner.step`).
    """
    if len(entropy_grad) != len(delta):
        raise ValueError(f"{len(entropy_grad)} gradients but {len(delta)} steps")
    total = None
    for g, d in zip(entropy_grad, delta):
        if g.shape != d.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} != step shape {tuple(d.shape)}")
        # per model: the product in the operands' dtype, the sum in float64 (no float64 copies of the model);
        # one model: piece by piece (inner_product)
        part = ((g * d).reshape(g.shape[0], -1).sum(1, dtype=torch.float64) if batch_dims
                else inner_product(g, d))
        total = part if total is None else total + part
    return total


def policy_loss_gradient(
    logits_fn: LogitsFn, params: Sequence[Tensor], tokens: Tensor, advantages: Tensor, mask: Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[Tensor, ...]:
    """``grad_theta L`` of ``L = -(1/N) sum_{t in mask} A_t log pi(y_t)`` (one forward + backward).

    Used as Adam's second-moment input before a selection is known (eq. 5.2): ``adam_preconditioner(...,
    grads=policy_loss_gradient(...))`` holds ``v`` at its value after a step on the whole batch, which, unlike
    the stale ``v`` of earlier steps, covers parameters this batch touches for the first time (e.g. the
    embedding rows of new tokens, whose frozen ``v`` ~ 0 would give ``P ~ 1 / eps``). ``advantages`` per token
    or per sequence; ``N`` defaults to the mask count. Shapes as :func:`param_space_contributions` (no
    ``batch_dims``).
    """
    params = _check_params(params)
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError("tokens must be an integer torch.Tensor")
    adv = _expand_advantages(check_float_tensor(advantages, "advantages"), tokens)
    mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if mask is None else mask.to(torch.bool)
    if mask.shape != tokens.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal tokens shape {tuple(tokens.shape)}")
    count = float(mask.sum())
    if count == 0:
        raise ValueError("empty mask: no token enters the loss")
    norm = count if normalizer is None else _check_hyper(normalizer, "normalizer", open_low=True)
    leaves = tuple(p.detach().requires_grad_(True) for p in params)
    with torch.enable_grad():
        logits = _call(logits_fn, leaves)
        _check_mask_shape(mask, logits, "tokens")
        logp = torch.log_softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
        safe = torch.where(mask, tokens, torch.zeros_like(tokens)).long()
        lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        loss = -(torch.where(mask, adv.to(lp.dtype) * lp, torch.zeros_like(lp))).sum() / norm
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, grads))


# ----------------------------------------------------------------------------- contributions
@dataclass(frozen=True)
class ParamSpaceContributions:
    """Result of :func:`param_space_contributions` (eq. 5.3). Shapes: ``[...]`` = the tokens' shape,
    ``[batch]`` = its first ``batch_dims`` dims (a scalar when 0).

    Attributes
    ----------
    contributions : ``[...]`` ``c_t = (A_t / N) s_t``: token ``t``'s share of the predicted ``dHbar`` of the
        step (nats; masked-out positions 0). ``sum_t c_t / lr`` is the per-unit-lr form of eq. 3.3.
    directional : ``[...]`` ``s_t = <G grad Hbar, grad log pi(y_t)>`` (nats per unit advantage per 1/N).
    drift : ``[batch]`` ``<grad Hbar, drift_step>``, the sample-independent part (Adam momentum, weight decay).
    bonus : ``[batch]`` first-order change from the entropy term of the objective (0 without ``entropy_weights``).
    predicted : ``[batch]`` ``drift + bonus + sum_t c_t``.
    entropy : ``[batch]`` ``Hbar`` before the step.
    entropy_grad : ``grad_theta Hbar`` per parameter (for :func:`first_order_entropy_change` after the step).
    """

    contributions: Tensor
    directional: Tensor
    drift: Tensor
    bonus: Tensor
    predicted: Tensor
    entropy: Tensor
    entropy_grad: tuple[Tensor, ...]


def _expand_advantages(adv: Tensor, tokens: Tensor) -> Tensor:
    if adv.shape == tokens.shape:
        return adv
    if tokens.ndim >= 1 and adv.shape == tokens.shape[:-1]:
        return adv.unsqueeze(-1).expand(tokens.shape)
    raise ValueError(f"advantages shape {tuple(adv.shape)} must be per token {tuple(tokens.shape)} "
                     f"or per sequence {tuple(tokens.shape[:-1])}")


def param_space_contributions(
    logits_fn: LogitsFn,
    params: Sequence[Tensor],
    tokens: Tensor,
    advantages: Tensor,
    preconditioner: StepPreconditioner,
    mask: Tensor | None = None,
    normalizer: float | Tensor | None = None,
    *,
    method: str = "fd",
    fd_step: float | None = None,
    batch_dims: int = 0,
    entropy_weights: Tensor | None = None,
) -> ParamSpaceContributions:
    """Per-token first-order entropy contributions of the coming step in parameter space (eq. 5.1-5.3).

    For the loss ``L = -(1/N) sum_t A_t log pi(y_t)`` (``- sum_t w_t H_t`` if ``entropy_weights`` are given)
    and the optimiser step ``dtheta = drift_step - G g`` of ``preconditioner``:

    ``s_t = <G grad Hbar, grad log pi(y_t)>``, ``c_t = (A_t / N) s_t``, ``drift = <grad Hbar, drift_step>``,
    ``bonus = sum_t w_t <G grad Hbar, grad H_t>``, and ``dHbar ~= drift + bonus + sum_t c_t``.

    Costs one forward + backward (``grad Hbar``) and one JVP or two no-grad forwards (``method``).

    Parameters
    ----------
    logits_fn : ``params -> logits [..., V]`` (teacher-forced logits of every token, with gradient).
    params : parameter tensors (``theta``); not modified.
    tokens : ``[...]`` integer tokens ``y_t`` (the logits' leading shape).
    advantages : ``[...]`` per token or ``[...-1]`` per sequence (broadcast over the last dim).
    preconditioner : the coming step, :func:`preconditioner_from_optimizer` or the constructors.
    mask : ``[...]`` bool, the tokens of both ``Hbar`` and the loss (default all).
    normalizer : the loss normaliser ``N`` (default the per-model mask count ``M``); number or ``[batch]``.
    method : ``"fd"`` (default), ``"forward"`` (one-sided, from the logits already computed) or ``"jvp"``, see
        :func:`logit_directional_derivative`.
    fd_step : the FD step as the largest first-order change of ``Hbar`` it can cause,
        ``h ||grad Hbar|| ||G grad Hbar||`` (nats; default ``DEFAULT_FD_STEP`` of the parameters' dtype):
        a function-space size, so the same value suits any parameterisation.
    batch_dims : leading dims (0 or 1) that index independent models (e.g. seeds); every parameter then
        has that dim first, and ``Hbar``, ``N``, ``drift``, ``predicted`` are per model.
    entropy_weights : optional ``[...]`` weights ``w_t`` of an entropy term ``+ sum_t w_t H_t`` of the objective.
    """
    if not isinstance(preconditioner, StepPreconditioner):
        raise TypeError("preconditioner must be a StepPreconditioner (see preconditioner_from_optimizer)")
    params = _check_params(params)
    if len(preconditioner.gain) != len(params):
        raise ValueError(f"preconditioner has {len(preconditioner.gain)} parameters, params has {len(params)}")
    if batch_dims not in (0, 1):
        raise ValueError(f"batch_dims must be 0 or 1, got {batch_dims}")
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError("tokens must be an integer torch.Tensor")
    if tokens.ndim <= batch_dims:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} has no position dims after batch_dims={batch_dims}")
    adv = _expand_advantages(check_float_tensor(advantages, "advantages"), tokens)
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    elif not isinstance(mask, Tensor) or mask.shape != tokens.shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask shape {got} must equal tokens shape {tuple(tokens.shape)}")
    mask = mask.to(torch.bool)

    # mask has the tokens' shape (checked above), so a mismatch with the logits is the tokens'
    h_bar, grad_h, logits = _entropy_param_gradient(logits_fn, params, mask, batch_dims, "tokens")
    vocab = logits.shape[-1]
    if bool(((tokens < 0) | (tokens >= vocab))[mask].any()):
        raise ValueError(f"tokens out of range [0, {vocab}) at masked-in positions")
    direction = tuple(k * g for k, g in zip(preconditioner.gain, grad_h))
    step = None
    if method in ("fd", "forward"):
        # h such that the perturbation can move Hbar by at most fd_step nats to first order (Cauchy-Schwarz,
        # h ||grad Hbar|| ||d|| = fd_step): a function-space step size; d may be indefinite (linearised Adam)
        size = torch.sqrt(first_order_entropy_change(grad_h, grad_h, batch_dims)
                          * first_order_entropy_change(direction, direction, batch_dims))
        rel = DEFAULT_FD_STEP.get(params[0].dtype, 1e-3) if fd_step is None else _check_hyper(
            fd_step, "fd_step", open_low=True)
        step = torch.where(size > 0, rel / size.clamp(min=1e-300), torch.zeros_like(size))
    tangent = logit_directional_derivative(logits_fn, params, direction, method, step, batch_dims,
                                           base=logits if method == "forward" else None)
    safe_tokens = torch.where(mask, tokens, torch.zeros_like(tokens))
    s = log_prob_tangent(logits, tangent, safe_tokens)
    dtype = s.dtype
    zero = torch.zeros((), dtype=dtype, device=s.device)
    count = _reduce_positions(mask.to(dtype), batch_dims)
    if normalizer is None:
        norm = count
    else:
        norm = torch.as_tensor(normalizer, dtype=dtype, device=s.device)
        if not bool(torch.isfinite(norm).all()) or bool((norm <= 0).any()):
            raise ValueError(f"normalizer must be finite and > 0, got {normalizer!r}")
        if norm.ndim and norm.shape != count.shape:
            raise ValueError(f"normalizer shape {tuple(norm.shape)} must be a number or {tuple(count.shape)}")
    norm_b = norm.reshape(norm.shape + (1,) * (s.ndim - norm.ndim))
    s = torch.where(mask, s, zero)
    c = torch.where(mask, adv.to(dtype) * s / norm_b, zero)
    drift = first_order_entropy_change(
        grad_h, [torch.zeros_like(g) if d is None else d for g, d in zip(grad_h, preconditioner.drift_step)],
        batch_dims).to(dtype)
    bonus = torch.zeros_like(drift)
    if entropy_weights is not None:
        w = check_float_tensor(entropy_weights, "entropy_weights")
        if w.shape != tokens.shape:
            raise ValueError(f"entropy_weights shape {tuple(w.shape)} must equal tokens shape {tuple(tokens.shape)}")
        dh_t = predicted_entropy_change(logits, tangent.to(logits.dtype)).to(dtype)
        bonus = _reduce_positions(torch.where(mask, w.to(dtype) * dh_t, zero), batch_dims)
    predicted = drift + bonus + _reduce_positions(c, batch_dims)
    return ParamSpaceContributions(c, s, drift, bonus, predicted, h_bar.to(dtype), grad_h)
