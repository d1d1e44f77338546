"""Tests of sparselens.core.penalties against independent numpy/scipy references.

Each formula is pinned to a numpy computation (values and analytic gradients), to the closed-form
test vectors of the SPD reference suites, and to properties that fail for the known wrong
variants: frequency terms from local sums or counts (batch-dependent), a detached log factor,
smooth-L0 without normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import special
from torch import Tensor

from sparselens.core import hard_concrete as hc
from sparselens.core import penalties as P

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


# -- numpy references --------------------------------------------------------------------------


def _tokens(ci: np.ndarray) -> np.ndarray:
    return ci.reshape(-1, ci.shape[-1])


def np_lp(ci: np.ndarray, p: float, eps: float = 1e-12) -> float:
    return float(((_tokens(ci) + eps) ** p).mean(axis=0).sum())


def np_smooth_l0(ci: np.ndarray, gamma: float, normalize_at_one: bool = False) -> float:
    x = _tokens(ci)
    phi = x**2 / (x**2 + gamma**2)
    return float(phi.mean(axis=0).sum() * ((1 + gamma**2) if normalize_at_one else 1.0))


def np_freq(ci: np.ndarray, p: float, a: float, eps: float = 1e-12) -> float:
    f = ((_tokens(ci) + eps) ** p).mean(axis=0)
    return float((f * np.log1p(a * f)).sum() / math.log(2))


def np_rolled(ci: np.ndarray, p: float, beta: float, eps: float = 1e-12) -> float:
    """The pre-PR #543 SPD loss on one rank: sum_c [M_c + beta M_c log2(1 + S_c)]."""
    s = ((_tokens(ci) + eps) ** p).sum(axis=0)
    m = s / _tokens(ci).shape[0]
    return float((m + beta * m * np.log1p(s) / math.log(2)).sum())


def np_lp_grad(ci: np.ndarray, p: float, eps: float = 1e-12) -> np.ndarray:
    n = _tokens(ci).shape[0]
    return p * (ci + eps) ** (p - 1) / n


def np_smooth_l0_grad(ci: np.ndarray, gamma: float) -> np.ndarray:
    n = _tokens(ci).shape[0]
    return 2 * ci * gamma**2 / (ci**2 + gamma**2) ** 2 / n


def np_freq_grad(ci: np.ndarray, p: float, a: float, eps: float = 1e-12) -> np.ndarray:
    """d/d ci of sum_c f log2(1 + a f): both factors differentiated."""
    n = _tokens(ci).shape[0]
    f = ((_tokens(ci) + eps) ** p).mean(axis=0)
    dphi_df = (np.log1p(a * f) + a * f / (1 + a * f)) / math.log(2)
    return dphi_df * p * (ci + eps) ** (p - 1) / n


def _ci(shape: tuple[int, ...], seed: int = 0, low: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(low, 1.0, size=shape)
    x[rng.uniform(size=shape) < 0.3] = 0.0  # exact zeros, as produced by clamped CI
    return x


def _grad(fn: Callable[[Tensor], Tensor], ci: np.ndarray) -> tuple[float, np.ndarray]:
    t = torch.tensor(ci, dtype=torch.float64, requires_grad=True)
    out = fn(t)
    (g,) = torch.autograd.grad(out, t)
    return float(out.detach()), g.numpy()


ci_arrays = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 5)),
    elements=st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False),
)
powers = st.sampled_from([0.3, 0.5, 1.0, 1.7, 2.0])


# -- values and gradients vs numpy ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (9, 4), (2, 5, 3), (2, 3, 2, 6)])
@pytest.mark.parametrize("p", [0.4, 1.0, 2.0])
def test_lp_importance_vs_numpy(shape: tuple[int, ...], p: float) -> None:
    ci = _ci(shape, seed=len(shape))
    val, grad = _grad(lambda t: P.lp_importance(t, p), ci)
    assert val == pytest.approx(np_lp(ci, p), rel=1e-12)
    np.testing.assert_allclose(grad, np_lp_grad(ci, p), rtol=1e-10)


