"""SparseCalibrationWeights: the l0-python contract, the fixes of its defects, and the additions.

Each test that guards a fix says in its docstring which l0-python 0.6.2 behaviour it fails on.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sparselens.core import hard_concrete as hc
from sparselens.core.schedules import Schedule
from sparselens.l0.calibration import SparseCalibrationWeights, relative_errors


def survey(m: int = 30, n: int = 300, seed: int = 0) -> tuple[sp.csr_array, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    M = sp.random_array(
        (m, n),
        density=0.2,
        rng=rng,
        format="csr",
        data_sampler=lambda size: rng.lognormal(1.5, 0.25, size),
    )
    w = np.zeros(n)
    active = rng.choice(n, n // 2, replace=False)
    w[active] = rng.lognormal(2.0, 1.0, n // 2)
    return M, M @ w, w


PROD = dict(beta=0.35, init_keep_prob=0.999, init_weights=10.0, log_weight_jitter_sd=0.05)


def test_init_matches_l0_python_formula_bit_for_bit():
    """log_alpha = logit(p) + sd * randn(n, seeded generator); log_weight = log(w0 + 1e-8)."""
    model = SparseCalibrationWeights(50, init_keep_prob=0.7, log_alpha_jitter_sd=0.1, seed=123)
    g = torch.Generator().manual_seed(123)
    p = torch.full((50,), 0.7)
    expected = torch.log(p / (1 - p)) + torch.randn(50, generator=g) * 0.1
    assert torch.equal(model.log_alpha.data, expected)
    assert torch.equal(model.log_weight.data, torch.log(torch.ones(50) + 1e-8))


def test_state_dict_names_match_l0_python():
    assert list(SparseCalibrationWeights(4).state_dict()) == ["log_weight", "log_alpha"]


def test_keep_prob_one_gives_finite_log_alpha():
    """l0-python leaves a scalar keep prob of 1.0 unclamped: log_alpha = inf (its defect D6)."""
    model = SparseCalibrationWeights(5, init_keep_prob=1.0, log_alpha_jitter_sd=0.0)
    assert torch.isfinite(model.log_alpha).all()
    assert model.log_alpha[0].item() == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-3)


def test_stale_cache_is_not_returned():
    """l0-python cached on shape + nnz: predict(10*A) after predict(A) gave A's values (D1)."""
    M, _, _ = survey()
    model = SparseCalibrationWeights(M.shape[1], init_weights=2.0, seed=0)
    a = model.predict(M)
    b = model.predict(M * 10)
    torch.testing.assert_close(b, 10 * a, rtol=1e-5, atol=1e-4)
    M2 = M.copy()
    M2.data *= 3  # same object kind, same pattern, mutated values
    torch.testing.assert_close(model.predict(M2), 3 * a, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "convert",
    [
        sp.csr_matrix,
        sp.csr_array,
        sp.coo_array,
        lambda A: A.toarray(),
        lambda A: torch.tensor(A.toarray()),
        lambda A: torch.tensor(A.toarray()).to_sparse(),
    ],
)
def test_every_matrix_type_is_accepted(convert):
    """l0-python raised AttributeError for dense numpy and torch sparse input (D7)."""
    M, y, _ = survey()
    ref = SparseCalibrationWeights(M.shape[1], seed=1).fit(M, y, epochs=5, lr=0.1)
    other = SparseCalibrationWeights(M.shape[1], seed=1).fit(convert(M), y, epochs=5, lr=0.1)
    torch.testing.assert_close(other.log_weight, ref.log_weight)
    torch.testing.assert_close(other.predict(convert(M)), ref.predict(M))


def test_relative_loss_target_minus_one_raises_instead_of_nan():
    """'relative' divides by y + 1: l0-python turned parameters into NaN for y = -1 (D2)."""
    M, y, _ = survey()
    y = y.copy()
    y[3] = -1.0
    model = SparseCalibrationWeights(M.shape[1])
    with pytest.raises(ValueError, match=r"y\[3\] = -1.*relative_epsilon"):
        model.fit(M, y, loss_type="relative", epochs=3)
    model.fit(M, y, loss_type="relative_epsilon", epochs=3)
    assert torch.isfinite(model.log_weight).all() and torch.isfinite(model.log_alpha).all()


