"""Layers whose weights or channels are gated by Hard Concrete gates (drop-in for ``l0.layers``).

Louizos et al. (2018), sec. 4: the weights are ``W * z`` with ``z`` one Hard Concrete gate per
weight (unstructured) or per filter/channel (structured), and the L0 penalty is the expected number
of non-zero gates, ``sum P(z != 0)`` (eq. 12). One gate draw per forward call is shared by the whole
batch, as in l0-python. Parameter names, initialisation order (so the same seed gives the same
weights) and ``state_dict`` keys match l0-python 0.6.2.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparselens.core.checks import check_int, check_number
from sparselens.l0.distributions import HardConcrete

logger = logging.getLogger(__name__)

IntPair = int | tuple[int, int]


def _pair(name: str, value: Any, ge: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``ge``, as a pair."""
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (check_int(name, value[0], ge=ge), check_int(name, value[1], ge=ge))
    v = check_int(name, value, ge=ge)
    return (v, v)


def _check_sparsity(init_sparsity: float) -> float:
    return check_number("init_sparsity", init_sparsity, ge=0.0, le=1.0)


class _GatedWeightMethods:
    """Penalty and sparsity methods shared by L0Linear and L0Conv2d (gates in ``_gates``)."""

    weight: nn.Parameter
    use_l2: bool

    @property
    def _gates(self) -> HardConcrete:
        return self.weight_gates  # type: ignore[attr-defined,no-any-return]

    def get_l0_penalty(self) -> Tensor:
        """Expected number of non-zero gates, ``sum P(z != 0)`` (eq. 12)."""
        return self._gates.get_penalty()

    def get_l2_penalty(self) -> Tensor:
        """``sum W^2`` of the ungated weights if ``use_l2``, else a 0-d zero tensor."""
        if not self.use_l2:
            return torch.tensor(0.0, device=self.weight.device)
        return (self.weight**2).sum()

    def get_sparsity(self) -> float:
        """Expected fraction of zero gates, 1 - mean P(z != 0)."""
        return self._gates.get_sparsity()


class L0Linear(_GatedWeightMethods, nn.Module):
    """``y = x (W * z)^T + b`` with one gate per weight.

    Args:
        in_features, out_features: sizes (>= 1).
        bias: add a (never gated) bias, initialised to zero.
        temperature: gate temperature ``beta`` > 0.
        init_sparsity: in [0, 1]; the gates start with ``init_mean = 1 - init_sparsity`` (clamped
            to ``[1e-6, 1 - 1e-6]``, see :func:`~sparselens.l0.distributions.init_logit`).
        use_l2: whether :meth:`get_l2_penalty` returns ``sum W^2`` (else 0).

    ``weight`` is Kaiming-normal (``fan_out``) initialised; ``weight_gates`` is a
    ``HardConcrete(out_features, in_features)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        temperature: float = 0.5,
        init_sparsity: float = 0.5,
        use_l2: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, ge=1)
        self.out_features = check_int("out_features", out_features, ge=1)
        _check_sparsity(init_sparsity)
        self.use_l2 = use_l2
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.weight_gates = HardConcrete(
            out_features, in_features, temperature=temperature, init_mean=1.0 - init_sparsity
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal weights (``fan_out``), zero bias; the gates are left as they are."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have shape (..., {self.in_features}), got {tuple(input.shape)}"
            )
        return F.linear(input, self.weight * self.weight_gates(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class L0Conv2d(_GatedWeightMethods, nn.Module):
    """2-D convolution with gated weights.

    ``structured=False``: ``weight_gates = HardConcrete(out_channels, in_channels * kh * kw)``,
    one gate per weight, reshaped to the weight shape. ``structured=True``: ``channel_gates =
    HardConcrete(out_channels)`` scales whole output filters; the bias is not gated (as in
    l0-python). No dilation or groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        bias: bool = True,
        temperature: float = 0.5,
        init_sparsity: float = 0.5,
        structured: bool = False,
        use_l2: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, ge=1)
        self.out_channels = check_int("out_channels", out_channels, ge=1)
        self.kernel_size = _pair("kernel_size", kernel_size, ge=1)
        _pair("stride", stride, ge=1)
        _pair("padding", padding, ge=0)
        _check_sparsity(init_sparsity)
        self.stride = stride
        self.padding = padding
        self.structured = structured
        self.use_l2 = use_l2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        init_mean = 1.0 - init_sparsity
        if structured:
            self.channel_gates = HardConcrete(
                out_channels, temperature=temperature, init_mean=init_mean
            )
        else:
            self.weight_gates = HardConcrete(
                out_channels,
                in_channels * self.kernel_size[0] * self.kernel_size[1],
                temperature=temperature,
                init_mean=init_mean,
            )
        self.reset_parameters()

    @property
    def _gates(self) -> HardConcrete:
        return self.channel_gates if self.structured else self.weight_gates

    def reset_parameters(self) -> None:
        """Kaiming-normal weights (``fan_out``), zero bias."""
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() not in (3, 4) or input.shape[-3] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, H, W), got {tuple(input.shape)}"
            )
        if self.structured:
            gates = self.channel_gates().view(-1, 1, 1, 1)
        else:
            gates = self.weight_gates().view(self.weight.shape)
        return F.conv2d(input, self.weight * gates, self.bias, self.stride, self.padding)


