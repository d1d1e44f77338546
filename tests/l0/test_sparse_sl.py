"""SparseL0Linear: l0-python contract and the fixes (each docstring names the defect it catches)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sparselens.core import hard_concrete as hc
from sparselens.l0.sparse import SparseL0Linear


def regression(n: int = 400, p: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = sp.random_array((n, p), density=0.3, rng=rng, format="csr")
    coef = np.zeros(p)
    support = rng.choice(p, 8, replace=False)
    coef[support] = rng.normal(0, 3, 8)
    y = X @ coef + 0.01 * rng.normal(size=n) + 1.5
    return X, y, set(support.tolist())


def test_init_bit_for_bit_and_state_dict_names():
    model = SparseL0Linear(20, init_keep_prob=0.3, seed=5)
    g = torch.Generator().manual_seed(5)
    expected = torch.log(torch.tensor(0.3) / (1 - torch.tensor(0.3))) + 0.01 * torch.randn(
        20, generator=g
    )
    torch.testing.assert_close(model.log_alpha.data, expected, rtol=0, atol=1e-6)
    assert list(model.state_dict()) == ["weight", "bias", "log_alpha"]
    assert list(SparseL0Linear(3, fit_intercept=False).state_dict()) == ["weight", "log_alpha"]


def test_recovers_sparse_support():
    X, y, support = regression()
    model = SparseL0Linear(60, seed=0).fit(X, y, lambda_reg=0.02, lr=0.05, epochs=500)
    chosen = set(model.get_selected_features().tolist())
    assert len(chosen & support) >= 7 and len(chosen - support) <= 4
    resid = y - model.predict(X).numpy()
    assert np.sqrt(np.mean(resid**2)) < 0.5 * np.std(y)


def test_deterministic_forward_is_x_times_gated_weight_plus_bias():
    X, _, _ = regression()
    model = SparseL0Linear(60, seed=0)
    with torch.no_grad():
        model.weight.normal_()
        model.bias.fill_(0.7)
    gate = hc.median(model.log_alpha, model.beta, model.gamma, model.zeta)
    expected = X.toarray() @ (model.weight * gate).detach().numpy() + 0.7
    np.testing.assert_allclose(model.predict(X).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_scipy_sparse_arrays_and_dense_inputs_are_accepted():
    """l0-python raised TypeError for scipy sparse *arrays* (csr_array) and dense input (D7)."""
    X, _, _ = regression()
    model = SparseL0Linear(60, seed=0)
    ref = model.predict(sp.csr_matrix(X))
    for M in (sp.csr_array(X), X.toarray(), torch.tensor(X.toarray()), sp.coo_array(X)):
        torch.testing.assert_close(model.predict(M), ref)


def test_cache_does_not_return_stale_matrix():
    """l0-python keyed its cache on shape + nnz, so predict(2*X) returned predict(X) (D1)."""
    X, _, _ = regression()
    model = SparseL0Linear(60, fit_intercept=False, seed=0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    a = model.predict(X)
    torch.testing.assert_close(model.predict(X * 2), 2 * a)
    assert model._cached_X_torch is not None and model._cached_X_torch.is_sparse


def test_seed_makes_fit_reproducible():
    """l0-python drew gate noise and the weight init from the global RNG (D13)."""
    X, y, _ = regression()
    torch.manual_seed(0)
    a = SparseL0Linear(60, seed=2).fit(X, y, epochs=30)
    torch.manual_seed(99)
    b = SparseL0Linear(60, seed=2).fit(X, y, epochs=30)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.log_alpha, b.log_alpha)


def test_warm_start_continues_instead_of_reinitialising():
    """l0-python re-initialised the weights on every fit call (D14)."""
    X, y, _ = regression()
    one = SparseL0Linear(60, seed=2).fit(X, y, epochs=40, lr=0.05)
    two = SparseL0Linear(60, seed=2).fit(X, y, epochs=25, lr=0.05)
    two.fit(X, y, epochs=15, lr=0.05, warm_start=True)
    assert torch.equal(one.weight, two.weight)


def test_validation_messages():
    X, y, _ = regression()
    with pytest.raises(ValueError, match="n_features must be an integer >= 1"):
        SparseL0Linear(0)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        SparseL0Linear(5, beta=-1.0)
    model = SparseL0Linear(60)
    with pytest.raises(ValueError, match=r"y must have shape \(400,\)"):
        model.fit(X, y[:10])
    with pytest.raises(ValueError, match=r"X must have shape \(n_samples, 60\)"):
        model.predict(X[:, :5])
    with pytest.raises(ValueError, match="lambda_reg"):
        model.fit(X, y, lambda_reg=-1.0)


def test_warm_start_takes_the_new_learning_rate():
    X, y, _ = regression()
    model = SparseL0Linear(60, seed=0).fit(X, y, lr=0.01, epochs=2)
    model.fit(X, y, lr=0.5, epochs=1, warm_start=True)
    assert model._optimizer is not None
    assert model._optimizer.param_groups[0]["lr"] == 0.5
