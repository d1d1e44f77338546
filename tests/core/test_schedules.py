"""Tests of sparselens.core.schedules.Schedule against closed forms written out with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sparselens.core.schedules import Schedule

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def closed_form(kind: str, start: float, end: float, s0: float, s1: float, f: float) -> float:
    """Independent reference: hold, move along the kind, hold."""
    if kind == "constant":
        return start
    t = float(np.clip((f - s0) / (s1 - s0), 0.0, 1.0)) if s1 > s0 else float(f > s0)
    if kind == "linear":
        return (1 - t) * start + t * end
    if kind == "cosine":
        return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return float(np.exp((1 - t) * np.log(abs(start)) + t * np.log(abs(end)))) * np.sign(start)


KINDS = ["constant", "linear", "cosine", "exponential"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("s0", "s1"), [(0.0, 1.0), (0.2, 0.7), (0.5, 0.5001)])
def test_kinds_vs_closed_form(kind: str, s0: float, s1: float) -> None:
    start, end = 2.0, 0.4
    end_arg = None if kind == "constant" else end
    sched = Schedule(kind=kind, start=start, end=end_arg, start_frac=s0, end_frac=s1)
    for f in np.linspace(0, 1, 101):
        assert sched.at(float(f)) == pytest.approx(
            closed_form(kind, start, end, s0, s1, f), rel=1e-9
        )


def test_spd_anneal_vector() -> None:
    """SPD reference: p anneals 2 -> 1 linearly over progress 0..0.5; at 0.25 it is 1.5."""
    sched = Schedule(kind="linear", start=2.0, end=1.0, start_frac=0.0, end_frac=0.5)
    assert sched.at(0.25) == pytest.approx(1.5)
    assert sched.at(0.0) == 2.0 and sched.at(0.5) == 1.0 and sched.at(0.9) == 1.0
    assert Schedule(kind="linear", start=1.0, end=0.1).at(0.5) == pytest.approx(0.55)


def test_known_midpoints() -> None:
    assert Schedule(kind="cosine", start=1.0, end=0.0).at(0.5) == pytest.approx(0.5)
    assert Schedule(kind="cosine", start=1.0, end=0.0).at(0.25) == pytest.approx(
        (1 + math.cos(math.pi / 4)) / 2
    )
    assert Schedule(kind="exponential", start=1.0, end=0.01).at(0.5) == pytest.approx(0.1)
    assert Schedule(kind="exponential", start=-4.0, end=-1.0).at(0.5) == pytest.approx(-2.0)


@SETTINGS
@given(
    kind=st.sampled_from(KINDS),
    start=st.floats(0.01, 100),
    end=st.floats(0.01, 100),
    s0=st.floats(0, 1),
    width=st.floats(1e-3, 1),
    f=st.floats(0, 1),
)
def test_holds_outside_window_and_stays_between(
    kind: str, start: float, end: float, s0: float, width: float, f: float
) -> None:
    s1 = min(1.0, s0 + width)
    if kind == "constant":
        end = start
    sched = Schedule(kind=kind, start=start, end=end, start_frac=s0, end_frac=s1)
    final = start if kind == "constant" else end
    if f <= s0:
        assert sched.at(f) == pytest.approx(start)
    if f >= s1:
        assert sched.at(f) == pytest.approx(final)
    lo, hi = min(start, final), max(start, final)
    assert lo * (1 - 1e-12) <= sched.at(f) <= hi * (1 + 1e-12)
    assert sched.at(f) == pytest.approx(closed_form(kind, start, final, s0, s1, f), rel=1e-9)


def test_at_step_and_constant() -> None:
    sched = Schedule(kind="linear", start=0.0, end=10.0)
    assert sched.at_step(3, 10) == pytest.approx(3.0)
    assert sched.at_step(10, 10) == 10.0
    with pytest.raises(ValueError, match="total_steps"):
        sched.at_step(1, 0)
    c = Schedule.constant(0.3)
    assert c.kind == "constant" and c.final == 0.3
    assert all(c.at(f) == 0.3 for f in (0.0, 0.5, 1.0))
    assert Schedule(kind="linear", start=5.0).at(0.7) == 5.0  # no end: stays at start


def test_frozen_and_no_extra_fields() -> None:
    sched = Schedule(kind="linear", start=1.0, end=2.0)
    with pytest.raises(ValidationError):
        sched.start = 3.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="typo"):
        Schedule(kind="linear", start=1.0, typo=2.0)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="kind"):
        Schedule(kind="step", start=1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"start_frac": 0.6, "end_frac": 0.4}, "start_frac"),
        ({"start_frac": -0.1}, "start_frac"),
        ({"end_frac": 1.5}, "end_frac"),
        ({"kind": "exponential", "start": 1.0, "end": 0.0}, "exponential"),
        ({"kind": "exponential", "start": 0.0, "end": 1.0}, "exponential"),
        ({"kind": "exponential", "start": 1.0, "end": -1.0}, "exponential"),
        ({"start": math.nan}, "start"),
        ({"end": math.inf}, "end"),
        ({"start_frac": math.nan}, "start_frac"),
    ],
)
def test_validation_errors(kwargs: dict[str, object], name: str) -> None:
    args: dict[str, object] = {"kind": "linear", "start": 1.0, "end": 2.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        Schedule(**args)  # type: ignore[arg-type]


def test_constant_schedule_rejects_a_different_end() -> None:
    """A constant schedule with an end it would silently ignore is a config mistake."""
    with pytest.raises(ValueError, match="end must be omitted"):
        Schedule(kind="constant", start=1.0, end=2.0)
