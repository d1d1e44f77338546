"""Tests of sparselens.l0.distributions.HardConcrete.

References: l0-python 0.6.2's formulas written out inline (bit-exactness of samples, eval gates,
penalty and init), numpy closed forms (Louizos et al. 2018 eqs. 10-13) and Monte Carlo over many
gates (the eval estimators really are the median / mean they claim to be).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.l0.distributions import HardConcrete, init_logit

# -- l0-python 0.6.2 formulas, written out from its documented behaviour ---------------------------


def upstream_sample(logits: torch.Tensor, temperature: float, stretch: float) -> torch.Tensor:
    """l0-python ``HardConcrete._sample_gates`` (after PR #42), op for op, on the global RNG."""
    gamma, zeta = -stretch, 1.0 + stretch
    a = logits.clamp(-20.0, 20.0)
    u = torch.zeros_like(a).uniform_(1e-6, 1.0 - 1e-6)
    s = torch.log(u) - torch.log(1 - u) + a
    s = torch.sigmoid(s / temperature)
    return torch.clamp(s * (zeta - gamma) + gamma, 0, 1)


def upstream_eval(logits: torch.Tensor, temperature: float, stretch: float) -> torch.Tensor:
    """l0-python ``_deterministic_gates`` (after PR #41): the temperature-aware median."""
    gamma, zeta = -stretch, 1.0 + stretch
    a = logits.clamp(-20.0, 20.0)
    return torch.clamp(torch.sigmoid(a / temperature) * (zeta - gamma) + gamma, 0, 1)


def upstream_prob(logits: torch.Tensor, temperature: float, stretch: float) -> torch.Tensor:
    """l0-python ``get_active_prob``: sigmoid(a - beta log(-gamma/zeta))."""
    gamma, zeta = -stretch, 1.0 + stretch
    a = logits.clamp(-20.0, 20.0)
    return torch.sigmoid(a - temperature * math.log(-gamma / zeta))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def gate_with(logits: torch.Tensor, **kw: float) -> HardConcrete:
    g = HardConcrete(*logits.shape, **kw)
    with torch.no_grad():
        g.qz_logits.copy_(logits)
    return g


# -- API surface ----------------------------------------------------------------------------------


def test_signature_and_constants_match_upstream() -> None:
    params = inspect.signature(HardConcrete.__init__).parameters
    positional = [(n, p.default) for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == [
        ("self", inspect.Parameter.empty),
        ("input_dim", inspect.Parameter.empty),
        ("output_dim", None),
        ("temperature", 0.5),
        ("stretch", 0.1),
        ("init_mean", 0.5),
    ]
    assert HardConcrete.LOG_ALPHA_BOUND == 20.0
    assert HardConcrete._UNIFORM_EPS == 1e-6
    for method in (
        "forward",
        "reset_parameters",
        "_sample_gates",
        "_deterministic_gates",
        "get_penalty",
        "get_active_prob",
        "get_sparsity",
        "get_num_active",
        "extra_repr",
    ):
        assert callable(getattr(HardConcrete, method))


def test_attributes_and_state_dict_keys() -> None:
    g = HardConcrete(20, 30, temperature=0.3, stretch=0.2, init_mean=0.9)
    assert g.gate_size == (20, 30)
    assert (g.temperature, g.stretch, g.gamma, g.zeta, g.init_mean) == (0.3, 0.2, -0.2, 1.2, 0.9)
    assert list(g.state_dict()) == ["qz_logits"]
    assert g.qz_logits.shape == (20, 30) and g.qz_logits.dtype == torch.float32
    assert HardConcrete(7).gate_size == (7,)
    # an l0-python state_dict loads
    g.load_state_dict({"qz_logits": torch.full((20, 30), 1.25)})
    assert torch.all(g.qz_logits == 1.25)


def test_extra_repr_matches_upstream_format() -> None:
    g = HardConcrete(4, 3, temperature=0.25, init_mean=0.7)
    assert g.extra_repr() == "gate_size=(4, 3), temperature=0.25, stretch=0.1, init_mean=0.7"


# -- bit-exactness with l0-python -----------------------------------------------------------------


@pytest.mark.parametrize("init_mean", [0.1, 0.5, 0.8, 0.9, 0.99, 0.3])
def test_init_logits_bit_exact(init_mean: float) -> None:
    g = HardConcrete(6, init_mean=init_mean)
    expected = torch.full((6,), math.log(init_mean / (1 - init_mean)))
    assert torch.equal(g.qz_logits.data, expected)


def test_init_mean_none_keeps_zeros() -> None:
    assert torch.equal(HardConcrete(3, init_mean=None).qz_logits.data, torch.zeros(3))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from([(1,), (7,), (5, 3), (2, 9)]),
    temperature=st.sampled_from([0.1, 0.25, 0.5, 2 / 3, 1.0, 2.0]),
    stretch=st.sampled_from([0.05, 0.1, 0.2]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.5, 3.0, 40.0]),
)
def test_sampling_bit_exact_and_same_rng_consumption(
    shape: tuple[int, ...], temperature: float, stretch: float, seed: int, scale: float
) -> None:
    """Same float32 values *and* the same global-RNG consumption as l0-python."""
    torch.manual_seed(seed + 1)
    logits = torch.randn(shape) * scale  # includes |a| > 20 (clamped)
    g = gate_with(logits, temperature=temperature, stretch=stretch)
    g.train()
    torch.manual_seed(seed)
    ours = g()
    after_ours = torch.rand(3)
    torch.manual_seed(seed)
    ref = upstream_sample(logits, temperature, stretch)
    after_ref = torch.rand(3)
    assert torch.equal(ours, ref)
    assert torch.equal(after_ours, after_ref)


