"""Cost of the parameter-space contributions (docs/theory.md §5) against one training step.

Model: a tiny random Llama built from a config (vocab 512, width 64, 2 layers, eager attention so that the
JVP path runs too), float32, a batch of 32 sequences x 24 tokens. Side by side in one pytest-benchmark group:

* ``training_step_baseline``: forward + backward of the token-mean policy-gradient loss + ``AdamW.step()``;
* ``param_space_fd``: :func:`entrotheory.param_space_contributions` with the AdamW preconditioner read from
  the optimiser and the default finite-difference path (one forward + backward for ``grad Hbar``, two no-grad
  forwards);
* ``param_space_jvp``: the same with the forward-mode JVP.

``benchmarks/conftest.py`` prints ``baseline / candidate`` (its inverse is the cost as a fraction of a
step). ``test_param_space_cost_ratio`` interleaves the three (best of 5) and prints the fractions. Run:
``pytest benchmarks/bench_param_space.py --benchmark-only -s``.
"""

from __future__ import annotations

import time

import pytest
import torch
from common import record_ratio
from torch.func import functional_call

from entrotheory import param_space_contributions, preconditioner_from_optimizer

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, LAYERS, ROWS, LENGTH = 512, 64, 2, 32, 24


@pytest.fixture(scope="module")
def setup():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    adv = torch.randn(ROWS, generator=g)
    mask = torch.ones(ROWS, LENGTH, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    training_step(model, opt, tokens, adv, mask)  # AdamW state exists (the preconditioner needs v)
    return model, opt, tokens, adv, mask


def training_step(model, opt, tokens, adv, mask) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(tokens).logits
    logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss = -(adv[:, None] * logp * mask).sum() / mask.sum()
    loss.backward()
    opt.step()


def contributions(model, opt, tokens, adv, mask, method: str):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    pre = preconditioner_from_optimizer(opt, params)
    return param_space_contributions(
        lambda ps: functional_call(model, dict(zip(names, ps)), (tokens,)).logits, params, tokens, adv, pre, mask,
        method=method)


@pytest.mark.benchmark(group="param-space-contributions")
def test_training_step_baseline(benchmark, setup):
    model, opt, tokens, adv, mask = setup
    benchmark.pedantic(training_step, args=(model, opt, tokens, adv, mask), rounds=10, iterations=1,
                       warmup_rounds=2)


@pytest.mark.benchmark(group="param-space-contributions")
@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_param_space(benchmark, setup, method):
    model, opt, tokens, adv, mask = setup
    out = benchmark.pedantic(contributions, args=(model, opt, tokens, adv, mask, method), rounds=10, iterations=1,
                             warmup_rounds=2)
    assert torch.isfinite(out.contributions).all()


def test_param_space_cost_ratio(benchmark, setup):
    """Interleaved best of 5: the contributions' time as a fraction of one training step."""
    model, opt, tokens, adv, mask = setup
    jobs = {
        "step": lambda: training_step(model, opt, tokens, adv, mask),
        "fd": lambda: contributions(model, opt, tokens, adv, mask, "fd"),
        "jvp": lambda: contributions(model, opt, tokens, adv, mask, "jvp"),
    }
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(5):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - t0)
    fractions = {name: best[name] / best["step"] for name in ("fd", "jvp")}
    benchmark.extra_info.update({f"seconds_{k}": v for k, v in best.items()})
    benchmark.extra_info.update({f"fraction_of_step_{k}": v for k, v in fractions.items()})
    for name, fraction in fractions.items():
        record_ratio(f"param-space contributions ({name})", fraction,
                     "time / one AdamW training step (best of 5, interleaved)", f"{ROWS}x{LENGTH} tokens, V={VOCAB}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\nparam-space contributions vs one training step ({ROWS}x{LENGTH} tokens, V={VOCAB}, width {WIDTH}): "
          f"step {best['step'] * 1e3:.1f} ms, fd {best['fd'] * 1e3:.1f} ms ({fractions['fd']:.0%}), "
          f"jvp {best['jvp'] * 1e3:.1f} ms ({fractions['jvp']:.0%})")
    assert all(v > 0 for v in fractions.values())
