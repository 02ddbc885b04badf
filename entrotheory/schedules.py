"""Entropy schedules and bands (docs/theory.md §4.1).

A :class:`Schedule` maps a training step ``t`` in ``0..total_steps`` to a target entropy
(nats per token); steps past ``total_steps`` hold the final value. A :class:`Band` is a pair
of schedules ``(lower, upper)`` with ``lower <= upper`` at every step.

Compact string specs (for command lines and configs)::

    constant:0.6                     H(t) = 0.6
    linear:0.7->0.5                  H(t) = a + (b - a) t / T
    cosine:0.7->0.5                  H(t) = a + (b - a) (1 - cos(pi t / T)) / 2
    exponential:0.7->0.5             H(t) = a (b / a)^(t / T)          (a, b > 0)
    piecewise:0:0.7,100:0.6,200:0.5  step function: value of the last breakpoint <= t
    0.6                              shorthand for constant:0.6
    linear:H0->H0-0.2                relative: H0 is the entropy at the start of training

A value written ``H0``, ``H0+x`` or ``H0-x`` is relative to the initial entropy ``H0`` of whatever
the controller controls, which only the training loop knows: such a spec is anchored with
:func:`anchor_schedule_spec` (``llm.train`` measures ``H0`` before its first update) and then
parses like any other; :func:`parse_schedule` refuses it unanchored (docs/theory.md §4.1).

A band spec is ``LOWER..UPPER`` (two schedule specs), e.g. ``linear:0.6->0.4..linear:0.7->0.5``
(the released recipe), or a centre schedule spec plus ``width`` (``lower = centre - width/2``,
``upper = centre + width/2``). ``str(schedule)`` / ``schedule.spec`` is a canonical spec that
parses back to the same schedule (round trip).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["SCHEDULE_KINDS", "Schedule", "Band", "parse_schedule", "parse_band", "is_relative_spec",
           "anchor_schedule_spec"]

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "piecewise", "callable")

_SPEC_HELP = (
    "expected one of 'constant:H', 'linear:H0->H1', 'cosine:H0->H1', 'exponential:H0->H1', "
    "'piecewise:STEP:H,STEP:H,...' (first STEP 0, increasing) or a bare number; entropies in nats, >= 0"
)


#: a value relative to the initial entropy: ``H0``, ``H0+x`` or ``H0-x`` (x a plain non-negative number; the
#: ``->`` after a bare ``H0`` is not a sign)
_RELATIVE_TERM = re.compile(r"\bH0\b(?:\s*([+-])\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))?", re.IGNORECASE)


def is_relative_spec(spec: object) -> bool:
    """Whether a schedule or band spec string has values relative to the initial entropy (``H0``)."""
    return isinstance(spec, str) and _RELATIVE_TERM.search(spec) is not None


def anchor_schedule_spec(spec: str, h0: float) -> str:
    """The spec with every ``H0``, ``H0+x``, ``H0-x`` replaced by the number ``h0``, ``h0 + x``, ``h0 - x``.

    ``anchor_schedule_spec("linear:H0->H0-0.2", 0.86)`` is ``"linear:0.86->0.66"`` (up to float
    rounding), which :func:`parse_schedule` or :func:`parse_band` then parse and check (a value that
    comes out negative is an error there). A spec without ``H0`` comes back unchanged.

    Parameters
    ----------
    spec : a schedule or band spec string (module docstring).
    h0 : the initial entropy, nats per token, finite and ``>= 0``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"anchor_schedule_spec takes a spec string, got {type(spec).__name__}")
    if isinstance(h0, bool) or not isinstance(h0, (int, float, np.integer, np.floating)) or not math.isfinite(h0) \
            or h0 < 0:
        raise ValueError(f"the initial entropy H0 to anchor {spec!r} at must be a finite number >= 0, got {h0!r}")

    def value(m: re.Match) -> str:
        sign, x = m.group(1), m.group(2)
        v = float(h0) if sign is None else float(h0) + (float(x) if sign == "+" else -float(x))
        return _fmt(round(v, 12))  # 0.862 - 0.2 is written 0.662, not 0.6619999999999999

    return _RELATIVE_TERM.sub(value, spec)


