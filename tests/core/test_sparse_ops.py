"""CSR operator: products and their backward against a dense reference, for every input type."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.core.sparse_ops import SparseOperator, fingerprint, to_csr


def _random(m: int, n: int, density: float, seed: int) -> sp.csr_array:
    rng = np.random.default_rng(seed)
    return sp.random_array((m, n), density=density, rng=rng, format="csr")


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 40),
    k=st.sampled_from([None, 1, 3]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    backend=st.sampled_from(["scipy", "torch"]),
)
def test_product_and_backward_match_dense(m, n, k, density, seed, backend):
    """y = M x and dx = M^T dy equal the dense float64 computation (both backends)."""
    A = _random(m, n, density, seed)
    op = SparseOperator(A, dtype=torch.float64, backend=backend)
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if k is None else (n, k)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = op @ x
    dense = torch.as_tensor(A.toarray())
    torch.testing.assert_close(y, dense @ x.detach(), rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    torch.testing.assert_close(x.grad, dense.T @ gy, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    """The custom backward is the true derivative (finite differences)."""
    op = SparseOperator(_random(7, 9, 0.4, 1), dtype=torch.float64)
    x = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: op @ v, (x,))


def test_every_input_type_gives_the_same_matrix():
    """scipy matrices and arrays (any format), dense numpy/torch and torch sparse all agree."""
    A = _random(6, 8, 0.5, 3)
    dense = A.toarray()
    inputs = [
        A,
        sp.csr_matrix(A),
        sp.coo_matrix(A),
        sp.csc_array(A),
        dense,
        torch.tensor(dense),
        torch.tensor(dense).to_sparse(),
        torch.tensor(dense).to_sparse_csr(),
    ]
    ref = fingerprint(to_csr(A))
    for M in inputs:
        assert fingerprint(to_csr(M)) == ref, type(M)


def test_fingerprint_sees_values_not_just_shape_and_nnz():
    """Catches l0-python's cache key (shape + nnz): 10*A has the same pattern, other values."""
    A = _random(5, 5, 0.6, 2)
    assert fingerprint(to_csr(A)) != fingerprint(to_csr(A * 10))


@pytest.mark.parametrize(
    ("M", "match"),
    [
        (np.zeros((2, 2, 2)), "must be 2-D"),
        (np.array([[1.0, np.nan]]), "must be finite"),
        (np.array([["a", "b"]]), "real numbers"),
        ("matrix.npz", "must be a scipy sparse"),
    ],
)
def test_bad_matrices_raise_one_line(M, match):
    with pytest.raises((ValueError, TypeError), match=match):
        to_csr(M)


def test_wrong_vector_shape_names_the_expected_shape():
    op = SparseOperator(_random(3, 4, 0.5, 0))
    with pytest.raises(ValueError, match=r"x must have shape \(4,\)"):
        op @ torch.ones(5)


def test_float32_backward_keeps_input_dtype():
    """Gradients come back in the dtype of x even when the operator computes in float64."""
    op = SparseOperator(_random(3, 4, 0.5, 0), dtype=torch.float64)
    x = torch.ones(4, requires_grad=True)
    (op @ x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
