"""Rank-1 subcomponents and the replaced forward (sheet §1), against explicit references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from sparselens.spd.components import (
    EmbeddingComponents,
    LinearComponents,
    TiedLinearComponents,
    TransposedLinear,
    is_conv1d,
    linear_weight,
    make_components,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(d_in: int, d_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(F64).requires_grad_(False)


def _explicit_linear(
    x: Tensor, V: Tensor, U: Tensor, W: Tensor, b: Tensor | None, m: Tensor, r: Tensor | None
) -> Tensor:
    """``(h * m) U + r * x (W - (V U)^T)^T + b`` with the delta formed explicitly."""
    h = x @ V
    out = (h * m) @ U
    if r is not None:
        delta = W - (V @ U).T  # (d_out, d_in)
        out = out + r.unsqueeze(-1) * (x @ delta.T)
    return out if b is None else out + b


class Conv1D(nn.Module):
    """Minimal stand-in for Hugging Face's ``Conv1D``: weight ``(nx, nf)``, ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=F64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


@settings(max_examples=15, deadline=None)
@given(
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    C=st.integers(1, 7),
    lead=st.sampled_from([(5,), (3, 4), (2, 2, 3)]),
    bias=st.booleans(),
    with_delta=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_forward_equals_explicit_delta_form(d_in, d_out, C, lead, bias, with_delta, seed):
    """The code's rearranged ``(h (m - r)) U + r x W^T + b`` equals the explicit delta form.

    Catches a delta term with the wrong sign / orientation (``W^T - VU``) and a missing bias."""
    comp = LinearComponents(_linear(d_in, d_out, bias, seed), C)
    g = _gen(seed)
    x = torch.randn((*lead, d_in), generator=g, dtype=F64)
    m = torch.rand((*lead, C), generator=g, dtype=F64)
    r = torch.rand(lead, generator=g, dtype=F64) if with_delta else None
    got = comp(x, m, r)
    W, b = comp.target_module.weight, comp.target_module.bias
    want = _explicit_linear(x, comp.V, comp.U, W, b, m, r)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the pre-computed acts / target product give the same result
    again = comp(x, m, r, acts=x @ comp.V, target_product=x @ W.T)
    torch.testing.assert_close(again, want, rtol=1e-12, atol=1e-12)


def test_masks_one_and_delta_one_give_the_target_layer_exactly() -> None:
    """m = 1, r = 1: the components and the delta sum to W, whatever U and V are."""
    lin = _linear(4, 3)
    comp = LinearComponents(lin, 6)
    x = torch.randn(7, 4, generator=_gen(1), dtype=F64)
    out = comp(x, torch.ones(7, 6, dtype=F64), torch.ones(7, dtype=F64))
    torch.testing.assert_close(out, lin(x), rtol=1e-13, atol=1e-13)
    # and without the delta, m = 1 is the implied weight (V U)^T plus the bias
    no_delta = comp(x, torch.ones(7, 6, dtype=F64))
    torch.testing.assert_close(no_delta, x @ comp.weight().T + lin.bias, rtol=1e-13, atol=1e-13)


def test_gradients_equal_explicit_form() -> None:
    """Gradients into U, V, the masks and the delta mask equal those of the explicit form.

    Catches a delta term computed from a detached ``VU`` (no gradient through ``W - (VU)^T``)
    and the rearranged form dropping the ``- r`` inside ``h (m - r)``."""
    comp = LinearComponents(_linear(5, 4, seed=3), 6)
    g = _gen(3)
    x = torch.randn(3, 2, 5, generator=g, dtype=F64)
    m = torch.rand(3, 2, 6, generator=g, dtype=F64, requires_grad=True)
    r = torch.rand(3, 2, generator=g, dtype=F64, requires_grad=True)
    up = torch.randn(3, 2, 4, generator=g, dtype=F64)
    leaves = [comp.V, comp.U, m, r]
    got = torch.autograd.grad((comp(x, m, r) * up).sum(), leaves)
    W, b = comp.target_module.weight, comp.target_module.bias
    want = torch.autograd.grad((_explicit_linear(x, comp.V, comp.U, W, b, m, r) * up).sum(), leaves)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # the delta alone has a gradient in U and V (W - (VU)^T is differentiable)
    gv, gu = torch.autograd.grad(comp.weight_delta().square().sum(), [comp.V, comp.U])
    assert gv.abs().sum() > 0 and gu.abs().sum() > 0


def test_weight_and_weight_delta() -> None:
    lin = _linear(5, 3)
    comp = LinearComponents(lin, 4)
    V, U = comp.V.detach(), comp.U.detach()
    want = torch.zeros(3, 5, dtype=F64)
    for c in range(4):  # sum of rank-1 outer products u_c v_c^T
        want += torch.outer(U[c], V[:, c])
    torch.testing.assert_close(comp.weight().detach(), want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(comp.weight_delta().detach(), lin.weight - want, rtol=0, atol=1e-13)
    assert comp.target_weight is lin.weight and comp.bias is lin.bias
    assert (comp.d_in, comp.d_out, comp.C) == (5, 3, 4)
    assert comp.V.dtype == F64 and comp.U.dtype == F64  # follows the target


def test_parameters_are_only_U_and_V() -> None:
    """The target is not registered under the components (it lives in the target model)."""
    comp = LinearComponents(_linear(4, 3), 2)
    assert sorted(n for n, _ in comp.named_parameters()) == ["U", "V"]


def test_init_std() -> None:
    """Kaiming normal with linear gain: std(V) = 1/sqrt(d_in), std(U) = 1/sqrt(C)."""
    torch.manual_seed(0)
    comp = LinearComponents(nn.Linear(400, 300), 200)
    # 80k / 60k samples: the std estimate has relative s.e. ~ 1/sqrt(2n) < 0.3%; 5% is generous
    assert float(comp.V.detach().std()) == pytest.approx(1 / math.sqrt(400), rel=0.05)
    assert float(comp.U.detach().std()) == pytest.approx(1 / math.sqrt(200), rel=0.05)


def test_transposed_linear() -> None:
    src = _linear(5, 2, bias=False)
    t = TransposedLinear(src)
    with torch.no_grad():
        t.bias.copy_(torch.arange(5, dtype=F64))
    x = torch.randn(3, 2, generator=_gen(0), dtype=F64)
    torch.testing.assert_close(t(x), x @ src.weight + t.bias, rtol=1e-13, atol=1e-13)
    assert t.weight.shape == (5, 2) and torch.equal(t.weight, src.weight.T)
    assert (t.in_features, t.out_features) == (2, 5)
    assert [n for n, _ in t.named_parameters()] == ["bias"]  # the source is not re-registered
    assert TransposedLinear(src, bias=False).bias is None
    assert torch.equal(linear_weight(t), src.weight.T)
    with pytest.raises(TypeError, match=r"source must be an nn\.Linear, got Conv2d"):
        TransposedLinear(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]


def test_tied_components_are_views_of_the_source() -> None:
    """``V = U_src^T``, ``U = V_src^T``: the same storage, no parameters of its own."""
    lin1 = _linear(5, 2, bias=False)
    lin2 = TransposedLinear(lin1).to(F64)
    src = LinearComponents(lin1, 7)
    tied = TiedLinearComponents(lin2, src)
    assert list(tied.parameters()) == []
    assert tied.V.data_ptr() == src.U.data_ptr() and tied.U.data_ptr() == src.V.data_ptr()
    assert torch.equal(tied.V, src.U.T) and torch.equal(tied.U, src.V.T)
    torch.testing.assert_close(tied.weight(), src.weight().T, rtol=0, atol=0)
    assert (tied.d_in, tied.d_out, tied.C) == (2, 5, 7)
    # its replaced forward is the explicit one with the transposed weight and its own bias
    g = _gen(2)
    x = torch.randn(4, 2, generator=g, dtype=F64)
    m = torch.rand(4, 7, generator=g, dtype=F64)
    r = torch.rand(4, generator=g, dtype=F64)
    want = _explicit_linear(x, src.U.T, src.V.T, lin1.weight.T, lin2.bias, m, r)
    torch.testing.assert_close(tied(x, m, r), want, rtol=1e-12, atol=1e-12)
    # gradients of the tied layer land on the source's parameters
    tied(x, m, r).sum().backward()
    assert src.U.grad is not None and src.V.grad is not None


def test_tied_errors() -> None:
    lin1 = _linear(5, 2, bias=False)
    src = LinearComponents(lin1, 3)
    with pytest.raises(ValueError, match="tied_to"):
        TiedLinearComponents(_linear(5, 2), src)  # same shape, not the transpose
    with pytest.raises(TypeError, match="source must be LinearComponents"):
        TiedLinearComponents(
            TransposedLinear(lin1), TiedLinearComponents(TransposedLinear(lin1), src)
        )  # type: ignore[arg-type]


def _explicit_embedding(
    tok: Tensor, V: Tensor, U: Tensor, W: Tensor, m: Tensor, r: Tensor | None
) -> Tensor:
    """The one-hot product ``(onehot V * m) U + r * onehot (W - V U)``."""
    onehot = F.one_hot(tok, V.shape[0]).to(V.dtype)
    out = ((onehot @ V) * m) @ U
    if r is not None:
        out = out + r.unsqueeze(-1) * (onehot @ (W - V @ U))
    return out


@pytest.mark.parametrize("with_delta", [False, True])
def test_embedding_equals_one_hot_product(with_delta: bool) -> None:
    """Indexing ``V`` equals the one-hot matrix product; no bias; gradients agree too."""
    torch.manual_seed(0)
    emb = nn.Embedding(11, 4).to(F64).requires_grad_(False)
    comp = EmbeddingComponents(emb, 5)
    g = _gen(5)
    tok = torch.randint(0, 11, (3, 6), generator=g)
    m = torch.rand(3, 6, 5, generator=g, dtype=F64, requires_grad=True)
    r = torch.rand(3, 6, generator=g, dtype=F64, requires_grad=True) if with_delta else None
    up = torch.randn(3, 6, 4, generator=g, dtype=F64)
    got = comp(tok, m, r)
    want = _explicit_embedding(tok, comp.V, comp.U, emb.weight, m, r)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [comp.V, comp.U, m] + ([r] if r is not None else [])
    ga = torch.autograd.grad((got * up).sum(), leaves)
    ge = torch.autograd.grad((want * up).sum(), leaves)
    for a, e in zip(ga, ge, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert comp.bias is None
    assert comp.weight().shape == (11, 4)
    torch.testing.assert_close(comp.weight(), comp.V @ comp.U, rtol=0, atol=0)
    torch.testing.assert_close(comp.weight_delta(), emb.weight - comp.V @ comp.U, rtol=0, atol=0)
    assert (comp.d_in, comp.d_out) == (11, 4)
    # m = 1, r = 1: exactly the target embedding
    if with_delta:
        one = comp(tok, torch.ones(3, 6, 5, dtype=F64), torch.ones(3, 6, dtype=F64))
        torch.testing.assert_close(one, emb(tok), rtol=1e-13, atol=1e-13)


def test_conv1d_uses_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(nf=3, nx=5).requires_grad_(False)
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(2, 2))
    comp = make_components(conv, 4)
    assert isinstance(comp, LinearComponents) and (comp.d_in, comp.d_out) == (5, 3)
    assert torch.equal(comp.target_weight, conv.weight.T)
    x = torch.randn(6, 5, generator=_gen(0), dtype=F64)
    out = comp(x, torch.ones(6, 4, dtype=F64), torch.ones(6, dtype=F64))
    torch.testing.assert_close(out, conv(x), rtol=1e-13, atol=1e-13)


def test_make_components_dispatch_and_errors() -> None:
    assert isinstance(make_components(nn.Linear(3, 2), 2), LinearComponents)
    assert isinstance(make_components(nn.Embedding(5, 2), 2), EmbeddingComponents)
    assert isinstance(make_components(TransposedLinear(nn.Linear(3, 2)), 2), LinearComponents)
    with pytest.raises(TypeError, match=r"cannot decompose a Conv2d") as e:
        make_components(nn.Conv2d(2, 2, 1), 3)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="LayerNorm"):
        make_components(nn.LayerNorm(3), 3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=r"^C must be an integer >= 1, got") as e:
            make_components(nn.Linear(3, 2), bad)
        with pytest.raises(ValueError, match=r"^C must be an integer >= 1"):
            make_components(nn.Embedding(3, 2), bad)
    with pytest.raises(TypeError, match=r"^C must be an integer"):
        make_components(nn.Linear(3, 2), 2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"target must be an nn\.Embedding"):
        EmbeddingComponents(nn.Linear(3, 2), 2)  # type: ignore[arg-type]