def test_unknown_loss_type_raises():
    """l0-python silently used MSE for any unknown loss_type, typos included (D3)."""
    M, y, _ = survey()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        SparseCalibrationWeights(M.shape[1]).fit(M, y, loss_type="relativ", epochs=1)


def _loss_after_zero_epochs(model, M, y, **kw):
    model.fit(M, y, epochs=1, lr=1e-12, log_every=1, **kw)
    return model.history[-1]["data_loss"]


def test_losses_match_numpy_reference():
    """Each loss equals an independent float64 numpy computation on the same gate draw."""
    M, y, _ = survey(m=12, n=40)
    rng = np.random.default_rng(5)
    tw = rng.uniform(0.5, 2.0, 12)
    tol = rng.uniform(0.0, 0.3, 12)
    groups = np.array([0] * 5 + [1] * 4 + [2] * 3)
    for loss_type in ("mse", "relative", "relative_epsilon"):
        model = SparseCalibrationWeights(40, init_weights=3.0, seed=7, log_alpha_jitter_sd=0.3)
        gen_state = model._generator.get_state()
        got = _loss_after_zero_epochs(
            model,
            M,
            y,
            loss_type=loss_type,
            loss_dtype=torch.float64,
            target_groups=groups,
            group_multipliers={1: 2.0},
            target_weights=tw,
            target_tolerances=tol,
            relative_floor=5.0,
        )
        # replay the same gate draw
        probe = SparseCalibrationWeights(40, init_weights=3.0, seed=7, log_alpha_jitter_sd=0.3)
        probe._generator.set_state(gen_state)
        with torch.no_grad():
            w = probe.get_weights().double().numpy()
        yhat = M @ w
        omega = np.array([1 / 5] * 5 + [2 / 4] * 4 + [1 / 3] * 3) * tw
        if loss_type == "mse":
            r = yhat - y
        elif loss_type == "relative":
            r = (yhat - y) / (y + 1)
        else:
            r = (yhat - y) / np.maximum(np.abs(y), 5.0)
        r = np.maximum(np.abs(r) - tol, 0.0)
        ref = np.sum(omega * r**2)
        if loss_type == "relative_epsilon":
            ref /= omega.sum()
        assert got == pytest.approx(ref, rel=1e-9), loss_type


def test_group_errors_keep_l0_python_messages():
    M, y, _ = survey()
    model = SparseCalibrationWeights(M.shape[1])
    with pytest.raises(ValueError, match="group_multipliers requires target_groups"):
        model.fit(M, y, group_multipliers={0: 2.0}, epochs=1)
    with pytest.raises(ValueError, match="group_multipliers key 99 not found in target_groups"):
        model.fit(M, y, target_groups=np.zeros(len(y)), group_multipliers={99: 2.0}, epochs=1)


def test_seed_makes_fit_reproducible_whatever_the_global_rng():
    """l0-python drew gate noise from the global RNG: same seed, different fits (D13)."""
    M, y, _ = survey()
    torch.manual_seed(1)
    a = SparseCalibrationWeights(M.shape[1], seed=3, **PROD).fit(M, y, epochs=30, lr=0.1)
    torch.manual_seed(2)
    b = SparseCalibrationWeights(M.shape[1], seed=3, **PROD).fit(M, y, epochs=30, lr=0.1)
    assert torch.equal(a.log_weight, b.log_weight) and torch.equal(a.log_alpha, b.log_alpha)


def test_seed_none_follows_global_rng():
    M, y, _ = survey()
    torch.manual_seed(0)
    a = SparseCalibrationWeights(M.shape[1]).fit(M, y, epochs=10)
    torch.manual_seed(0)
    b = SparseCalibrationWeights(M.shape[1]).fit(M, y, epochs=10)
    assert torch.equal(a.log_weight, b.log_weight)


