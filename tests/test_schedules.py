import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotheory.schedules import Band, Schedule, anchor_schedule_spec, is_relative_spec, parse_band, parse_schedule

entropies = st.floats(min_value=0.0, max_value=20.0, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-3, max_value=20.0, allow_nan=False, allow_infinity=False)
horizons = st.integers(min_value=1, max_value=5000)


def test_values_of_each_kind():
    lin = parse_schedule("linear:0.7->0.5", 100)
    assert lin(0) == pytest.approx(0.7) and lin(50) == pytest.approx(0.6) and lin(100) == pytest.approx(0.5)
    assert lin(250) == pytest.approx(0.5)  # holds the final value past the horizon
    cos = parse_schedule("cosine:0.7->0.5", 100)
    assert cos(0) == pytest.approx(0.7) and cos(100) == pytest.approx(0.5)
    assert cos(50) == pytest.approx(0.6)  # (1 - cos(pi/2)) / 2 = 1/2
    assert cos(25) == pytest.approx(0.7 - 0.2 * (1 - math.cos(math.pi / 4)) / 2)
    exp = parse_schedule("exponential:0.8->0.2", 10)
    assert exp(5) == pytest.approx(0.4)  # geometric mid-point sqrt(0.8 * 0.2)
    const = parse_schedule("constant:0.6", 7)
    assert const(0) == const(7) == const(3.5) == 0.6
    assert parse_schedule("0.6", 7) == const
    pw = parse_schedule("piecewise:0:0.7,100:0.6,200:0.5", 300)
    assert [pw(s) for s in (0, 99, 100, 199, 200, 300)] == [0.7, 0.7, 0.6, 0.6, 0.5, 0.5]
    fn = parse_schedule(lambda t: 1.0 / (1 + t), 10)
    assert fn(1) == 0.5 and fn.kind == "callable"