class L0DepthwiseConv2d(nn.Module):
    """Depthwise convolution (``groups = in_channels``) whose *input* channels are gated.

    ``channel_gates = HardConcrete(in_channels)`` multiplies the input before
    ``depthwise_conv`` (an ``nn.Conv2d``); a closed channel's output is just its bias.
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        bias: bool = True,
        temperature: float = 0.5,
        init_sparsity: float = 0.5,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, ge=1)
        self.kernel_size = _pair("kernel_size", kernel_size, ge=1)
        _pair("stride", stride, ge=1)
        _pair("padding", padding, ge=0)
        _check_sparsity(init_sparsity)
        self.stride = stride
        self.padding = padding
        self.depthwise_conv = nn.Conv2d(
            in_channels,
            in_channels,
            kernel_size=self.kernel_size,
            stride=stride,
            padding=padding,
            groups=in_channels,
            bias=bias,
        )
        self.channel_gates = HardConcrete(
            in_channels, temperature=temperature, init_mean=1.0 - init_sparsity
        )

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4 or input.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, H, W), got {tuple(input.shape)}"
            )
        gates = self.channel_gates().view(1, -1, 1, 1)
        return self.depthwise_conv(input * gates)

    def get_l0_penalty(self) -> Tensor:
        """Expected number of open input channels, eq. 12."""
        return self.channel_gates.get_penalty()

    def get_sparsity(self) -> float:
        """Expected fraction of closed channels, 1 - mean P(z != 0)."""
        return self.channel_gates.get_sparsity()


class SparseMLP(nn.Module):
    """Three :class:`L0Linear` layers ``fc1, fc2, fc3`` with ReLU; the input is flattened."""

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dim: int = 256,
        output_dim: int = 10,
        init_sparsity: float = 0.5,
        temperature: float = 0.5,
        use_l2: bool = False,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {
            "init_sparsity": init_sparsity,
            "temperature": temperature,
            "use_l2": use_l2,
        }
        self.fc1 = L0Linear(input_dim, hidden_dim, **kw)
        self.fc2 = L0Linear(hidden_dim, hidden_dim, **kw)
        self.fc3 = L0Linear(hidden_dim, output_dim, **kw)
        self.use_l2 = use_l2

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def get_l0_loss(self) -> Tensor:
        """Sum of the L0 penalties of every L0 layer (expected number of non-zero weights)."""
        loss = torch.tensor(0.0)
        for module in self.modules():
            if isinstance(module, L0Linear | L0Conv2d | L0DepthwiseConv2d):
                loss = loss + module.get_l0_penalty()
        return loss

    def get_l2_loss(self) -> Tensor:
        """Sum of the layers' ``get_l2_penalty`` if ``use_l2``, else 0."""
        loss = torch.tensor(0.0)
        if not self.use_l2:
            return loss
        for module in self.modules():
            if hasattr(module, "get_l2_penalty"):
                loss = loss + module.get_l2_penalty()
        return loss

    def get_sparsity_stats(self) -> dict[str, dict[str, Any]]:
        """``{name: {"sparsity": 1 - mean P, "active_params": sum P}}`` per L0 layer."""
        return {
            name: {
                "sparsity": module.get_sparsity(),
                "active_params": module.get_l0_penalty().item(),
            }
            for name, module in self.named_modules()
            if hasattr(module, "get_sparsity") and hasattr(module, "get_l0_penalty")
        }