@settings(max_examples=30, deadline=None)
@given(
    temperature=st.sampled_from([0.1, 0.25, 0.4, 0.5, 2.0]),
    stretch=st.sampled_from([0.05, 0.1, 0.2]),
    seed=st.integers(0, 2**31 - 1),
)
def test_eval_gates_penalty_stats_bit_exact(temperature: float, stretch: float, seed: int) -> None:
    torch.manual_seed(seed)
    logits = torch.randn(40) * 4
    logits[0], logits[1] = 1000.0, -1000.0
    g = gate_with(logits, temperature=temperature, stretch=stretch).eval()
    assert torch.equal(g(), upstream_eval(logits, temperature, stretch))
    prob = upstream_prob(logits, temperature, stretch)
    assert torch.equal(g.get_active_prob(), prob)
    assert torch.equal(g.get_penalty(), prob.sum())
    assert g.get_sparsity() == 1.0 - prob.mean().item()
    assert g.get_num_active() == int((prob > 0.5).sum().item())
    assert isinstance(g.get_sparsity(), float) and isinstance(g.get_num_active(), int)


def test_broadcasting_appends_singleton_dims() -> None:
    g = HardConcrete(20, 30).eval()
    assert g((32, 20, 28, 28)).shape == (20, 30, 1, 1)
    assert g(torch.Size([5, 5])).shape == (20, 30)
    assert g((3,)).shape == (20, 30)


# -- closed forms and estimators vs independent references -----------------------------------------


A7 = [-3.0, -1.5, -0.6, 0.0, 0.6, 1.5, 3.0]


def test_closed_forms_vs_numpy() -> None:
    beta, gamma, zeta = 0.5, -0.1, 1.1
    a = np.array(A7)
    g = gate_with(torch.tensor(A7), temperature=beta).eval()
    p_np = np_sigmoid(a - beta * np.log(-gamma / zeta))
    np.testing.assert_allclose(g.get_active_prob().detach().numpy(), p_np, rtol=1e-6)
    med_np = np.clip(np_sigmoid(a / beta) * (zeta - gamma) + gamma, 0, 1)
    np.testing.assert_allclose(g().detach().numpy(), med_np, atol=1e-6)
    # fact-sheet table (T = 0.5, stretch 0.1)
    np.testing.assert_allclose(p_np, [0.142, 0.425, 0.645, 0.768, 0.858, 0.937, 0.985], atol=2e-3)