@given(h0=entropies, h1=entropies, total=horizons, kind=st.sampled_from(["linear", "cosine"]))
@settings(max_examples=60, deadline=None)
def test_round_trip_and_endpoints(h0, h1, total, kind):
    s = parse_schedule(f"{kind}:{h0!r}->{h1!r}", total)
    back = parse_schedule(s.spec, total)
    assert back == s
    assert back(0) == pytest.approx(h0) and back(total) == pytest.approx(h1)
    lo, hi = min(h0, h1), max(h0, h1)
    for t in (0, total // 3, total // 2, total):
        assert lo - 1e-12 <= s(t) <= hi + 1e-12  # monotone interpolation stays between the ends


@given(h0=positive, h1=positive, total=horizons)
@settings(max_examples=30, deadline=None)
def test_exponential_round_trip(h0, h1, total):
    s = parse_schedule(f"exponential:{h0!r}->{h1!r}", total)
    assert parse_schedule(str(s), total) == s
    assert s(total) == pytest.approx(h1)


@given(values=st.lists(entropies, min_size=1, max_size=6), gaps=st.lists(st.integers(1, 50), min_size=6, max_size=6))
@settings(max_examples=40, deadline=None)
def test_piecewise_round_trip(values, gaps):
    steps = [0]
    for g in gaps[: len(values) - 1]:
        steps.append(steps[-1] + g)
    spec = "piecewise:" + ",".join(f"{s}:{v!r}" for s, v in zip(steps, values))
    sch = parse_schedule(spec, steps[-1] + 1)
    assert parse_schedule(sch.spec, steps[-1] + 1) == sch
    for s, v in zip(steps, values):
        assert sch(s) == v


@pytest.mark.parametrize(
    "spec, total, fragment",
    [
        ("linear:-0.1->0.5", 10, "negative entropy"),
        ("linear:0.7->abc", 10, "malformed number"),
        ("linear:0.7", 10, "START->END"),
        ("wiggly:0.7->0.5", 10, "unknown kind"),
        ("constant:nan", 10, "finite"),
        ("piecewise:5:0.7,10:0.5", 20, "step 0"),
        ("piecewise:0:0.7,0:0.5", 20, "strictly increase"),
        ("piecewise:0:0.7,30:0.5", 20, "beyond total_steps"),
        ("piecewise:0:0.7,x", 20, "STEP:H"),
        ("exponential:0.0->0.5", 10, "> 0"),
        ("", 10, "empty"),
    ],
)
def test_bad_specs_quote_the_spec(spec, total, fragment):
    with pytest.raises(ValueError) as err:
        parse_schedule(spec, total)
    assert fragment in str(err.value)
    if spec:
        assert repr(spec) in str(err.value)


def test_bad_total_steps_and_types():
    with pytest.raises(ValueError, match="total_steps must be > 0"):
        parse_schedule("constant:0.5", 0)
    with pytest.raises(TypeError, match="total_steps"):
        parse_schedule("constant:0.5", 10.0)
    with pytest.raises(TypeError):
        parse_schedule(["linear"], 10)
    with pytest.raises(ValueError, match="step"):
        parse_schedule("constant:0.5", 10)(-1)
    with pytest.raises(ValueError, match="returned"):
        parse_schedule(lambda t: -1.0, 10)(0)


def test_band_specs():
    band = parse_band("linear:0.6->0.4..linear:0.7->0.5", 100)
    assert isinstance(band, Band)
    assert band.lower(0) == pytest.approx(0.6) and band.upper(100) == pytest.approx(0.5)
    assert band.centre(50) == pytest.approx(0.55)
    assert band.contains(0.55, 50) and not band.contains(0.4, 50)
    assert band.distance(0.4, 50) == pytest.approx(0.1) and band.distance(0.55, 50) == 0
    again = parse_band(band.spec, 100)
    assert [again.lower(t) for t in range(0, 101, 10)] == [band.lower(t) for t in range(0, 101, 10)]
    centred = parse_band("linear:0.65->0.45", 100, width=0.1)
    assert centred.lower(0) == pytest.approx(0.6) and centred.upper(100) == pytest.approx(0.5)
    rt = parse_band(centred.spec, 100)  # "CENTRE+-HALF"
    assert rt.lower(30) == pytest.approx(centred.lower(30)) and rt.upper(30) == pytest.approx(centred.upper(30))
    pair = parse_band((0.2, Schedule("constant", (0.3,), 5)), 5)
    assert pair.lower(3) == 0.2 and pair.upper(3) == 0.3


def test_band_errors():
    with pytest.raises(ValueError, match="lower bound above upper bound") as err:
        parse_band("linear:0.5->0.8..linear:0.7->0.6", 100)
    assert "linear:0.5->0.8" in str(err.value)
    with pytest.raises(ValueError, match="pass width"):
        parse_band("linear:0.7->0.5", 100)
    with pytest.raises(ValueError, match="do not pass width"):
        parse_band("constant:0.1..constant:0.2", 100, width=0.1)
    with pytest.raises(ValueError, match="negative"):
        parse_band("constant:0.1", 10, width=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        parse_band("constant:0.1..constant:0.2..constant:0.3", 10)


def test_retargeting_a_centre_band_stretches_it_and_keeps_its_spec():
    band = parse_band("linear:0.7->0.5", 100, width=0.1)
    longer = parse_band(band, 200)
    # the centre is stretched to the new horizon: at step 100 of 200 it is half-way, 0.6
    assert longer.lower(100) == pytest.approx(0.55) and longer.upper(100) == pytest.approx(0.65)
    assert longer.lower(200) == pytest.approx(0.45) and longer.upper(0) == pytest.approx(0.75)
    assert longer.spec == band.spec == "linear:0.7->0.5+-0.05" and longer.total_steps == 200
    again = parse_band(longer.spec, 200)  # the spec parses back (round trip)
    for t in range(0, 201, 25):
        assert again.lower(t) == pytest.approx(longer.lower(t)) and again.upper(t) == pytest.approx(longer.upper(t))
    # its bounds stretch on their own too, and a pair of them re-targets like the band
    assert band.lower.with_total_steps(200)(100) == pytest.approx(0.55)
    pair = parse_band((band.lower, band.upper), 200)
    assert pair.upper(100) == pytest.approx(0.65)
    # re-targeting twice, and back, is consistent
    assert parse_band(parse_band(band, 50), 100).lower(50) == pytest.approx(band.lower(50))


def test_samplers_and_methods_retarget_a_centre_band():
    from entrotheory.methods import make_method
    from entrotheory.rejection import EntropyRejectionSampler

    band = parse_band("linear:0.7->0.5", 100, width=0.1)
    s = EntropyRejectionSampler(band, mode="band", total_steps=200)
    assert s.band.lower(100) == pytest.approx(0.55) and s.band.upper(100) == pytest.approx(0.65)
    assert s.state_dict()["target"] == "linear:0.7->0.5+-0.05"
    p = EntropyRejectionSampler(band, mode="predictive", total_steps=200)
    assert p.target_entropy(100) == pytest.approx(0.6)
    w = EntropyRejectionSampler(parse_schedule("linear:0.7->0.5", 100), mode="band", total_steps=200, width=0.1)
    assert w.band.upper(100) == pytest.approx(0.65)
    m = make_method("entrocraft-band", band=band, total_steps=200)
    assert m.sampler.band.lower(100) == pytest.approx(0.55) and m.sampler.band.spec == band.spec


def test_relative_specs_are_anchored_and_refused_unanchored():
    # every H0 term becomes the anchored number; the '->' after a bare H0 is not a minus sign
    assert anchor_schedule_spec("linear:H0->H0-0.2", 0.862) == "linear:0.862->0.662"
    assert anchor_schedule_spec("cosine:H0 -> 0.5", 0.7) == "cosine:0.7 -> 0.5"
    assert anchor_schedule_spec("piecewise:0:H0,10:h0+1e-1", 0.5) == "piecewise:0:0.5,10:0.6"
    assert anchor_schedule_spec("linear:H0->H0-0.2+-0.05", 1.0) == "linear:1.0->0.8+-0.05"
    assert anchor_schedule_spec("linear:0.85->0.65", 0.3) == "linear:0.85->0.65"  # absolute: unchanged
    sched = parse_schedule(anchor_schedule_spec("linear:H0->H0+0.15", 0.8), 30)
    assert sched(0) == pytest.approx(0.8) and sched(15) == pytest.approx(0.875) and sched(30) == pytest.approx(0.95)
    band = parse_band(anchor_schedule_spec("linear:H0-0.1->0.4..linear:H0->0.5", 0.9), 10)
    assert band.lower(0) == pytest.approx(0.8) and band.upper(0) == pytest.approx(0.9)
    assert is_relative_spec("constant:H0") and not is_relative_spec("linear:0.7->0.5") and not is_relative_spec(0.5)
    for spec in ("linear:H0->H0-0.2", "constant:H0"):
        with pytest.raises(ValueError, match="relative to the initial entropy H0"):
            parse_schedule(spec, 10)
    with pytest.raises(ValueError, match="relative to the initial entropy H0"):
        parse_band("linear:H0->0.4..linear:0.8->0.5", 10)
    with pytest.raises(ValueError, match="negative entropy"):  # anchored too low: the usual check
        parse_schedule(anchor_schedule_spec("linear:H0->H0-1", 0.862), 10)
    for bad in (-0.1, float("nan"), True):
        with pytest.raises(ValueError, match="H0"):
            anchor_schedule_spec("constant:H0", bad)