def _gate_target(module: nn.Module) -> tuple[str, Tensor] | None:
    """The weight a module's gates act on: ``weight``, else ``depthwise_conv.weight``."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        return "weight", weight
    conv = getattr(module, "depthwise_conv", None)
    if isinstance(conv, nn.Conv2d):
        return "depthwise_conv.weight", conv.weight
    return None


def _channel_mask(module: nn.Module, keep: Tensor, name: str, weight: Tensor) -> Tensor:
    """Broadcast a per-channel keep mask onto ``weight``.

    For a depthwise convolution the gates scale *input* channels; output filter ``j`` of a grouped
    conv with ``groups = in_channels`` reads input channel ``j // (out / in)``, so the mask is
    repeated accordingly. Otherwise the gates act on dimension 0 (output filters).
    """
    conv = getattr(module, "depthwise_conv", None)
    if name == "depthwise_conv.weight" and isinstance(conv, nn.Conv2d):
        if keep.numel() != conv.in_channels or conv.groups != conv.in_channels:
            raise ValueError(
                f"channel_gates of {type(module).__name__} must have {conv.in_channels} entries "
                f"(one per input channel of a depthwise conv), got {keep.numel()}"
            )
        keep = keep.repeat_interleave(conv.out_channels // conv.in_channels)
    if keep.numel() != weight.shape[0]:
        raise ValueError(
            f"channel_gates of {type(module).__name__} must have {weight.shape[0]} entries to "
            f"mask {name} of shape {tuple(weight.shape)}, got {keep.numel()}"
        )
    return keep.view(-1, *([1] * (weight.dim() - 1)))


def prune_model(model: nn.Module, threshold: float = 0.05) -> nn.Module:
    """Zero, in place, the weights whose gate has P(z != 0) <= ``threshold``; return ``model``.

    Puts the model in eval mode. Modules with ``weight_gates`` have the matching entries of
    ``weight`` zeroed (gate and weight must have the same number of entries). Modules with
    ``channel_gates`` have whole filters zeroed: output filters of ``weight`` (structured
    :class:`L0Conv2d`), or, for :class:`L0DepthwiseConv2d` whose gates scale input channels, the
    ``depthwise_conv`` filters reading a pruned channel (their output becomes the bias, exactly
    what a closed gate gives). l0-python raised ``AttributeError`` there (its defect D5). The
    gates stay in the model. Modules with gates but no weight are skipped.
    """
    check_number("threshold", threshold, ge=0.0, le=1.0)
    model.eval()
    with torch.no_grad():
        for module in model.modules():
            for attr in ("weight_gates", "channel_gates"):
                gates = getattr(module, attr, None)
                if gates is None or not hasattr(gates, "get_active_prob"):
                    continue
                target = _gate_target(module)
                if target is None:
                    logger.debug("prune_model: %s has %s but no weight", type(module), attr)
                    continue
                name, weight = target
                keep = (gates.get_active_prob() > threshold).to(weight.dtype)
                if attr == "weight_gates":
                    if keep.numel() != weight.numel():
                        raise ValueError(
                            f"weight_gates of {type(module).__name__} must have "
                            f"{weight.numel()} entries to mask {name}, got {keep.numel()}"
                        )
                    mask = keep.reshape(weight.shape)
                else:
                    mask = _channel_mask(module, keep, name, weight)
                weight.mul_(mask)
    return model