def mc_draws(n: int = 100_000, **kw: object) -> np.ndarray:
    """``n`` training-mode draws per log alpha in A7 (rows), T = 0.5."""
    g = HardConcrete(len(A7), n, temperature=0.5, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        g.qz_logits.copy_(torch.tensor(A7)[:, None].expand(len(A7), n))
        return g.train()().double().numpy()


def test_penalty_and_eval_gate_monte_carlo() -> None:
    """P(z != 0) is the expected L0 (eq. 12) and the eval gate is the median of the samples."""
    torch.manual_seed(7)
    z = mc_draws()
    g = gate_with(torch.tensor(A7), temperature=0.5).eval()
    np.testing.assert_allclose((z > 0).mean(axis=1), g.get_active_prob().detach(), atol=6e-3)
    np.testing.assert_allclose(np.median(z, axis=1), g().detach(), atol=1e-2)


def test_mean_and_hard_estimators_monte_carlo() -> None:
    """Extension: ``"mean"`` is E[z] over draws, ``"hard"`` the 0/1 mask of the median."""
    z = mc_draws(generator=torch.Generator().manual_seed(8))
    g = gate_with(torch.tensor(A7), temperature=0.5)
    mean = g.get_deterministic_gates("mean").detach().numpy()
    np.testing.assert_allclose(z.mean(axis=1), mean, atol=6e-3)
    hard = g.get_deterministic_gates("hard").detach().numpy()
    median = g.get_deterministic_gates("median").detach().numpy()
    assert set(np.unique(hard)) <= {0.0, 1.0}
    np.testing.assert_array_equal(hard, (median > 0).astype(np.float32))


@pytest.mark.parametrize("inference", ["median", "paper", "mean", "hard"])
def test_inference_keyword_sets_eval_estimator(inference: str) -> None:
    """Extension (not in l0-python): ``inference=`` names the eval-mode estimator."""
    a = np.array(A7)
    g = gate_with(torch.tensor(A7), temperature=0.5, inference=inference).eval()
    assert g.inference == inference and g.generator is None
    assert torch.equal(g(), g.get_deterministic_gates(inference))
    assert (f"inference='{inference}'" in g.extra_repr()) == (inference != "median")
    if inference == "paper":  # eq. 13, no temperature
        expected = np.clip(np_sigmoid(a) * 1.2 - 0.1, 0, 1)
        np.testing.assert_allclose(g().detach().numpy(), expected, atol=1e-6)
    if inference == "mean":  # Riemann sum of P(z > t) over t in [0, 1], numpy
        t = np.linspace(0.0, 1.0, 200_001)[:-1]
        v = (t[None, :] + 0.1) / 1.2
        surv = np_sigmoid(a[:, None] - 0.5 * np.log(v / (1 - v)))
        np.testing.assert_allclose(g().detach().numpy(), surv.mean(axis=1), atol=2e-5)


def test_generator_drives_noise_and_leaves_global_rng_alone() -> None:
    """Extension: ``generator=`` makes sampling reproducible without the global RNG."""
    a = HardConcrete(50, generator=torch.Generator().manual_seed(3))
    b = HardConcrete(50, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    za, zb = a(), b()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(za, zb)
    assert not torch.equal(a(), za)  # the generator advances
    c = HardConcrete(50)
    c.generator = torch.Generator().manual_seed(3)
    assert torch.equal(c(), za)
    with pytest.raises(TypeError, match="generator"):
        HardConcrete(3, generator=3)  # type: ignore[arg-type]


# -- gradients and guards -------------------------------------------------------------------------


def test_gradients_flow_and_vanish_beyond_clamp() -> None:
    g = gate_with(torch.tensor([0.0] * 50 + [25.0] * 5 + [-25.0] * 5))
    g.train()
    torch.manual_seed(0)
    g().sum().backward()
    grad = g.qz_logits.grad
    assert grad is not None and (grad[:50] != 0).any()
    assert (grad[50:] == 0).all()
    g.qz_logits.grad = None
    g.get_penalty().backward()
    assert (g.qz_logits.grad[:50] > 0).all() and (g.qz_logits.grad[50:] == 0).all()


def test_extreme_logits_equal_clamped_logits() -> None:
    big = gate_with(torch.tensor([1000.0, -1000.0]), temperature=0.1)
    edge = gate_with(torch.tensor([20.0, -20.0]), temperature=0.1)
    for mode in ("train", "eval"):
        getattr(big, mode)()
        getattr(edge, mode)()
        torch.manual_seed(0)
        x = big()
        torch.manual_seed(0)
        assert torch.equal(x, edge()) and torch.isfinite(x).all()
    assert torch.equal(big.get_penalty(), edge.get_penalty())


# -- D6: degenerate arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("init_mean", [0.0, 1.0])
def test_init_mean_at_bounds_is_clamped_not_an_error(init_mean: float) -> None:
    """D6: l0-python raised ZeroDivisionError (1.0) / math domain error (0.0); we clamp the mean
    into [1e-6, 1 - 1e-6] and keep every quantity finite."""
    g = HardConcrete(5, init_mean=init_mean)
    sign = 1.0 if init_mean == 1.0 else -1.0
    expected = sign * math.log((1 - 1e-6) / 1e-6)
    assert torch.allclose(g.qz_logits.data, torch.full((5,), expected))
    assert torch.isfinite(g.get_penalty()) and torch.isfinite(g()).all()
    assert g.init_mean == init_mean
    assert (g.get_num_active() == 5) == (init_mean == 1.0)


@settings(max_examples=50, deadline=None)
@given(p=st.floats(0.0, 1.0))
def test_init_logit_finite_and_monotone(p: float) -> None:
    a = init_logit(p)
    assert math.isfinite(a) and abs(a) <= 13.82
    assert init_logit(min(p + 0.01, 1.0)) >= a


def test_stretch_zero_gives_finite_constant_penalty() -> None:
    """D6: l0-python's ``HardConcrete(stretch=0).get_penalty()`` hit log(0) (math domain error).
    With no stretch the gate is never exactly 0, so P(z != 0) = 1 and the penalty is n."""
    g = HardConcrete(6, stretch=0.0)
    assert g.get_penalty().item() == 6.0
    g.train()
    z = g()
    assert torch.isfinite(z).all() and (z > 0).all() and (z < 1).all()


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"input_dim": 0}, ValueError, "input_dim"),
        ({"input_dim": -3}, ValueError, "input_dim"),
        ({"input_dim": 2.5}, TypeError, "input_dim"),
        ({"input_dim": 3, "output_dim": 0}, ValueError, "output_dim"),
        ({"input_dim": 3, "temperature": 0.0}, ValueError, "temperature"),
        ({"input_dim": 3, "temperature": -1.0}, ValueError, "temperature"),
        ({"input_dim": 3, "temperature": float("nan")}, ValueError, "temperature"),
        ({"input_dim": 3, "stretch": -0.1}, ValueError, "stretch"),
        ({"input_dim": 3, "stretch": float("nan")}, ValueError, "stretch"),
        ({"input_dim": 3, "init_mean": 1.5}, ValueError, "init_mean"),
        ({"input_dim": 3, "init_mean": -0.1}, ValueError, "init_mean"),
        ({"input_dim": 3, "init_mean": float("nan")}, ValueError, "init_mean"),
        ({"input_dim": 3, "inference": "bogus"}, ValueError, "inference"),
    ],
)
def test_invalid_arguments_raise_one_line_errors(
    kwargs: dict[str, object], exc: type[Exception], name: str
) -> None:
    with pytest.raises(exc, match=name) as info:
        HardConcrete(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_bad_estimator_and_input_shape_at_call_time() -> None:
    with pytest.raises(TypeError, match="input_shape"):
        HardConcrete(3)(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator"):
        HardConcrete(3).get_deterministic_gates("bogus")
    g = HardConcrete(3)
    g.temperature = 0.0
    with pytest.raises(ValueError, match="temperature"):
        g.get_penalty()
