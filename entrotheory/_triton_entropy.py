"""One-pass Triton kernel for :func:`entrotheory.token_entropy_stats` on the GPU (eq. 3.1b).

Each program reads one row of logits exactly once, in blocks of ``BLOCK`` entries, and keeps per lane
a running maximum ``m`` and four sums taken relative to it,

``S0 = sum e^(x-m)``, ``S1 = sum e^(x-m) (x-m)``, ``S2 = sum e^(2(x-m))``, ``S3 = sum e^(2(x-m)) (x-m)``.

When the maximum grows from ``m`` to ``m'`` (``d = m - m' <= 0``, ``a = e^d``) the sums are rescaled
exactly: ``S0 <- a S0``, ``S1 <- a (S1 + d S0)``, ``S2 <- a^2 S2``, ``S3 <- a^2 (S3 + d S2)``. At the
end the lanes are merged with the same rule and the statistics follow as in
:func:`entrotheory.tokens.fused_row_stats`. Logits stay in their dtype in memory (bf16 welcome) and are
converted to float32 in registers; the outputs are three float32 values per row.

Without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module
is imported), which is how the test suite checks it against the torch path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional: the GPU extra installs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None
    tl = None

#: a finite floor for the running maximum: lanes that never saw a logit keep zero sums and
#: rescale by exp(floor - max) = 0 instead of producing inf - inf
_MAX_FLOOR = -3.0e38


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | None = None) -> bool:
    """Can the kernel run on tensors of ``device`` here?"""
    if triton is None:
        return False
    if interpreted():
        return device is None or device.type == "cpu"
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


if triton is not None:
    _FLOOR = tl.constexpr(_MAX_FLOOR)

    @triton.jit
    def _row_stats_kernel(x_ptr, row_start_ptr, token_ptr, log_prob_ptr, entropy_ptr, baseline_ptr,
                          vocab, stride_v, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        row = x_ptr + tl.load(row_start_ptr + r).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], _FLOOR, tl.float32)
        s0 = tl.zeros([BLOCK], tl.float32)
        s1 = tl.zeros([BLOCK], tl.float32)
        s2 = tl.zeros([BLOCK], tl.float32)
        s3 = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + lanes
            valid = offs < vocab
            x = tl.load(row + offs.to(tl.int64) * stride_v, mask=valid, other=_FLOOR).to(tl.float32)
            m_new = tl.maximum(m, x)
            d = m - m_new
            a = tl.exp(d)
            s1 = a * (s1 + d * s0)
            s0 = a * s0
            s3 = a * a * (s3 + d * s2)
            s2 = a * a * s2
            z = x - m_new
            e = tl.where(valid, tl.exp(z), 0.0)
            ez = tl.where(valid, e * z, 0.0)
            s0 += e
            s1 += ez
            s2 += e * e
            s3 += e * ez
            m = m_new
        big_m = tl.max(m, 0)
        d = m - big_m
        c = tl.exp(d)
        t0 = tl.sum(c * s0, 0)
        t1 = tl.sum(c * (s1 + d * s0), 0)
        t2 = tl.sum(c * c * s2, 0)
        t3 = tl.sum(c * c * (s3 + d * s2), 0)
        log_t0 = tl.log(t0)
        entropy = log_t0 - t1 / t0
        inv_sq = 1.0 / (t0 * t0)
        baseline = (t3 - t2 * log_t0) * inv_sq + entropy * (t2 * inv_sq)
        y = tl.load(token_ptr + r).to(tl.int64)
        x_y = tl.load(row + y * stride_v).to(tl.float32)
        tl.store(log_prob_ptr + r, x_y - big_m - log_t0)
        tl.store(entropy_ptr + r, entropy)
        tl.store(baseline_ptr + r, baseline)


def row_stats(flat: Tensor, row_start: Tensor, token: Tensor, vocab: int, stride_v: int = 1,
              block: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(log pi(y), H, sum pi^2 (log pi + H))`` of the rows ``flat[row_start[r] + stride_v * b]``, ``b < vocab``.

    ``flat``: 1-D logits storage (any float dtype); ``row_start``, ``token``: ``[R]`` integer tensors;
    ``block``: logits per lane block (a power of two; default ``min(4096, next_pow2(vocab))``).
    Returns three float32 ``[R]`` tensors on ``flat``'s device.
    """
    if triton is None:
        raise RuntimeError("the Triton kernel needs the triton package (pip install triton)")
    if flat.ndim != 1:
        raise ValueError(f"flat must be 1-D, got {tuple(flat.shape)}")
    n = row_start.numel()
    if block is None:
        block = min(4096, triton.next_power_of_2(vocab))
    out = torch.empty(3, n, dtype=torch.float32, device=flat.device)
    if n:
        _row_stats_kernel[(n,)](flat, row_start.contiguous(), token.contiguous(), out[0], out[1], out[2], vocab,
                                stride_v, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out[0], out[1], out[2]
