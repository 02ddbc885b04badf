"""Parameter-space per-token entropy contributions (docs/theory.md §5) against independent truths.

Ground truths, each computed by a path that shares no code with ``entrotheory.param_space``:
``<grad Hbar, dtheta>`` of a real ``torch.optim`` step (entropy written out by hand, gradient by
``torch.autograd`` on the module, ``dtheta`` = parameters after ``optimizer.step()`` minus before), the exact
change of ``Hbar`` after the step, and per-token gradients by one backward pass per token.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from entrotheory.param_space import (
    StepPreconditioner,
    adam_preconditioner,
    first_order_entropy_change,
    logit_directional_derivative,
    optimizer_step_direction,
    param_space_contributions,
    preconditioner_from_optimizer,
    sgd_preconditioner,
)

V, B, T = 11, 6, 5
STEP_CHUNK_TEST = 100_000  # three of these span two pieces of the Adam map (STEP_DIRECTION_CHUNK = 2^18)


class TinyLM(nn.Module):
    """Previous-token + position embedding, one tanh layer, V logits (float64)."""

    def __init__(self, seed: int = 0, width: int = 8, hidden: int = 12) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(V + 1, width, generator=g, dtype=torch.float64))
        self.pos = nn.Parameter(torch.randn(T, width, generator=g, dtype=torch.float64))
        self.w1 = nn.Parameter(torch.randn(width, hidden, generator=g, dtype=torch.float64) / math.sqrt(width))
        self.b1 = nn.Parameter(torch.zeros(hidden, dtype=torch.float64))
        self.w2 = nn.Parameter(2.0 * torch.randn(hidden, V, generator=g, dtype=torch.float64) / math.sqrt(hidden))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prev = torch.cat([torch.full_like(tokens[:, :1], V), tokens[:, :-1]], 1)  # V = begin-of-sequence
        x = self.emb[prev] + self.pos[: tokens.shape[1]]
        return torch.tanh(x @ self.w1 + self.b1) @ self.w2


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return tokens, adv, mask


def logits_fn_of(model: nn.Module, tokens: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    return lambda ps: functional_call(model, dict(zip(names, ps)), (tokens,))


# ----------------------------------------------------------------------------- independent truths
def hand_mean_entropy(model: nn.Module, tokens, mask) -> torch.Tensor:
    p = torch.softmax(model(tokens), -1)
    h = -(p * torch.log(p)).sum(-1)
    return (h * mask).sum() / mask.sum()


def hand_entropy_grad(model, tokens, mask):
    return torch.autograd.grad(hand_mean_entropy(model, tokens, mask), list(model.parameters()))


def real_step(model, opt, tokens, adv, mask, normalizer):
    """One real optimiser step on L = -(1/N) sum A_t log pi(y_t); returns (dtheta, loss gradients)."""
    opt.zero_grad()
    logp = torch.log_softmax(model(tokens), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss = -(adv[:, None] * logp * mask).sum() / normalizer
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    return before, grads


def delta_after(model, before):
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def dot(xs, ys) -> float:
    return float(sum((x * y).sum() for x, y in zip(xs, ys)))


def warm_up(model, opt, steps: int, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tok = torch.randint(0, V, (B, T), generator=g)
        a = torch.randn(B, generator=g, dtype=torch.float64)
        real_step(model, opt, tok, a, torch.ones(B, T, dtype=torch.bool), B * T)
        opt.step()


# ----------------------------------------------------------------------------- SGD: exact identity
SGD_CONFIGS = [
    {},
    {"weight_decay": 0.3},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05},
]


@pytest.mark.parametrize("options", SGD_CONFIGS)
@pytest.mark.parametrize("warm", [0, 2])
def test_sgd_sum_identity_equals_real_step(options, warm):
    """drift + sum_t c_t = <grad Hbar, dtheta> of torch.optim.SGD.step() to float64 precision (eq. 5.3)."""
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, **options)
    warm_up(model, opt, warm)
    tokens, adv, mask = batch()
    n = 37.0  # a normaliser other than the mask count (rejected tokens keep their place)
    params = list(model.parameters())
    pre = preconditioner_from_optimizer(opt, params)
    out = param_space_contributions(logits_fn_of(model, tokens), params, tokens, adv, pre, mask, n, method="jvp")
    truth_grad = hand_entropy_grad(model, tokens, mask)
    h_truth = float(hand_mean_entropy(model, tokens, mask).detach())
    before, _ = real_step(model, opt, tokens, adv, mask, n)
    opt.step()
    truth = dot(truth_grad, delta_after(model, before))
    assert pre.exact
    assert float(out.predicted) == pytest.approx(truth, rel=1e-10, abs=1e-15)
    # without momentum or weight decay there is no drift, and the sum of c_t alone is the change
    if not options.get("weight_decay") and not (options.get("momentum") and warm):
        assert float(out.drift) == 0.0
    assert float(out.entropy) == pytest.approx(h_truth, rel=1e-12)
    assert torch.all(out.contributions[~mask] == 0)


def test_sgd_contribution_scale_is_lr_over_n():
    """c_t = lr (1/N) A_t s_t with s_t = <grad Hbar, grad log pi(y_t)>, per token from per-token backward passes."""
    model = TinyLM()
    tokens, adv, mask = batch()
    lr, n = 0.2, float(mask.sum())
    params = list(model.parameters())
    out = param_space_contributions(logits_fn_of(model, tokens), params, tokens, adv, sgd_preconditioner(params, lr),
                                    mask, method="jvp")
    gh = hand_entropy_grad(model, tokens, mask)
    logp = torch.log_softmax(model(tokens), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            gt = torch.autograd.grad(logp[b, t], params, retain_graph=True)
            s_truth = dot(gh, gt)
            assert float(out.directional[b, t]) == pytest.approx(lr * s_truth, rel=1e-10, abs=1e-14)
            c_truth = lr * float(adv[b]) * s_truth / n
            assert float(out.contributions[b, t]) == pytest.approx(c_truth, rel=1e-10, abs=1e-14)


# ----------------------------------------------------------------------------- Adam
def adam_setup(beta2: float, warm: int, weight_decay: float = 0.1, decoupled: bool = True):
    model = TinyLM()
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls(model.parameters(), lr=1e-3, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay)
    warm_up(model, opt, warm)
    return model, opt


@pytest.mark.parametrize("decoupled", [True, False])
def test_adam_with_the_steps_own_second_moment_is_exact(decoupled):
    """Given the step's own gradient (v updated, nothing frozen) the linear map is Adam's step: identity to 1e-10."""
    model, opt = adam_setup(0.999, 4, decoupled=decoupled)
    tokens, adv, mask = batch()
    params = list(model.parameters())
    truth_grad = hand_entropy_grad(model, tokens, mask)
    before, grads = real_step(model, opt, tokens, adv, mask, float(mask.sum()))
    pre = preconditioner_from_optimizer(opt, params, grads=grads)
    out = param_space_contributions(logits_fn_of(model, tokens), params, tokens, adv, pre, mask, method="jvp")
    opt.step()
    delta = delta_after(model, before)
    assert pre.exact
    assert float(out.predicted) == pytest.approx(dot(truth_grad, delta), rel=1e-10)
    # the map's own step equals the real one element by element
    for d_map, d_real in zip(pre.step(grads), delta):
        torch.testing.assert_close(d_map, d_real, rtol=1e-9, atol=1e-15)


def frozen_v_bound(opt, params, grads, truth_grad, delta_adam):
    """Exact size of the frozen-v error, bounded term by term (docs/theory.md §5.2).

    The real step's Adam part is ``dtheta_i = -(lr/bc1) m_i / (a_i + eps)`` with ``a = sqrt(vhat_new)``; the
    prediction uses ``b = sqrt(vhat_old)``, so its error is ``sum_i grad_i dtheta_i (a_i - b_i) / (b_i + eps)``,
    whose absolute value is at most ``sum_i |grad_i dtheta_i| |a_i - b_i| / (b_i + eps)``."""
    total = 0.0
    group = opt.param_groups[0]
    b2 = group["betas"][1]
    for p, g, gh, d in zip(params, grads, truth_grad, delta_adam):
        st = opt.state[p]
        taken = float(st["step"]) - 1  # the state has already been advanced by the real step
        v_new = st["exp_avg_sq"]
        v_old = (v_new - (1 - b2) * g * g) / b2
        a = (v_new / (1 - b2 ** (taken + 1))).sqrt()
        b = (v_old / (1 - b2**taken)).sqrt()
        total += float((gh * d).abs().mul((a - b).abs() / (b + group["eps"])).sum())
    return total


@pytest.mark.parametrize("beta2", [0.999, 0.9999])
def test_adam_frozen_v_prediction_within_derived_bound(beta2):
    """Before the step (v held fixed), drift + sum c_t equals <grad Hbar, dtheta_actual> up to the frozen-v error,
    which is bounded by the derived expression; a wrong preconditioner (v without bias correction) violates it."""
    model, opt = adam_setup(beta2, 30)
    tokens, adv, mask = batch()
    params = list(model.parameters())
    fn = logits_fn_of(model, tokens)
    pre = preconditioner_from_optimizer(opt, params)
    assert not pre.exact
    out = param_space_contributions(fn, params, tokens, adv, pre, mask, method="jvp")
    # deliberately wrong: raw exp_avg_sq (no bias correction) as if it were vhat
    st = [opt.state[p] for p in params]
    taken = float(st[0]["step"])
    wrong = adam_preconditioner(params, [s["exp_avg"] for s in st], [s["exp_avg_sq"] * (1 - beta2**taken) for s in st],
                                taken, 1e-3, (0.9, beta2), 1e-8, 0.1)
    out_wrong = param_space_contributions(fn, params, tokens, adv, wrong, mask, method="jvp")

    truth_grad = hand_entropy_grad(model, tokens, mask)
    before, grads = real_step(model, opt, tokens, adv, mask, float(mask.sum()))
    opt.step()
    delta = delta_after(model, before)
    truth = dot(truth_grad, delta)
    wd_part = [-1e-3 * 0.1 * b for b in before]
    delta_adam = [d - w for d, w in zip(delta, wd_part)]
    bound = frozen_v_bound(opt, params, grads, truth_grad, delta_adam)
    err = abs(float(out.predicted) - truth)
    assert err <= bound * (1 + 1e-6) + 1e-15, (err, bound, truth)
    # the bound is informative: small against the change itself (1/t-sized v moves after 30 warm-up steps)
    assert bound < 0.25 * abs(truth), (bound, truth)
    assert abs(float(out_wrong.predicted) - truth) > 3 * bound, (float(out_wrong.predicted), truth, bound)


def adam_step_with_grad(model, opt, state, grads):
    """The real AdamW step from a saved state with the given gradient (set by hand), as dtheta."""
    opt.load_state_dict(copy.deepcopy(state))
    before = [p.detach().clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()
    delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return delta


@pytest.mark.parametrize("decoupled", [True, False])
def test_linearised_adam_is_the_first_order_expansion_of_the_real_step(decoupled):
    """grads=g0 with linearize_v: drift_step - gain g equals the real AdamW step at g = g0 exactly and is its
    tangent there: the error at g0 + e d shrinks 4x when e halves (second order), while holding v fixed at g0
    (linearize_v=False) leaves a first-order error (2x)."""
    model, opt = adam_setup(0.99, 3, decoupled=decoupled)
    params = list(model.parameters())
    state = copy.deepcopy(opt.state_dict())
    g = torch.Generator().manual_seed(3)
    g0 = [torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 for p in params]
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 for p in params]
    lin = preconditioner_from_optimizer(opt, params, grads=g0)
    fixed = preconditioner_from_optimizer(opt, params, grads=g0, linearize_v=False)
    for a, b in zip(lin.step(g0), adam_step_with_grad(model, opt, state, g0)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)

    def err(pre, e):
        gs = [x + e * d for x, d in zip(g0, direction)]
        real = adam_step_with_grad(model, opt, state, gs)
        return math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(pre.step(gs), real)))

    e_lin = [err(lin, 0.05 / 2**k) for k in range(3)]
    e_fix = [err(fixed, 0.05 / 2**k) for k in range(3)]
    assert 3.5 < e_lin[1] / e_lin[2] < 4.5, e_lin
    assert 1.8 < e_fix[1] / e_fix[2] < 2.2, e_fix
    assert e_lin[2] < 0.1 * e_fix[2]


def test_adam_without_state_raises():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="first step"):
        preconditioner_from_optimizer(opt, list(model.parameters()))


# ----------------------------------------------------------------------------- the step direction, one tensor at a time
STEP_DIRECTION_CASES = [("sgd", c) for c in SGD_CONFIGS] + [
    ("adam", {"weight_decay": 0.1}), ("adamw", {"weight_decay": 0.1}), ("adamw", {"weight_decay": 0.0})]


@pytest.mark.parametrize(("kind", "options"), STEP_DIRECTION_CASES)
def test_optimizer_step_direction_is_the_real_step_on_grad_h(kind, options):
    """With the step's own loss gradient g (SGD needs none), drift - <G grad Hbar, g> equals <grad Hbar, dtheta> of
    the real optimiser step to float64 precision; for Adam with v held fixed (no g), linearised about another
    gradient g0, and with v at g0, it equals the whole-model map of preconditioner_from_optimizer: the direction
    element by element, the drift <grad Hbar, drift_step>."""
    model = TinyLM()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    opt = cls(model.parameters(), lr=0.05 if kind == "sgd" else 1e-3, **options)
    warm_up(model, opt, 3)
    tokens, adv, mask = batch()
    params = list(model.parameters())
    gh = hand_entropy_grad(model, tokens, mask)
    if kind != "sgd":
        g = torch.Generator().manual_seed(4)
        g0 = [torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1 for p in params]
        for ref, linearize in [(None, True), (g0, True), (g0, False)]:
            whole = preconditioner_from_optimizer(opt, params, ref, linearize)
            direction, drift = optimizer_step_direction(opt, params, gh, ref, linearize)
            # float64 rounding of another order of operations (the linearised gain's two terms cancel in part)
            for d, k, x in zip(direction, whole.gain, gh):
                torch.testing.assert_close(d, k * x, rtol=1e-10, atol=0.0)
            assert drift == pytest.approx(dot(gh, whole.drift_step), rel=1e-10)
    before, grads = real_step(model, opt, tokens, adv, mask, float(mask.sum()))
    direction, drift = optimizer_step_direction(opt, params, gh, grads=None if kind == "sgd" else grads)
    opt.step()
    truth = dot(gh, delta_after(model, before))
    assert drift - dot(direction, grads) == pytest.approx(truth, rel=1e-10, abs=1e-15)


def test_optimizer_step_direction_float32_with_silent_parameters():
    """float32 AdamW whose second moment and reference gradient are zero in places (parameters no gradient has
    reached): the direction is finite and equals the whole-model map there too."""
    p = nn.Parameter(torch.randn(3 * STEP_CHUNK_TEST))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p) * (torch.arange(p.numel()) % 3 != 0)
    opt.step()
    vec = [torch.randn_like(p)]
    for ref in (None, [p.grad.clone()]):
        direction, drift = optimizer_step_direction(opt, [p], vec, ref)
        whole = preconditioner_from_optimizer(opt, [p], ref)
        assert torch.isfinite(direction[0]).all() and math.isfinite(drift)
        # the whole-model map forms 1 - beta2^t in float32 (1.3e-5 relative error at t = 1), this one in float64
        torch.testing.assert_close(direction[0], whole.gain[0] * vec[0], rtol=5e-5, atol=0.0)
        assert drift == pytest.approx(float(first_order_entropy_change(vec, whole.drift_step)), rel=5e-5)


def test_optimizer_step_direction_errors():
    model = TinyLM()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="first step"):
        optimizer_step_direction(opt, params, [torch.zeros_like(p) for p in params])
    with pytest.raises(ValueError, match="vector has 2 entries"):
        optimizer_step_direction(opt, params, [torch.zeros_like(p) for p in params[:2]])
    with pytest.raises(ValueError, match=r"vector\[1\] has shape"):
        optimizer_step_direction(opt, params, [torch.zeros(3, dtype=torch.float64) if i == 1 else torch.zeros_like(p)
                                               for i, p in enumerate(params)])


# ----------------------------------------------------------------------------- first order
def measured_and_predicted(lr: float, kind: str):
    model = TinyLM()
    tokens, adv, mask = batch()
    adv = adv * 3
    params = list(model.parameters())
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
        warm_up(model, opt, 3)
        for group in opt.param_groups:  # warm-up at a fixed lr; the measured step uses lr
            group["lr"] = lr
    h0 = float(hand_mean_entropy(model, tokens, mask))
    _, grads = real_step(model, opt, tokens, adv, mask, float(mask.sum()))
    pre = preconditioner_from_optimizer(opt, params, grads=grads if kind == "adam" else None)
    out = param_space_contributions(logits_fn_of(model, tokens), params, tokens, adv, pre, mask, method="jvp")
    opt.step()
    with torch.no_grad():
        h1 = float(hand_mean_entropy(model, tokens, mask))
    return h1 - h0, float(out.predicted)


@pytest.mark.parametrize("kind,lr", [("sgd", 0.02), ("adam", 4e-4)])
def test_first_order_error_is_quadratic_in_lr(kind, lr):
    """|dHbar_exact - predicted| = a lr^2 + b lr^3: halving lr divides it by 4 (1 + O(lr)); the O(lr) part
    is checked by requiring the ratio to approach 4 as lr shrinks."""
    errs, preds = [], []
    for k in range(3):
        m, p = measured_and_predicted(lr / 2**k, kind)
        errs.append(abs(m - p))
        preds.append(p)
    assert all(e < 0.05 * abs(p) for e, p in zip(errs, preds)), (errs, preds)  # first order dominates
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert abs(r2 - 4.0) < 0.3, (r1, r2)
    assert abs(r2 - 4.0) <= abs(r1 - 4.0) + 0.02, (r1, r2)


# ----------------------------------------------------------------------------- JVP vs finite differences
def derivative_setup():
    """The tiny model under an SGD preconditioner: ``(fn, params, tokens, adv, pre, mask)`` and the exact (JVP)
    contributions, against which the finite differences are measured."""
    model = TinyLM()
    tokens, adv, mask = batch()
    params = list(model.parameters())
    fn = logits_fn_of(model, tokens)
    pre = sgd_preconditioner(params, 0.1)
    return (fn, params, tokens, adv, pre, mask), param_space_contributions(fn, params, tokens, adv, pre, mask,
                                                                           method="jvp")


def test_jvp_and_central_difference_agree_with_error_order_h2():
    """Both paths give the same s_t; the FD error against the JVP shrinks ~4x when the FD step halves
    (truncation O(h^2) dominates in float64 at these steps)."""
    (fn, params, tokens, adv, pre, mask), ref = derivative_setup()
    scale = float(ref.directional.abs().max())
    errs = []
    for step in (4e-2, 2e-2, 1e-2):  # nats of first-order Hbar change along the FD perturbation
        fd = param_space_contributions(fn, params, tokens, adv, pre, mask, method="fd", fd_step=step)
        errs.append(float((fd.directional - ref.directional).abs().max()))
    assert 3.5 < errs[0] / errs[1] < 4.5 and 3.5 < errs[1] / errs[2] < 4.5, errs
    # default float64 step 1e-4 nats: 100x smaller than the last one, so the error is ~1e4 times smaller
    default = param_space_contributions(fn, params, tokens, adv, pre, mask)
    assert float((default.directional - ref.directional).abs().max()) < 3 * errs[-1] * 1e-4 + 1e-12 * scale
    torch.testing.assert_close(default.predicted, ref.predicted, rtol=1e-7, atol=0)


def test_forward_difference_error_is_first_order_in_h():
    """The one-sided difference (method="forward"): its error against the JVP halves when the step halves
    (truncation O(h), the second derivative, dominates in float64 here), so it is ~h/2 |f''| where the central
    one is O(h^2); given the centre logits as ``base`` it equals the one that computes them itself."""
    (fn, params, tokens, adv, pre, mask), ref = derivative_setup()
    errs, central = [], []
    for step in (4e-2, 2e-2, 1e-2):
        fwd = param_space_contributions(fn, params, tokens, adv, pre, mask, method="forward", fd_step=step)
        cen = param_space_contributions(fn, params, tokens, adv, pre, mask, method="fd", fd_step=step)
        errs.append(float((fwd.directional - ref.directional).abs().max()))
        central.append(float((cen.directional - ref.directional).abs().max()))
    assert 1.7 < errs[0] / errs[1] < 2.3 and 1.7 < errs[1] / errs[2] < 2.3, errs
    assert all(c < e for c, e in zip(central, errs)), (central, errs)
    direction = [0.1 * p.detach() for p in params]
    with torch.no_grad():
        centre = fn(tuple(params))
    own = logit_directional_derivative(fn, params, direction, "forward", 1e-3)
    given = logit_directional_derivative(fn, params, direction, "forward", 1e-3, base=centre)
    torch.testing.assert_close(own, given, rtol=0, atol=0)
    with pytest.raises(ValueError, match="base logits"):
        logit_directional_derivative(fn, params, direction, "forward", 1e-3, base=centre[..., :-1])


def tiny_llama(dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      initializer_range=0.3, pad_token_id=None, tie_word_embeddings=True)
    config._attn_implementation = "eager"  # forward-mode AD has no rule for the fused SDPA kernel
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def test_transformers_model_sum_identity_and_fd_in_float32():
    """A tiny random Llama built from a config (no download). float64: the sum identity against a real SGD
    step to 1e-5 (the JVP path; RMSNorm runs in float32 inside). float32: the FD path (the default, which
    also runs with SDPA kernels) agrees with the JVP to 1e-3 of the largest |s_t| (truncation + float32
    rounding at the default step, measured 1.4e-4..2.2e-4 on the smoke model, docs/theory.md §5.4)."""
    tokens, adv, mask = batch()
    model = tiny_llama(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    def fn(ps):
        return functional_call(model, dict(zip(names, ps)), (tokens,)).logits

    opt = torch.optim.SGD(params, lr=0.05)
    pre = preconditioner_from_optimizer(opt, params)
    jvp = param_space_contributions(fn, params, tokens, adv, pre, mask, method="jvp")
    p = torch.softmax(model(tokens).logits, -1)
    h_bar = ((-(p * p.log()).sum(-1)) * mask).sum() / mask.sum()
    gh = torch.autograd.grad(h_bar, params)
    opt.zero_grad()
    logp = torch.log_softmax(model(tokens).logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (-(adv[:, None] * logp * mask).sum() / mask.sum()).backward()
    before = [q.detach().clone() for q in params]
    opt.step()
    truth = dot(gh, [q.detach() - b for q, b in zip(params, before)])
    # LlamaRMSNorm normalises in float32 even in a float64 model, so both paths carry float32 rounding
    assert float(jvp.predicted) == pytest.approx(truth, rel=1e-5)

    model32 = tiny_llama(torch.float32)
    params32 = [p for _, p in model32.named_parameters()]

    def fn32(ps):
        return functional_call(model32, dict(zip(names, ps)), (tokens,)).logits

    pre32 = sgd_preconditioner(params32, 0.05)
    jvp32 = param_space_contributions(fn32, params32, tokens, adv.float(), pre32, mask, method="jvp")
    fd32 = param_space_contributions(fn32, params32, tokens, adv.float(), pre32, mask)
    scale = float(jvp32.directional.abs().max())
    assert float((fd32.directional - jvp32.directional).abs().max()) < 1e-3 * scale


# ----------------------------------------------------------------------------- independent models (seeds)
def test_batch_dims_gives_each_model_its_own_contributions():
    """Stacked parameters of two models with batch_dims=1 give the same s_t, drift, predicted as separate calls."""
    models = [TinyLM(seed=s) for s in (0, 3)]
    tokens, adv, mask = batch()
    stacked = [torch.stack([a, b]) for a, b in zip(models[0].parameters(), models[1].parameters())]
    names = [n for n, _ in models[0].named_parameters()]
    tok2, adv2, mask2 = torch.stack([tokens, tokens.flip(0)]), torch.stack([adv, -adv]), torch.stack([mask, mask])

    def fn(ps):
        return torch.stack([functional_call(models[0], dict(zip(names, [p[s] for p in ps])), (tok2[s],))
                            for s in range(2)])

    m = [torch.randn_like(p) for p in stacked]
    v = [torch.rand_like(p) + 0.1 for p in stacked]
    taken = torch.tensor([3.0, 7.0])
    pre = adam_preconditioner(stacked, m, v, taken, 1e-3, weight_decay=0.1)
    both = param_space_contributions(fn, stacked, tok2, adv2, pre, mask2, method="fd", batch_dims=1)
    for s in range(2):
        ps = [p[s] for p in stacked]
        pre_s = adam_preconditioner(ps, [x[s] for x in m], [x[s] for x in v], float(taken[s]), 1e-3, weight_decay=0.1)
        one = param_space_contributions(logits_fn_of(models[0], tok2[s]), ps, tok2[s], adv2[s], pre_s, mask2[s],
                                        method="jvp")
        torch.testing.assert_close(both.directional[s], one.directional, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(both.predicted[s], one.predicted, rtol=1e-6, atol=1e-14)
        torch.testing.assert_close(both.drift[s], one.drift, rtol=1e-10, atol=1e-16)


def test_entropy_weights_bonus_matches_a_real_step():
    """With an entropy term + sum w_t H_t in the objective, drift + bonus + sum c_t is still the real SGD step's
    <grad Hbar, dtheta>."""
    model = TinyLM()
    tokens, adv, mask = batch()
    w = torch.rand(B, T, dtype=torch.float64) * 0.5
    params = list(model.parameters())
    n = float(mask.sum())
    pre = sgd_preconditioner(params, 0.1)
    out = param_space_contributions(logits_fn_of(model, tokens), params, tokens, adv, pre, mask, method="jvp",
                                    entropy_weights=w)
    gh = hand_entropy_grad(model, tokens, mask)
    opt = torch.optim.SGD(params, lr=0.1)
    z = model(tokens)
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    h_t = -(logp_all.exp() * logp_all).sum(-1)
    (-(adv[:, None] * logp * mask).sum() / n - (w * h_t * mask).sum()).backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert float(out.predicted) == pytest.approx(dot(gh, delta_after(model, before)), rel=1e-10)
    assert float(out.bonus) != 0.0


def test_first_order_entropy_change_is_the_inner_product():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    d = [torch.tensor([0.5, -1.0]), torch.tensor([[2.0]])]
    assert float(first_order_entropy_change(g, d)) == pytest.approx(0.5 - 2.0 + 6.0)


# ----------------------------------------------------------------------------- errors
def test_clear_errors():
    model = TinyLM()
    tokens, adv, mask = batch()
    params = list(model.parameters())
    fn = logits_fn_of(model, tokens)
    pre = sgd_preconditioner(params, 0.1)
    with pytest.raises(ValueError, match="advantages shape"):
        param_space_contributions(fn, params, tokens, adv[:3], pre, mask)
    with pytest.raises(ValueError, match="NaN"):
        param_space_contributions(fn, params, tokens, adv * float("nan"), pre, mask)
    with pytest.raises(ValueError, match="empty mask"):
        param_space_contributions(fn, params, tokens, adv, pre, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="mask shape"):
        param_space_contributions(fn, params, tokens, adv, pre, mask[:, :2])
    with pytest.raises(ValueError, match="tokens shape"):
        param_space_contributions(fn, params, tokens[:, :2], adv[:, None].expand(B, 2), pre)
    with pytest.raises(ValueError, match="out of range"):
        param_space_contributions(fn, params, tokens + V, adv, pre, mask)
    with pytest.raises(TypeError, match="unsupported optimizer"):
        preconditioner_from_optimizer(torch.optim.RMSprop(params), params)
    with pytest.raises(ValueError, match="amsgrad"):
        preconditioner_from_optimizer(torch.optim.Adam(params, amsgrad=True), params)
    with pytest.raises(ValueError, match="not managed"):
        preconditioner_from_optimizer(torch.optim.SGD(params[:2], lr=0.1), params)
    with pytest.raises(ValueError, match="parameters"):
        param_space_contributions(fn, params, tokens, adv, StepPreconditioner("sgd", (), (), True), mask)
    bad = [p.detach().clone() for p in params]
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        param_space_contributions(fn, bad, tokens, adv, pre, mask)
    with pytest.raises(ValueError, match="normalizer"):
        param_space_contributions(fn, params, tokens, adv, pre, mask, normalizer=0.0)
    with pytest.raises(ValueError, match="unknown method"):
        logit_directional_derivative(fn, params, params, method="bogus")


@pytest.mark.parametrize("taken, warmup", [(0, 0), (3, 0), (40, 0), (2, 6)])
def test_momentum_carry_factor_is_the_real_optimisers_lifetime_effect(taken, warmup):
    """W of eq. 5.2e against real torch steps: a gradient given once at step tau = taken + 1 (zero gradients
    before and after) moves a linear function <a, theta> by W times its move at step tau, over the following
    steps. Adam with eps >> sqrt(vhat) has a constant preconditioner 1/eps (the assumption of W; relative error
    ~ sqrt(vhat)/eps = 1e-8); SGD with momentum has no bias correction; a linear learning-rate warm-up enters
    through lr_factors."""
    from entrotheory.param_space import momentum_carry_factor

    gen = torch.Generator().manual_seed(taken)
    a = torch.randn(5, generator=gen, dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64)

    def lam(s):
        return min(1.0, (s + 1) / warmup) if warmup else 1.0

    for kind in ("adam", "sgd"):
        theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = (torch.optim.Adam([theta], lr=0.1, betas=(0.9, 0.999), eps=1e8) if kind == "adam"
               else torch.optim.SGD([theta], lr=0.1, momentum=0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        moves = []
        for step in range(taken + 400):
            before = float(a @ theta.detach())
            theta.grad = g.clone() if step == taken else torch.zeros_like(g)
            opt.step()
            sched.step()
            moves.append(float(a @ theta.detach()) - before)
        now, later = moves[taken], sum(moves[taken:])
        assert abs(now) > 0
        w = momentum_carry_factor(taken, 0.9, bias_correction=kind == "adam", lr_factors=lambda k: lam(taken + k))
        assert later / now == pytest.approx(w, rel=1e-6), kind
    assert momentum_carry_factor(taken, 0.0) == 1.0
    assert momentum_carry_factor(10_000, 0.9) == pytest.approx(10.0, rel=1e-9)
    with pytest.raises(ValueError, match="beta1 must be < 1"):
        momentum_carry_factor(0, 1.0)
    with pytest.raises(ValueError, match="steps_taken must be an int >= 0"):
        momentum_carry_factor(-1, 0.9)
