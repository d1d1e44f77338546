"""``smooth_l0_and_frequency``: smooth-L0 importance minimality and its frequency term, one pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.core import penalties as P

F64 = torch.float64


def _np_reference(ci: np.ndarray, gamma: float, a: float, normalize: bool) -> tuple[float, float]:
    """Per component c: f_c = mean over tokens of g^2/(g^2+gamma^2); imp = sum_c f_c (times
    1 + gamma^2 when normalised); freq = sum_c f_c log2(1 + a f_c) (never rescaled)."""
    flat = ci.reshape(-1, ci.shape[-1])
    imp = freq = 0.0
    for c in range(flat.shape[1]):
        col = flat[:, c]
        f = float(np.mean(col**2 / (col**2 + gamma**2)))
        imp += f
        freq += f * math.log2(1.0 + a * f)
    return imp * (1.0 + gamma**2 if normalize else 1.0), freq


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(5,), (4, 3), (2, 3, 4)]),
    gamma=st.floats(0.01, 2.0),
    a=st.floats(0.5, 1e4),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_smooth_l0_and_frequency_vs_numpy(shape, gamma, a, normalize, seed) -> None:
    """Catches the frequency term computed on the normalised means (scaled by 1 + gamma^2) and
    means over all tokens and components instead of per component."""
    ci = np.random.default_rng(seed).uniform(0.0, 1.5, size=shape)
    imp, freq = P.smooth_l0_and_frequency(torch.tensor(ci), gamma, a, normalize)
    want_imp, want_freq = _np_reference(ci, gamma, a, normalize)
    assert float(imp) == pytest.approx(want_imp, rel=1e-10, abs=1e-15)
    assert float(freq) == pytest.approx(want_freq, rel=1e-10, abs=1e-15)


def test_equals_separate_building_blocks() -> None:
    ci = torch.rand(6, 3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    for normalize in (False, True):
        imp, freq = P.smooth_l0_and_frequency(ci, 0.2, 300.0, normalize)
        assert float(imp) == pytest.approx(float(P.smooth_l0(ci, 0.2, normalize)), rel=1e-14)
        phi = ci**2 / (ci**2 + 0.04)
        f = P.component_means(phi)
        assert float(freq) == pytest.approx(float(P.frequency_term(f, 300.0)), rel=1e-14)


def test_gradients_match_autograd_of_reference() -> None:
    ci = torch.rand(4, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    ci.requires_grad_(True)
    imp, freq = P.smooth_l0_and_frequency(ci, 0.3, 50.0, True)
    g_code = torch.autograd.grad(imp + 2.0 * freq, ci)[0]
    x = ci.detach().clone().requires_grad_(True)
    f = (x**2 / (x**2 + 0.09)).mean(0)
    ref = (f.sum() * 1.09) + 2.0 * (f * torch.log2(1 + 50.0 * f)).sum()
    torch.testing.assert_close(g_code, torch.autograd.grad(ref, x)[0], rtol=1e-12, atol=1e-15)


def test_batch_invariant_and_zero_firing() -> None:
    """Duplicating the tokens leaves both terms unchanged (a fixed a', not the batch size);
    no firing gives 0 for both."""
    ci = torch.rand(5, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    one = P.smooth_l0_and_frequency(ci, 0.1, 20.0)
    three = P.smooth_l0_and_frequency(torch.cat([ci, ci, ci]), 0.1, 20.0)
    for u, v in zip(one, three, strict=True):
        assert float(u) == pytest.approx(float(v), rel=1e-13)
    zero = P.smooth_l0_and_frequency(torch.zeros(3, 4), 0.5, 10.0)
    assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"gamma": 0.0}, ValueError, r"^gamma must be a finite number > 0, got 0"),
        ({"gamma": float("nan")}, ValueError, r"^gamma must be a finite number > 0"),
        ({"reference_token_count": -1.0}, ValueError, r"^reference_token_count must be"),
        ({"ci": torch.tensor([[float("nan")]])}, ValueError, "ci"),
        ({"ci": torch.ones(3, dtype=torch.long)}, TypeError, "floating-point"),
    ],
)
def test_argument_errors(kwargs: dict, exc: type[Exception], match: str) -> None:
    args = {"ci": torch.rand(2, 3), "gamma": 0.1, "reference_token_count": 10.0}
    args.update(kwargs)
    with pytest.raises(exc, match=match) as e:
        P.smooth_l0_and_frequency(**args)
    assert "\n" not in str(e.value)