def test_jitter_is_applied_once():
    """l0-python re-added the log-weight jitter on every fit call (D14)."""
    M, y, _ = survey()
    model = SparseCalibrationWeights(M.shape[1], log_weight_jitter_sd=0.5, seed=0)
    model.fit(M, y, epochs=0)
    first = model.log_weight.detach().clone()
    assert not torch.equal(first, torch.zeros_like(first) + math.log(1 + 1e-8))
    model.fit(M, y, epochs=0)
    assert torch.equal(model.log_weight.detach(), first)


def test_warm_start_continues_exactly():
    """fit(20) + fit(20, warm_start) == fit(40): Adam state and noise stream carry on (D14)."""
    M, y, _ = survey()
    one = SparseCalibrationWeights(M.shape[1], seed=4, **PROD).fit(M, y, epochs=40, lr=0.1)
    two = SparseCalibrationWeights(M.shape[1], seed=4, **PROD)
    two.fit(M, y, epochs=20, lr=0.1).fit(M, y, epochs=20, lr=0.1, warm_start=True)
    assert torch.equal(one.log_weight, two.log_weight)
    assert torch.equal(one.log_alpha, two.log_alpha)
    assert [r["epoch"] for r in two.history][-1] == 40
    cold = SparseCalibrationWeights(M.shape[1], seed=4, **PROD)
    cold.fit(M, y, epochs=20, lr=0.1).fit(M, y, epochs=20, lr=0.1)
    assert not torch.equal(one.log_weight, cold.log_weight)


def test_fit_state_dict_resumes_exactly_through_a_file(tmp_path):
    """A checkpoint saved mid-fit and loaded with weights_only=True continues bit-for-bit."""
    M, y, _ = survey()
    full = SparseCalibrationWeights(M.shape[1], seed=9, **PROD).fit(M, y, epochs=30, lr=0.1)
    part = SparseCalibrationWeights(M.shape[1], seed=9, **PROD).fit(M, y, epochs=12, lr=0.1)
    torch.save(part.fit_state_dict(), tmp_path / "ckpt.pt")
    resumed = SparseCalibrationWeights(M.shape[1], seed=1234, **PROD)
    resumed.load_fit_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    resumed.fit(M, y, epochs=18, lr=0.1, warm_start=True)
    assert torch.equal(full.log_weight, resumed.log_weight)
    assert torch.equal(full.log_alpha, resumed.log_alpha)
    assert resumed.history == full.history


def test_refit_after_resume_uses_the_fits_loss_settings(tmp_path):
    """A checkpoint carries the loss settings, so refit after a resume matches refit in-process."""
    M, y, _ = survey()
    groups = np.arange(30) % 3
    kw = dict(epochs=40, lr=0.1, loss_type="relative_epsilon", relative_floor=2.0)
    a = SparseCalibrationWeights(M.shape[1], seed=9, **PROD)
    a.fit(M, y, target_groups=groups, group_multipliers={1: 3.0}, **kw)
    torch.save(a.fit_state_dict(), tmp_path / "ckpt.pt")
    b = SparseCalibrationWeights(M.shape[1], **PROD)
    b.load_fit_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert b.lambda_l0_ == a.lambda_l0_
    a.refit(M, y, epochs=20)
    b.refit(M, y, epochs=20)
    assert torch.equal(a.get_weights(deterministic=True), b.get_weights(deterministic=True))


