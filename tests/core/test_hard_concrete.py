"""Tests of sparselens.core.hard_concrete against independent references.

References: Monte Carlo over many draws (fixed generator), scipy quadrature of
``E[z] = int_0^1 P(z > t) dt``, the closed forms of Louizos et al. (2018) eqs. 10-13 evaluated with
scipy, and the l0-python sampling formula (bit-exact).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from sparselens.core import hard_concrete as hc

A7 = [-3.0, -1.5, -0.6, 0.0, 0.6, 1.5, 3.0]
GAMMA, ZETA = -0.1, 1.1
N_MC = 200_000


def _a(values: list[float] | float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def quad_mean(a: float, beta: float, gamma: float, zeta: float) -> float:
    """Independent E[z] = int_0^1 P(z > t) dt, P(z > t) = sigmoid(a - beta logit(v(t)))."""

    def survival(t: float) -> float:
        return float(special.expit(a - beta * special.logit((t - gamma) / (zeta - gamma))))

    t_mid = gamma + (zeta - gamma) * special.expit(a / beta)  # where the survival is 1/2
    points = [t_mid] if 0.0 < t_mid < 1.0 else None
    val, _ = integrate.quad(survival, 0.0, 1.0, points=points, limit=500, epsabs=1e-12)
    return val


@pytest.fixture(scope="module")
def mc_samples() -> torch.Tensor:
    """N_MC draws per log_alpha in A7 at beta 0.5 (float64, fixed generator)."""
    gen = torch.Generator().manual_seed(20240501)
    a = _a(A7).expand(N_MC, len(A7))
    return hc.rsample(a, 0.5, GAMMA, ZETA, generator=gen)


# -- reference table and closed forms ----------------------------------------------------------


REF_TABLE = {
    "median": [0, 0, 0.178, 0.5, 0.822, 1, 1],
    "mean": [0.055, 0.198, 0.365, 0.500, 0.635, 0.802, 0.945],
    "prob_nonzero": [0.142, 0.425, 0.645, 0.768, 0.858, 0.937, 0.985],
    "prob_one": [0.015, 0.063, 0.142, 0.232, 0.355, 0.575, 0.858],
}


@pytest.mark.parametrize("fn", sorted(REF_TABLE))
def test_reference_table_beta_half(fn: str) -> None:
    got = getattr(hc, fn)(_a(A7), 0.5, GAMMA, ZETA)
    np.testing.assert_allclose(got.numpy(), REF_TABLE[fn], atol=1e-3)


def test_reference_table_paper_gate() -> None:
    got = hc.paper_gate(_a(A7), GAMMA, ZETA)
    np.testing.assert_allclose(got.numpy(), [0, 0.119, 0.325, 0.5, 0.675, 0.881, 1], atol=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_closed_forms_vs_scipy(beta: float) -> None:
    a = np.linspace(-6, 6, 41)
    t = _a(a.tolist())
    np.testing.assert_allclose(
        hc.prob_nonzero(t, beta, GAMMA, ZETA).numpy(),
        special.expit(a - beta * np.log(-GAMMA / ZETA)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        hc.prob_one(t, beta, GAMMA, ZETA).numpy(),
        special.expit(a - beta * np.log((1 - GAMMA) / (ZETA - 1))),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        hc.median(t, beta, GAMMA, ZETA).numpy(),
        np.clip(special.expit(a / beta) * (ZETA - GAMMA) + GAMMA, 0, 1),
        atol=1e-12,
    )


# -- exact mean vs quadrature --------------------------------------------------------------------


@pytest.mark.parametrize("stretch", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0])
def test_mean_vs_quadrature(beta: float, stretch: float) -> None:
    gamma, zeta = -stretch, 1.0 + stretch
    grid = [-8.0, *A7, 8.0]
    got = hc.mean(_a(grid), beta, gamma, zeta).numpy()
    ref = [quad_mean(a, beta, gamma, zeta) for a in grid]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("gamma", "zeta"), [(0.0, 1.0), (0.0, 1.1), (-0.1, 1.0)])
@pytest.mark.parametrize("beta", [0.05, 0.5, 5.0])
def test_mean_vs_quadrature_without_stretch(gamma: float, zeta: float, beta: float) -> None:
    """No stretch on one or both sides: the gate saturates only asymptotically.

    Integrating over L in [-40, 40] (the first version) was off by ~2e-3 at beta = 0.05.
    """
    got = hc.mean(_a(A7), beta, gamma, zeta).numpy()
    ref = [quad_mean(a, beta, gamma, zeta) for a in A7]
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_mean_gradient_matches_finite_difference() -> None:
    a = _a(A7).requires_grad_(True)
    hc.mean(a, 0.5, GAMMA, ZETA).sum().backward()
    assert a.grad is not None
    h = 1e-5
    fd = [
        (quad_mean(x + h, 0.5, GAMMA, ZETA) - quad_mean(x - h, 0.5, GAMMA, ZETA)) / (2 * h)
        for x in A7
    ]
    np.testing.assert_allclose(a.grad.numpy(), fd, atol=1e-5)


# -- Monte Carlo ---------------------------------------------------------------------------------


def test_mc_sample_median_is_median(mc_samples: torch.Tensor) -> None:
    sample_median = torch.quantile(mc_samples, 0.5, dim=0)
    np.testing.assert_allclose(
        sample_median.numpy(), hc.median(_a(A7), 0.5, GAMMA, ZETA).numpy(), atol=0.01
    )


def test_mc_sample_mean_is_mean(mc_samples: torch.Tensor) -> None:
    np.testing.assert_allclose(
        mc_samples.mean(0).numpy(), hc.mean(_a(A7), 0.5, GAMMA, ZETA).numpy(), atol=0.005
    )


def test_mc_prob_nonzero_and_prob_one(mc_samples: torch.Tensor) -> None:
    np.testing.assert_allclose(
        (mc_samples > 0).double().mean(0).numpy(),
        hc.prob_nonzero(_a(A7), 0.5, GAMMA, ZETA).numpy(),
        atol=0.005,
    )
    np.testing.assert_allclose(
        (mc_samples == 1).double().mean(0).numpy(),
        hc.prob_one(_a(A7), 0.5, GAMMA, ZETA).numpy(),
        atol=0.005,
    )


@pytest.mark.parametrize("t", [-0.5, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_cdf_vs_empirical(mc_samples: torch.Tensor, t: float) -> None:
    emp = (mc_samples <= t).double().mean(0).numpy()
    np.testing.assert_allclose(hc.cdf(t, _a(A7), 0.5, GAMMA, ZETA).numpy(), emp, atol=0.005)


def test_cdf_endpoints() -> None:
    a = _a(A7)
    assert torch.equal(hc.cdf(-1e-3, a, 0.5), torch.zeros_like(a))
    assert torch.equal(hc.cdf(1.0, a, 0.5), torch.ones_like(a))
    torch.testing.assert_close(hc.cdf(0.0, a, 0.5), 1 - hc.prob_nonzero(a, 0.5))
    torch.testing.assert_close(hc.cdf(1.0 - 1e-12, a, 0.5), 1 - hc.prob_one(a, 0.5))


def test_pathwise_gradient_matches_exact_mean_gradient() -> None:
    """The reparameterised sample's average gradient is d E[z] / d log_alpha."""
    gen = torch.Generator().manual_seed(7)
    a = _a([-1.0, 0.0, 1.0]).requires_grad_(True)
    z = hc.rsample(a.expand(N_MC, 3), 0.5, generator=gen)
    (g_mc,) = torch.autograd.grad(z.mean(0).sum(), a)
    (g_exact,) = torch.autograd.grad(hc.mean(a, 0.5).sum(), a)
    np.testing.assert_allclose(g_mc.numpy(), g_exact.numpy(), atol=0.01)


