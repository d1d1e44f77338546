"""Rank-1 subcomponents of one weight matrix (Bushnaq et al. 2025, eq. 1; sheet §1).

A decomposed matrix ``W`` (``nn.Linear`` layout ``(d_out, d_in)``) is approximated by ``C`` rank-1
subcomponents ``W ~ (V U)^T`` with ``V`` of shape ``(d_in, C)`` and ``U`` of shape ``(C, d_out)``.
The target's own weight and bias stay frozen; the weight delta ``W - (V U)^T`` is differentiable
in ``U`` and ``V``. With component activations ``h = x V``, a per-component mask ``m`` and the
delta component's scalar mask ``r`` (one per position), the replaced layer computes

    y = (h * m) U + r * x (W - (V U)^T)^T + b  =  (h * (m - r)) U + r * (x W^T) + b

(the right-hand form needs one product with ``W``, which the unreplaced layer computes anyway,
instead of a separate product with the delta). Without the delta component ``r = 0``.

* :class:`LinearComponents`: for ``nn.Linear``, :class:`TransposedLinear` and Hugging Face's
  ``Conv1D`` (weight stored ``(d_in, d_out)``).
* :class:`TiedLinearComponents`: the components of a layer whose weight is the transpose of
  another decomposed layer's (TMS ``linear2``): ``V = U_src^T``, ``U = V_src^T`` -- views of the
  source's parameters, so a tied pair is ONE set of parameters (one Adam state), not two
  storage-sharing Parameters stepped twice (the reference's double learning rate, sheet §13 #6).
* :class:`EmbeddingComponents`: ``V`` is a ``(vocab, C)`` table indexed by token (no one-hot
  product); the implied weight ``V U`` has ``nn.Embedding``'s ``(vocab, d)`` layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparselens.core.checks import check_int


class TransposedLinear(nn.Module):
    """``y = x W_src + b``: the transpose of ``source``'s weight with a bias of its own.

    Used for tied weights (TMS ``linear2 = linear1^T``): the weight is the source's Parameter
    itself, so it is one Parameter with one optimiser state. ``weight`` is the ``nn.Linear``-layout
    view ``source.weight.T`` of shape ``(source.in_features, source.out_features)``.
    """

    def __init__(self, source: nn.Linear, bias: bool = True) -> None:
        super().__init__()
        if not isinstance(source, nn.Linear):
            raise TypeError(f"source must be an nn.Linear, got {type(source).__name__}")
        # a plain list: the source is registered where it lives, not again under this module
        self._source = [source]
        self.in_features = source.out_features
        self.out_features = source.in_features
        w = source.weight
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, dtype=w.dtype, device=w.device))
            if bias
            else None
        )

    @property
    def source(self) -> nn.Linear:
        return self._source[0]

    @property
    def weight(self) -> Tensor:
        return self.source.weight.T

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.source.weight.T, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied"


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a linear layer storing its weight as ``(d_in, d_out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> Tensor:
    """The ``nn.Linear``-layout weight ``(d_out, d_in)`` of a linear-like module."""
    if is_conv1d(module):
        return module.weight.T  # type: ignore[union-attr]
    w = module.weight
    if not isinstance(w, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return w


def module_bias(module: nn.Module) -> Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, Tensor) else None


class Components(nn.Module):
    """Shared interface: ``V``, ``U``, the implied weight and the replaced forward."""

    C: int
    d_in: int
    d_out: int
    V: Tensor
    U: Tensor

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self._target = [target]  # not registered: the target module lives in the target model

    @property
    def target_module(self) -> nn.Module:
        return self._target[0]

    @property
    def target_weight(self) -> Tensor:
        """The frozen target weight in the layout of :meth:`weight`."""
        return linear_weight(self.target_module)

    @property
    def bias(self) -> Tensor | None:
        """The frozen target bias (never decomposed)."""
        return module_bias(self.target_module)

    def weight(self) -> Tensor:
        """The implied weight ``(V U)^T``, shape ``(d_out, d_in)``."""
        return (self.V @ self.U).T

    def weight_delta(self) -> Tensor:
        """``W - (V U)^T``, differentiable in ``U`` and ``V``."""
        return self.target_weight - self.weight()

    def acts(self, x: Tensor) -> Tensor:
        """Component activations ``h = x V``, shape ``(..., C)``."""
        return x @ self.V

    def target_product(self, x: Tensor) -> Tensor:
        """``x W^T`` without the bias (the unreplaced layer's output minus its bias)."""
        return F.linear(x, self.target_weight)

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        delta_mask: Tensor | None = None,
        *,
        acts: Tensor | None = None,
        target_product: Tensor | None = None,
    ) -> Tensor:
        """``(h * (m - r)) U + r (x W^T) + b`` (module docstring); ``r = 0`` without a delta mask.

        ``acts`` / ``target_product`` may pass ``x V`` / ``x W^T`` when already computed.
        """
        h = self.acts(x) if acts is None else acts
        if delta_mask is None:
            out = (h * mask) @ self.U
        else:
            r = delta_mask.unsqueeze(-1)
            y0 = self.target_product(x) if target_product is None else target_product
            out = torch.addcmul((h * (mask - r)) @ self.U, r, y0)
        b = self.bias
        return out if b is None else out + b

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, C={self.C}"


