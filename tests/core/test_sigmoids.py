"""Leaky hard sigmoids of SPD's causal importances (sheet §3, §14), against explicit references."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.core.sigmoids import LEAK, lower_leaky, upper_leaky

_floats = st.floats(-5.0, 5.0, allow_nan=False, width=64)


def _ref_lower_backward(z: float, g: float) -> float:
    """Reference (spd main) backward of lower_leaky, one element, written as branches."""
    if 0.0 < z <= 1.0:
        return g
    if z > 1.0:
        return 0.0
    # z <= 0: leak only when gradient descent would raise z (grad < 0)
    return LEAK * g if g < 0 else 0.0


def _grad_of(fn, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    (out,) = torch.autograd.grad(fn(z), z, grad_outputs=g)
    return out


def test_lower_forward_is_exact_clamp() -> None:
    """Forward is exactly clamp(z, 0, 1). Catches the spd-paper forward ``0.01 z`` below 0."""
    z = torch.tensor([-3.0, -1e-3, 0.0, 0.25, 1.0, 1.5, 7.0], dtype=torch.float64)
    out = lower_leaky(z)
    assert torch.equal(out, z.clamp(0, 1))
    assert (out >= 0).all()  # the paper variant gives -0.03, -1e-5 here


def test_lower_backward_cases() -> None:
    """The four backward cases, pinned elementwise.

    Catches a two-sided leak (0.01 * grad below 0 for grad > 0 too), no leak at all (0 below 0),
    a leak above 1, and a plain clamp backward (which would also pass nothing at z = 1 in some
    conventions; here z = 1 passes the gradient)."""
    z = torch.tensor([-2.0, -2.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.5, 1.5], dtype=torch.float64)
    g = torch.tensor([-3.0, 3.0, -5.0, 5.0, 2.0, -2.0, 4.0, 3.0, -3.0], dtype=torch.float64)
    got = _grad_of(lower_leaky, z, g)
    want = torch.tensor([-0.03, 0.0, -0.05, 0.0, 2.0, -2.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


@settings(max_examples=60, deadline=None)
@given(zs=st.lists(_floats, min_size=1, max_size=12), data=st.data())
def test_lower_backward_matches_reference(zs: list[float], data: st.DataObject) -> None:
    gs = data.draw(st.lists(_floats, min_size=len(zs), max_size=len(zs)))
    z = torch.tensor(zs, dtype=torch.float64)
    g = torch.tensor(gs, dtype=torch.float64)
    got = _grad_of(lower_leaky, z, g)
    want = torch.tensor(
        [_ref_lower_backward(a, b) for a, b in zip(zs, gs, strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lower_leaky(z), z.clamp(0, 1), rtol=0, atol=0)


def test_lower_dead_ci_revives_under_descent() -> None:
    """A CI stuck below 0 with a loss that wants it higher gets a (small) gradient that raises it;
    a loss that wants it lower leaves it untouched. Catches the no-leak variant (stuck forever)."""
    z = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    (1.0 - lower_leaky(z)).sum().backward()  # wants the CI up: grad wrt output is -1
    assert z.grad is not None and float(z.grad) == -LEAK
    z.grad = None
    lower_leaky(z).sum().backward()  # wants it down: nothing pushes further below 0
    assert float(z.grad) == 0.0


def _ref_upper(z: float) -> float:
    if z > 1.0:
        return 1.0 + LEAK * (z - 1.0)
    return min(max(z, 0.0), 1.0)


def _ref_upper_grad(z: float) -> float:
    if z > 1.0:
        return LEAK
    if 0.0 < z < 1.0:
        return 1.0
    return 0.0


@settings(max_examples=40, deadline=None)
@given(zs=st.lists(_floats.filter(lambda v: v not in (0.0, 1.0)), min_size=1, max_size=12))
def test_upper_values_and_gradient(zs: list[float]) -> None:
    """Values ``1 + 0.01 (z - 1)`` above 1 else clamp; gradient 0.01 above 1 (catches a plain
    clamp, whose gradient vanishes above 1), 1 inside, 0 below 0 (never negative)."""
    z = torch.tensor(zs, dtype=torch.float64)
    out = upper_leaky(z)
    want = torch.tensor([_ref_upper(v) for v in zs], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=1e-15, atol=1e-15)
    assert (out >= 0).all()
    grad = _grad_of(upper_leaky, z, torch.ones_like(z))
    want_g = torch.tensor([_ref_upper_grad(v) for v in zs], dtype=torch.float64)
    torch.testing.assert_close(grad, want_g, rtol=1e-12, atol=0)


def test_upper_pulls_overconfident_ci_back() -> None:
    """Above 1 the penalty still has slope 0.01 (the reason upper_leaky exists)."""
    z = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    upper_leaky(z).sum().backward()
    assert float(upper_leaky(z.detach())) == 1.0 + LEAK * 2.0
    assert float(z.grad) == LEAK
    z2 = torch.tensor([3.0], requires_grad=True)
    lower_leaky(z2).sum().backward()
    assert float(z2.grad) == 0.0  # the lower version does not


def test_dtypes_and_shapes_preserved() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z = torch.randn(3, 4, 5, dtype=dtype, generator=torch.Generator().manual_seed(0))
        for fn in (lower_leaky, upper_leaky):
            out = fn(z)
            assert out.dtype == dtype and out.shape == z.shape