def _refuse_relative(spec: str) -> None:
    if is_relative_spec(spec):
        raise ValueError(f"schedule spec {spec!r} is relative to the initial entropy H0: anchor it first with "
                         "anchor_schedule_spec(spec, h0) (llm.train does so with the entropy it controls, measured "
                         "before the first update)")


def _check_total_steps(total_steps: object) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)):
        raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    return int(total_steps)


def _check_step(step: object) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float, np.integer, np.floating)):
        raise TypeError(f"step must be a number, got {type(step).__name__}")
    s = float(step)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"step must be a finite number >= 0, got {step!r}")
    return s


def _fmt(x: float) -> str:
    return repr(float(x))


class Schedule:
    """Target entropy as a function of the step (docs/theory.md §4.1).

    Parameters
    ----------
    kind : one of :data:`SCHEDULE_KINDS`.
    params : the kind's numbers: ``(h,)`` constant; ``(h0, h1)`` linear/cosine/exponential;
        ``((step, h), ...)`` piecewise; a callable ``f(step) -> float`` for ``"callable"``.
    total_steps : ``T > 0``; progress is ``min(t, T) / T``.

    Calling ``schedule(step)`` returns a float; ``step`` must be a finite number ``>= 0``.
    """

    __slots__ = ("kind", "params", "total_steps")

    def __init__(self, kind: str, params: object, total_steps: int) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        self.kind = kind
        self.params = params
        self.total_steps = _check_total_steps(total_steps)

    # -- evaluation ------------------------------------------------------------------------
    def __call__(self, step: float) -> float:
        t = _check_step(step)
        if self.kind == "callable":
            v = float(self.params(step))  # type: ignore[operator]
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"schedule callable returned {v!r} at step {step}; need a finite value >= 0")
            return v
        progress = min(t, self.total_steps) / self.total_steps
        if self.kind == "constant":
            return float(self.params[0])  # type: ignore[index]
        if self.kind == "piecewise":
            value = self.params[0][1]  # type: ignore[index]
            for s, h in self.params:  # type: ignore[attr-defined]
                if t >= s:
                    value = h
                else:
                    break
            return float(value)
        h0, h1 = self.params  # type: ignore[misc]
        if self.kind == "linear":
            return float(h0 + (h1 - h0) * progress)
        if self.kind == "cosine":
            return float(h0 + (h1 - h0) * (1.0 - math.cos(math.pi * progress)) / 2.0)
        return float(h0 * (h1 / h0) ** progress)  # exponential

    # -- description -----------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string; ``parse_schedule(s.spec, s.total_steps)`` rebuilds ``s``."""
        if self.kind == "callable":
            name = getattr(self.params, "__name__", type(self.params).__name__)
            return f"callable:{name}"
        if self.kind == "constant":
            return f"constant:{_fmt(self.params[0])}"  # type: ignore[index]
        if self.kind == "piecewise":
            return "piecewise:" + ",".join(f"{int(s)}:{_fmt(h)}" for s, h in self.params)  # type: ignore[attr-defined]
        h0, h1 = self.params  # type: ignore[misc]
        return f"{self.kind}:{_fmt(h0)}->{_fmt(h1)}"

    @property
    def value_range(self) -> float:
        """``max - min`` of the schedule over the integer steps ``0..T`` (0 for a constant)."""
        v = self.values()
        return float(v.max() - v.min())

    def values(self, steps: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """The schedule at ``steps`` (default: every integer step ``0..T``) as a float64 array."""
        if steps is None:
            steps = np.arange(self.total_steps + 1)
        return np.array([self(s) for s in steps], dtype=np.float64)

    def with_total_steps(self, total_steps: int) -> Schedule:
        """The same schedule stretched over another horizon (piecewise breakpoints are kept).

        A callable that knows how to re-target itself (the shifted centre of a ``CENTRE+-HALF``
        band) is re-targeted too; any other callable is kept as it is (it maps steps, not progress).
        """
        params = self.params
        if self.kind == "callable" and isinstance(params, _Shifted):
            params = params.with_total_steps(total_steps)
        return Schedule(self.kind, params, total_steps)

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"Schedule({self.spec!r}, total_steps={self.total_steps})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self.kind, self.params, self.total_steps) == (other.kind, other.params, other.total_steps)

    def __hash__(self) -> int:
        return hash((self.kind, str(self.params), self.total_steps))


class Band:
    """A pair of schedules ``lower(step) <= upper(step)`` (docs/theory.md §4.1).

    Use :func:`parse_band` to build one from a spec; the constructor checks ``lower <= upper``
    on the integer steps ``0..T`` of the longer horizon (sampled at 10 001 points when T is large).
    """

    __slots__ = ("lower", "upper", "_spec", "_centre")

    def __init__(
        self, lower: Schedule, upper: Schedule, spec: str | None = None,
        centre: tuple[Schedule, float] | None = None,
    ) -> None:
        if not isinstance(lower, Schedule) or not isinstance(upper, Schedule):
            raise TypeError("Band(lower, upper) needs two Schedule objects (use parse_band for specs)")
        self.lower = lower
        self.upper = upper
        self._spec = spec
        self._centre = centre  # (centre schedule, half width) of a CENTRE+-HALF band, else None
        horizon = max(lower.total_steps, upper.total_steps)
        steps = np.unique(np.round(np.linspace(0, horizon, min(horizon + 1, 10_001))))
        lo, up = lower.values(steps), upper.values(steps)
        bad = np.nonzero(lo > up + 1e-12)[0]
        if bad.size:
            s = steps[bad[0]]
            raise ValueError(
                f"band {self.spec!r}: lower bound above upper bound at step {int(s)} "
                f"({lo[bad[0]]:.6g} > {up[bad[0]]:.6g})"
            )

    @property
    def spec(self) -> str:
        """Canonical ``LOWER..UPPER`` spec (``parse_band`` round trip)."""
        return self._spec if self._spec is not None else f"{self.lower.spec}..{self.upper.spec}"

    @property
    def total_steps(self) -> int:
        return max(self.lower.total_steps, self.upper.total_steps)

    def centre(self, step: float) -> float:
        """Mid-point ``(lower + upper) / 2`` (the target of predictive mode given a band)."""
        return 0.5 * (self.lower(step) + self.upper(step))

    def contains(self, entropy: float, step: float) -> bool:
        return self.lower(step) <= entropy <= self.upper(step)

    def distance(self, entropy: float, step: float) -> float:
        """Distance from ``entropy`` to the band at ``step`` (0 inside)."""
        lo, up = self.lower(step), self.upper(step)
        return max(lo - entropy, entropy - up, 0.0)

    def __str__(self) -> str:
        return self.spec

    def __repr__(self) -> str:
        return f"Band({self.spec!r}, total_steps={self.total_steps})"


# ------------------------------------------------------------------------------ parsing
def _number(text: str, spec: str, what: str) -> float:
    try:
        v = float(text.strip())
    except ValueError:
        raise ValueError(f"schedule spec {spec!r}: malformed number {text.strip()!r} for {what}; "
                         f"{_SPEC_HELP}") from None
    if not math.isfinite(v):
        raise ValueError(f"schedule spec {spec!r}: {what} must be finite, got {text.strip()!r}")
    return v


def _entropy(text: str, spec: str, what: str) -> float:
    v = _number(text, spec, what)
    if v < 0:
        raise ValueError(f"schedule spec {spec!r}: negative entropy {v} for {what} (entropy is >= 0 nats)")
    return v


def parse_schedule(spec: str | float | Schedule | Callable[[float], float], total_steps: int) -> Schedule:
    """Build a :class:`Schedule` from a spec string, a number, a ``Schedule`` or a callable.

    Parameters
    ----------
    spec : see the module docstring (e.g. ``"linear:0.7->0.5"``); a number means a constant;
        a ``Schedule`` is re-targeted to ``total_steps``; a callable ``f(step) -> float`` is
        wrapped (its values are checked when called).
    total_steps : horizon ``T > 0``.

    Raises
    ------
    TypeError / ValueError quoting the spec on unknown kinds, malformed or negative numbers,
    ``total_steps <= 0`` or badly ordered piecewise breakpoints. docs/theory.md §4.1.
    """
    total_steps = _check_total_steps(total_steps)
    if isinstance(spec, Schedule):
        return spec.with_total_steps(total_steps)
    if isinstance(spec, bool):
        raise TypeError(f"schedule spec must be a string, number, Schedule or callable, got {spec!r}")
    if isinstance(spec, (int, float, np.integer, np.floating)):
        return Schedule("constant", (_entropy(str(float(spec)), str(spec), "the constant"),), total_steps)
    if callable(spec):
        return Schedule("callable", spec, total_steps)
    if not isinstance(spec, str):
        raise TypeError(f"schedule spec must be a string, number, Schedule or callable, got "
                        f"{type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise ValueError(f"empty schedule spec {spec!r}; {_SPEC_HELP}")
    _refuse_relative(text)
    if ":" not in text:
        return Schedule("constant", (_entropy(text, spec, "the constant"),), total_steps)
    kind, _, body = text.partition(":")
    kind = kind.strip().lower()
    if kind == "constant":
        return Schedule("constant", (_entropy(body, spec, "the constant"),), total_steps)
    if kind in ("linear", "cosine", "exponential"):
        parts = body.split("->")
        if len(parts) != 2:
            raise ValueError(f"schedule spec {spec!r}: {kind} needs 'START->END'; {_SPEC_HELP}")
        h0 = _entropy(parts[0], spec, "the start value")
        h1 = _entropy(parts[1], spec, "the end value")
        if kind == "exponential" and (h0 <= 0 or h1 <= 0):
            raise ValueError(f"schedule spec {spec!r}: exponential needs start and end > 0")
        return Schedule(kind, (h0, h1), total_steps)
    if kind == "piecewise":
        points: list[tuple[int, float]] = []
        for item in body.split(","):
            s_text, sep, h_text = item.partition(":")
            if not sep:
                raise ValueError(f"schedule spec {spec!r}: piecewise item {item.strip()!r} is not STEP:H; "
                                 f"{_SPEC_HELP}")
            s = _number(s_text, spec, "a breakpoint step")
            if s != int(s) or s < 0:
                raise ValueError(f"schedule spec {spec!r}: breakpoint step {s_text.strip()!r} must be an "
                                 "integer >= 0")
            points.append((int(s), _entropy(h_text, spec, f"the value at step {int(s)}")))
        if points[0][0] != 0:
            raise ValueError(f"schedule spec {spec!r}: the first piecewise breakpoint must be step 0")
        if any(b[0] <= a[0] for a, b in zip(points, points[1:])):
            raise ValueError(f"schedule spec {spec!r}: piecewise breakpoints must strictly increase")
        if points[-1][0] > total_steps:
            raise ValueError(f"schedule spec {spec!r}: breakpoint {points[-1][0]} is beyond "
                             f"total_steps={total_steps}")
        return Schedule("piecewise", tuple(points), total_steps)
    raise ValueError(f"schedule spec {spec!r}: unknown kind {kind!r}; {_SPEC_HELP}")


def parse_band(
    spec: str | Band | tuple[object, object], total_steps: int, width: float | None = None
) -> Band:
    """Build a :class:`Band` (docs/theory.md §4.1).

    Parameters
    ----------
    spec : ``"LOWER..UPPER"`` (two schedule specs), ``"CENTRE+-HALF"`` (a centre spec and a half
        width), a ``(lower, upper)`` pair of anything :func:`parse_schedule` accepts, a ``Band``,
        or a single centre schedule spec (then ``width`` is required and
        ``lower/upper = centre -/+ width/2``).
    total_steps : horizon ``T > 0``.
    width : full band width in nats (> 0), only for a centre spec.

    Raises ``ValueError`` quoting the spec when the lower bound exceeds the upper bound at any
    step, when a centre spec has no (or a non-positive) width, or when the lower bound goes negative.
    """
    total_steps = _check_total_steps(total_steps)
    if isinstance(spec, Band):
        if width is not None:
            raise ValueError("width applies only to a centre schedule spec, not to a Band")
        if spec._centre is not None:  # a CENTRE+-HALF band: stretch the centre, keep the half width
            centre, half = spec._centre
            return _centre_band(centre.with_total_steps(total_steps), half, total_steps, centre.spec)
        return Band(spec.lower.with_total_steps(total_steps), spec.upper.with_total_steps(total_steps))
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"band pair must be (lower, upper), got {len(spec)} items")
        if width is not None:
            raise ValueError("width applies only to a centre schedule spec, not to a (lower, upper) pair")
        return Band(parse_schedule(spec[0], total_steps), parse_schedule(spec[1], total_steps))
    if isinstance(spec, str):
        _refuse_relative(spec)
    if isinstance(spec, str) and ".." in spec:
        if width is not None:
            raise ValueError(f"band spec {spec!r} gives both bounds; do not pass width")
        parts = spec.split("..")
        if len(parts) != 2:
            raise ValueError(f"band spec {spec!r}: expected exactly one '..' between LOWER and UPPER")
        return Band(parse_schedule(parts[0], total_steps), parse_schedule(parts[1], total_steps))
    if isinstance(spec, str) and "+-" in spec:
        if width is not None:
            raise ValueError(f"band spec {spec!r} gives its half width after '+-'; do not pass width")
        centre_text, _, half_text = spec.rpartition("+-")
        width = 2.0 * _number(half_text, spec, "the half width")
        spec = centre_text
    centre = parse_schedule(spec, total_steps)  # type: ignore[arg-type]
    if width is None:
        raise ValueError(f"band spec {str(spec)!r} is a centre schedule (no '..'); pass width=...")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"band width must be a finite number > 0, got {width!r}")
    return _centre_band(centre, float(width) / 2.0, total_steps, str(spec))