@pytest.mark.parametrize("shape", [(7,), (9, 4), (2, 5, 3)])
@pytest.mark.parametrize("gamma", [0.01, 0.3, 2.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_smooth_l0_vs_numpy(shape: tuple[int, ...], gamma: float, normalize: bool) -> None:
    ci = _ci(shape, seed=3)
    val, grad = _grad(lambda t: P.smooth_l0(t, gamma, normalize_at_one=normalize), ci)
    assert val == pytest.approx(np_smooth_l0(ci, gamma, normalize), rel=1e-12)
    scale = (1 + gamma**2) if normalize else 1.0
    np.testing.assert_allclose(grad, scale * np_smooth_l0_grad(ci, gamma), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("shape", [(7,), (9, 4), (2, 5, 3)])
@pytest.mark.parametrize(("p", "a"), [(1.0, 1.0), (0.5, 64.0), (2.0, 4096.0)])
def test_frequency_minimality_vs_numpy(shape: tuple[int, ...], p: float, a: float) -> None:
    """The gradient goes through both factors of f log2(1 + a f).

    Wrong variant: a detached log factor (gradient log2(1 + a f) p ci^(p-1) / n only) fails here.
    """
    ci = _ci(shape, seed=5)
    val, grad = _grad(lambda t: P.frequency_minimality(t, p, a), ci)
    assert val == pytest.approx(np_freq(ci, p, a), rel=1e-12)
    np.testing.assert_allclose(grad, np_freq_grad(ci, p, a), rtol=1e-9)
    n = _tokens(ci).shape[0]
    f = ((_tokens(ci) + 1e-12) ** p).mean(axis=0)
    detached = np.log1p(a * f) / math.log(2) * p * (ci + 1e-12) ** (p - 1) / n
    assert not np.allclose(grad, detached, rtol=1e-3)


def test_lp_and_frequency_equal_separate_calls() -> None:
    ci = torch.tensor(_ci((4, 3, 5), seed=8))
    lp, freq = P.lp_and_frequency(ci, 0.7, 300.0)
    assert float(lp) == pytest.approx(float(P.lp_importance(ci, 0.7)), rel=1e-14)
    assert float(freq) == pytest.approx(float(P.frequency_minimality(ci, 0.7, 300.0)), rel=1e-14)


def test_expected_l0_vs_scipy_and_monte_carlo() -> None:
    a = np.linspace(-4, 4, 33).reshape(3, 11)
    beta = 2.0 / 3.0
    got = P.expected_l0(torch.tensor(a), beta)
    ref = special.expit(a - beta * np.log(0.1 / 1.1)).sum()
    assert float(got) == pytest.approx(float(ref), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    z = hc.rsample(torch.tensor(a).expand(20_000, 3, 11), beta, generator=gen)
    mc = float((z > 0).double().mean(0).sum())
    assert float(got) == pytest.approx(mc, abs=0.1)  # 33 gates, MC s.e. < 0.02
    assert float(P.expected_l0(torch.tensor(a), beta, gamma=0.0, zeta=1.0)) == 33.0


def test_expected_l0_gradient_and_half_precision() -> None:
    a = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    P.expected_l0(a, 0.5).backward()
    s = special.expit(-0.5 * np.log(0.1 / 1.1))
    assert a.grad is not None
    np.testing.assert_allclose(a.grad.numpy(), s * (1 - s), rtol=1e-12)
    half = P.expected_l0(torch.zeros(1000, dtype=torch.bfloat16), 0.5)
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(1000 * s, rel=5e-3)
    with pytest.raises(ValueError, match="beta"):
        P.expected_l0(a, 0.0)


# -- closed-form vectors from the SPD reference suites -------------------------------------------


def test_reference_vectors_lp() -> None:
    # two layers [[1, 2, 3]] and [[.5, 1.5]] at p = 1: layer sums add to 8
    total = P.lp_importance(torch.tensor([[1.0, 2, 3]]), 1.0, eps=0.0) + P.lp_importance(
        torch.tensor([[0.5, 1.5]]), 1.0, eps=0.0
    )
    assert float(total) == pytest.approx(8.0)
    assert float(P.lp_importance(torch.tensor([[2.0, 3.0]]), 2.0, eps=0.0)) == pytest.approx(13.0)
    eps = 1e-3  # eps inside the power
    got = P.lp_importance(torch.tensor([[0.0, 1.0]], dtype=torch.float64), 0.5, eps=eps)
    assert float(got) == pytest.approx(eps**0.5 + (1 + eps) ** 0.5, rel=1e-14)


def test_reference_vector_rolled_beta_term() -> None:
    """CI [[1,2],[3,4]], p = 1, beta = 1: 2 (1 + log2 5) + 3 (1 + log2 7)."""
    ci = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    lp, freq = P.lp_and_frequency(ci, 1.0, reference_token_count=2, eps=0.0)
    expected = 2 * (1 + math.log2(5)) + 3 * (1 + math.log2(7))
    assert float(lp + freq) == pytest.approx(expected, rel=1e-14)


def test_reference_vectors_smooth_l0() -> None:
    assert float(P.smooth_l0(torch.tensor([[0.0, 1.0, 1e6]]), 1.0)) == pytest.approx(1.5)
    assert float(P.smooth_l0(torch.full((1, 4), 5.0), 0.1)) == pytest.approx(4.0, abs=2e-3)
    two_by_two = torch.full((2, 2), 0.1, dtype=torch.float64)  # phi = 0.5 at g = gamma
    assert float(P.smooth_l0(two_by_two, 0.1)) == pytest.approx(1.0)


@pytest.mark.parametrize("value", [0.0, 1e-12, 1e-10, 1e6, 1e8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_at_extremes(value: float, dtype: torch.dtype) -> None:
    ci = torch.full((3, 4), value, dtype=dtype, requires_grad=True)
    outs = [
        P.lp_importance(ci, 0.4),
        P.lp_importance(ci, 2.0),
        P.smooth_l0(ci, 0.01),
        P.smooth_l0(ci, 1e-6, normalize_at_one=True),
        P.frequency_minimality(ci, 1.0, 32768.0),
    ]
    for out in outs:
        (g,) = torch.autograd.grad(out, ci)
        assert math.isfinite(float(out.detach())) and bool(torch.isfinite(g).all())


@pytest.mark.parametrize("gamma", [1e-30, 1e-6, 1.0, 1e6])
def test_smooth_l0_finite_for_any_finite_float32(gamma: float) -> None:
    """The bounded penalty stays finite where (ci/gamma)^2 would overflow float32."""
    big = torch.finfo(torch.float32).max
    ci = torch.tensor([[0.0, 1e-30, 1.0, 1e30, big, -big]], requires_grad=True)
    out = P.smooth_l0(ci, gamma, normalize_at_one=True)
    (g,) = torch.autograd.grad(out, ci)
    assert math.isfinite(float(out.detach())) and bool(torch.isfinite(g).all())
    assert 0.0 <= float(out.detach()) <= 6 * (1 + gamma**2)


# -- batch invariance ----------------------------------------------------------------------------


def _frequency_local_sum(ci: Tensor, p: float, a: float) -> Tensor:
    """Wrong variant: the per-component SUM over the batch in place of the mean."""
    s = (ci + 1e-12).pow(p).reshape(-1, ci.shape[-1]).sum(0)
    return (s * torch.log2(1 + a * s)).sum()


def _frequency_rolled(ci: Tensor, p: float, a: float) -> Tensor:
    """Wrong variant: the pre-PR #543 term M log2(1 + S) (local count inside the log)."""
    s = (ci + 1e-12).pow(p).reshape(-1, ci.shape[-1]).sum(0)
    return (s / ci.reshape(-1, ci.shape[-1]).shape[0] * torch.log2(1 + s)).sum()


FREQ_VARIANTS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "frequency_minimality": P.frequency_minimality,
    "local_sum": _frequency_local_sum,
    "rolled": _frequency_rolled,
}


def _batch_invariant(fn: Callable[[Tensor], Tensor], ci: Tensor, k: int) -> bool:
    """fn(batch) == fn(batch repeated k times) == fn of each of the k identical pieces."""
    base = float(fn(ci))
    repeated = torch.cat([ci] * k, dim=0)
    pieces = torch.chunk(repeated, k, dim=0)
    vals = [float(fn(repeated))] + [float(fn(piece)) for piece in pieces]
    return all(math.isclose(v, base, rel_tol=1e-9, abs_tol=1e-12) for v in vals)


@SETTINGS
@given(ci=ci_arrays, p=powers, a=st.sampled_from([1.0, 100.0, 32768.0]), k=st.integers(2, 5))
def test_frequency_minimality_batch_invariant(ci: np.ndarray, p: float, a: float, k: int) -> None:
    t = torch.tensor(ci)
    assert _batch_invariant(lambda x: P.frequency_minimality(x, p, a), t, k)
    # reshaping the token dims does not matter either
    t3 = t.reshape(1, *t.shape) if t.dim() == 2 else t
    assert float(P.frequency_minimality(t3, p, a)) == pytest.approx(
        float(P.frequency_minimality(t, p, a)), rel=1e-12, abs=1e-15
    )


@pytest.mark.parametrize("variant", sorted(FREQ_VARIANTS))
def test_batch_invariance_check_catches_wrong_variants(variant: str) -> None:
    """The invariance check above fails for the local-sum and the rolled (local-count) forms."""
    ci = torch.tensor(_ci((6, 4), seed=1, low=0.1))
    fn = FREQ_VARIANTS[variant]
    invariant = _batch_invariant(lambda x: fn(x, 1.0, 64.0), ci, 3)
    assert invariant is (variant == "frequency_minimality")


def test_frequency_zero_firing_gives_zero() -> None:
    ci = torch.zeros(5, 3, dtype=torch.float64)
    assert float(P.frequency_minimality(ci, 1.0, 1000.0, eps=0.0)) == 0.0
    assert float(P.frequency_term(torch.zeros(4), 7.0)) == 0.0


@SETTINGS
@given(ci=ci_arrays, p=powers, k=st.integers(2, 4))
def test_lp_importance_invariant_to_duplicating_tokens(ci: np.ndarray, p: float, k: int) -> None:
    t = torch.tensor(ci)
    assert _batch_invariant(lambda x: P.lp_importance(x, p), t, k)
    # duplicating every token k times in place (not just the batch) changes nothing either
    dup = torch.repeat_interleave(t, k, dim=0)
    assert float(P.lp_importance(dup, p)) == pytest.approx(float(P.lp_importance(t, p)), rel=1e-12)
    assert float(P.lp_importance(t, p)) == pytest.approx(np_lp(ci, p), rel=1e-12, abs=1e-300)


@SETTINGS
@given(ci=ci_arrays, gamma=st.sampled_from([0.01, 0.1, 1.0]), k=st.integers(2, 4))
def test_smooth_l0_invariant_to_duplicating_tokens(ci: np.ndarray, gamma: float, k: int) -> None:
    assert _batch_invariant(lambda x: P.smooth_l0(x, gamma), torch.tensor(ci), k)


# -- rolled-form migration -----------------------------------------------------------------------


@SETTINGS
@given(
    b=st.integers(1, 6),
    t=st.integers(1, 4),
    c=st.integers(1, 5),
    p=powers,
    beta=st.sampled_from([0.1, 0.2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_rolled_form_reproduced_at_reference_count(
    b: int, t: int, c: int, p: float, beta: float, seed: int
) -> None:
    """old_total = lp_importance + beta * frequency_minimality(a' = B T) exactly."""
    ci = _ci((b, t, c), seed=seed)
    ci_t = torch.tensor(ci)
    lp, freq = P.lp_and_frequency(ci_t, p, reference_token_count=b * t)
    assert float(lp + beta * freq) == pytest.approx(np_rolled(ci, p, beta), rel=1e-6, abs=1e-12)


def test_rolled_form_is_batch_dependent_new_form_is_not() -> None:
    """Same per-token firing at batch size B and 2B: the old loss changes, the new one does not."""
    ci = _ci((4, 3, 5), seed=2, low=0.2)
    doubled = np.concatenate([ci, ci], axis=0)
    beta, p, a = 0.5, 1.0, 4 * 3
    old_b, old_2b = np_rolled(ci, p, beta), np_rolled(doubled, p, beta)
    assert abs(old_2b - old_b) > 0.1
    new_b = float(P.lp_importance(torch.tensor(ci), p)) + beta * float(
        P.frequency_minimality(torch.tensor(ci), p, a)
    )
    new_2b = float(P.lp_importance(torch.tensor(doubled), p)) + beta * float(
        P.frequency_minimality(torch.tensor(doubled), p, a)
    )
    assert new_b == pytest.approx(old_b, rel=1e-12)
    assert new_2b == pytest.approx(new_b, rel=1e-12)
    assert abs(new_2b - old_2b) > 0.1  # a' = B T reproduces the old form only at that B T


# -- smooth-L0 shape -----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1e-3, 0.1, 1.0, 7.0])
def test_smooth_l0_flat_at_zero(gamma: float) -> None:
    for dtype in (torch.float32, torch.float64):
        ci = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
        out = P.smooth_l0(ci, gamma)
        (g,) = torch.autograd.grad(out, ci)
        assert float(out.detach()) == 0.0
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_smooth_l0_gradient_maximum(gamma: float) -> None:
    """max_g phi'(g) = 3^1.5 / (8 gamma) at g = gamma / sqrt(3), by autograd on a fine grid."""
    grid = torch.linspace(0.0, 3 * gamma, 30001, dtype=torch.float64)
    ci = grid.reshape(1, -1).clone().requires_grad_(True)  # one token, one component per point
    (g,) = torch.autograd.grad(P.smooth_l0(ci, gamma), ci)
    i = int(g.argmax())
    step = float(grid[1] - grid[0])
    assert float(grid[i]) == pytest.approx(gamma / math.sqrt(3), abs=step)
    assert float(g.max()) == pytest.approx(3**1.5 / (8 * gamma), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.01, 0.1, 0.5, 1.0, 3.0])
def test_smooth_l0_normalize_at_one(gamma: float) -> None:
    """phi(1) = 1 for every gamma when normalised; unnormalised, 1/(1+gamma^2) ramps with gamma."""
    one = torch.ones(1, 1, dtype=torch.float64)
    assert float(P.smooth_l0(one, gamma, normalize_at_one=True)) == pytest.approx(1.0, rel=1e-14)
    assert float(P.smooth_l0(one, gamma)) == pytest.approx(1 / (1 + gamma**2), rel=1e-14)
    half = torch.full((1, 1), gamma, dtype=torch.float64)
    assert float(P.smooth_l0(half, gamma)) == pytest.approx(0.5, rel=1e-14)


# -- building blocks, dtypes, arguments ----------------------------------------------------------


def test_component_means() -> None:
    x = torch.tensor(_ci((3, 4, 5), seed=4))
    torch.testing.assert_close(P.component_means(x), x.reshape(-1, 5).mean(0))
    v = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(P.component_means(v), v)  # 1-D = one token


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    ci32 = torch.tensor(_ci((64, 8), seed=6), dtype=torch.float32)
    ci = ci32.to(dtype).requires_grad_(True)
    # p >= 1: at ci = 0, p < 1 has gradient p eps^(p-1), beyond float16's range (the cliff)
    out = P.frequency_minimality(ci, 1.5, 1000.0) + P.smooth_l0(ci, 0.1) + P.lp_importance(ci, 1.0)
    assert out.dtype == torch.float32
    ref = sum(
        fn(ci.detach().float())
        for fn in (
            lambda t: P.frequency_minimality(t, 1.5, 1000.0),
            lambda t: P.smooth_l0(t, 0.1),
            lambda t: P.lp_importance(t, 1.0),
        )
    )
    assert float(out.detach()) == pytest.approx(float(ref), rel=1e-6)
    (g,) = torch.autograd.grad(out, ci)
    assert g.dtype == dtype and bool(torch.isfinite(g).all())


CI_OK = torch.rand(4, 3)
BAD_CALLS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("p=0", lambda: P.lp_importance(CI_OK, 0.0), ValueError, "p"),
    ("p<0", lambda: P.frequency_minimality(CI_OK, -1.0, 10.0), ValueError, "p"),
    ("p=nan", lambda: P.lp_importance(CI_OK, math.nan), ValueError, "p"),
    ("eps<0", lambda: P.lp_importance(CI_OK, 1.0, eps=-1e-12), ValueError, "eps"),
    ("eps=inf", lambda: P.frequency_minimality(CI_OK, 1.0, 5.0, eps=math.inf), ValueError, "eps"),
    ("gamma=0", lambda: P.smooth_l0(CI_OK, 0.0), ValueError, "gamma"),
    ("gamma<0", lambda: P.smooth_l0(CI_OK, -0.1), ValueError, "gamma"),
    ("gamma=nan", lambda: P.smooth_l0(CI_OK, math.nan), ValueError, "gamma"),
    ("a'=0", lambda: P.frequency_minimality(CI_OK, 1.0, 0.0), ValueError, "reference_token_count"),
    ("a'<0", lambda: P.lp_and_frequency(CI_OK, 1.0, -3.0), ValueError, "reference_token_count"),
    ("a'=inf", lambda: P.frequency_term(torch.ones(2), math.inf), ValueError, "reference_token"),
    ("ci nan", lambda: P.lp_importance(torch.tensor([[0.1, math.nan]]), 1.0), ValueError, "ci"),
    ("ci inf", lambda: P.smooth_l0(torch.tensor([[math.inf, 0.1]]), 1.0), ValueError, "ci"),
    ("ci 0-d", lambda: P.lp_importance(torch.tensor(0.5), 1.0), ValueError, "ci"),
    ("ci C=0", lambda: P.smooth_l0(torch.zeros(3, 0), 1.0), ValueError, "ci"),
    ("ci no tokens", lambda: P.lp_importance(torch.zeros(0, 3), 1.0), ValueError, "ci"),
    ("ci int", lambda: P.lp_importance(torch.ones(2, 3, dtype=torch.int64), 1.0), TypeError, "ci"),
    ("ci list", lambda: P.smooth_l0([[0.1, 0.2]], 1.0), TypeError, "ci"),  # type: ignore[arg-type]
    ("p str", lambda: P.lp_importance(CI_OK, "1"), TypeError, "p"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("call", "exc", "name"), [b[1:] for b in BAD_CALLS], ids=[b[0] for b in BAD_CALLS]
)
def test_argument_errors(call: Callable[[], object], exc: type[Exception], name: str) -> None:
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(name) and "\n" not in msg


@pytest.mark.parametrize(
    "call",
    [
        lambda ci, **kw: P.lp_importance(ci, 1.0, **kw),
        lambda ci, **kw: P.smooth_l0(ci, 0.1, **kw),
        lambda ci, **kw: P.lp_and_frequency(ci, 1.0, 8.0, **kw)[0],
        lambda ci, **kw: P.smooth_l0_and_frequency(ci, 0.1, 8.0, **kw)[0],
    ],
    ids=["lp", "smooth_l0", "lp_and_frequency", "smooth_l0_and_frequency"],
)
def test_finite_check_off_skips_only_the_scan(call: Callable[..., Tensor]) -> None:
    """``finite_check=False`` (a training loop that checks its logged losses instead) gives the
    same value on finite CI and lets NaN through as NaN instead of raising."""
    ci = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(call(ci, finite_check=False), call(ci))
    bad = ci.clone()
    bad[2, 1] = math.nan
    with pytest.raises(ValueError, match="ci must be finite"):
        call(bad)
    assert math.isnan(float(call(bad, finite_check=False)))
