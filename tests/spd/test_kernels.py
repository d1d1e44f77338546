"""The fused C++ kernels of the one-hidden-layer ``mlp`` CI function (spd/kernels.py).

Each kernel is pinned against a float64 computation written out independently (erf GELU, its
derivative ``Phi + a phi`` by autograd), at sizes that leave partial vectors of positions.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from sparselens.spd import kernels
from sparselens.spd.ci_functions import MLPCI, _OneHiddenMLP

F64 = torch.float64

pytestmark = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="no C++ compiler: the kernels cannot be built (runs fall back to eager)",
)


def _reference(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """z[..., c] = sum_j w2[c, j] gelu(h[..., c] w1[c, j] + b1[c, j]) + b2[c], erf GELU."""
    a = h.unsqueeze(-1) * w1 + b1
    g = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    return (g * w2).sum(-1) + b2


def _params(C: int, H: int, seed: int, scale: float = 1.0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g) for shape in ((C, H), (C, H), (C, H), (C,))]


def _check(lead: tuple[int, ...], C: int, H: int, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    h = 2.0 * scale * torch.randn((*lead, C), generator=g)
    w1, b1, w2, b2 = _params(C, H, seed, scale)
    dz = torch.randn((*lead, C), generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (h, w1, b1, w2, b2)]
    z = kernels.one_hidden_mlp(*leaves)
    assert z is not None, "the kernels did not build"
    assert z.grad_fn is not None and "FusedOneHidden" in type(z.grad_fn).__name__
    grads = torch.autograd.grad(z, leaves, dz)
    ref_leaves = [t.to(F64).requires_grad_(True) for t in (h, w1, b1, w2, b2)]
    z_ref = _reference(*ref_leaves)
    ref_grads = torch.autograd.grad(z_ref, ref_leaves, dz.to(F64))
    for name, got, want in zip(
        ("z", "dh", "dw1", "db1", "dw2", "db2"), (z, *grads), (z_ref, *ref_grads), strict=True
    ):
        err = (got.to(F64) - want).abs().max().item()
        assert err <= 2e-6 * (1.0 + want.abs().max().item()), f"{name}: max error {err}"


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    C=st.integers(1, 9),
    H=st.integers(1, 40),
    three_d=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_float64_reference(n: int, C: int, H: int, three_d: bool, seed: int) -> None:
    """Forward and all five gradients against float64 autograd of the erf-GELU MLP, at position
    counts that are not multiples of the vector width (8 or 16).

    Catches the tanh-approximation GELU (off by up to ~5e-4 here), ``gelu'`` without its
    ``a phi(a)`` term, the positions of a partial vector leaking into the sums, and mixed-up
    components or hidden units."""
    lead = (2, n) if three_d else (n,)
    _check(lead, C, H, seed)


@pytest.mark.parametrize("scale", [0.1, 4.0], ids=["small", "large-preactivations"])
def test_kernels_many_positions(scale: float) -> None:
    """10,000 positions (the position sums are flushed into doubles every 4,096) at small and at
    large pre-activations (|a| up to ~60: erf saturates, ``phi`` underflows)."""
    _check((10_000,), 5, 16, seed=3, scale=scale)


def test_kernels_same_with_two_threads() -> None:
    """Threads split the components, so 1 and 2 threads give bitwise the same results."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(333, 7, generator=g, requires_grad=True)
    params = [p.requires_grad_(True) for p in _params(7, 16, 1)]
    dz = torch.randn(333, 7, generator=g)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            z = kernels.one_hidden_mlp(h, *params)
            assert z is not None
            out.append((z, *torch.autograd.grad(z, [h, *params], dz)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_mlp_ci_compiled_uses_kernels_in_training_and_eval() -> None:
    """``MLPCI.compiled`` on CPU fp32 runs the kernels (also without grad, for evaluation) and
    agrees with the eager fused op."""
    torch.manual_seed(0)
    fn = MLPCI(C=6, hidden=[16])
    acts = torch.randn(50, 6, requires_grad=True)
    eager = fn(None, acts)
    assert type(eager.grad_fn).__name__ == "_OneHiddenMLPBackward"
    fn.compiled = True
    z = fn(None, acts)
    assert "FusedOneHidden" in type(z.grad_fn).__name__
    torch.testing.assert_close(z, eager, rtol=1e-5, atol=1e-6)
    leaves = [acts, *fn.parameters()]
    for a, b in zip(
        torch.autograd.grad(z.sum(), leaves), torch.autograd.grad(eager.sum(), leaves), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # bitwise the kernel's training output, not the eager op's
        assert torch.equal(fn(None, acts), z.detach())


def test_kernels_decline_other_dtypes_and_failed_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 inputs and a failed build return None: MLPCI then runs its fallback, same values."""
    C, H = 3, 4
    w = [p.to(F64) for p in _params(C, H, 0)]
    assert kernels.one_hidden_mlp(torch.randn(5, C, dtype=F64), *w) is None
    monkeypatch.setattr(kernels._Build, "fns", {})
    monkeypatch.setattr(kernels._Build, "failed", True)
    assert kernels.one_hidden_mlp(torch.randn(5, C), *_params(C, H, 0)) is None
    fn = MLPCI(C=C, hidden=[H])
    fn.compiled = True
    acts = torch.randn(5, C)
    with torch.no_grad():
        want = _OneHiddenMLP.apply(acts, fn.weights[0][:, 0, :], fn.biases[0], fn.w_out, fn.b_out)
        torch.testing.assert_close(fn(None, acts), want)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((3, 4), (3, 4), (3, 5), (3,)), r"w1, b1, w2 must have shape \(C, H\) with C = 3"),
        (((2, 4), (2, 4), (2, 4), (2,)), r"w1, b1, w2 must have shape \(C, H\) with C = 3"),
        (((3, 4), (3, 4), (3, 4), (4,)), r"b2 must have shape \(3,\)"),
    ],
)
def test_kernels_reject_bad_shapes(shapes: tuple, match: str) -> None:
    """Wrong parameter shapes raise before any pointer reaches C++."""
    with pytest.raises(ValueError, match=match):
        kernels.one_hidden_mlp(torch.randn(5, 3), *(torch.randn(s) for s in shapes))


# -- leaky hard sigmoids --------------------------------------------------------------------------
def _logits_with_edges(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(40, 7, generator=g)
    z[0] = torch.tensor([0.0, 1.0, -0.0, 2.0, -3.0, 1.0 + 1e-7, 1e-8])  # the clamp bounds exactly
    return z


@pytest.mark.parametrize("which", ["both", "lower only", "upper only"])
def test_leaky_sigmoids_match_core(which: str) -> None:
    """Forward bitwise equal to ``core.sigmoids`` and the summed backward equal to autograd
    through the two core functions, with upstream gradients of both signs, at z exactly 0 and 1.

    Catches exclusive clamp bounds in the upper backward (z = 0 or 1 would get no gradient), the
    lower leak applied when the gradient would lower z, or the two gradients not summed."""
    from sparselens.core.sigmoids import lower_leaky, upper_leaky

    z = _logits_with_edges(0)
    g = torch.Generator().manual_seed(1)
    gl, gu = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
    za = z.clone().requires_grad_(True)
    out = kernels.leaky_sigmoids(za)
    assert out is not None
    zb = z.clone().requires_grad_(True)
    ref = (lower_leaky(zb), upper_leaky(zb))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    pick = {"both": (0, 1), "lower only": (0,), "upper only": (1,)}[which]
    loss_a = sum((out[i] * (gl, gu)[i]).sum() for i in pick)
    loss_b = sum((ref[i] * (gl, gu)[i]).sum() for i in pick)
    (da,) = torch.autograd.grad(loss_a, za)
    (db,) = torch.autograd.grad(loss_b, zb)
    torch.testing.assert_close(da, db, rtol=0, atol=1e-7)


def test_leaky_sigmoids_keep_nan() -> None:
    """A NaN logit stays NaN in both outputs, as in ``core.sigmoids`` (so a broken CI function
    shows up in the logged losses instead of being clamped into a valid-looking 0 or 1)."""
    from sparselens.core.sigmoids import lower_leaky, upper_leaky

    z = torch.tensor([[0.5, math.nan, 2.0, -1.0] * 5])
    out = kernels.leaky_sigmoids(z)
    assert out is not None
    for got, want in zip(out, (lower_leaky(z), upper_leaky(z)), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    assert out[0][0, 1].isnan() and out[1][0, 1].isnan()


# -- uniform noise --------------------------------------------------------------------------------
def _uniform(n: int, seed: int) -> Tensor:
    out = kernels.uniform((n,), torch.Generator().manual_seed(seed))
    assert out is not None
    return out


def test_uniform_is_keyed_by_the_generator() -> None:
    """Same generator state, same numbers (a resumed run redraws its masks exactly); the next
    call, or another seed, gives other numbers; an odd count ends with the element an even
    count would have there (no uninitialised last entry)."""
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    a = kernels.uniform((3, 1001), g)
    b = kernels.uniform((3, 1001), g)
    g.set_state(state)
    again = kernels.uniform((3, 1001), g)
    assert a is not None and b is not None and again is not None
    assert a.shape == (3, 1001) and a.dtype == torch.float32
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert not torch.equal(_uniform(100, 0), _uniform(100, 1))
    for n in (1, 7, 101):
        assert torch.equal(_uniform(n, 9), _uniform(n + 1, 9)[:n])


def test_uniform_is_drawn_on_the_host_under_another_default_device() -> None:
    """The key and the output live on the CPU whatever the default device (the kernel reads host
    memory)."""
    with torch.device("meta"):
        u = kernels.uniform((5,), torch.Generator().manual_seed(0))
    assert u is not None and u.device.type == "cpu" and torch.isfinite(u).all()


def test_uniform_distribution() -> None:
    """200,000 draws: in [0, 1) on the 2^-24 grid, Kolmogorov-Smirnov against U(0, 1), every one
    of the 24 bits set half the time, no correlation between draws of neighbouring counters or
    between the two halves of one 64-bit output, and no more repeated values than chance gives.

    Catches both halves of a 64-bit output taken from the same bits (correlation 1 at their
    distance, every value repeated), a generator that ignores the counter, or a lost bit."""
    from scipy import stats

    u = _uniform(200_001, 11).double()
    assert 0.0 <= u.min() and u.max() < 1.0
    ints = (u * 2**24).round()
    assert torch.equal(ints, u * 2**24)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    n = u.numel()
    bits = ((ints.long().unsqueeze(1) >> torch.arange(24)) & 1).double().mean(0)
    assert (bits - 0.5).abs().max() < 5 * 0.5 / math.sqrt(n)
    half = (n + 1) // 2  # the two halves of one 64-bit output sit this far apart
    for lag in (1, 2, 3, half):
        r = torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1]
        assert abs(r) < 5 / math.sqrt(n - lag), (lag, float(r))
    # birthday bound: about n^2 / 2^25 ~ 1,200 repeated values among n draws on a 2^24 grid
    repeats = n - torch.unique(ints).numel()
    assert repeats < 2 * n * n / 2**25, repeats
