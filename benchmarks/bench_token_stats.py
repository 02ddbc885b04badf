"""token_entropy_stats (one pass, chunked over positions) vs a straightforward implementation
(full float32 copy of the bf16 logits, softmax and log_softmax computed separately)."""

from __future__ import annotations

import pytest
import torch

import entrotheory as et

B, T, V = 4, 64, 32768


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return logits, tokens, mask


def naive_stats(logits, tokens):
    z = logits.float()  # full-size float32 copy
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    h = -(p * logp).sum(-1)
    base = (p * p * (logp + h.unsqueeze(-1))).sum(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), h, base


@pytest.mark.benchmark(group="token_entropy_stats")
def test_naive_baseline(benchmark, batch):
    logits, tokens, _ = batch
    benchmark(naive_stats, logits, tokens)


@pytest.mark.benchmark(group="token_entropy_stats")
def test_chunked(benchmark, batch):
    logits, tokens, mask = batch
    out = benchmark(et.token_entropy_stats, logits, tokens, mask)
    ref = naive_stats(logits, tokens)
    assert torch.allclose(out.entropy, ref[1], atol=1e-4)
