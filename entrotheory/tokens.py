"""Token-level entropy statistics for language models (docs/theory.md, section 3).

A language model's response of length T is T states (prefixes), each with one sampled
token. Under the *per-position tabular assumption* each position's logits move as a
tabular softmax policy updated on its own single sample, so the first-order results of
:mod:`entrotheory.core` apply position by position with N = 1.

Memory strategy: :func:`token_entropy_stats` chunks over **positions**. Each chunk of
``chunk_size`` rows of the ``[*, V]`` logits is upcast to float32 and reduced in one pass
(one log-sum-exp, then three weighted sums), so peak extra memory is
``O(chunk_size * V)`` float32 values instead of ``O(B * T * V)``. We chunk over positions
rather than streaming over the vocabulary (an online log-sum-exp with rescaled running
sums) because one row of even a 2^17-token vocabulary is only 512 KiB in float32: a
few whole rows fit in cache (the default chunk is about 2 MiB, which is also what makes it
faster than one full-size pass), the vectorised ``log_softmax`` kernel is used as-is,
and the statistics need no rescaling algebra. Streaming over V would only pay off for
vocabularies far beyond 10^7.

Backends (``backend=``): ``"torch"`` is the chunked reference above. ``"compiled"`` is the same
statistics in one fused reduction per row, compiled by ``torch.compile`` (eq. 3.1a): one max pass and
one pass that evaluates a single ``exp`` per logit and accumulates four sums, with no ``[rows, V]``
temporary at all, the bf16 -> float32 conversion done in registers, and the rows (strided or masked)
read in place. ``"triton"`` is a one-pass GPU kernel with an online max (:mod:`entrotheory._triton_entropy`).
``"auto"`` picks the Triton kernel on CUDA when Triton is installed, the compiled kernel on the CPU for
inputs of at least :data:`AUTO_COMPILE_MIN_ELEMENTS` logits, and the torch path otherwise.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from .core import all_finite, check_float_tensor, check_rule

__all__ = [
    "TokenEntropyStats",
    "token_entropy_stats",
    "token_entropy_contributions",
    "token_mean_entropy_change",
    "token_mean_contributions",
    "ENTROPY_BACKENDS",
]

#: values of ``token_entropy_stats(backend=...)``
ENTROPY_BACKENDS = ("auto", "torch", "compiled", "triton")

#: ``backend="auto"`` uses the compiled kernel on the CPU from this many logits up (2^26, e.g. 441 positions at
#: V = 152k): there one call of the torch path costs about 0.2 s more than the fused kernel (docs/performance.md),
#: so the one-off compilation (2-4 s with inductor's on-disk cache, about 20 s without) is repaid within a few
#: dozen calls; smaller inputs stay on the torch path, which needs no compiler
AUTO_COMPILE_MIN_ELEMENTS = 1 << 26

#: default float32 elements per chunk: 2^19 (2 MiB per temporary) keeps each chunk's passes in cache,
#: which measured 3-7x faster than one full-size pass for V = 8k..128k (docs/performance.md)
DEFAULT_CHUNK_ELEMENTS = 1 << 19


class TokenEntropyStats(NamedTuple):
    """Per-position statistics, each ``[...]`` (the logits' leading shape), float32.

    ``log_prob``: ``log pi(y_t)``; ``entropy``: ``H_t``;
    ``pg_baseline``: ``sum_b pi_b^2 (log pi_b + H_t)``; ``mask``: bool, positions that count.
    Masked-out positions hold zeros.
    """

    log_prob: Tensor
    entropy: Tensor
    pg_baseline: Tensor
    mask: Tensor


@torch.no_grad()
def token_entropy_stats(
    logits: Tensor,
    tokens: Tensor,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> TokenEntropyStats:
    """Per-position ``(log pi(y_t), H_t, sum_b pi_b^2 (log pi_b + H_t))`` in one pass (eq. 3.1).

    Parameters
    ----------
    logits : ``[..., V]`` float tensor (bfloat16 welcome; never copied whole to float32).
        Detached internally: the statistics are diagnostics, not part of the loss graph.
    tokens : ``[...]`` integer tensor, the token sampled at each position.
    mask : optional ``[...]`` bool/0-1 tensor; only these positions are computed.
    chunk_size : positions per chunk of the torch path; default ``max(2, 2^19 // V)``, so each
        float32 temporary holds about 2^19 elements (2 MiB) and stays in cache.
    backend : one of :data:`ENTROPY_BACKENDS` (module docstring). ``"compiled"`` and ``"triton"``
        fall back to ``"torch"`` with a warning when they cannot run here (no C++ compiler, no
        Triton, no GPU); the three agree to float32 rounding (``tests/test_token_stats_backends.py``).

    Raises ``ValueError`` for NaN/inf logits at masked-in positions, tokens out of range and
    mismatched shapes, whatever the backend.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating torch.Tensor")
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (vocabulary) dim, got {tuple(logits.shape)}")
    if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError("tokens must be an integer torch.Tensor")
    lead = logits.shape[:-1]
    if tokens.shape != lead:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} must equal logits shape without V "
                         f"{tuple(lead)}")
    if mask is None:
        mask = torch.ones(lead, dtype=torch.bool, device=logits.device)
    else:
        if not isinstance(mask, Tensor) or mask.shape != lead:
            raise ValueError(f"mask must be a tensor of shape {tuple(lead)}")
        mask = mask.to(torch.bool)
    if backend not in ENTROPY_BACKENDS:
        raise ValueError(f"backend must be one of {ENTROPY_BACKENDS}, got {backend!r}")
    vocab = logits.shape[-1]
    if chunk_size is None:
        chunk_size = max(2, DEFAULT_CHUNK_ELEMENTS // vocab)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")

    logits = logits.detach()
    flat_tokens = tokens.reshape(-1)
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    if rows.numel() and (
        bool((flat_tokens[rows] < 0).any()) or bool((flat_tokens[rows] >= vocab).any())
    ):
        raise ValueError(f"tokens out of range [0, {vocab}) at masked-in positions")
    out = torch.zeros(3, flat_tokens.numel(), dtype=torch.float32, device=logits.device)
    if rows.numel():
        kind = _resolve_backend(backend, logits)
        done = False
        if kind == "triton":
            done = _run_triton(logits, flat_tokens, rows, out)
        elif kind == "compiled":
            done = _run_compiled(logits, flat_tokens, rows, out)
        if not done:
            _stats_torch(logits, flat_tokens, rows, out, chunk_size)
    out = out.reshape(3, *lead)
    return TokenEntropyStats(out[0], out[1], out[2], mask)


def _resolve_backend(backend: str, logits: Tensor) -> str:
    if backend != "auto":
        return backend
    if logits.device.type == "cuda" and _triton_available():
        return "triton"
    large = logits.numel() >= AUTO_COMPILE_MIN_ELEMENTS
    if logits.device.type == "cpu" and large and _COMPILE_STATE["ok"] is not False:
        return "compiled"
    return "torch"


def _stats_torch(logits: Tensor, flat_tokens: Tensor, rows: Tensor, out: Tensor, chunk_size: int) -> None:
    """The reference path: chunks of rows upcast to float32, log_softmax, three weighted sums."""
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    # a contiguous tensor is viewed as rows; a strided one (e.g. logits[:, :-1]) is gathered chunk by
    # chunk, because reshape would copy all B*T*V entries
    flat_logits = logits.view(-1, vocab) if logits.is_contiguous() else None
    dense = rows.numel() == flat_tokens.numel()  # all positions count: slice, don't gather
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        if flat_logits is None:
            chunk = logits[torch.unravel_index(idx, tuple(lead))]
        elif dense:
            chunk = flat_logits[start : start + idx.numel()]
        else:
            chunk = flat_logits.index_select(0, idx)
        z = chunk.float()
        if not all_finite(z):
            raise ValueError("logits contain NaN/inf at masked-in positions")
        logp = torch.log_softmax(z, dim=-1)
        del z
        p = logp.exp()
        plogp = p * logp
        neg_h = plogp.sum(-1)  # -H
        q = (p * p).sum(-1)  # sum pi^2
        m2 = (p * plogp).sum(-1)  # sum pi^2 log pi
        h = -neg_h
        out[0, idx] = logp.gather(-1, flat_tokens[idx].long().unsqueeze(-1)).squeeze(-1)
        out[1, idx] = h
        out[2, idx] = m2 + h * q


def fused_row_stats(table: Tensor, row_index: Tensor, token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The fused statistics of the rows ``table[row_index[r]]`` of a ``[n, V]`` table (eq. 3.1a).

    With ``z_b = x_b - max x`` and ``e_b = exp(z_b)`` (one ``exp`` per logit), four sums
    ``S0 = sum e``, ``S1 = sum e z``, ``S2 = sum e^2``, ``S3 = sum e^2 z`` give everything:
    ``log pi(y) = z_y - log S0``, ``H = log S0 - S1 / S0``, ``sum pi^2 = S2 / S0^2``,
    ``sum pi^2 log pi = (S3 - S2 log S0) / S0^2``, and the baseline ``sum pi^2 log pi + H sum pi^2``.

    ``table`` is a 2-D view of the logits' storage with unit stride along V (:func:`_row_table`), so strided
    slices, masked rows and any number of leading dims are one compiled graph per dtype. Written so that
    ``torch.compile`` fuses it into one max pass and one accumulation pass over each row with no ``[R, V]``
    temporary; eager execution gives the same numbers (slowly). A NaN or inf logit makes the row's outputs
    NaN (``0 * inf``), which the caller turns into an error. Returns three float32 ``[R]`` tensors.
    """
    rows = table[row_index].float()
    z = rows - rows.amax(-1, keepdim=True)
    e = torch.exp(z)
    s0 = e.sum(-1)
    s1 = (e * z).sum(-1)
    e2 = e * e
    s2 = e2.sum(-1)
    s3 = (e2 * z).sum(-1)
    log_s0 = torch.log(s0)
    entropy = log_s0 - s1 / s0
    inv_sq = 1.0 / (s0 * s0)
    baseline = (s3 - s2 * log_s0) * inv_sq + entropy * (s2 * inv_sq)
    log_prob = z.gather(-1, token.unsqueeze(-1)).squeeze(-1) - log_s0
    return log_prob, entropy, baseline


def _row_table(logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor] | None:
    """``logits``' rows as ``(table [n, V], row_index)`` over the same storage (no copy), or None.

    The table's rows are ``pitch`` elements apart (the smallest stride of the leading dims), so that every
    row of ``logits`` is a row of the table; it exists when the vocabulary dim has unit stride and every
    leading stride is a multiple of the pitch (contiguous tensors and the usual ``logits[:, :-1]`` slice).
    The table is a fresh tensor on the storage, not a view: a view's ``_base`` would make torch.compile guard
    on (and recompile for) every layout of the original logits."""
    vocab = logits.shape[-1]
    lead = [(n, st) for n, st in zip(logits.shape[:-1], logits.stride()[:-1]) if n > 1]
    if logits.stride(-1) != 1 and vocab > 1:
        return None
    pitch = min((st for _, st in lead), default=vocab)
    if pitch < vocab or any(st % pitch for _, st in lead):
        return None
    _, offset = _row_offsets(logits, rows)
    n = 1 + sum((size - 1) * st for size, st in lead) // pitch
    table = torch.empty(0, dtype=logits.dtype, device=logits.device).set_(
        logits.untyped_storage(), logits.storage_offset(), (n, vocab), (pitch, 1))
    return table, offset // pitch


_COMPILE_STATE: dict[str, object] = {"ok": None, "fn": None}


def _row_offsets(logits: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """A 1-D tensor over ``logits``' storage span (no copy) and the element offset of each flat row index."""
    lead = logits.shape[:-1]
    if any(st < 0 for st in logits.stride()):
        raise ValueError("logits with negative strides are not supported")
    span = 1 + sum((n - 1) * st for n, st in zip(logits.shape, logits.stride()))
    flat = torch.empty(0, dtype=logits.dtype, device=logits.device).set_(
        logits.untyped_storage(), logits.storage_offset(), (span,), (1,))
    offset = torch.zeros_like(rows)
    rest = rows
    for n, st in zip(reversed(lead), reversed(logits.stride()[:-1])):
        offset += (rest % n) * st
        rest = rest // n
    return flat, offset


def _run_compiled(logits: Tensor, flat_tokens: Tensor, rows: Tensor, out: Tensor) -> bool:
    if _COMPILE_STATE["ok"] is False:
        return False
    if _COMPILE_STATE["fn"] is None:
        _COMPILE_STATE["fn"] = torch.compile(fused_row_stats, dynamic=True)
    layout = _row_table(logits, rows)
    if layout is None:  # an exotic layout: the torch path
        return False
    table, row_index = layout
    try:
        log_prob, entropy, baseline = _COMPILE_STATE["fn"](table, row_index, flat_tokens[rows].long())
    except Exception as exc:  # no C++ compiler, unsupported platform: keep the torch path
        _COMPILE_STATE["ok"] = False
        warnings.warn(f"token_entropy_stats: the compiled kernel is unavailable here ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); using the torch path", RuntimeWarning, stacklevel=3)
        return False
    _COMPILE_STATE["ok"] = True
    _store(out, rows, log_prob, entropy, baseline)
    return True


def _store(out: Tensor, rows: Tensor, log_prob: Tensor, entropy: Tensor, baseline: Tensor) -> None:
    if not (all_finite(entropy) and all_finite(baseline) and all_finite(log_prob)):
        raise ValueError("logits contain NaN/inf at masked-in positions")
    out[0, rows] = log_prob
    out[1, rows] = entropy
    out[2, rows] = baseline


def _triton_available() -> bool:
    from . import _triton_entropy

    return _triton_entropy.available()


def _run_triton(logits: Tensor, flat_tokens: Tensor, rows: Tensor, out: Tensor) -> bool:
    from . import _triton_entropy

    if not _triton_entropy.available(logits.device):
        warnings.warn("token_entropy_stats: the Triton kernel needs Triton and a CUDA tensor (or "
                      "TRITON_INTERPRET=1); using the torch path", RuntimeWarning, stacklevel=3)
        return False
    flat, row_start = _row_offsets(logits, rows)
    log_prob, entropy, baseline = _triton_entropy.row_stats(flat, row_start, flat_tokens[rows].long(),
                                                            logits.shape[-1], logits.stride(-1))
    _store(out, rows, log_prob, entropy, baseline)
    return True


def token_entropy_contributions(
    stats: TokenEntropyStats, advantages: Tensor, mask: Tensor | None = None, rule: str = "pg"
) -> Tensor:
    """Per-token first-order entropy contributions per unit learning rate (eq. 3.2).

    Each masked-in position is a tabular state updated on its own token with its advantage
    (N = 1): npg ``c_t = -A_t (log pi(y_t) + H_t)``; pg
    ``c_t = -A_t [pi(y_t)(log pi(y_t) + H_t) - sum_b pi_b^2 (log pi_b + H_t)]``. Thus
    ``c_t = entropy_change_contributions(logits_t, y_t, A_t, rule)`` and the sum over tokens
    equals the sum of the per-position predicted changes.

    ``advantages`` is ``[...]`` per token or ``[B]`` per sequence (broadcast over positions).
    Masked-out positions get 0. Returns float32 ``[...]``.
    """
    check_rule(rule)
    if not isinstance(stats, TokenEntropyStats):
        raise TypeError("stats must be the TokenEntropyStats returned by token_entropy_stats")
    adv = check_float_tensor(advantages, "advantages")
    lead = stats.entropy.shape
    if adv.shape != lead:
        if adv.ndim == 1 and len(lead) >= 1 and adv.shape[0] == lead[0]:
            adv = adv.reshape(adv.shape[0], *([1] * (len(lead) - 1))).expand(lead)
        else:
            raise ValueError(
                f"advantages shape {tuple(adv.shape)} must be per token {tuple(lead)} "
                f"or per sequence ({lead[0] if lead else '?'},)"
            )
    m = stats.mask if mask is None else mask.to(torch.bool)
    if m.shape != lead:
        raise ValueError(f"mask shape {tuple(m.shape)} must equal {tuple(lead)}")
    adv = adv.to(torch.float32)
    centred_y = stats.log_prob + stats.entropy
    if rule == "npg":
        c = -adv * centred_y
    else:
        c = -adv * (stats.log_prob.exp() * centred_y - stats.pg_baseline)
    return torch.where(m, c, torch.zeros_like(c))


def token_mean_entropy_change(contributions: Tensor, mask: Tensor, normalizer: float | None = None) -> Tensor:
    """First-order change of the token-mean entropy per unit learning rate (eq. 3.3).

    The loss is a token mean ``sum_t A_t ... / N`` with normaliser ``N`` (the masked tokens of the
    whole batch, rejected ones included; default: ``mask.sum()``), so under the per-position
    tabular assumption position ``t``'s logits move by ``lr * A_t (e_{y_t} - pi_t) / N`` and its
    entropy by ``lr * c_t / N``. The token-mean entropy over the ``M`` masked positions then moves by

    ``dH_mean ~= lr * sum_t c_t / (M * N)``.

    ``contributions`` ``[...]`` as :func:`token_entropy_contributions` returns them; returns a scalar
    (0 when nothing is masked in).
    """
    check_float_tensor(contributions, "contributions", allow_empty=True)
    m = mask.to(torch.bool)
    if m.shape != contributions.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} must equal contributions shape {tuple(contributions.shape)}")
    count = float(m.sum())
    norm = count if normalizer is None else float(normalizer)
    if norm < 0 or (normalizer is not None and norm == 0 and count > 0):
        raise ValueError(f"normalizer must be > 0 when tokens are masked in, got {normalizer!r}")
    total = torch.where(m, contributions, torch.zeros_like(contributions)).sum()
    if count == 0:
        return total * 0.0
    return total / (count * norm)


def token_mean_contributions(
    stats: TokenEntropyStats, advantages: Tensor, mask: Tensor | None = None, rule: str = "pg",
    normalizer: float | None = None,
) -> Tensor:
    """Per-token contributions per unit learning rate of the batch's token-mean entropy (eq. 3.3).

    ``c_t / (M N)`` with ``c_t`` from :func:`token_entropy_contributions`, ``M`` the masked positions and
    ``N`` the loss normaliser (default ``M``), so that for any accepted subset ``S`` of tokens the
    first-order change of the token-mean entropy is ``lr * sum_{t in S} result_t``; the sum over all tokens
    equals :func:`token_mean_entropy_change`. This is the convention the entropy methods and the
    rejection sampler take their ``contributions`` in. Returns float32 ``[...]``, 0 off-mask.
    """
    c = token_entropy_contributions(stats, advantages, mask, rule)
    m = stats.mask if mask is None else mask.to(torch.bool)
    count = float(m.sum())
    norm = count if normalizer is None else float(normalizer)
    if count == 0:
        return c
    if not norm > 0:
        raise ValueError(f"normalizer must be > 0 when tokens are masked in, got {normalizer!r}")
    return c / (count * norm)
