"""Stochastic masks, delta masks and uniform-k-subset routes (sheet §4), checked statistically.

Statistical tests use a fixed seed, so they are deterministic; each bound is chosen so that a
correct implementation with a *random* seed would exceed it with probability about 1e-6, while
the wrong variants named in the docstrings exceed it by orders of magnitude.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sparselens.spd.masks import delta_mask, stochastic_masks, uniform, uniform_k_subset_routes

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(4,), (3, 5), (2, 3, 4)]),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_masks_lie_in_g_to_one(shape: tuple[int, ...], n: int, seed: int) -> None:
    g = torch.rand(shape, generator=_gen(seed), dtype=F64)
    g.view(-1)[0] = 0.0
    g.view(-1)[-1] = 1.0
    m = stochastic_masks(g, n, _gen(seed + 1))
    assert m.shape == (n, *shape) and m.dtype == F64
    assert (m >= g).all() and (m <= 1).all()
    assert (m[:, *([0] * len(shape))] < 1).all()  # g = 0 is not pinned at 1
    assert (m.reshape(n, -1)[:, -1] == 1).all()  # g = 1 -> m = 1


def test_masks_are_g_plus_one_minus_g_times_u() -> None:
    """Exactly ``g + (1 - g) u`` with ``u`` the generator's next ``rand((n, *g.shape))``; the
    gradient wrt ``g`` is ``1 - u`` (reparametrised, so CI gets a gradient from the masks)."""
    g = torch.rand(3, 4, generator=_gen(0), dtype=F64).requires_grad_(True)
    m = stochastic_masks(g, 2, _gen(1))
    u = torch.rand((2, 3, 4), generator=_gen(1), dtype=F64)
    torch.testing.assert_close(m, g + (1 - g) * u, rtol=1e-15, atol=1e-15)
    (grad,) = torch.autograd.grad(m.sum(), g)
    torch.testing.assert_close(grad, (1 - u).sum(0), rtol=1e-14, atol=1e-14)


def test_float32_masks_draw_the_fast_noise() -> None:
    """In float32 on CPU the masks are ``g + (1 - g) u`` with ``u`` from :func:`uniform` (the
    counter-based kernel where it builds), keyed by the generator: a saved generator state
    redraws the same masks, as an exact resume needs; delta masks likewise."""
    g = torch.rand(64, 5, generator=_gen(0))
    gen = _gen(1)
    state = gen.get_state()
    m = stochastic_masks(g, 2, gen)
    d = delta_mask((64,), gen)
    gen.set_state(state)
    u = uniform((2, 64, 5), gen)
    torch.testing.assert_close(m, g + (1 - g) * u, rtol=0, atol=1e-7)
    assert torch.equal(d, uniform((64,), gen))
    assert m.dtype == torch.float32 and (m >= g).all() and (m <= 1).all()


def test_noise_follows_the_default_device() -> None:
    """With another default device (here meta) the masks are drawn there by torch, never by the
    CPU kernel (which would read a non-host pointer: a crash)."""
    with torch.device("meta"):
        d = delta_mask((10,))
        r = uniform((3, 4))
        routes = uniform_k_subset_routes((6,), 3)
    assert d.device.type == "meta" and r.device.type == "meta" and routes.device.type == "meta"


def test_mask_mean_and_variance() -> None:
    """``E[m] = (1 + g)/2`` and ``Var[m] = (1 - g)^2 / 12`` (m ~ U(g, 1)).

    With N = 40000 draws the mean's standard error is ``(1 - g)/sqrt(12 N)`` <= 1.5e-3; we allow
    5 s.e. (|z| > 5 has probability 6e-7). Catches ``max(g, u)`` (mean ``(1 + g^2)/2``, off by
    0.105 at g = 0.3) and ``g * u`` / ``u`` alone."""
    g = torch.tensor([0.0, 0.3, 0.75, 0.95], dtype=F64)
    n = 40_000
    m = stochastic_masks(g, n, _gen(3))
    se = (1 - g) / math.sqrt(12 * n)
    assert ((m.mean(0) - (1 + g) / 2).abs() <= 5 * se).all()
    # the sample variance of U has relative s.e. sqrt(0.8/n) ~ 0.45%; allow 3%
    var = m.var(0)
    torch.testing.assert_close(var, (1 - g) ** 2 / 12, rtol=0.03, atol=0.0)
    # uniform on [g, 1]: a Kolmogorov-Smirnov test of (m - g)/(1 - g) at g = 0.3
    u = ((m[:, 1] - 0.3) / 0.7).numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-6


def test_masks_errors() -> None:
    with pytest.raises(ValueError, match=r"^n_mask_samples must be an integer >= 1, got 0"):
        stochastic_masks(torch.rand(3), 0)


def test_delta_mask() -> None:
    d = delta_mask((3, 4), _gen(0), dtype=F64)
    assert d.shape == (3, 4) and d.dtype == F64
    assert torch.equal(d, torch.rand((3, 4), generator=_gen(0), dtype=F64))
    assert delta_mask(torch.Size([5])).dtype == torch.float32
    big = delta_mask((50_000,), _gen(1))
    assert (big >= 0).all() and (big < 1).all()
    # mean of U(0,1) over 50k draws: s.e. 1.3e-3, bound 5 s.e.
    assert abs(float(big.mean()) - 0.5) < 5 / math.sqrt(12 * 50_000)


def _subset_counts(routes: torch.Tensor, L: int) -> dict[tuple[int, ...], int]:
    codes = (routes.reshape(-1, L).long() * (2 ** torch.arange(L))).sum(-1)
    counts = torch.bincount(codes, minlength=2**L)
    return {tuple(i for i in range(L) if code >> i & 1): int(counts[code]) for code in range(2**L)}


@pytest.mark.parametrize("L", [3, 4])
def test_uniform_k_subset_distribution(L: int) -> None:
    """``k ~ U{1..L}``, then given k each k-subset equally likely: P(S) = 1 / (L * C(L, |S|)).

    Pearson chi-square on N = 60000 positions against that law, with the bound at the 1e-6
    upper tail of chi2(2^L - 2) (empty subset has probability 0 and is checked separately).
    Catches k ~ U{0..L} (empty subsets), independent Bernoulli(1/2) routing (binomial sizes),
    and "the first k layers" (only L of the subsets ever appear)."""
    shape = (200, 300)
    routes = uniform_k_subset_routes(shape, L, _gen(11))
    assert routes.shape == (*shape, L) and routes.dtype == torch.bool
    assert routes.any(-1).all()  # at least one layer replaced per position
    counts = _subset_counts(routes, L)
    assert counts[()] == 0
    n = math.prod(shape)
    chi2 = 0.0
    for size in range(1, L + 1):
        for subset in itertools.combinations(range(L), size):
            expected = n / (L * math.comb(L, size))
            chi2 += (counts[subset] - expected) ** 2 / expected
    assert chi2 < stats.chi2.isf(1e-6, 2**L - 2), chi2
    # the k marginal alone: uniform over 1..L
    sizes = torch.bincount(routes.sum(-1).reshape(-1), minlength=L + 1)[1:].double()
    chi2_k = float(((sizes - n / L) ** 2 / (n / L)).sum())
    assert chi2_k < stats.chi2.isf(1e-6, L - 1), chi2_k
    # each layer is replaced with probability (L + 1) / (2 L) (mean k / L); 5 s.e. bound
    p = (L + 1) / (2 * L)
    freq = routes.reshape(-1, L).double().mean(0)
    assert ((freq - p).abs() < 5 * math.sqrt(p * (1 - p) / n)).all()


def test_routes_single_layer_and_seeding() -> None:
    r = uniform_k_subset_routes((4, 3), 1, _gen(0))
    assert r.shape == (4, 3, 1) and r.all()
    a = uniform_k_subset_routes((5,), 4, _gen(7))
    b = uniform_k_subset_routes((5,), 4, _gen(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"^n_layers must be an integer >= 1, got 0"):
        uniform_k_subset_routes((3,), 0)
