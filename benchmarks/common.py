"""Shared helpers of the benchmarks: the smoke switch and the table of ratios.

``ENTROCRAFT_BENCH_SMOKE=1`` shrinks every benchmark to a size that runs in seconds (CI runs them
that way with ``--benchmark-disable``: each benchmark body runs once and its assertions are
checked). :func:`record_ratio` adds a row to the markdown table that ``benchmarks/conftest.py``
writes after the run (``--bench-table PATH``, default ``benchmarks/results.md``), next to the
ratios of each pytest-benchmark group against its ``baseline`` member.
"""

from __future__ import annotations

import os

SMOKE = os.environ.get("ENTROCRAFT_BENCH_SMOKE", "") not in ("", "0")

#: rows added by record_ratio during the run: (benchmark, ratio, what the ratio is, note)
RECORDED: list[tuple[str, float, str, str]] = []


def record_ratio(benchmark: str, ratio: float, meaning: str, note: str = "") -> None:
    """Record ``ratio`` (already measured side by side in this run) for the results table.

    ``meaning`` says what the number is, e.g. ``"time / baseline time"``; ``note`` the sizes."""
    RECORDED.append((benchmark, float(ratio), meaning, note))