def _check_C(C: int) -> int:
    return check_int("C", C, ge=1)


class LinearComponents(Components):
    """``V (d_in, C)``, ``U (C, d_out)`` for a linear-like target module.

    Initialisation (reference): Kaiming normal with linear gain, ``std(V) = 1/sqrt(d_in)``,
    ``std(U) = 1/sqrt(C)``.
    """

    def __init__(self, target: nn.Module, C: int) -> None:
        super().__init__(target)
        self.C = _check_C(C)
        w = linear_weight(target)
        self.d_out, self.d_in = w.shape
        kw = {"dtype": w.dtype, "device": w.device}
        self.V = nn.Parameter(torch.randn(self.d_in, self.C, **kw) / math.sqrt(self.d_in))
        self.U = nn.Parameter(torch.randn(self.C, self.d_out, **kw) / math.sqrt(self.C))


class TiedLinearComponents(Components):
    """Components of ``target`` whose weight is the transpose of ``source``'s target weight.

    ``V = source.U^T``, ``U = source.V^T``: ``(V U)^T = ((V_s U_s)^T)^T``. No parameters of its own.
    """

    def __init__(self, target: nn.Module, source: LinearComponents) -> None:
        super().__init__(target)
        if not isinstance(source, LinearComponents):
            raise TypeError(f"source must be LinearComponents, got {type(source).__name__}")
        w = linear_weight(target)
        if tuple(w.shape) != (source.d_in, source.d_out):
            raise ValueError(
                f"tied_to: weight of shape {tuple(w.shape)} is not the transpose of the source's "
                f"{(source.d_out, source.d_in)}"
            )
        self._source = [source]
        self.C = source.C
        self.d_out, self.d_in = w.shape

    @property
    def source(self) -> LinearComponents:
        return self._source[0]

    @property
    def V(self) -> Tensor:
        return self.source.U.T

    @property
    def U(self) -> Tensor:
        return self.source.V.T


class EmbeddingComponents(Components):
    """``V (vocab, C)`` indexed by token id, ``U (C, d)``; implied weight ``V U`` (vocab, d).

    Initialisation: ``V ~ N(0, 1)``, ``U ~ N(0, 1/C)``, so ``V U`` has unit-variance entries like
    ``nn.Embedding``'s default.
    """

    def __init__(self, target: nn.Embedding, C: int) -> None:
        super().__init__(target)
        if not isinstance(target, nn.Embedding):
            raise TypeError(f"target must be an nn.Embedding, got {type(target).__name__}")
        self.C = _check_C(C)
        w = target.weight
        self.d_in, self.d_out = w.shape  # vocab, d
        kw = {"dtype": w.dtype, "device": w.device}
        self.V = nn.Parameter(torch.randn(self.d_in, self.C, **kw))
        self.U = nn.Parameter(torch.randn(self.C, self.d_out, **kw) / math.sqrt(self.C))

    @property
    def target_weight(self) -> Tensor:
        return self.target_module.weight  # type: ignore[return-value]

    @property
    def bias(self) -> Tensor | None:
        return None

    def weight(self) -> Tensor:
        """The implied embedding table ``V U``, shape ``(vocab, d)``."""
        return self.V @ self.U

    def acts(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.V)

    def target_product(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.target_weight)


def make_components(target: nn.Module, C: int) -> Components:
    """The components class for ``target``'s type (Linear, TransposedLinear, Conv1D, Embedding)."""
    if isinstance(target, nn.Embedding):
        return EmbeddingComponents(target, C)
    if isinstance(target, nn.Linear | TransposedLinear) or is_conv1d(target):
        return LinearComponents(target, C)
    raise TypeError(
        f"cannot decompose a {type(target).__name__}: supported module types are nn.Linear, "
        "nn.Embedding, TransposedLinear and Hugging Face Conv1D"
    )


__all__ = [
    "Components",
    "EmbeddingComponents",
    "LinearComponents",
    "TiedLinearComponents",
    "TransposedLinear",
    "is_conv1d",
    "linear_weight",
    "make_components",
]
