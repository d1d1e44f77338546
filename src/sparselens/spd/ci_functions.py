"""Causal-importance functions: per position, how much each subcomponent may be ablated.

Bushnaq et al. (2025), §2.2 and sheet §2. A CI function maps a layer's input (or its component
activations) to pre-sigmoid logits ``z`` of shape ``(..., C)``; :class:`CIOutput` carries the two
leaky hard sigmoids of :mod:`sparselens.core.sigmoids` (``lower`` for masks, ``upper`` for the
importance-minimality penalty) and ``z`` itself.

* ``mlp``: C independent tiny MLPs ``1 -> h... -> 1``, each on its own component activation
  ``h_c = x . V_c``; run as batched products over the component axis (no Python loop over C).
* ``vector_mlp``: C independent MLPs ``d_in -> h... -> 1`` on the layer input; the first layer is
  one ``(d_in, C*h)`` matrix product.
* ``shared_mlp``: one MLP ``d_in -> h... -> C`` on the layer input.

Every hidden layer is followed by GELU (erf form). Initialisation (reference): hidden layers
Kaiming normal with ReLU gain (``std = sqrt(2 / fan_in)``), the last layer linear gain
(``std = 1 / sqrt(fan_in)``), biases zero.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparselens.core.checks import check_choice, check_int
from sparselens.core.sigmoids import lower_leaky, upper_leaky
from sparselens.spd import kernels

logger = logging.getLogger(__name__)

CIKind = Literal["mlp", "vector_mlp", "shared_mlp"]
CI_KINDS: tuple[str, ...] = ("mlp", "vector_mlp", "shared_mlp")


class CIOutput(NamedTuple):
    """Causal importances of one layer, each of shape ``(..., C)``."""

    lower: Tensor
    """``lower_leaky(z)`` in [0, 1]: masks, CI-L0, CI-masked reconstruction."""
    upper: Tensor
    """``upper_leaky(z)`` >= 0: the importance-minimality penalty."""
    pre_sigmoid: Tensor
    """The logits ``z``."""


def ci_output(z: Tensor) -> CIOutput:
    """Both leaky sigmoids of the logits ``z`` (one fused pass on CPU in fp32)."""
    fused = kernels.leaky_sigmoids(z)
    if fused is not None:
        return CIOutput(fused[0], fused[1], z)
    return CIOutput(lower_leaky(z), upper_leaky(z), z)


def _normal(shape: tuple[int, ...], fan_in: int, gain: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * (gain / math.sqrt(fan_in)))


_RELU_GAIN = math.sqrt(2.0)


class _OneHiddenMLP(torch.autograd.Function):
    """``z_c = w2_c . gelu(h_c w1_c + b1_c) + b2_c`` for every component c, fused.

    Runs in a component-major ``(C, N, H)`` layout so that the output and every weight gradient
    is one batched matrix product, and the backward applies ``gelu'`` in one pass
    (``aten.gelu_backward``); autograd on the broadcast form needs about twice the passes over
    the ``(N, C, H)`` hidden tensor (sheet §12: the CI MLP dominates a TMS step).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        lead = h.shape[:-1]
        ht = h.reshape(-1, h.shape[-1]).T.contiguous()  # (C, N)
        a = torch.addcmul(b1.unsqueeze(1), ht.unsqueeze(-1), w1.unsqueeze(1))  # (C, N, H)
        g = F.gelu(a)
        z = torch.bmm(g, w2.unsqueeze(-1)).squeeze(-1)  # (C, N)
        ctx.save_for_backward(ht, a, g, w1, w2)
        ctx.lead = lead
        return (z.T + b2).reshape(*lead, -1)

    @staticmethod
    def backward(ctx: Any, dz: Tensor) -> tuple[Tensor, ...]:
        ht, a, g, w1, w2 = ctx.saved_tensors
        dzt = dz.reshape(-1, dz.shape[-1]).T.contiguous()  # (C, N)
        dw2 = torch.bmm(dzt.unsqueeze(1), g).squeeze(1)
        da = torch.ops.aten.gelu_backward(dzt.unsqueeze(-1) * w2.unsqueeze(1), a)
        db1 = da.sum(1)
        dw1 = torch.bmm(ht.unsqueeze(1), da).squeeze(1)
        dh = torch.bmm(da, w1.unsqueeze(-1)).squeeze(-1).T.reshape(*ctx.lead, -1)
        return dh, dw1, db1, dw2, dzt.sum(1)