def _centre_band(centre: Schedule, half: float, total_steps: int, what: str) -> Band:
    """``centre -/+ half`` over ``total_steps``, canonical spec ``CENTRE+-HALF`` (re-targetable)."""
    lower = Schedule("callable", _Shifted(centre, -half), total_steps)
    upper = Schedule("callable", _Shifted(centre, half), total_steps)
    lows = centre.values(np.linspace(0, total_steps, min(total_steps + 1, 10_001))) - half
    if lows.min() < 0:
        raise ValueError(f"band spec {what!r} with width {2 * half}: lower bound goes negative "
                         f"({lows.min():.4g}); use a smaller width")
    return Band(lower, upper, spec=f"{centre.spec}+-{_fmt(half)}", centre=(centre, half))


class _Shifted:
    """``step -> centre(step) + offset`` (a picklable callable for centre/width bands).

    Re-targeting (:meth:`Schedule.with_total_steps`) stretches the centre, so a shifted bound
    follows its centre to the new horizon.
    """

    def __init__(self, centre: Schedule, offset: float) -> None:
        self.centre = centre
        self.offset = offset
        self.__name__ = f"({centre.spec}){'+' if offset >= 0 else '-'}{abs(offset)!r}"

    def __call__(self, step: float) -> float:
        return max(self.centre(step) + self.offset, 0.0)

    def with_total_steps(self, total_steps: int) -> _Shifted:
        return _Shifted(self.centre.with_total_steps(total_steps), self.offset)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Shifted):
            return NotImplemented
        return (self.centre, self.offset) == (other.centre, other.offset)

    def __hash__(self) -> int:
        return hash((self.centre, self.offset))