# -- the known wrong variants --------------------------------------------------------------------


def test_median_needs_temperature(mc_samples: torch.Tensor) -> None:
    """Wrong variant: an eval gate without temperature (the paper gate, l0-python before PR #41).

    At beta != 1 it is not the median of the samples; it coincides with the median at beta = 1.
    """
    a = _a(A7)
    med, paper = hc.median(a, 0.5), hc.paper_gate(a)
    assert float((med - paper).abs().max()) > 0.1
    sample_median = torch.quantile(mc_samples, 0.5, dim=0)
    assert float((sample_median - paper).abs().max()) > 0.1
    torch.testing.assert_close(hc.median(a, 1.0), paper)


def test_median_is_not_mean() -> None:
    """Wrong variant: documenting the median gate as the mean (l0-python's docstrings)."""
    a = _a([-1.5, -0.6, 0.6, 1.5])
    assert float((hc.median(a, 0.5) - hc.mean(a, 0.5)).abs().min()) > 0.1


# -- numeric guards ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_samples_are_finite(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.linspace(-25, 25, 101, dtype=dtype).expand(2000, 101).requires_grad_(True)
    z = hc.rsample(a, 0.25, generator=gen)
    assert z.dtype == dtype
    zd = z.detach()
    assert bool(torch.isfinite(zd).all()) and float(zd.min()) >= 0 and float(zd.max()) <= 1
    z.float().sum().backward()
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uniform_noise_never_hits_zero_or_one(dtype: torch.dtype) -> None:
    """Noise for half inputs is drawn in float32 inside (1e-6, 1 - 1e-6).

    Wrong variant (l0-python before PR #42): eps = 1e-8 in the half dtype, where 1e-8 rounds to 0
    and 1 - 1e-8 to 1, so log(u) - log(1 - u) is infinite for some draws; shown below.
    """
    gen = torch.Generator().manual_seed(11)
    like = torch.zeros(1_000_000, dtype=dtype)
    u = hc.uniform_noise(like, generator=gen)
    assert u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert bool(torch.isfinite(torch.log(u) - torch.log1p(-u)).all())
    wrong = torch.empty(1_000_000, dtype=torch.float16).uniform_(1e-8, 1 - 1e-8, generator=gen)
    assert not bool(torch.isfinite(torch.log(wrong) - torch.log(1 - wrong)).all())


