"""Side-by-side ratios for pytest-benchmark groups, and the markdown table of every ratio of a run.

Within each benchmark group, the benchmark whose name contains ``baseline`` is the reference; after
the run, a table prints ``candidate median / baseline median`` (time ratio: below 1 = faster than the
baseline) for every other member of the group, both measured in the same run. Benchmarks that measure
a ratio themselves (interleaved runs, bandwidth, memory, a second busy process) add rows with
:func:`common.record_ratio`. The whole table is written as markdown to ``--bench-table`` (default
``benchmarks/results.md``) with the machine it ran on.

Run: ``python -m pytest benchmarks --benchmark-only -q -s``; smoke (CI):
``ENTROCRAFT_BENCH_SMOKE=1 python -m pytest benchmarks --benchmark-disable -q``.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

import common

DEFAULT_TABLE = Path(__file__).with_name("results.md")


def pytest_addoption(parser):
    parser.addoption("--bench-table", default=str(DEFAULT_TABLE),
                     help="markdown file for the table of ratios ('' = do not write)")


def _group_rows(config) -> list[tuple[str, str, str, float]]:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return []
    groups: dict[str, list] = defaultdict(list)
    for bench in session.benchmarks:
        if bench.stats is not None and bench.stats.rounds:
            groups[bench.group or ""].append(bench)
    rows = []
    for group, benches in sorted(groups.items()):
        base = [b for b in benches if "baseline" in b.name]
        if not base:
            continue
        ref = base[0].stats.median
        for b in benches:
            if b is not base[0]:
                rows.append((group, b.name, base[0].name, b.stats.median / ref))
    return rows


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine() -> str:
    import torch

    return (f"{_cpu_model()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} intra-op threads, Python {sys.version.split()[0]}, "
            f"{platform.system()} {platform.release()}")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    group_rows = _group_rows(config)
    recorded = list(common.RECORDED)
    if not group_rows and not recorded:
        return
    terminalreporter.write_sep("-", "ratios measured side by side in this run")
    for group, name, base, ratio in group_rows:
        terminalreporter.write_line(f"{group:40s} {name:56s} time x{ratio:7.3f} of {base}")
    for name, ratio, meaning, note in recorded:
        terminalreporter.write_line(f"{name:97s} {ratio:9.3f}  {meaning} {note}")
    path = config.getoption("--bench-table")
    if not path or common.SMOKE:
        return
    lines = [
        "# Benchmark ratios",
        "",
        f"Written by `benchmarks/conftest.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {_machine()}.",
        f"Command: `{' '.join(['python -m pytest'] + [a for a in config.invocation_params.args])}`.",
        "",
    ]
    if group_rows:
        lines += ["## pytest-benchmark groups (median time of the candidate / median time of the baseline)", "",
                  "| group | candidate | baseline | time ratio |", "|---|---|---|---|"]
        lines += [f"| `{g}` | `{n}` | `{b}` | {r:.3f} |" for g, n, b, r in group_rows]
        lines.append("")
    if recorded:
        lines += ["## Ratios the benchmarks measured themselves", "",
                  "| benchmark | ratio | what the ratio is | sizes |", "|---|---|---|---|"]
        lines += [f"| {n} | {r:.3f} | {m} | {note} |" for n, r, m, note in recorded]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    terminalreporter.write_line(f"table written to {path}")