def test_refit_removes_the_gated_bias():
    """Median gates over-predict every target; the refit on the support brings the error to ~0.

    Fails for l0-python, which has no refit (its deterministic predictions stay biased, D10).
    """
    M, y, _ = survey(m=30, n=300)
    model = SparseCalibrationWeights(M.shape[1], seed=0, **PROD)
    model.fit(M, y, lambda_l0=1e-4, lr=0.15, epochs=300, loss_type="relative")
    before = relative_errors(model.predict(M), y)
    support = model.selected().clone()
    signed = (model.predict(M).numpy() - y) / np.abs(y)
    assert (signed > 0).mean() > 0.9  # the bias has one sign
    model.refit(M, y, epochs=300)
    after = relative_errors(model.predict(M), y)
    assert after.mean() < 1e-4 < before.mean()
    assert torch.equal(model.selected(), support)
    w = model.get_weights(deterministic=True)
    mask = torch.zeros(M.shape[1], dtype=torch.bool)
    mask[support] = True
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()
    assert [r["phase"] for r in model.history].count("refit") == 300


@pytest.mark.parametrize("estimator", ["median", "paper", "mean", "hard"])
def test_inference_estimator_is_the_named_gate(estimator):
    model = SparseCalibrationWeights(40, init_weights=2.0, log_alpha_jitter_sd=2.0, seed=0)
    model.inference = estimator
    gate = hc.deterministic_gate(model.log_alpha, model.beta, model.gamma, model.zeta, estimator)
    with torch.no_grad():
        torch.testing.assert_close(model.get_weights(deterministic=True), 2.0 * gate)


def test_target_count_bisection_hits_the_budget():
    """l0-python has no budget mode: lambda_l0 had to be swept by hand (D15)."""
    M, y, _ = survey(m=20, n=200)
    model = SparseCalibrationWeights(M.shape[1], seed=0, **PROD)
    model.fit(M, y, lr=0.15, epochs=150, loss_type="relative", lambda_l0=1e-4, target_count=60)
    count = model.get_active_weights()["count"]
    assert abs(count - 60) <= 6, model.budget_trace
    assert model.lambda_l0_ == pytest.approx(
        min(model.budget_trace, key=lambda r: abs(r["count"] - 60))["lambda_l0"]
    )


def test_float64_loss_keeps_large_targets_exact():
    """float32 turns 2^40 + 1 into 2^40: the residual vanishes (D18); float64 keeps it."""
    M = sp.csr_array(np.array([[2.0**40]]))
    y = np.array([2.0**40 + 1])
    for dtype, expect_zero in ((torch.float32, True), (torch.float64, False)):
        model = SparseCalibrationWeights(1, init_weights=1.0, use_gates=False)
        model.fit(M, y, epochs=1, lr=1e-30, loss_dtype=dtype)
        assert (model.history[-1]["data_loss"] == 0.0) is expect_zero


def test_use_gates_false_reports_no_sparsity_and_leaves_gates():
    """l0-python optimised log_alpha by the penalty alone and reported sparsity 1.0 (D12)."""
    M, y, _ = survey()
    model = SparseCalibrationWeights(M.shape[1], use_gates=False, seed=0)
    before = model.log_alpha.detach().clone()
    model.fit(M, y, epochs=20, lambda_l0=1.0, lr=0.1)
    assert torch.equal(model.log_alpha.detach(), before)
    assert model.get_sparsity() == 0.0


def test_callbacks_see_records_and_can_stop():
    M, y, _ = survey()
    seen = []

    def cb(model, record):
        seen.append(record["epoch"])
        return record["epoch"] >= 7

    model = SparseCalibrationWeights(M.shape[1]).fit(M, y, epochs=50, callbacks=[cb])
    assert seen == list(range(1, 8)) and model.epochs_done == 7
    assert set(model.history[0]) >= {
        "phase",
        "epoch",
        "loss",
        "data_loss",
        "l0_penalty",
        "n_active",
    }


