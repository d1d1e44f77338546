"""Tests of sparselens.core.checks: the one-line argument errors shared by every entry point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparselens.core import checks


def test_check_number_accepts_and_converts() -> None:
    assert checks.check_number("x", 3) == 3.0
    assert isinstance(checks.check_number("x", np.float32(0.5)), float)
    assert checks.check_number("x", np.int64(2), gt=1) == 2.0
    assert checks.check_number("x", torch.tensor([0.25])) == 0.25
    assert checks.check_number("x", 1.0, gt=0, ge=1, lt=2, le=1) == 1.0


@pytest.mark.parametrize(
    ("value", "bounds", "allowed"),
    [
        (0.0, {"gt": 0.0}, "> 0"),
        (-1.0, {"ge": 0.0}, ">= 0"),
        (1.0, {"lt": 1.0}, "< 1"),
        (2.0, {"le": 1.0}, "<= 1"),
        (math.nan, {}, "finite"),
        (math.inf, {"gt": 0.0}, "finite"),
    ],
)
def test_check_number_rejects(value: float, bounds: dict[str, float], allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        checks.check_number("beta", value, **bounds)
    msg = str(info.value)
    assert msg.startswith("beta must be") and allowed in msg and "\n" not in msg


@pytest.mark.parametrize("value", [True, "1.0", None, [1.0], torch.ones(2)])
def test_check_number_type_errors(value: object) -> None:
    with pytest.raises(TypeError, match=r"^lr must be a number"):
        checks.check_number("lr", value)


def test_check_int() -> None:
    assert checks.check_int("k", 3, ge=1, le=5) == 3
    assert checks.check_int("k", np.int32(4)) == 4
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1 and <= 5, got 0$"):
        checks.check_int("k", 0, ge=1, le=5)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match=r"^k must be an integer"):
            checks.check_int("k", bad)


def test_check_choice() -> None:
    assert checks.check_choice("kind", "mean", ["mean", "median"]) == "mean"
    with pytest.raises(ValueError, match=r"^kind must be one of 'mean', 'median'; got 'mode'$"):
        checks.check_choice("kind", "mode", ["mean", "median"])


@pytest.mark.parametrize("to_array", [torch.tensor, np.asarray])
def test_check_finite(to_array: object) -> None:
    conv = to_array  # torch.tensor or np.asarray
    checks.check_finite("x", conv([[1.0, 2.0], [3.0, 4.0]]))  # type: ignore[operator]
    checks.check_finite("ints", conv([1, 2]))  # type: ignore[operator]
    bad = conv([[1.0, 2.0, 3.0], [4.0, 5.0, math.nan]])  # type: ignore[operator]
    with pytest.raises(ValueError, match=r"^x must be finite .* at 5$"):
        checks.check_finite("x", bad)
    with pytest.raises(ValueError, match=r"^y must be finite"):
        checks.check_finite("y", conv(math.inf))  # type: ignore[operator]


def test_check_stretch() -> None:
    assert checks.check_stretch(-0.1, 1.1) == (-0.1, 1.1)
    assert checks.check_stretch(0.0, 1.0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"^gamma"):
        checks.check_stretch(0.1, 1.1)
    with pytest.raises(ValueError, match=r"^zeta"):
        checks.check_stretch(-0.1, 0.99)


@given(
    n=st.integers(1, 40),
    pos=st.integers(0, 39),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_check_finite_finds_one_bad_value_anywhere(n: int, pos: int, bad: float, dtype) -> None:
    """One NaN or inf at any position of any float dtype is reported at that position.

    Wrong variant caught: a fast path through min/max that drops NaN (``nanmin``-like semantics)
    or checks only the ends of the tensor."""
    pos = pos % n
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    x[pos] = bad
    with pytest.raises(ValueError, match=rf"^x must be finite .* at {pos}$"):
        checks.check_finite("x", x)
    x[pos] = 0.0
    checks.check_finite("x", x)
