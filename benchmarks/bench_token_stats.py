"""``token_entropy_stats`` (three statistics) against the straightforward entropy alone.

The baseline is what one writes without thinking about memory: a float32 copy of the logits, then
``log_softmax``, ``exp``, multiply and sum (the entropy only). The candidates compute all three
statistics of eq. 3.1 (log pi(y), H, the pg baseline): the chunked torch path and the fused compiled
kernel (``backend="compiled"``). A plain copy of the logits (``x.clone()``) gives the machine's memory
bandwidth for the same bytes. Groups: one per dtype and number of positions, V = 151,936 (a Qwen2-size
vocabulary).

Besides the groups, the benchmarks record, measured in the same run:

* bandwidth: bytes of logits read per second by each candidate, as a fraction of the copy's rate;
* contention: the same time ratios while a second process runs torch with its default threads
  (the case where many small ops used to suffer from thread oversubscription);
* memory: the largest allocation during the call, as a fraction of the logits' size (torch profiler).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from common import SMOKE, record_ratio
from torch.profiler import ProfilerActivity, profile

import entrotheory as et

VOCAB = 4096 if SMOKE else 151_936
POSITIONS = (64,) if SMOKE else (512, 4096)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROUNDS = 1 if SMOKE else 3

_CACHE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _batch(dtype: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (dtype, n)
    if key not in _CACHE:
        _CACHE.clear()  # one batch alive at a time: 4096 x 152k fp32 logits are 2.5 GB
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, VOCAB, generator=g) * 3).to(DTYPES[dtype])
        tokens = torch.randint(0, VOCAB, (n,), generator=g)
        _CACHE[key] = (logits, tokens)
    return _CACHE[key]


def straightforward_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy alone, written plainly: float32 copy, log_softmax, exp, multiply, sum."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def plain_copy(logits: torch.Tensor) -> torch.Tensor:
    return logits.clone()


def _stats(backend: str):
    def run(logits, tokens):
        return et.token_entropy_stats(logits, tokens, backend=backend)

    return run


CANDIDATES = {
    "baseline_straightforward_entropy": lambda x, y: straightforward_entropy(x),
    "plain_copy": lambda x, y: plain_copy(x),
    "token_entropy_stats_torch": _stats("torch"),
    "token_entropy_stats_compiled": _stats("compiled"),
}
CASES = [(d, n, name) for d in DTYPES for n in POSITIONS for name in CANDIDATES]


@pytest.mark.parametrize("dtype,positions,candidate", CASES)
def test_token_stats(benchmark, dtype, positions, candidate):
    benchmark.group = f"entropy-{dtype}-{positions}x{VOCAB}"
    logits, tokens = _batch(dtype, positions)
    fn = CANDIDATES[candidate]
    fn(logits, tokens)  # warm-up (compiles the fused kernel once)
    out = benchmark.pedantic(fn, args=(logits, tokens), rounds=ROUNDS, iterations=1)
    if candidate.startswith("token_entropy_stats"):
        ref = straightforward_entropy(logits)
        assert torch.allclose(out.entropy, ref, rtol=1e-5, atol=1e-4)


def _best_of(fn, args, repeats: int) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bandwidth_against_copy(benchmark, dtype):
    """GB/s of logits read, each candidate against the copy, best of 3, interleaved in one run."""
    n = POSITIONS[-1]
    logits, tokens = _batch(dtype, n)
    size = logits.numel() * logits.element_size()
    times = {name: _best_of(CANDIDATES[name], (logits, tokens), ROUNDS) for name in CANDIDATES}
    note = f"{dtype}, {n} x {VOCAB}"
    for name in ("token_entropy_stats_torch", "token_entropy_stats_compiled", "baseline_straightforward_entropy"):
        record_ratio(f"bandwidth `{name}`", times["plain_copy"] / times[name],
                     f"logit bytes read per s / plain copy's ({size / times['plain_copy'] / 1e9:.2f} GB/s)", note)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(t > 0 for t in times.values())


BUSY = """
import time, torch
a = torch.randn(1024, 1024)
end = time.time() + {seconds}
while time.time() < end:
    (a @ a).exp_().sum()
"""


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_under_contention(benchmark, dtype):
    """Time ratios against the straightforward entropy while another torch process (default threads) runs."""
    n = POSITIONS[0]
    logits, tokens = _batch(dtype, n)
    seconds = 5 if SMOKE else 60
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)])
    try:
        time.sleep(1.0)
        times = {name: _best_of(CANDIDATES[name], (logits, tokens), ROUNDS)
                 for name in ("baseline_straightforward_entropy", "token_entropy_stats_torch",
                              "token_entropy_stats_compiled")}
    finally:
        busy.kill()
        busy.wait()
    note = f"{dtype}, {n} x {VOCAB}, second busy torch process"
    for name in ("token_entropy_stats_torch", "token_entropy_stats_compiled"):
        record_ratio(f"contention `{name}`", times[name] / times["baseline_straightforward_entropy"],
                     "time / straightforward entropy's time, both under contention", note)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert all(t > 0 for t in times.values())


def _largest_allocation(fn, args) -> int:
    """Bytes of the largest single allocation during ``fn(*args)`` (after a warm-up call)."""
    fn(*args)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_peak_memory(benchmark, dtype):
    n = POSITIONS[0]
    logits, tokens = _batch(dtype, n)
    size = logits.numel() * logits.element_size()
    note = f"{dtype}, {n} x {VOCAB}"
    for name in ("baseline_straightforward_entropy", "token_entropy_stats_torch", "token_entropy_stats_compiled"):
        largest = _largest_allocation(CANDIDATES[name], (logits, tokens))
        record_ratio(f"memory `{name}`", largest / size, "largest allocation / logits bytes", note)
        # the fused kernel allocates only its [rows] outputs; the torch path one float32 chunk, which is
        # small against the logits except at the smoke size (one chunk holds all 64 rows there)
        if name == "token_entropy_stats_compiled" or (name == "token_entropy_stats_torch" and not SMOKE):
            assert largest <= 0.05 * size, (name, largest, size)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