def _one_hidden_broadcast(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The one-hidden-layer ``mlp`` CI function in a component-major layout, for torch.compile."""
    lead = h.shape[:-1]
    ht = h.reshape(-1, h.shape[-1]).T  # (C, N)
    a = torch.addcmul(b1.unsqueeze(1), ht.unsqueeze(-1), w1.unsqueeze(1))  # (C, N, H)
    z = (F.gelu(a) * w2.unsqueeze(1)).sum(-1)
    return (z.T + b2).reshape(*lead, -1)


class _Compiled:
    """``torch.compile`` of :func:`_one_hidden_broadcast`, built on first use; if compiling fails
    (e.g. no C++ compiler for inductor) it logs once and the eager fused path is used instead."""

    fn: Any = None
    failed = False

    @classmethod
    def run(cls, *args: Tensor) -> Tensor | None:
        if cls.failed:
            return None
        try:
            if cls.fn is None:
                cls.fn = torch.compile(_one_hidden_broadcast, dynamic=False)
            return cls.fn(*args)
        except Exception as e:  # any inductor/dynamo failure: fall back, never fail the run
            cls.failed = True
            logger.warning("torch.compile of the CI function failed (%s); running eager", e)
            return None


class MLPCI(nn.Module):
    """``mlp``: C independent MLPs ``1 -> hidden... -> 1`` on the component activations."""

    uses_component_acts = True

    def __init__(self, C: int, hidden: list[int]) -> None:
        super().__init__()
        self.C = C
        self.compiled = False
        """A one-hidden-layer MLP runs compiled code: on CPU in fp32 the fused C++ kernels of
        :mod:`~sparselens.spd.kernels` (built once per machine, a few seconds), elsewhere
        torch.compile for training passes (grad enabled; eval passes stay eager, no recompiles);
        either falls back to the eager fused op if it cannot build."""
        widths = [1, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(widths):
            self.weights.append(_normal((C, a, b), a, _RELU_GAIN))
            self.biases.append(nn.Parameter(torch.zeros(C, b)))
        last = widths[-1]
        self.w_out = _normal((C, last), last, 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, x: Tensor, acts: Tensor) -> Tensor:
        if len(self.weights) == 1 and acts.numel():
            args = (acts, self.weights[0][:, 0, :], self.biases[0], self.w_out, self.b_out)
            if self.compiled:
                out = kernels.one_hidden_mlp(*args)
                if out is None and torch.is_grad_enabled():
                    out = _Compiled.run(*args)
                if out is not None:
                    return out
            return _OneHiddenMLP.apply(*args)
        return self.reference_forward(acts)

    def reference_forward(self, acts: Tensor) -> Tensor:
        """The same function by plain autograd on the broadcast form (any depth)."""
        h = acts.unsqueeze(-1)  # (..., C, 1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i == 0:
                h = torch.addcmul(b, h, w[:, 0, :])  # (..., C, h1): a 1-wide input is a product
            else:
                h = torch.einsum("...ci,cij->...cj", h, w) + b
            h = F.gelu(h)
        return (h * self.w_out).sum(-1) + self.b_out


class VectorMLPCI(nn.Module):
    """``vector_mlp``: C independent MLPs ``d_in -> hidden... -> 1`` on the layer input."""

    uses_component_acts = False

    def __init__(self, d_in: int, C: int, hidden: list[int]) -> None:
        super().__init__()
        self.C = C
        h0 = hidden[0]
        self.w_in = _normal((d_in, C * h0), d_in, _RELU_GAIN)
        self.b_in = nn.Parameter(torch.zeros(C, h0))
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in itertools.pairwise(hidden):
            self.weights.append(_normal((C, a, b), a, _RELU_GAIN))
            self.biases.append(nn.Parameter(torch.zeros(C, b)))
        last = hidden[-1]
        self.w_out = _normal((C, last), last, 1.0)
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, x: Tensor, acts: Tensor | None = None) -> Tensor:
        h = (x @ self.w_in).unflatten(-1, (self.C, -1)) + self.b_in
        h = F.gelu(h)
        for w, b in zip(self.weights, self.biases, strict=True):
            h = F.gelu(torch.einsum("...ci,cij->...cj", h, w) + b)
        return (h * self.w_out).sum(-1) + self.b_out


class SharedMLPCI(nn.Module):
    """``shared_mlp``: one MLP ``d_in -> hidden... -> C`` on the layer input."""

    uses_component_acts = False

    def __init__(self, d_in: int, C: int, hidden: list[int]) -> None:
        super().__init__()
        self.C = C
        widths = [d_in, *hidden]
        self.layers = nn.ModuleList()
        for a, b in itertools.pairwise(widths):
            lin = nn.Linear(a, b)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(b, a) * (_RELU_GAIN / math.sqrt(a)))
                lin.bias.zero_()
            self.layers.append(lin)
        self.out = nn.Linear(widths[-1], C)
        with torch.no_grad():
            self.out.weight.copy_(torch.randn(C, widths[-1]) / math.sqrt(widths[-1]))
            self.out.bias.zero_()

    def forward(self, x: Tensor, acts: Tensor | None = None) -> Tensor:
        h = x
        for layer in self.layers:
            h = F.gelu(layer(h))
        return self.out(h)


def make_ci_function(kind: str, d_in: int | None, C: int, hidden: list[int]) -> nn.Module:
    """A CI function of ``kind`` for a layer with input width ``d_in`` and ``C`` components.

    ``forward(x, acts)`` takes the layer input ``x`` and its component activations ``acts``
    (``x V``) and returns the logits ``z`` (``(..., C)``). ``d_in`` may be None only for ``mlp``
    (embedding layers, whose input is a token id).
    """
    kind = check_choice("ci_fn", kind, CI_KINDS)
    C = check_int("C", C, ge=1)
    hidden = [check_int("ci_hidden", h, ge=1) for h in hidden]
    if kind == "mlp":
        return MLPCI(C, hidden)
    if d_in is None:
        raise ValueError(
            f"ci_fn {kind!r} needs a layer input vector; embedding layers support only 'mlp'"
        )
    if not hidden:
        raise ValueError(f"ci_hidden must list at least one width for ci_fn {kind!r}")
    if kind == "vector_mlp":
        return VectorMLPCI(d_in, C, hidden)
    return SharedMLPCI(d_in, C, hidden)


__all__ = [
    "CI_KINDS",
    "MLPCI",
    "CIOutput",
    "SharedMLPCI",
    "VectorMLPCI",
    "ci_output",
    "make_ci_function",
]
