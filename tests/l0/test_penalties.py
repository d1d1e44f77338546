"""Tests of sparselens.l0.penalties: penalties (incl. the D4 fix), statistics, the temperature
scheduler against l0-python's formulas, update_temperatures (incl. the D21 fix) and the
tracker."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparselens.l0.distributions import HardConcrete
from sparselens.l0.gates import HybridGate, L0Gate
from sparselens.l0.layers import L0Conv2d, L0DepthwiseConv2d, L0Linear
from sparselens.l0.penalties import (
    PenaltyTracker,
    TemperatureScheduler,
    compute_l0_penalty,
    compute_l0l2_penalty,
    compute_l2_penalty,
    get_active_parameter_count,
    get_sparsity_stats,
    update_temperatures,
)


class FakeVectorGates(nn.Module):
    """Duck-typed stand-in for SparseL0Linear / SparseCalibrationWeights (beta + log_alpha)."""

    def __init__(self, n: int, penalty: float = 1.6) -> None:
        super().__init__()
        self.beta = 2 / 3
        self.log_alpha = nn.Parameter(torch.zeros(n))
        self.log_weight = nn.Parameter(torch.full((n,), 3.0))
        self._penalty = penalty

    def get_l0_penalty(self) -> torch.Tensor:
        return torch.tensor(self._penalty) + 0 * self.log_alpha.sum()

    def get_sparsity(self) -> float:
        return 1.0


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = L0Linear(10, 20, init_sparsity=0.3, use_l2=True)
        self.fc2 = L0Linear(20, 10, init_sparsity=0.5, use_l2=True)
        self.fc3 = nn.Linear(10, 5)


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model()


# -- penalties ------------------------------------------------------------------------------------


def test_compute_l0_penalty_is_sum_of_layer_penalties(model: Model) -> None:
    expected = torch.tensor(0.0) + model.fc1.get_l0_penalty() + model.fc2.get_l0_penalty()
    assert torch.equal(compute_l0_penalty(model), expected)
    assert compute_l0_penalty(nn.Linear(2, 2)).item() == 0.0
    gate_only = nn.Sequential(L0Gate(5))  # stand-alone gates are not counted (as upstream)
    assert compute_l0_penalty(gate_only).item() == 0.0


def test_compute_l2_penalty_counts_real_weights_only_d4(model: Model) -> None:
    """D4: l0-python summed every parameter whose name *contains* "weight", i.e. also
    ``weight_gates.qz_logits`` (and SCW's ``log_weight``). Only parameters named exactly
    ``weight`` count here."""
    expected = sum((m.weight**2).sum() for m in (model.fc1, model.fc2, model.fc3))
    assert compute_l2_penalty(model).item() == pytest.approx(expected.item(), rel=1e-6)
    lin = L0Linear(4, 3, init_sparsity=0.1)  # logits = logit(0.9) = 2.2, far from 0
    assert torch.equal(compute_l2_penalty(lin), torch.tensor(0.0) + (lin.weight**2).sum())
    upstream = sum((p**2).sum() for n, p in lin.named_parameters() if "weight" in n)
    assert upstream.item() > compute_l2_penalty(lin).item() + 10  # what l0-python returned
    scw = FakeVectorGates(4)
    assert compute_l2_penalty(scw).item() == 0.0  # log_weight, log_alpha excluded
    dw = L0DepthwiseConv2d(3, 2)
    assert torch.equal(
        compute_l2_penalty(dw), torch.tensor(0.0) + (dw.depthwise_conv.weight**2).sum()
    )
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    assert compute_l2_penalty(frozen).item() == 0.0
    both = compute_l2_penalty(scw, weight_names=("weight", "log_weight")).item()
    assert both == pytest.approx(4 * 9.0)
    with pytest.raises(TypeError, match="weight_names"):
        compute_l2_penalty(scw, weight_names="weight")


def test_compute_l2_penalty_gradient_leaves_logits_alone() -> None:
    lin = L0Linear(3, 2)
    compute_l2_penalty(lin).backward()
    assert lin.weight_gates.qz_logits.grad is None
    assert torch.allclose(lin.weight.grad, 2 * lin.weight.detach())


def test_compute_l0l2_penalty(model: Model) -> None:
    got = compute_l0l2_penalty(model, l0_lambda=1e-3, l2_lambda=1e-4)
    assert torch.equal(got, 1e-3 * compute_l0_penalty(model) + 1e-4 * compute_l2_penalty(model))


def test_compute_l0l2_penalty_validates_lambdas(model: Model) -> None:
    for bad in ({"l0_lambda": -1.0}, {"l2_lambda": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            compute_l0l2_penalty(model, **bad)


# -- statistics -----------------------------------------------------------------------------------


def test_get_sparsity_stats(model: Model) -> None:
    stats = get_sparsity_stats(model)
    assert list(stats) == ["fc1", "fc2"]
    assert stats["fc1"]["total_params"] == 200
    assert stats["fc1"]["active_params"] == pytest.approx(model.fc1.get_l0_penalty().item())
    assert stats["fc1"]["sparsity"] == model.fc1.get_sparsity()
    dw = nn.Sequential(L0DepthwiseConv2d(7, 3), L0Conv2d(2, 4, 3, structured=True))
    stats = get_sparsity_stats(dw)
    assert stats["0"]["total_params"] == pytest.approx(7)
    assert stats["1"]["total_params"] == 4 * 2 * 3 * 3


def test_get_sparsity_stats_total_params_without_division() -> None:
    """l0-python's fallback ``active / (1 - sparsity)`` divided by zero at sparsity 1 and only
    approximated the gate count; the gate count is read from the module instead."""
    assert get_sparsity_stats(nn.Sequential(L0DepthwiseConv2d(7, 3)))["0"]["total_params"] == 7
    scw = get_sparsity_stats(nn.Sequential(FakeVectorGates(6)))  # sparsity 1: no 0-division
    assert scw["0"]["total_params"] == 6


def test_get_active_parameter_count_truncation_and_exact() -> None:
    """l0-python truncates per module (int(1.6) + int(1.6) = 2); ``exact=True`` gives 3.2."""
    m = nn.Sequential(FakeVectorGates(3, 1.6), FakeVectorGates(3, 1.6))
    count = get_active_parameter_count(m)
    assert count == 2 and isinstance(count, int)


def test_get_active_parameter_count_exact() -> None:
    """Extension (D21): the untruncated sum."""
    m = nn.Sequential(FakeVectorGates(3, 1.6), FakeVectorGates(3, 1.6))
    assert get_active_parameter_count(m, exact=True) == pytest.approx(3.2)


# -- temperature schedule -------------------------------------------------------------------------


def upstream_temperature(t0: float, t1: float, n: float, kind: str, epoch: float) -> float:
    """l0-python TemperatureScheduler.get_temperature, in numpy."""
    if epoch >= n:
        return t1
    p = epoch / n
    if kind == "linear":
        return t0 - (t0 - t1) * p
    if kind == "exponential":
        return float(np.exp(np.log(t0) - (np.log(t0) - np.log(t1)) * p))
    return float(t1 + (t0 - t1) * (1 + np.cos(np.pi * p)) / 2)


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
def test_scheduler_matches_upstream_formulas(kind: str) -> None:
    sched = TemperatureScheduler(2.0, 0.1, 100, kind)
    assert sched.get_temperature(0) == 2.0
    assert sched.get_temperature(100) == 0.1 and sched.get_temperature(150) == 0.1
    for epoch in [-20, -1, 0, 1, 10, 33, 50, 77, 99, 99.5, 100, 1000]:
        ref = upstream_temperature(2.0, 0.1, 100, kind, epoch)
        assert sched.get_temperature(epoch) == pytest.approx(ref, rel=1e-12)
    assert sched.get_temperature(-10) > 2.0 or kind == "cosine"  # extrapolates


@settings(max_examples=40, deadline=None)
@given(
    t0=st.floats(0.05, 5.0),
    t1=st.floats(0.05, 5.0),
    n=st.integers(1, 500),
    kind=st.sampled_from(["linear", "exponential", "cosine"]),
)
def test_scheduler_is_monotone_between_endpoints(t0: float, t1: float, n: int, kind: str) -> None:
    sched = TemperatureScheduler(t0, t1, n, kind)
    temps = [sched.get_temperature(e) for e in range(n + 2)]
    lo, hi = min(t0, t1), max(t0, t1)
    assert all(lo - 1e-12 <= t <= hi + 1e-12 for t in temps)
    diffs = np.diff(temps) * np.sign(t1 - t0)
    assert (diffs >= -1e-12).all()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"initial_temp": 0.0}, "initial_temp"),
        ({"final_temp": -0.1}, "final_temp"),
        ({"final_temp": float("nan")}, "final_temp"),
        ({"anneal_epochs": 0}, "anneal_epochs"),
        ({"schedule": "bogus"}, "schedule"),
    ],
)
def test_scheduler_validation(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TemperatureScheduler(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        TemperatureScheduler().get_temperature(float("nan"))


# -- update_temperatures --------------------------------------------------------------------------


def test_update_temperatures_covers_beta_and_gates_d21() -> None:
    """D21: l0-python left ``beta`` of SparseL0Linear / SparseCalibrationWeights and
    ``L0Gate.temperature`` unchanged."""
    model = nn.ModuleDict(
        {
            "lin": L0Linear(3, 2),
            "conv": L0Conv2d(2, 2, 2, structured=True),
            "gate": L0Gate(4),
            "hybrid": HybridGate(20),
            "hc": HardConcrete(3),
            "scw": FakeVectorGates(3),
            "act": nn.Softplus(beta=2.0),
        }
    )
    update_temperatures(model, 0.2)
    assert model["lin"].weight_gates.temperature == 0.2
    assert model["conv"].channel_gates.temperature == 0.2
    assert model["gate"].temperature == 0.2 and model["gate"].gates.temperature == 0.2
    assert model["hybrid"].l0_gate.temperature == 0.2
    assert model["hc"].temperature == 0.2
    assert model["scw"].beta == 0.2
    assert model["act"].beta == 2.0  # an unrelated ``beta`` is left alone
    with pytest.raises(ValueError, match="temperature"):
        update_temperatures(model, 0.0)


def test_update_temperatures_on_lead_modules() -> None:
    """The real SparseL0Linear / SparseCalibrationWeights get their ``beta`` set."""
    import sparselens.l0.calibration as calibration
    import sparselens.l0.sparse as sparse

    model = nn.ModuleList([sparse.SparseL0Linear(5), calibration.SparseCalibrationWeights(5)])
    update_temperatures(model, 0.3)
    assert [m.beta for m in model] == [0.3, 0.3]


def test_scheduler_call_and_step() -> None:
    """Extensions: the scheduler is callable, and ``step`` applies it to a model."""
    assert TemperatureScheduler()(50) == TemperatureScheduler().get_temperature(50)
    lin = L0Linear(3, 2)
    sched = TemperatureScheduler(1.0, 0.25, 10, "linear")
    assert sched.step(lin, 5) == pytest.approx(0.625)
    assert lin.weight_gates.temperature == pytest.approx(0.625)


# -- tracker --------------------------------------------------------------------------------------


def test_penalty_tracker_stats_and_history() -> None:
    tracker = PenaltyTracker()
    for i in range(10):
        tracker.log("l0", i * 10.0)
        tracker.log("sparsity", 0.1 + i * 0.05)
    stats = tracker.get_stats("l0")
    assert stats == {"mean": 45.0, "std": float(np.std(np.arange(10) * 10.0)), "min": 0.0,
                     "max": 90.0, "last": 90.0}  # fmt: skip
    assert tracker.get_history("sparsity")[-1] == 0.1 + 9 * 0.05
    tracker.clear()
    assert len(tracker.history) == 0


def test_penalty_tracker_input_checks() -> None:
    """Extensions: tensors are stored as floats, bad values raise, and asking for the stats of an
    unknown metric does not create an empty history."""
    tracker = PenaltyTracker()
    tracker.log("loss", torch.tensor(2.5))
    assert tracker.get_history("loss") == [2.5]
    assert tracker.get_stats("missing") == {} and "missing" not in tracker.history
    with pytest.raises(TypeError, match="value"):
        tracker.log("x", "1.0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scalar"):
        tracker.log("x", torch.ones(2))


def test_save_to_csv_unequal_lengths(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """l0-python needed pandas and failed when metrics had different lengths."""
    tracker = PenaltyTracker()
    for i in range(3):
        tracker.log("a", i / 3)
    tracker.log("b", math.nan)
    path = tmp_path / "hist.csv"
    tracker.save_to_csv(path)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["a", "b"] and len(rows) == 4
    assert [float(r[0]) for r in rows[1:]] == [0.0, 1 / 3, 2 / 3]
    assert math.isnan(float(rows[1][1])) and rows[2][1] == rows[3][1] == ""


def test_plot_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    tracker = PenaltyTracker()
    for i in range(5):
        tracker.log("l0", float(i))
        tracker.log("l2", float(i * i))
    path = tmp_path / "plot.png"
    tracker.plot_history(["l0"], save_path=path)
    assert path.stat().st_size > 0


def test_plot_history_rejects_unknown_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tracker = PenaltyTracker()
    tracker.log("l0", 1.0)
    path = tmp_path / "plot.png"
    with pytest.raises(ValueError, match="metrics"):
        tracker.plot_history(["nope"], save_path=path)
    with pytest.raises(ValueError, match="nothing to plot"):
        PenaltyTracker().plot_history(save_path=path)
