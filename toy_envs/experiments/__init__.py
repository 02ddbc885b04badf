"""The toy experiments, one module each; run with ``python -m toy_envs.experiments NAME``."""

from __future__ import annotations

from . import baselines, collapse, schedule_control, schedule_study, theory_vs_practice

EXPERIMENTS = {
    theory_vs_practice.NAME: theory_vs_practice,
    collapse.NAME: collapse,
    schedule_control.NAME: schedule_control,
    schedule_study.NAME: schedule_study,
    baselines.NAME: baselines,
}

__all__ = ["EXPERIMENTS"]