@pytest.mark.parametrize("big", [1e4, -1e4, 1e30])
def test_extreme_log_alpha_is_finite_and_gradient_zero(big: float) -> None:
    a = torch.tensor([big, -big], dtype=torch.float32, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    outputs = {
        "rsample": hc.rsample(a, 0.5, generator=gen),
        "median": hc.median(a, 0.5),
        "paper_gate": hc.paper_gate(a),
        "mean": hc.mean(a, 0.5),
        "prob_nonzero": hc.prob_nonzero(a, 0.5),
        "prob_one": hc.prob_one(a, 0.5),
        "cdf": hc.cdf(0.5, a, 0.5),
    }
    for name, out in outputs.items():
        assert bool(torch.isfinite(out).all()), name
        (g,) = torch.autograd.grad(out.sum(), a)
        assert torch.equal(g, torch.zeros_like(g)), name


def test_gradient_alive_inside_bound() -> None:
    """Control for the test above: just inside +-20 the gradients are not zero."""
    a = torch.tensor([19.0, -19.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(hc.prob_nonzero(a, 0.5).sum(), a)
    assert bool((g > 0).all())


def test_clamp_log_alpha_bound() -> None:
    a = torch.tensor([-1e4, -20.0, 3.0, 20.0, 1e4])
    assert torch.equal(hc.clamp_log_alpha(a), torch.tensor([-20.0, -20.0, 3.0, 20.0, 20.0]))


# -- reproducibility and bit-exactness -----------------------------------------------------------


def test_generator_reproducible_and_independent_of_global_rng() -> None:
    a = torch.randn(64, generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    z1 = hc.rsample(a, 0.4, generator=torch.Generator().manual_seed(5))
    torch.rand(17)  # move the global RNG
    z2 = hc.rsample(a, 0.4, generator=torch.Generator().manual_seed(5))
    z3 = hc.rsample(a, 0.4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    torch.set_rng_state(state)
    hc.rsample(a, 0.4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not consumed


@pytest.mark.parametrize("beta", [0.25, 2.0 / 3.0, 1.0])
def test_rsample_bit_exact_with_l0_python(beta: float) -> None:
    """Same float32 op order and RNG consumption as l0-python's ``_sample_gates``."""
    a = torch.randn(257, 3, generator=torch.Generator().manual_seed(2)) * 4
    torch.manual_seed(1234)
    u = torch.empty_like(a).uniform_(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / beta)
    ref = torch.clamp(s * (ZETA - GAMMA) + GAMMA, 0, 1)
    torch.manual_seed(1234)
    got = hc.rsample(a, beta, GAMMA, ZETA)
    assert torch.equal(got, ref)
    assert torch.equal(hc.rsample(a, beta, GAMMA, ZETA, u=u), ref)


# -- arguments -----------------------------------------------------------------------------------


BAD_ARGS = [
    ({"beta": 0.0}, "beta"),
    ({"beta": -1.0}, "beta"),
    ({"beta": math.nan}, "beta"),
    ({"beta": math.inf}, "beta"),
    ({"gamma": 0.1}, "gamma"),
    ({"gamma": math.nan}, "gamma"),
    ({"zeta": 0.9}, "zeta"),
]


@pytest.mark.parametrize("fn", ["rsample", "median", "mean", "prob_nonzero", "prob_one"])
@pytest.mark.parametrize(("kwargs", "name"), BAD_ARGS)
def test_argument_errors(fn: str, kwargs: dict[str, float], name: str) -> None:
    args = {"beta": 0.5, "gamma": GAMMA, "zeta": ZETA, **kwargs}
    with pytest.raises(ValueError, match=name) as info:
        getattr(hc, fn)(_a(A7), **args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "name"), BAD_ARGS)
def test_distribution_argument_errors(kwargs: dict[str, float], name: str) -> None:
    args = {"beta": 0.5, "gamma": GAMMA, "zeta": ZETA, **kwargs}
    with pytest.raises(ValueError, match=name):
        hc.HardConcreteDistribution(_a(A7), **args)


def test_paper_gate_and_cdf_argument_errors() -> None:
    with pytest.raises(ValueError, match="gamma"):
        hc.paper_gate(_a(A7), gamma=0.5)
    with pytest.raises(ValueError, match="beta"):
        hc.cdf(0.5, _a(A7), beta=-0.5)


def test_no_stretch() -> None:
    a = _a([-30.0, *A7, 30.0])
    pnz, p1 = hc.prob_nonzero(a, 0.5, 0.0, 1.0), hc.prob_one(a, 0.5, 0.0, 1.0)
    assert torch.equal(pnz, torch.ones_like(a))
    assert torch.equal(p1, torch.zeros_like(a))
    for out in (hc.mean(a, 0.5, 0.0, 1.0), hc.median(a, 0.5, 0.0, 1.0)):
        assert bool(torch.isfinite(out).all())
    z = hc.rsample(a, 0.5, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(z).all())


# -- estimators and the distribution object ------------------------------------------------------


def test_deterministic_gate_estimators() -> None:
    a, beta = _a(A7), 0.5
    torch.testing.assert_close(hc.deterministic_gate(a, beta), hc.median(a, beta))
    torch.testing.assert_close(
        hc.deterministic_gate(a, beta, estimator="median"), hc.median(a, beta)
    )
    torch.testing.assert_close(hc.deterministic_gate(a, beta, estimator="paper"), hc.paper_gate(a))
    torch.testing.assert_close(hc.deterministic_gate(a, beta, estimator="mean"), hc.mean(a, beta))
    hard = hc.deterministic_gate(a, beta, estimator="hard")
    assert torch.equal(hard, _a([0, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="estimator"):
        hc.deterministic_gate(a, beta, estimator="mode")


def test_distribution_methods() -> None:
    a = _a(A7)
    d = hc.HardConcreteDistribution(a, 0.5)
    assert d.batch_shape == torch.Size([7])
    for name in ("mean", "median", "prob_nonzero", "prob_one"):
        torch.testing.assert_close(getattr(d, name), getattr(hc, name)(a, 0.5))
    torch.testing.assert_close(d.cdf(0.3), hc.cdf(0.3, a, 0.5))
    gen = torch.Generator().manual_seed(9)
    z = d.rsample((4, 5), generator=gen)
    assert z.shape == (4, 5, 7)
    assert torch.equal(
        z, hc.rsample(a.expand(4, 5, 7), 0.5, generator=torch.Generator().manual_seed(9))
    )
    a_req = a.clone().requires_grad_(True)
    d2 = hc.HardConcreteDistribution(a_req, 0.5)
    assert d2.rsample((3,)).requires_grad
    assert not d2.sample((3,)).requires_grad


def test_dtype_preserved() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a = _a(A7, dtype)
        for fn in (hc.median, hc.mean, hc.prob_nonzero, hc.prob_one):
            assert fn(a, 0.5).dtype == dtype


def test_keep_prob_logit_matches_l0_python_and_clamps() -> None:
    """float path = math.log(p/(1-p)) (HardConcrete), tensor path = torch.log(p/(1-p)) (SCW),
    bit for bit; p = 0 and 1 give finite logits (l0-python: ZeroDivisionError / inf)."""
    assert hc.keep_prob_logit(0.8) == math.log(0.8 / (1 - 0.8))
    p = torch.tensor([0.1, 0.5, 0.999])
    assert torch.equal(hc.keep_prob_logit(p), torch.log(p / (1 - p)))
    ends = hc.keep_prob_logit(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(ends).all() and ends[0] < -13.5 and ends[1] > 13.5
    assert math.isfinite(hc.keep_prob_logit(1.0))
    with pytest.raises(ValueError, match="keep probabilit"):
        hc.keep_prob_logit(torch.tensor([1.5]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_keep_prob_logit_is_finite_in_half_precision(dtype: torch.dtype) -> None:
    """1 - 1e-6 rounds to 1 in fp16/bf16: computed in the half dtype, p = 1 gave +inf."""
    out = hc.keep_prob_logit(torch.tensor([0.0, 1.0], dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
