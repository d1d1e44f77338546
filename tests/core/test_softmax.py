"""Tests of sparselens.core.softmax against an independent mpmath reference.

Wrong variants each test catches (named so a regression says which one came back):
* the post-softmax power form ``softmax(z) ** (1/tau)`` (renormalised or not): loses the tail
  1.8e-35 of z = [0, -800], tau = 10 (test_power_form_underflow_is_avoided);
* dividing by tau before subtracting the max: z / tau overflows to inf and gives NaN for small
  tau in float16 (test_small_tau_does_not_overflow);
* softmax without the max subtraction: exp(1000) = inf (test_large_logits);
* entropy as -sum q log q without 0 log 0 = 0: NaN at -inf entries (test_minus_inf_entries);
* NaN rows silently propagated (test_non_finite_rows_raise).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.core.softmax import check_logits, cross_entropy, entropy, log_softmax, softmax

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)

Z = [3.0, 2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]
TAUS = [0.1, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0, 10.0]
# The reference sheet's table (sampling-and-data.md §2.4): H in bits and max q, rounded.
TABLE_H = [0.0007, 0.2335, 0.7175, 1.2066, 1.7864, 2.3372, 2.5994, 2.9323, 2.9832]
TABLE_QMAX = [0.99995, 0.9641, 0.8590, 0.7409, 0.5916, 0.4341, 0.3478, 0.2017, 0.1606]


def mp_softmax(z: list[float], tau: float) -> list[mp.mpf]:
    """Independent reference: softmax(z / tau) in 50-digit arithmetic (-inf -> exactly 0)."""
    with mp.workdps(50):
        e = [mp.mpf(0) if x == -math.inf else mp.e ** (mp.mpf(x) / mp.mpf(tau)) for x in z]
        s = mp.fsum(e)
        return [x / s for x in e]


def mp_entropy_bits(z: list[float], tau: float) -> float:
    with mp.workdps(50):
        q = mp_softmax(z, tau)
        return float(-mp.fsum(x * mp.log(x, 2) for x in q if x > 0))


def power_form(z: np.ndarray, tau: float) -> np.ndarray:
    """The known wrong variant: softmax(z) ** (1/tau), renormalised."""
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    with np.errstate(under="ignore", invalid="ignore"):
        r = p ** (1.0 / tau)
        return r / r.sum()


# -- the synthetic sweep table ------------------------------------------------------------------
@pytest.mark.parametrize(("i", "tau"), list(enumerate(TAUS)))
def test_entropy_table_vs_mpmath_and_sheet(i: int, tau: float) -> None:
    z = np.array(Z)
    h = float(entropy(z, tau))
    assert h == pytest.approx(mp_entropy_bits(Z, tau), rel=1e-12, abs=1e-14)
    assert round(h, 4) == TABLE_H[i]
    q = softmax(z, tau)
    ref = [float(x) for x in mp_softmax(Z, tau)]
    np.testing.assert_allclose(q, ref, rtol=1e-12, atol=0)
    assert round(float(q.max()), 5 if tau == 0.1 else 4) == TABLE_QMAX[i]
    h_t = float(entropy(torch.tensor(Z, dtype=torch.float64), tau))
    assert h_t == pytest.approx(h, rel=1e-12, abs=1e-15)
    assert float(entropy(z, tau, unit="nats")) == pytest.approx(h * math.log(2), rel=1e-12)


def test_entropy_table_is_monotone_and_bounded() -> None:
    taus = np.concatenate([TAUS, np.geomspace(0.01, 100, 400)])
    taus.sort()
    h = np.array([float(entropy(np.array(Z), float(t))) for t in taus])
    assert np.all(np.diff(h) >= -1e-9)
    assert h[-1] <= 3.0 + 1e-12  # log2(8)


logit_rows = st.lists(
    st.floats(-30, 30, allow_nan=False, allow_infinity=False), min_size=2, max_size=12
)


@SETTINGS
@given(z=logit_rows, t1=st.floats(0.05, 20), t2=st.floats(0.05, 20))
def test_entropy_monotone_in_tau_property(z: list[float], t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    zz = np.array(z)
    assert float(entropy(zz, lo)) <= float(entropy(zz, hi)) + 1e-9
    assert float(entropy(zz, hi)) <= math.log2(len(z)) + 1e-9


@SETTINGS
@given(z=logit_rows, tau=st.floats(0.05, 20), shift=st.floats(-100, 100))
def test_softmax_normalised_and_shift_invariant(z: list[float], tau: float, shift: float) -> None:
    zz = np.array(z)
    q = softmax(zz, tau)
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(softmax(zz + shift, tau), q, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(q, [float(x) for x in mp_softmax(z, tau)], rtol=1e-9, atol=1e-300)


# -- the power form and overflow ----------------------------------------------------------------
def tail_check(fn) -> None:  # type: ignore[no-untyped-def]
    """z = [0, -800], tau = 10: the tail is exp(-80) / (1 + exp(-80)) = 1.8048513878e-35."""
    q = fn(np.array([0.0, -800.0]), 10.0)
    assert q[1] > 0
    assert q[1] == pytest.approx(1.8048513878e-35, rel=1e-9)


def test_power_form_underflow_is_avoided() -> None:
    tail_check(softmax)
    with pytest.raises(AssertionError):  # the check catches the power form
        tail_check(power_form)
    # float32: z = [0, -120], tau = 5 keeps exp(-24) = 3.8e-11; the power form gives 0
    q32 = softmax(torch.tensor([0.0, -120.0]), 5.0)
    assert q32.dtype == torch.float32
    assert float(q32[1]) == pytest.approx(3.77513454e-11, rel=1e-5)
    p32 = torch.softmax(torch.tensor([0.0, -120.0]), -1) ** (1 / 5)
    assert float(p32[1]) == 0.0
    lp = log_softmax(np.array([0.0, -800.0]), 10.0)
    assert lp[1] == pytest.approx(-80.0, rel=1e-12)


def test_small_tau_does_not_overflow() -> None:
    q = softmax(torch.tensor([80.0, 0.0], dtype=torch.float16), 1e-3)
    assert q.tolist() == [1.0, 0.0]
    assert softmax(np.array([1.0, 0.0]), 1e-310).tolist() == [1.0, 0.0]
    assert softmax(np.array([1.0, 1.0, 0.0]), 1e-300).tolist() == [0.5, 0.5, 0.0]
    assert float(entropy(np.array([2.0, 1.0]), 1e-300)) == 0.0


def test_large_logits() -> None:
    q = softmax(np.array([1000.0, 999.0]))
    np.testing.assert_allclose(q, [1 / (1 + math.exp(-1)), 1 / (1 + math.e)], rtol=1e-14)


# -- masks, errors, backends --------------------------------------------------------------------
def test_minus_inf_entries() -> None:
    z = [1.0, -math.inf, 0.5, -math.inf, -2.0]
    finite = [1.0, 0.5, -2.0]
    for tau in (0.5, 1.0, 3.0):
        q = softmax(np.array(z), tau)
        assert q[1] == 0.0 and q[3] == 0.0
        np.testing.assert_allclose(q[[0, 2, 4]], softmax(np.array(finite), tau), rtol=1e-14)
        h = float(entropy(np.array(z), tau))
        assert math.isfinite(h)
        assert h == pytest.approx(mp_entropy_bits(finite, tau), rel=1e-12)
        ht = entropy(torch.tensor(z, dtype=torch.float64), tau)
        assert float(ht) == pytest.approx(h, rel=1e-12)
        lp = log_softmax(torch.tensor(z), tau)
        assert lp[1] == -math.inf and bool(torch.isfinite(lp[[0, 2, 4]]).all())
    # a single finite entry: probability 1, entropy 0
    assert softmax(np.array([-math.inf, 3.0])).tolist() == [0.0, 1.0]
    assert float(entropy(np.array([-math.inf, 3.0]))) == 0.0


@pytest.mark.parametrize(
    ("row", "msg"),
    [
        ([0.0, math.nan, 1.0], "NaN"),
        ([0.0, math.inf], r"\+inf"),
        ([-math.inf, -math.inf], "all -inf"),
    ],
)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_non_finite_rows_raise(row: list[float], msg: str, backend: str) -> None:
    batch = [[0.0] * len(row), row]
    x = np.array(batch) if backend == "numpy" else torch.tensor(batch)
    for fn in (check_logits, softmax, log_softmax, entropy):
        with pytest.raises(ValueError, match=msg) as info:
            fn(x)
        assert "row 1" in str(info.value)


def test_invalid_arguments() -> None:
    z = np.array([1.0, 2.0])
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tau"):
            softmax(z, bad)
    with pytest.raises(ValueError, match="unit"):
        entropy(z, unit="dits")
    with pytest.raises(ValueError, match="dimension"):
        softmax(np.float64(1.0))
    with pytest.raises(TypeError, match="dtype"):
        softmax(np.array(["a", "b"]))


@SETTINGS
@given(
    z=st.lists(
        st.lists(st.floats(-50, 50, allow_nan=False), min_size=5, max_size=5),
        min_size=1,
        max_size=4,
    ),
    tau=st.floats(0.05, 10),
)
def test_torch_equals_numpy(z: list[list[float]], tau: float) -> None:
    zn = np.array(z)
    zt = torch.tensor(z, dtype=torch.float64)
    np.testing.assert_allclose(softmax(zt, tau).numpy(), softmax(zn, tau), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(
        log_softmax(zt, tau).numpy(), log_softmax(zn, tau), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(entropy(zt, tau).numpy(), entropy(zn, tau), rtol=1e-10, atol=1e-12)
    q32 = softmax(zt.float(), tau)
    assert q32.dtype == torch.float32
    np.testing.assert_allclose(q32.numpy(), softmax(zn, tau), rtol=1e-4, atol=1e-6)


def test_integer_logits_promote() -> None:
    q = softmax(np.array([2, 1, 0]))
    assert q.dtype == np.float64
    qt = softmax(torch.tensor([2, 1, 0]))
    assert qt.dtype == torch.float64
    np.testing.assert_allclose(qt.numpy(), q, rtol=1e-14)


def test_cross_entropy_keeps_float64_and_matches_mpmath() -> None:
    """A float32 downcast turns the 1e8-scale logits [1e8 + 1, 1e8] into a tie (loss log 2)."""
    logits = torch.tensor([[1e8 + 1, 1e8], [0.5, -2.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    got = float(cross_entropy(logits, targets))
    ref = []
    with mp.workdps(50):
        for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
            lse = mp.log(sum(mp.exp(mp.mpf(v) - mp.mpf(max(row))) for v in row)) + max(row)
            ref.append(lse - mp.mpf(row[t]))
    assert got == pytest.approx(float(sum(ref) / 2), rel=1e-12)
