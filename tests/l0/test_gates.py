"""Tests of sparselens.l0.gates: l0-python names and numerics, deterministic selection (D20), a
HybridGate seed that no longer reseeds the global RNG (D20), degenerate sizes (D6) and argument
validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.l0.gates import FeatureGate, HybridGate, L0Gate, SampleGate


def upstream_eval(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    a = logits.clamp(-20.0, 20.0)
    return torch.clamp(torch.sigmoid(a / temperature) * 1.2 - 0.1, 0, 1)


def upstream_sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    a = logits.clamp(-20.0, 20.0)
    u = torch.zeros_like(a).uniform_(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / temperature)
    return torch.clamp(s * 1.2 - 0.1, 0, 1)


def set_logits(gate: L0Gate, values: torch.Tensor) -> None:
    with torch.no_grad():
        gate.gates.qz_logits.copy_(values)


# -- names and basics -----------------------------------------------------------------------------


def test_state_dict_keys_and_attributes() -> None:
    assert list(L0Gate(5).state_dict()) == ["gates.qz_logits"]
    assert list(SampleGate(5, 2).state_dict()) == ["gates.qz_logits"]
    assert list(FeatureGate(5, 2).state_dict()) == ["gates.qz_logits"]
    assert list(HybridGate(50).state_dict()) == ["l0_gate.gates.qz_logits"]
    g = L0Gate(100, temperature=0.3, init_mean=0.7)
    assert (g.size, g.temperature, g.init_mean) == (100, 0.3, 0.7)
    s = SampleGate(1000, 100)
    assert (s.n_samples, s.target_samples, s.init_mean, s.temperature) == (1000, 100, 0.1, 0.25)
    f = FeatureGate(100, 10)
    assert (f.n_features, f.max_features, f.init_mean, f.temperature) == (100, 10, 0.1, 0.1)
    assert FeatureGate(10, 20).init_mean == 0.99
    h = HybridGate(1000, target_items=200, temperature=0.2)
    assert (h.target_items, h.n_l0, h.n_random) == (200, 50, 150)
    assert h.l0_gate.init_mean == 50 / 1000 and h.l0_gate.temperature == 0.2
    assert HybridGate(1000).target_items == 200


def test_temperature_property_stays_in_sync() -> None:
    """Extension: ``L0Gate.temperature`` is the gates' temperature (l0-python kept a stale copy,
    so changing one did not change the other)."""
    g = L0Gate(4, temperature=0.5)
    g.temperature = 0.2
    assert g.gates.temperature == 0.2
    g.gates.temperature = 0.7
    assert g.temperature == 0.7
    with pytest.raises(ValueError, match="temperature"):
        g.temperature = 0.0


def test_get_gates_apply_gates_and_penalty_bit_exact() -> None:
    g = L0Gate(6, temperature=0.3)
    logits = torch.tensor([-3.0, -0.5, 0.0, 0.4, 2.0, 30.0])
    set_logits(g, logits)
    x = torch.randn(4, 6, 2)
    torch.manual_seed(1)
    out = g.apply_gates(x, dim=1)
    torch.manual_seed(1)
    assert torch.equal(out, x * upstream_sample(logits, 0.3).view(1, -1, 1))
    g.eval()
    assert torch.equal(g.get_gates(), upstream_eval(logits, 0.3))
    prob = torch.sigmoid(logits.clamp(-20, 20) - 0.3 * math.log(0.1 / 1.1))
    assert torch.equal(g.get_penalty(), prob.sum())
    assert torch.equal(g.get_active_indices(), torch.where(upstream_eval(logits, 0.3) > 0.5)[0])


# -- D20: deterministic selection -----------------------------------------------------------------


def test_active_indices_deterministic_in_training_mode_d20() -> None:
    """D20: in training mode l0-python's get_active_indices returned a new random subset on every
    call; ``deterministic=True`` uses the eval gates whatever the mode."""
    g = L0Gate(200, temperature=0.5)
    set_logits(g, torch.randn(200, generator=torch.Generator().manual_seed(0)))
    g.train()
    a = g.get_active_indices(deterministic=True)
    b = g.get_active_indices(deterministic=True)
    assert torch.equal(a, b)
    g.eval()
    assert torch.equal(a, g.get_active_indices())
    g.train()
    draws = {tuple(g.get_active_indices().tolist()) for _ in range(5)}
    assert len(draws) > 1  # the default (upstream) behaviour is still a draw
    s = SampleGate(200, 50)
    set_logits(s, torch.randn(200, generator=torch.Generator().manual_seed(1)))
    data = torch.randn(200, 3)
    sel1, idx1 = s.select_samples(data, deterministic=True)
    _, idx2 = s.select_samples(data, deterministic=True)
    assert torch.equal(idx1, idx2) and torch.equal(sel1, data[idx1])


def test_hybrid_select_seed_does_not_touch_global_rng_d20() -> None:
    """D20: l0-python's ``select(random_seed=s)`` called ``torch.manual_seed(s)``. We use a local
    generator: the global RNG is untouched, yet the same seed gives the same selection -- on CPU
    exactly the selection l0-python makes."""
    h = HybridGate(300, l0_fraction=0.3, random_fraction=0.5, target_items=100)
    set_logits(h.l0_gate, torch.randn(300, generator=torch.Generator().manual_seed(2)) * 2)
    data = torch.randn(300, 4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    _, idx1, kinds1 = h.select(data, random_seed=42)
    assert torch.equal(torch.get_rng_state(), state)
    _, idx2, kinds2 = h.select(data, random_seed=42)
    assert torch.equal(idx1, idx2) and (kinds1 == kinds2).all()
    _, idx3, _ = h.select(data, random_seed=43)
    assert not torch.equal(idx1, idx3)

    # l0-python's algorithm, written out: reseed globally, gate draw, randperm of the rest
    torch.manual_seed(42)
    gates = upstream_sample(h.l0_gate.gates.qz_logits.detach(), 0.25)
    l0_idx = torch.where(gates > 0.5)[0]
    mask = torch.ones(300, dtype=torch.bool)
    mask[l0_idx] = False
    rest = torch.arange(300)[mask]
    rand_idx = rest[torch.randperm(len(rest))[: min(h.n_random, len(rest))]]
    expected = torch.sort(torch.cat([l0_idx, rand_idx]))[0]
    assert torch.equal(idx1, expected)
    assert set(idx1[torch.from_numpy(kinds1 == "l0")].tolist()) == set(l0_idx.tolist())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    l0_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    train=st.booleans(),
)
def test_hybrid_selection_invariants(n: int, l0_fraction: float, seed: int, train: bool) -> None:
    """Holds for every size, including n_l0 = 0 (D6 in l0-python)."""
    h = HybridGate(n, l0_fraction=l0_fraction, random_fraction=1.0 - l0_fraction, target_items=n)
    h.train(train)
    data = torch.arange(n, dtype=torch.float32)[:, None]
    sel, idx, kinds = h.select(data, random_seed=seed)
    assert idx.dtype == torch.long and torch.equal(idx, torch.sort(idx)[0])
    assert len(set(idx.tolist())) == len(idx) == len(kinds) == sel.shape[0]
    assert torch.equal(sel[:, 0].long(), idx)
    assert set(kinds.tolist()) <= {"l0", "random"} and kinds.dtype == np.dtype("<U6")
    n_l0 = int((kinds == "l0").sum())
    assert int((kinds == "random").sum()) == min(h.n_random, n - n_l0)


def test_hybrid_without_seed_uses_global_rng() -> None:
    h = HybridGate(100, target_items=40)
    data = torch.randn(100, 2)
    torch.manual_seed(5)
    _, a, _ = h.select(data)
    torch.manual_seed(5)
    _, b, _ = h.select(data)
    assert torch.equal(a, b)


# -- selection helpers ----------------------------------------------------------------------------


def test_weighted_and_feature_selection() -> None:
    s = SampleGate(50, 10).eval()
    set_logits(s, torch.linspace(-3, 3, 50))
    data, weights = torch.randn(50, 3), torch.rand(50) + 0.1
    sel, w, idx = s.select_weighted_samples(data, weights)
    gated = weights * upstream_eval(s.gates.qz_logits.detach(), 0.25)
    assert torch.equal(idx, torch.where(gated > 1e-8)[0])
    assert torch.equal(w, gated[idx]) and torch.equal(sel, data[idx])

    f = FeatureGate(20, 3).eval()
    set_logits(f, torch.linspace(-2, 4, 20))
    x = torch.randn(5, 20)
    xs, fi = f.select_features(x)
    assert torch.equal(xs, x[:, fi]) and fi.numel() > 3
    names = [f"f{i}" for i in range(20)]
    _, sel_names = f.select_features_with_names(x, names)
    assert sel_names == [names[i] for i in fi.tolist()]
    imp = f.get_feature_importance()
    assert not imp.requires_grad and torch.equal(imp, f.gates.get_active_prob().detach())


def test_feature_gate_can_enforce_max_features() -> None:
    """Extension (D20): l0-python never enforced ``max_features``; the option keeps the most
    probable ``max_features`` of the active features."""
    f = FeatureGate(20, 3).eval()
    set_logits(f, torch.linspace(-2, 4, 20))
    x = torch.randn(5, 20)
    assert f.select_features(x)[1].numel() > 3
    xs3, fi3 = f.select_features(x, enforce_max_features=True)
    assert fi3.tolist() == [17, 18, 19] and torch.equal(xs3, x[:, fi3])
    f.train()
    _, fi_train = f.select_features(x, deterministic=True, enforce_max_features=True)
    assert fi_train.tolist() == [17, 18, 19]


# -- D6 and validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [
        lambda: SampleGate(10, 10),
        lambda: SampleGate(10, 0),
        lambda: HybridGate(10),
        lambda: HybridGate(50, l0_fraction=0.0, random_fraction=1.0),
        lambda: FeatureGate(10, 0),
    ],
)
def test_degenerate_sizes_give_finite_values_d6(factory) -> None:  # type: ignore[no-untyped-def]
    """D6: SampleGate(n, n) raised ZeroDivisionError and SampleGate(n, 0) / HybridGate(10)
    (n_l0 = 0) a math domain error in l0-python; the initial mean is clamped instead."""
    gate = factory()
    assert math.isfinite(gate.get_penalty().item())
    logits = next(gate.parameters())
    assert torch.isfinite(logits).all() and logits.abs().max() < 14


def test_sample_gate_bounds_open_or_closed() -> None:
    full, empty = SampleGate(10, 10).eval(), SampleGate(10, 0).eval()
    assert full.get_active_indices().tolist() == list(range(10))
    assert empty.get_active_indices().numel() == 0
    data = torch.randn(10, 2)
    _, idx, kinds = HybridGate(10, l0_fraction=0.0, random_fraction=1.0, target_items=4).select(
        data, random_seed=0
    )
    assert len(idx) == 4 and (kinds == "random").all()


@pytest.mark.parametrize(
    ("factory", "exc", "name"),
    [
        (lambda: L0Gate(0), ValueError, "size"),
        (lambda: L0Gate(3, temperature=-1.0), ValueError, "temperature"),
        (lambda: L0Gate(3, init_mean=2.0), ValueError, "init_mean"),
        (lambda: SampleGate(10, 11), ValueError, "target_samples"),
        (lambda: SampleGate(10, -1), ValueError, "target_samples"),
        (lambda: SampleGate(0, 0), ValueError, "n_samples"),
        (lambda: FeatureGate(10, -1), ValueError, "max_features"),
        (lambda: FeatureGate(0, 1), ValueError, "n_features"),
        (lambda: HybridGate(10, 0.5, 0.6), ValueError, "l0_fraction"),
        (lambda: HybridGate(10, -0.1, 0.5), ValueError, "l0_fraction"),
        (lambda: HybridGate(10, target_items=11), ValueError, "target_items"),
        (lambda: HybridGate(0), ValueError, "n_items"),
        (lambda: L0Gate(3).get_active_indices(float("nan")), ValueError, "threshold"),
    ],
)
def test_invalid_arguments(factory, exc: type[Exception], name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=name) as info:
        factory()
    assert "\n" not in str(info.value)


def test_wrong_data_shapes() -> None:
    with pytest.raises(ValueError, match="must have shape"):
        L0Gate(4).apply_gates(torch.randn(3, 5), dim=0)
    with pytest.raises(ValueError, match="dim"):
        L0Gate(4).apply_gates(torch.randn(4), dim=2)
    with pytest.raises(ValueError, match="must have shape"):
        SampleGate(5, 2).select_samples(torch.randn(4, 2))
    with pytest.raises(ValueError, match="must have shape"):
        SampleGate(5, 2).select_weighted_samples(torch.randn(5, 2), torch.rand(5, 2))
    with pytest.raises(ValueError, match="must have shape"):
        FeatureGate(5, 2).select_features(torch.randn(3, 4))
    with pytest.raises(ValueError, match="feature_names"):
        FeatureGate(5, 2).select_features_with_names(torch.randn(3, 5), ["a"])
    with pytest.raises(ValueError, match="must have shape"):
        HybridGate(20).select(torch.randn(19, 2))
    with pytest.raises(TypeError, match="data"):
        HybridGate(20).select(np.zeros((20, 2)))  # type: ignore[arg-type]
