"""Tests of sparselens.l0.layers: l0-python's state_dict names and init/forward numerics (its
formulas written out inline), the L0 penalty against a numpy closed form, pruning (incl. the D5
fix) and argument validation (incl. D6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparselens.l0.distributions import HardConcrete
from sparselens.l0.layers import L0Conv2d, L0DepthwiseConv2d, L0Linear, SparseMLP, prune_model


def upstream_sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """l0-python HardConcrete._sample_gates with stretch 0.1, on the global RNG."""
    gamma, zeta = -0.1, 1.1
    a = logits.clamp(-20.0, 20.0)
    u = torch.zeros_like(a).uniform_(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / temperature)
    return torch.clamp(s * (zeta - gamma) + gamma, 0, 1)


def upstream_eval(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    a = logits.clamp(-20.0, 20.0)
    return torch.clamp(torch.sigmoid(a / temperature) * 1.2 - 0.1, 0, 1)


def randomize_logits(module: nn.Module, seed: int = 0, scale: float = 3.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("qz_logits"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


# -- state_dict names (hard-coded from l0-python 0.6.2) ----------------------------------------


@pytest.mark.parametrize(
    ("factory", "keys"),
    [
        (lambda: L0Linear(4, 3), ["weight", "bias", "weight_gates.qz_logits"]),
        (lambda: L0Linear(4, 3, bias=False), ["weight", "weight_gates.qz_logits"]),
        (lambda: L0Conv2d(3, 5, 3), ["weight", "bias", "weight_gates.qz_logits"]),
        (lambda: L0Conv2d(3, 5, 3, structured=True), ["weight", "bias", "channel_gates.qz_logits"]),
        (
            lambda: L0DepthwiseConv2d(4, 3),
            ["depthwise_conv.weight", "depthwise_conv.bias", "channel_gates.qz_logits"],
        ),
        (
            lambda: SparseMLP(8, 6, 2),
            [
                f"{fc}.{k}"
                for fc in ("fc1", "fc2", "fc3")
                for k in ("weight", "bias", "weight_gates.qz_logits")
            ],
        ),
    ],
)
def test_state_dict_keys_match_upstream(factory, keys: list[str]) -> None:  # type: ignore[no-untyped-def]
    module = factory()
    assert list(module.state_dict()) == keys
    module.load_state_dict({k: v.clone() for k, v in module.state_dict().items()})


def test_shapes_and_attributes() -> None:
    lin = L0Linear(10, 5, init_sparsity=0.8)
    assert (lin.in_features, lin.out_features, lin.use_l2) == (10, 5, False)
    assert lin.weight.shape == (5, 10) and lin.weight_gates.gate_size == (5, 10)
    assert lin.weight_gates.init_mean == pytest.approx(0.2)
    conv = L0Conv2d(3, 16, 3, stride=2, padding=1)
    assert conv.kernel_size == (3, 3) and conv.weight.shape == (16, 3, 3, 3)
    assert conv.weight_gates.gate_size == (16, 27) and (conv.stride, conv.padding) == (2, 1)
    assert L0Conv2d(3, 4, (2, 5), structured=True).channel_gates.gate_size == (4,)
    dw = L0DepthwiseConv2d(8, 3)
    assert dw.depthwise_conv.groups == 8 and dw.channel_gates.gate_size == (8,)
    assert not hasattr(dw, "weight")
    assert "in_features=10, out_features=5, bias=True" == lin.extra_repr()


# -- numerics identical to l0-python --------------------------------------------------------------


def test_init_bit_exact() -> None:
    torch.manual_seed(11)
    lin = L0Linear(7, 4, init_sparsity=0.3)
    torch.manual_seed(11)
    w = torch.empty(4, 7)
    nn.init.kaiming_normal_(w, mode="fan_out")
    assert torch.equal(lin.weight.data, w) and torch.equal(lin.bias.data, torch.zeros(4))
    assert torch.equal(lin.weight_gates.qz_logits.data, torch.full((4, 7), math.log(0.7 / 0.3)))
    torch.manual_seed(5)
    dw = L0DepthwiseConv2d(6, 3)
    torch.manual_seed(5)
    ref = nn.Conv2d(6, 6, (3, 3), groups=6)
    assert torch.equal(dw.depthwise_conv.weight, ref.weight)
    assert torch.equal(dw.depthwise_conv.bias, ref.bias)


def test_linear_forward_bit_exact() -> None:
    lin = L0Linear(6, 4, temperature=0.4)
    randomize_logits(lin)
    x = torch.randn(5, 6)
    torch.manual_seed(3)
    out = lin(x)
    torch.manual_seed(3)
    gates = upstream_sample(lin.weight_gates.qz_logits, 0.4)
    assert torch.equal(out, F.linear(x, lin.weight * gates, lin.bias))
    lin.eval()
    expected = F.linear(x, lin.weight * upstream_eval(lin.weight_gates.qz_logits, 0.4), lin.bias)
    assert torch.equal(lin(x), expected)


@pytest.mark.parametrize("structured", [False, True])
def test_conv_forward_bit_exact(structured: bool) -> None:
    conv = L0Conv2d(3, 5, 3, padding=1, structured=structured)
    randomize_logits(conv, seed=1)
    x = torch.randn(2, 3, 6, 6)
    gates_module = conv.channel_gates if structured else conv.weight_gates
    torch.manual_seed(9)
    out = conv(x)
    torch.manual_seed(9)
    g = upstream_sample(gates_module.qz_logits, 0.5)
    g = g.view(-1, 1, 1, 1) if structured else g.view(conv.weight.shape)
    expected = F.conv2d(x, conv.weight * g, conv.bias, 1, 1)
    assert torch.equal(out, expected) and out.shape == (2, 5, 6, 6)


def test_depthwise_forward_gates_inputs() -> None:
    dw = L0DepthwiseConv2d(4, 3).eval()
    randomize_logits(dw, seed=2)
    x = torch.randn(2, 4, 7, 7)
    g = upstream_eval(dw.channel_gates.qz_logits, 0.5).view(1, -1, 1, 1)
    assert torch.equal(dw(x), dw.depthwise_conv(x * g))


def test_l0_penalty_closed_form_numpy() -> None:
    lin = L0Linear(9, 3, temperature=0.25)
    randomize_logits(lin)
    a = lin.weight_gates.qz_logits.detach().double().numpy()
    expected = (1 / (1 + np.exp(-(a - 0.25 * np.log(0.1 / 1.1))))).sum()
    assert lin.get_l0_penalty().item() == pytest.approx(expected, rel=1e-6)
    assert lin.get_sparsity() == pytest.approx(1 - expected / a.size, rel=1e-6)


def test_l2_penalty() -> None:
    lin = L0Linear(5, 3)
    assert lin.get_l2_penalty().item() == 0.0
    lin = L0Linear(5, 3, use_l2=True)
    assert torch.equal(lin.get_l2_penalty(), (lin.weight**2).sum())
    conv = L0Conv2d(2, 3, 2, use_l2=True)
    assert torch.equal(conv.get_l2_penalty(), (conv.weight**2).sum())


def test_sparse_mlp_losses_and_stats() -> None:
    mlp = SparseMLP(12, 8, 3, use_l2=True)
    expected = torch.tensor(0.0)
    for fc in (mlp.fc1, mlp.fc2, mlp.fc3):
        expected = expected + fc.get_l0_penalty()
    assert torch.equal(mlp.get_l0_loss(), expected)
    l2 = sum((fc.weight**2).sum() for fc in (mlp.fc1, mlp.fc2, mlp.fc3))
    assert mlp.get_l2_loss().detach().item() == pytest.approx(float(l2.detach()), rel=1e-6)
    assert SparseMLP(12, 8, 3).get_l2_loss().item() == 0.0
    stats = mlp.get_sparsity_stats()
    assert list(stats) == ["fc1", "fc2", "fc3"]
    assert stats["fc2"]["active_params"] == pytest.approx(mlp.fc2.get_l0_penalty().item())
    assert mlp(torch.randn(4, 3, 4)).shape == (4, 3)  # input is flattened


# -- prune_model ----------------------------------------------------------------------------------


def test_prune_model_linear_zeroes_low_probability_weights() -> None:
    mlp = SparseMLP(10, 6, 2)
    randomize_logits(mlp, scale=4.0)
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    mlp.train()
    assert prune_model(mlp, threshold=0.3) is mlp and not mlp.training
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(mlp, name)
        keep = layer.weight_gates.get_active_prob() > 0.3
        assert 0 < int(keep.sum()) < keep.numel()
        assert torch.equal(layer.weight[~keep], torch.zeros(int((~keep).sum())))
        assert torch.equal(layer.weight[keep], before[f"{name}.weight"][keep])
        assert torch.equal(layer.bias, before[f"{name}.bias"])


def test_prune_structured_conv_zeroes_whole_filters() -> None:
    conv = L0Conv2d(2, 6, 3, structured=True)
    with torch.no_grad():
        conv.channel_gates.qz_logits.copy_(torch.tensor([5.0, -9.0, 5.0, -9.0, 5.0, 5.0]))
    prune_model(conv)
    norms = conv.weight.detach().flatten(1).abs().sum(1)
    assert (norms[[1, 3]] == 0).all() and (norms[[0, 2, 4, 5]] > 0).all()


def test_prune_depthwise_conv_d5() -> None:
    """D5: l0-python's prune_model raised AttributeError on L0DepthwiseConv2d (no ``.weight``,
    and its mask shape (1, C, 1, 1) did not fit). Its gates scale *input* channels, so the
    depthwise filters of pruned channels are zeroed; the eval output does not change."""
    dw = L0DepthwiseConv2d(5, 3, padding=1)
    with torch.no_grad():
        dw.channel_gates.qz_logits.copy_(torch.tensor([4.0, -8.0, 4.0, 4.0, -8.0]))
    x = torch.randn(2, 5, 6, 6)
    dw.eval()
    before = dw(x).detach()
    bias = dw.depthwise_conv.bias.detach().clone()
    prune_model(dw, threshold=0.05)
    w = dw.depthwise_conv.weight.detach()
    assert w.shape == (5, 1, 3, 3)
    assert (w[[1, 4]] == 0).all() and (w[[0, 2, 3]] != 0).all()
    assert torch.equal(dw.depthwise_conv.bias, bias)
    assert torch.allclose(dw(x), before, atol=1e-6)


def test_prune_depthwise_with_channel_multiplier() -> None:
    """Input channel c of a grouped conv with multiplier m feeds output filters c*m .. c*m+m-1."""
    dw = L0DepthwiseConv2d(3, 1)
    dw.depthwise_conv = nn.Conv2d(3, 6, 1, groups=3)
    with torch.no_grad():
        dw.channel_gates.qz_logits.copy_(torch.tensor([5.0, -9.0, 5.0]))
    prune_model(dw)
    zero = (dw.depthwise_conv.weight.detach().flatten(1) == 0).all(1)
    assert zero.tolist() == [False, False, True, True, False, False]


def test_prune_generic_channel_gated_module() -> None:
    class GatedRows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 4))
            self.channel_gates = HardConcrete(3)

    m = GatedRows()
    with torch.no_grad():
        m.channel_gates.qz_logits.copy_(torch.tensor([5.0, -9.0, 5.0]))
    prune_model(m)
    assert m.weight[1].abs().sum() == 0 and m.weight[[0, 2]].abs().sum() == 8


# -- validation (incl. D6) ------------------------------------------------------------------------


@pytest.mark.parametrize("init_sparsity", [0.0, 1.0])
def test_init_sparsity_bounds_d6(init_sparsity: float) -> None:
    """D6: l0-python raised ZeroDivisionError for init_sparsity=0 (init_mean 1) and a math
    domain error for 1; the initial mean is clamped into [1e-6, 1 - 1e-6]."""
    lin = L0Linear(4, 3, init_sparsity=init_sparsity)
    conv = L0Conv2d(2, 3, 2, init_sparsity=init_sparsity, structured=True)
    dw = L0DepthwiseConv2d(3, 2, init_sparsity=init_sparsity)
    for layer in (lin, conv, dw):
        penalty = layer.get_l0_penalty()
        assert penalty.shape == () and torch.isfinite(penalty)
        assert 0.0 <= layer.get_sparsity() <= 1.0
    assert (lin.get_l0_penalty().item() > 11.9) == (init_sparsity == 0.0)


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: L0Linear(0, 3), "in_features"),
        (lambda: L0Linear(3, -1), "out_features"),
        (lambda: L0Linear(3, 2, init_sparsity=1.5), "init_sparsity"),
        (lambda: L0Linear(3, 2, init_sparsity=float("nan")), "init_sparsity"),
        (lambda: L0Linear(3, 2, temperature=0.0), "temperature"),
        (lambda: L0Conv2d(3, 2, 0), "kernel_size"),
        (lambda: L0Conv2d(3, 2, (3, 3, 3)), "kernel_size"),
        (lambda: L0Conv2d(3, 2, 3, stride=0), "stride"),
        (lambda: L0Conv2d(3, 2, 3, padding=-1), "padding"),
        (lambda: L0Conv2d(0, 2, 3), "in_channels"),
        (lambda: L0DepthwiseConv2d(0, 3), "in_channels"),
        (lambda: L0DepthwiseConv2d(3, 3, temperature=-1.0), "temperature"),
        (lambda: SparseMLP(hidden_dim=0), "in_features|out_features"),
        (lambda: prune_model(L0Linear(2, 2), threshold=2.0), "threshold"),
    ],
)
def test_invalid_arguments(factory, name: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=name):
        factory()


def test_wrong_input_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="must have shape"):
        L0Linear(4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="must have shape"):
        L0Conv2d(3, 2, 3)(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="must have shape"):
        L0DepthwiseConv2d(3, 3)(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="must have shape"):
        SparseMLP(10, 4, 2)(torch.randn(2, 11))
