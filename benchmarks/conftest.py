"""Side-by-side ratios for pytest-benchmark groups.

Within each benchmark group, the benchmark whose name contains ``baseline`` is the
reference; after the run, a table prints ``baseline median / candidate median`` (speed-up)
for every other member of the group. Run: ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

from collections import defaultdict


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = defaultdict(list)
    for bench in session.benchmarks:
        if bench.stats is not None:
            groups[bench.group or ""].append(bench)
    lines = []
    for group, benches in sorted(groups.items()):
        base = [b for b in benches if "baseline" in b.name]
        if not base:
            continue
        ref = base[0].stats.median
        for b in benches:
            if b is not base[0]:
                lines.append(f"{group:32s} {b.name:60s} speed-up x{ref / b.stats.median:8.2f} vs {base[0].name}")
    if lines:
        terminalreporter.write_sep("-", "speed-up against each group's baseline (median time ratio)")
        for line in lines:
            terminalreporter.write_line(line)
