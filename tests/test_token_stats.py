"""Token-level statistics: chunked == unchunked == the core functions position by position."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import entrotheory as et


def make_batch(seed: int, b: int = 3, t: int = 5, v: int = 50, dtype=torch.float32, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    adv = torch.randn(b, generator=g)
    return logits, tokens, mask, adv


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), chunk=st.integers(1, 20), v=st.integers(2, 300))
def test_chunked_equals_unchunked(seed, chunk, v):
    logits, tokens, mask, _ = make_batch(seed, v=v)
    full = et.token_entropy_stats(logits, tokens, mask, chunk_size=10_000)
    part = et.token_entropy_stats(logits, tokens, mask, chunk_size=chunk)
    for a, b in zip(full[:3], part[:3]):
        assert torch.equal(a, b)


def test_stats_equal_core_functions_per_position():
    logits, tokens, mask, _ = make_batch(1, dtype=torch.float64)
    s = et.token_entropy_stats(logits, tokens, mask, chunk_size=4)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    h = et.entropy(logits)
    base = (p * p * (logp + h.unsqueeze(-1))).sum(-1)
    lp_y = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    for got, want in ((s.log_prob, lp_y), (s.entropy, h), (s.pg_baseline, base)):
        assert torch.allclose(got.double(), torch.where(mask, want, torch.zeros_like(want)), atol=1e-5)
    assert torch.count_nonzero(s.entropy[~mask]) == 0


@pytest.mark.parametrize("rule", ["pg", "npg"])
def test_token_contributions_equal_per_position_core_contributions(rule):
    logits, tokens, mask, adv = make_batch(2, dtype=torch.float64)
    s = et.token_entropy_stats(logits, tokens, mask)
    c = et.token_entropy_contributions(s, adv, rule=rule)
    per_token_adv = adv[:, None].expand_as(tokens).double()
    core = et.entropy_change_contributions(
        logits, tokens.unsqueeze(-1), per_token_adv.unsqueeze(-1), rule
    ).squeeze(-1)
    assert torch.allclose(c.double(), torch.where(mask, core, torch.zeros_like(core)), atol=1e-5)
    # sum identity: total = sum over positions of the predicted change of that position's update
    dz = et.logit_update(logits, tokens.unsqueeze(-1), per_token_adv.unsqueeze(-1), rule)
    pred = et.predicted_entropy_change(logits, dz)
    assert torch.allclose(c.sum().double(), pred[mask].sum(), rtol=1e-5, atol=1e-6)


def test_bfloat16_large_vocab_no_float32_copy_needed():
    logits, tokens, mask, adv = make_batch(3, b=2, t=3, v=(1 << 17) + 1, dtype=torch.bfloat16, scale=1e4)
    s = et.token_entropy_stats(logits, tokens, mask, chunk_size=2)
    assert all(torch.isfinite(x).all() for x in s[:3])
    assert s.entropy.dtype == torch.float32
    c = et.token_entropy_contributions(s, adv, rule="pg")
    assert torch.isfinite(c).all()
    ref = et.entropy(logits.float())
    assert torch.allclose(s.entropy, torch.where(mask, ref, torch.zeros_like(ref)), atol=1e-4)


def test_per_token_advantages_and_bad_input():
    logits, tokens, mask, adv = make_batch(4)
    s = et.token_entropy_stats(logits, tokens, mask)
    per_tok = adv[:, None].expand(3, 5).contiguous()
    assert torch.equal(et.token_entropy_contributions(s, adv), et.token_entropy_contributions(s, per_tok))
    with pytest.raises(ValueError, match="advantages shape"):
        et.token_entropy_contributions(s, torch.ones(4))
    with pytest.raises(ValueError, match="unknown rule"):
        et.token_entropy_contributions(s, adv, rule="sgd")
    with pytest.raises(ValueError, match="tokens shape"):
        et.token_entropy_stats(logits, tokens[:, :2])
    with pytest.raises(ValueError, match="out of range"):
        et.token_entropy_stats(logits, tokens + 50, mask)
    bad = logits.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        et.token_entropy_stats(bad, tokens, torch.ones_like(mask))
    with pytest.raises(ValueError, match="chunk_size"):
        et.token_entropy_stats(logits, tokens, chunk_size=0)
    with pytest.raises(TypeError, match="integer"):
        et.token_entropy_stats(logits, tokens.float())


def test_strided_logits_are_never_copied_whole():
    """logits[:, :-1] (the usual LM call) is not contiguous: no allocation may be as large as a full
    copy; each op allocates at most a float32 chunk (chunk * V * 4 bytes), here 1/8 of the bf16 size."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(5)
    b, t, v, chunk = 4, 65, 20_000, 8
    big = torch.randn(b, t, v, generator=g).to(torch.bfloat16)
    sliced = big[:, :-1]
    tokens = torch.randint(0, v, (b, t - 1), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = et.token_entropy_stats(sliced, tokens, chunk_size=chunk)
    largest = max(e.cpu_memory_usage for e in prof.events())
    chunk_bytes = chunk * v * 4
    assert largest <= chunk_bytes, (largest, chunk_bytes)
    assert largest < sliced.numel() * 2
    ref = et.token_entropy_stats(sliced.contiguous(), tokens, chunk_size=chunk)
    for a, b_ in zip(out[:3], ref[:3]):
        assert torch.equal(a, b_)
    masked = et.token_entropy_stats(sliced, tokens, mask=tokens % 2 == 0, chunk_size=chunk)
    assert torch.equal(masked.entropy[tokens % 2 == 0], ref.entropy[tokens % 2 == 0])


@pytest.mark.parametrize("rule", ["pg"])
def test_token_mean_entropy_change_matches_an_sgd_step_on_free_logits(rule):
    """Ground truth: every position has its own free logits; one SGD step on the token-mean loss
    -sum_t A_t log pi(y_t) / N (N = masked tokens) changes the token-mean entropy by
    lr * token_mean_entropy_change(c, mask) + O(lr^2): the residual shrinks 4x when lr halves."""
    logits, tokens, mask, adv = make_batch(6, dtype=torch.float64)
    stats = et.token_entropy_stats(logits, tokens, mask)
    c = et.token_entropy_contributions(stats, adv, rule=rule)
    predicted = float(et.token_mean_entropy_change(c, mask))
    n = int(mask.sum())

    def measured(lr: float) -> float:
        z = logits.clone().requires_grad_(True)
        lp = torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        loss = -(torch.where(mask, adv[:, None] * lp, 0.0)).sum() / n
        (grad,) = torch.autograd.grad(loss, z)
        before = et.entropy(logits)[mask].mean()
        after = et.entropy(logits - lr * grad)[mask].mean()
        return float(after - before)

    lr = 0.05
    residuals = [abs(measured(e) - e * predicted) for e in (lr, lr / 2)]
    assert abs(residuals[0] / residuals[1] - 4.0) < 0.2
    assert abs(measured(1e-4) / (1e-4 * predicted) - 1.0) < 1e-2
    with pytest.raises(ValueError, match="mask shape"):
        et.token_mean_entropy_change(c, mask[:, :2])
    assert float(et.token_mean_entropy_change(c, torch.zeros_like(mask))) == 0.0