def test_verbose_logs_instead_of_printing(capsys):
    """l0-python printed progress; sparselens logs it."""
    M, y, _ = survey()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger("sparselens.l0.calibration")
    log.addHandler(handler)
    try:
        SparseCalibrationWeights(M.shape[1]).fit(M, y, epochs=4, verbose=True, verbose_freq=2)
    finally:
        log.removeHandler(handler)
    assert capsys.readouterr().out == ""
    assert stream.getvalue().count("fit epoch") == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_features": 0}, "n_features must be an integer >= 1"),
        ({"n_features": 5, "beta": 0.0}, "beta must be a finite number > 0"),
        ({"n_features": 5, "gamma": 0.5}, "gamma must be"),
        ({"n_features": 5, "zeta": 0.9}, "zeta must be"),
        ({"n_features": 5, "init_keep_prob": 1.5}, "init_keep_prob"),
        ({"n_features": 5, "init_keep_prob": np.ones(4) * 0.5}, "must have shape"),
        ({"n_features": 5, "init_weights": np.ones(6)}, "must have shape"),
        ({"n_features": 5, "init_weights": -1.0}, "init_weights"),
        ({"n_features": 5, "log_weight_jitter_sd": -0.1}, "log_weight_jitter_sd"),
        ({"n_features": 5, "inference": "mode"}, "inference must be one of"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparseCalibrationWeights(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, "epochs must be an integer >= 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lambda_l0": float("nan")}, "lambda_l0"),
        ({"target_weights": np.ones(3)}, "target_weights must have shape"),
        ({"target_tolerances": -np.ones(30)}, "target_tolerances must be >= 0"),
        ({"relative_floor": 0.0}, "relative_floor"),
        ({"target_count": 10_000}, "target_count"),
    ],
)
def test_fit_validation(kwargs, match):
    M, y, _ = survey()
    with pytest.raises((ValueError, TypeError), match=match):
        SparseCalibrationWeights(M.shape[1]).fit(M, y, **kwargs)


def test_fit_rejects_bad_data():
    M, y, _ = survey()
    model = SparseCalibrationWeights(M.shape[1])
    with pytest.raises(ValueError, match=r"y must have shape \(30,\)"):
        model.fit(M, y[:-1], epochs=1)
    bad = y.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="y must be finite"):
        model.fit(M, bad, epochs=1)
    with pytest.raises(ValueError, match=r"M must have shape \(n_targets, 300\)"):
        model.fit(M[:, :10], y, epochs=1)
    Mbad = M.copy()
    Mbad.data[0] = np.inf
    with pytest.raises(ValueError, match="M must be finite"):
        model.fit(Mbad, y, epochs=1)


def test_beta_schedule_spans_each_call_and_reaches_its_end():
    """A schedule measured against absolute epochs ran a warm-started call at its end value only."""
    M, y, _ = survey()
    seen: list[float] = []
    sched = Schedule(kind="linear", start=2.0, end=0.5)
    model = SparseCalibrationWeights(M.shape[1], seed=0)
    model.fit(M, y, epochs=4, beta_schedule=sched, callbacks=[lambda m, r: seen.append(m.beta)])
    assert seen == pytest.approx([1.625, 1.25, 0.875, 0.5])
    seen.clear()
    model.fit(
        M,
        y,
        epochs=2,
        beta_schedule=sched,
        warm_start=True,
        callbacks=[lambda m, r: seen.append(m.beta)],
    )
    assert seen == pytest.approx([1.25, 0.5])


def test_refit_rejects_a_zero_floor_instead_of_replacing_it():
    M, y, _ = survey()
    model = SparseCalibrationWeights(M.shape[1], seed=0).fit(M, y, epochs=3)
    with pytest.raises(ValueError, match="relative_floor"):
        model.refit(M, y, epochs=1, relative_floor=0.0, loss_type="relative_epsilon")


def test_relative_loss_warns_for_targets_near_minus_one(caplog):
    """y = -0.9999 gives the 'relative' loss a weight of 1e8 on that target: say so."""
    M, y, _ = survey()
    y = y.copy()
    y[2] = -0.9999
    with caplog.at_level(logging.WARNING, logger="sparselens.l0.calibration"):
        SparseCalibrationWeights(M.shape[1]).fit(M, y, loss_type="relative", epochs=1)
    assert "first y[2]" in caplog.text
