"""The fused C++ kernels of the one-hidden-layer ``mlp`` CI function (spd/ci_kernels.py).

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

from sparselens.spd import ci_kernels
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
    z = ci_kernels.one_hidden_mlp(*leaves)
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
            z = ci_kernels.one_hidden_mlp(h, *params)
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
    with torch.no_grad():
        torch.testing.assert_close(fn(None, acts), eager.detach(), rtol=1e-5, atol=1e-6)


def test_kernels_decline_other_dtypes_and_failed_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """float64 inputs and a failed build return None: MLPCI then runs its fallback, same values."""
    C, H = 3, 4
    w = [p.to(F64) for p in _params(C, H, 0)]
    assert ci_kernels.one_hidden_mlp(torch.randn(5, C, dtype=F64), *w) is None
    monkeypatch.setattr(ci_kernels._Build, "forward", None)
    monkeypatch.setattr(ci_kernels._Build, "failed", True)
    assert ci_kernels.one_hidden_mlp(torch.randn(5, C), *_params(C, H, 0)) is None
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
        ci_kernels.one_hidden_mlp(torch.randn(5, 3), *(torch.randn(s) for s in shapes))
