"""A run's metrics: ``metrics.jsonl`` (one JSON object per step), TensorBoard scalars and the end-of-run
summary (``summary.json``).

Non-finite numbers are written as JSON ``null`` (:func:`json_safe`); the summary's fits of measured on
predicted entropy change are :func:`entrotheory.fit_measured_on_predicted` through the origin.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from entrotheory import fit_measured_on_predicted

__all__ = ["summarize", "measured_pairs", "read_rows", "json_safe", "MetricsLog", "write_summary"]

# the predictions the summary fits the measured change on, and the suffix of their statistics
PREDICTIONS = {
    "predicted_entropy_change": "",  # what the sampler selected on (per-position or parameter space)
    "exact_predicted_entropy_change": "_exact",  # <dH/dtheta, dtheta> of the update taken
    "predicted_entropy_change_logit": "_logit",  # the per-position prediction beside the parameter-space one
}
ENDS_FRACTION = 10  # the start / end values of the summary are means over the first / last tenth of the steps


def json_safe(row: dict) -> dict:
    """``row`` with every non-finite float replaced by None (JSON ``null``)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measured_pairs(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """The predictions ``key`` and the measured changes of every trained (not skipped) step that logged both.

    The per-position prediction (``predicted_entropy_change_logit``) is of the batch's own contexts: in a run
    that controls a fixed set (``--control-prompts``, where ``measured_entropy_change`` is the set's) it is
    paired with the batch's measured change, ``measured_batch_entropy_change``."""
    measured_key = "measured_entropy_change"
    if key == "predicted_entropy_change_logit" and any("measured_batch_entropy_change" in r for r in rows):
        measured_key = "measured_batch_entropy_change"
    pairs = [(float(r[key]), float(r[measured_key])) for r in rows
             if isinstance(r.get(measured_key), (int, float)) and not r.get("skipped")
             and isinstance(r.get(key), (int, float))]
    return [p for p, _ in pairs], [m for _, m in pairs]


def summarize(rows: list[dict]) -> dict[str, float]:
    """End-of-run summary of metrics rows.

    * ``correlation``, ``slope`` (through the origin: the measured/predicted ratio) and ``sign_agreement``
      (steps where both changes are nonzero) of measured vs predicted entropy change, for each prediction in
      :data:`PREDICTIONS` (suffixes ``""``, ``_exact``, ``_logit``); a statistic the steps do not define is left
      out, and ``steps_measured`` counts the steps of the first fit;
    * ``entropy``/``reward`` ``_start``/``_end``: means over the first / last tenth of the training steps;
      ``signal_fraction`` and ``seconds_per_step``: means over all of them;
    * ``pass_at_1``/``pass_at_k`` ``_start``/``_end``: the first and last evaluation;
    * ``calibration_factor_end``: the sampler's last calibration factor ``k / lr``.
    """
    out: dict[str, float] = {}
    for key, suffix in PREDICTIONS.items():
        predicted, measured = measured_pairs(rows, key)
        if suffix == "":
            out["steps_measured"] = float(len(predicted))
        fit = fit_measured_on_predicted(predicted, measured, line="origin", signs="nonzero")
        for name in ("correlation", "slope", "sign_agreement"):
            value = getattr(fit, name)
            if not math.isnan(value):
                out[name + suffix] = value
    train = [r for r in rows if "entropy" in r]
    if train:
        n = max(1, len(train) // ENDS_FRACTION)
        head, tail = train[:n], train[-n:]
        out.update(entropy_start=sum(r["entropy"] for r in head) / len(head),
                   entropy_end=sum(r["entropy"] for r in tail) / len(tail),
                   reward_start=sum(r["reward_mean"] for r in head) / len(head),
                   reward_end=sum(r["reward_mean"] for r in tail) / len(tail),
                   signal_fraction=sum(r["signal_fraction"] for r in train) / len(train),
                   seconds_per_step=sum(r.get("time_step", 0.0) for r in train) / len(train))
    evals = [r for r in rows if "pass_at_1" in r]
    if evals:
        out.update(pass_at_1_start=evals[0]["pass_at_1"], pass_at_k_start=evals[0]["pass_at_k"],
                   pass_at_1_end=evals[-1]["pass_at_1"], pass_at_k_end=evals[-1]["pass_at_k"])
    factors = [r["calibration_factor"] for r in rows if "calibration_factor" in r]
    if factors:
        out["calibration_factor_end"] = factors[-1]
    return out


def write_summary(summary: dict[str, float], path: Path) -> None:
    """``summary.json``: the summary, non-finite values as null."""
    path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")


class _Scalars:
    """TensorBoard scalars when tensorboard is installed; otherwise nothing."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(float(v)):
                self.writer.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsLog:
    """The rows of a run: kept in memory (JSON-safe) and, when ``write`` (rank 0), appended to
    ``run_dir/metrics.jsonl`` and to TensorBoard (``tensorboard``).

    ``rows`` are the rows a resumed run keeps (those before its checkpoint); the file is rewritten with
    them when the log opens. Use as a context manager."""

    def __init__(self, run_dir: Path, rows: list[dict], write: bool, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.rows = list(rows)
        self._file = None
        if write:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
            self._file = self.path.open("a")
        self._scalars = _Scalars(run_dir, tensorboard and write)

    def append(self, row: dict) -> None:
        """Add one row (non-finite numbers become null)."""
        self.rows.append(json_safe(row))
        if self._file is not None:
            self._file.write(json.dumps(self.rows[-1]) + "\n")
            self._file.flush()
            self._scalars.write(self.rows[-1])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._scalars.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
