"""The fused backends of ``token_entropy_stats`` against the chunked torch path (eq. 3.1a, 3.1b).

Both compute the same float32 quantities in another order, so they agree to float32 rounding: sums of
V terms each at most ``max|z|`` in size, accumulated blockwise, err by about ``eps32 * log2(V) * max|z|``;
the tolerance below is that bound with a factor 4 of headroom.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import entrotheory as et
from entrotheory import tokens as tokens_module

EPS32 = torch.finfo(torch.float32).eps


def tolerance(logits: torch.Tensor) -> float:
    v = logits.shape[-1]
    spread = float(logits.float().amax() - logits.float().amin())
    return 4 * EPS32 * math.log2(max(v, 2)) * (1.0 + spread)


def make(seed: int, shape=(3, 7, 300), scale: float = 4.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, generator=g) * scale).to(dtype)
    tokens = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(*shape[:-1], generator=g) > 0.3
    return logits, tokens, mask


def assert_close(a: et.TokenEntropyStats, b: et.TokenEntropyStats, tol: float) -> None:
    assert torch.equal(a.mask, b.mask)
    for name, x, y in zip(("log_prob", "entropy", "pg_baseline"), a[:3], b[:3]):
        assert x.dtype == torch.float32 and x.shape == y.shape
        err = float((x - y).abs().max()) if x.numel() else 0.0
        assert err <= tol, (name, err, tol)


@pytest.mark.parametrize("scale", [0.1, 4.0, 40.0])
def test_fused_formula_equals_the_torch_path(scale):
    """The four-sum formula itself (eager, no compiler), from near-uniform to nearly one-hot rows."""
    logits, tokens, _ = make(0, scale=scale)
    sliced, tok = logits[:, 1:], tokens[:, 1:]  # strided rows: the offsets must follow the strides
    rows = torch.arange(tok.numel())
    table, row_index = tokens_module._row_table(sliced, rows)
    assert table.shape == (logits.shape[0] * logits.shape[1] - 1, logits.shape[-1])
    lp, h, base = tokens_module.fused_row_stats(table, row_index, tok.reshape(-1))
    ref = et.token_entropy_stats(sliced, tok, backend="torch")
    tol = tolerance(logits)
    assert float((lp - ref.log_prob.reshape(-1)).abs().max()) <= tol
    assert float((h - ref.entropy.reshape(-1)).abs().max()) <= tol
    assert float((base - ref.pg_baseline.reshape(-1)).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backend_matches_the_torch_path(dtype):
    logits, tokens, mask = make(1, shape=(3, 9, 1000), dtype=dtype)
    tol = tolerance(logits)
    cases = [
        (logits, tokens, None),  # contiguous, every position
        (logits[:, :-1], tokens[:, :-1], mask[:, :-1]),  # the usual strided LM slice, masked
        (logits[0], tokens[0], mask[0]),  # 2-D
        (logits[0, 0], tokens[0, 0], None),  # one position
        (logits.reshape(3, 3, 3, 1000), tokens.reshape(3, 3, 3), mask.reshape(3, 3, 3)),  # 4-D
        (logits, tokens, torch.zeros_like(mask)),  # nothing masked in
        (logits.transpose(0, 1), tokens.T, mask.T),  # leading dims transposed: still rows of one table
        (logits[:, :, ::2], tokens % 500, None),  # vocabulary strided: no table, the torch path
    ]
    for x, y, m in cases:
        ref = et.token_entropy_stats(x, y, m, backend="torch")
        got = et.token_entropy_stats(x, y, m, backend="compiled")
        assert_close(got, ref, tol)
        # masked-out positions hold zeros, as on the torch path
        if m is not None:
            assert torch.all(got.entropy[~m.bool()] == 0)


def test_compiled_backend_rejects_bad_input():
    logits, tokens, mask = make(2)
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = logits.clone()
        bad[1, 2, 5] = value
        with pytest.raises(ValueError, match="NaN/inf"):
            et.token_entropy_stats(bad, tokens, backend="compiled")
        # a bad logit at a masked-out position does not matter
        m = torch.ones_like(mask)
        m[1, 2] = False
        et.token_entropy_stats(bad, tokens, m, backend="compiled")
    with pytest.raises(ValueError, match="out of range"):
        et.token_entropy_stats(logits, tokens + 300, backend="compiled")
    with pytest.raises(ValueError, match="backend must be one of"):
        et.token_entropy_stats(logits, tokens, backend="cuda-magic")


def test_compiled_backend_allocates_no_row_sized_temporary():
    from torch.profiler import ProfilerActivity, profile

    logits, tokens, _ = make(3, shape=(4, 33, 5000), dtype=torch.bfloat16)
    sliced, tok = logits[:, :-1], tokens[:, :-1]
    et.token_entropy_stats(sliced, tok, backend="compiled")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        et.token_entropy_stats(sliced, tok, backend="compiled")
    largest = max(e.cpu_memory_usage for e in prof.events())
    one_row = 5000 * 4  # a single float32 row would already be larger than any output buffer here
    assert largest < one_row, largest


def test_auto_uses_the_compiled_kernel_for_large_inputs(monkeypatch):
    calls = []
    real = tokens_module._run_compiled

    def spy(*args):
        calls.append(args[0].numel())
        return real(*args)

    monkeypatch.setattr(tokens_module, "_run_compiled", spy)
    logits, tokens, _ = make(4)
    et.token_entropy_stats(logits, tokens)  # far below the threshold: torch path
    assert calls == []
    monkeypatch.setattr(tokens_module, "AUTO_COMPILE_MIN_ELEMENTS", logits.numel())
    got = et.token_entropy_stats(logits, tokens)
    assert calls == [logits.numel()]
    assert_close(got, et.token_entropy_stats(logits, tokens, backend="torch"), tolerance(logits))


def test_compiled_backend_falls_back_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(tokens_module._COMPILE_STATE, "fn", broken)
    monkeypatch.setitem(tokens_module._COMPILE_STATE, "ok", None)
    logits, tokens, mask = make(5)
    with pytest.warns(RuntimeWarning, match="compiled kernel is unavailable"):
        got = et.token_entropy_stats(logits, tokens, mask, backend="compiled")
    ref = et.token_entropy_stats(logits, tokens, mask, backend="torch")
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    assert tokens_module._COMPILE_STATE["ok"] is False
    # once it failed, auto no longer tries it
    assert tokens_module._resolve_backend("auto", torch.zeros(1 << 27, dtype=torch.bfloat16)) == "torch"


def test_triton_backend_without_a_gpu_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, tokens, mask = make(6)
    ref = et.token_entropy_stats(logits, tokens, mask, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = et.token_entropy_stats(logits, tokens, mask, backend="triton")
    if not torch.cuda.is_available():
        assert any("Triton kernel needs" in str(w.message) for w in caught)
        for a, b in zip(got[:3], ref[:3]):
            assert torch.equal(a, b)


TRITON_CHECK = r"""
import math, torch, entrotheory as et
from entrotheory import _triton_entropy as te
from entrotheory import tokens as tokens_module
assert te.interpreted() and te.available(torch.device("cpu"))
eps = torch.finfo(torch.float32).eps
g = torch.Generator().manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for v, block in ((1000, None), (1000, 16), (37, 16), (5000, None)):
        x = (torch.randn(3, 9, v, generator=g) * 4).to(dtype)
        x[0, 0] += torch.linspace(-30, 30, v).to(dtype)  # the maximum keeps rising: every block rescales
        x[0, 1] += torch.linspace(30, -30, v).to(dtype)  # the maximum comes first
        y = torch.randint(0, v, (3, 9), generator=g)
        m = torch.rand(3, 9, generator=g) > 0.3
        xs, ys, ms = x[:, :-1], y[:, :-1], m[:, :-1]
        spread = float(x.float().amax() - x.float().amin())
        tol = 4 * eps * math.log2(v) * (1 + spread)
        ref = et.token_entropy_stats(xs, ys, ms, backend="torch")
        rows = ms.reshape(-1).nonzero().squeeze(-1)
        flat, start = tokens_module._row_offsets(xs, rows)
        lp, h, base = te.row_stats(flat, start, ys.reshape(-1)[rows], v, xs.stride(-1), block=block)
        for got, want in ((lp, ref.log_prob), (h, ref.entropy), (base, ref.pg_baseline)):
            err = float((got - want.reshape(-1)[rows]).abs().max())
            worst = max(worst, err / tol)
            assert err <= tol, (dtype, v, block, err, tol)
        full = et.token_entropy_stats(xs, ys, ms, backend="triton")
        assert torch.equal(full.entropy[~ms], torch.zeros_like(full.entropy[~ms]))
bad = torch.randn(2, 3, 50)
bad[1, 1, 7] = float("nan")
try:
    et.token_entropy_stats(bad, torch.zeros(2, 3, dtype=torch.long), backend="triton")
except ValueError as e:
    assert "NaN/inf" in str(e)
else:
    raise AssertionError("NaN logits were not rejected")
print("worst error / tolerance", worst)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_under_the_interpreter_matches_the_torch_path():
    """The GPU kernel's one-pass online rescaling, run by Triton's interpreter on the CPU."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TRITON_CHECK)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "worst error / tolerance" in proc.stdout
