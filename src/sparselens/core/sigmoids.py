"""Leaky hard sigmoids of Stochastic Parameter Decomposition's causal importances.

Bushnaq et al. (2025), arXiv 2506.20790, and the reference ``spd`` main (sheet §3). A CI function
outputs pre-sigmoid logits ``z``; two bounded versions are taken from them:

* :func:`lower_leaky` (masks, CI-L0, CI-masked reconstruction): forward exactly ``clamp(z, 0, 1)``;
  backward passes the gradient where ``0 < z <= 1``, nothing where ``z > 1``, and where ``z <= 0``
  ``0.01 * grad`` only when ``grad < 0`` -- i.e. only when gradient descent would *raise* ``z``,
  so a CI stuck below 0 can revive while nothing pushes it further down.
* :func:`upper_leaky` (importance-minimality penalty): ``1 + 0.01 (z - 1)`` above 1, else
  ``clamp(z, 0, 1)``; plain autograd, never negative, and it keeps a gradient above 1 so that the
  penalty still pulls an over-confident CI back.

The spd-paper branch instead used an honest ``0.01 z`` forward below 0 (slightly negative masks);
main's clamped forward with a one-sided straight-through leak is the one implemented here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

LEAK = 0.01
"""Slope of the leaks (reference ``spd``)."""


class _LowerLeaky(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        inside = (z > 0) & (z <= 1)
        revive = (z <= 0) & (grad < 0)
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(inside, grad, torch.where(revive, LEAK * grad, zero))


def lower_leaky(z: Tensor) -> Tensor:
    """``clamp(z, 0, 1)`` with the one-sided leaky backward described in the module docstring."""
    return _LowerLeaky.apply(z)


def upper_leaky(z: Tensor) -> Tensor:
    """``1 + 0.01 (z - 1)`` for ``z > 1``, else ``clamp(z, 0, 1)`` (autograd)."""
    return torch.where(z > 1, 1.0 + LEAK * (z - 1.0), z.clamp(0.0, 1.0))


__all__ = ["LEAK", "lower_leaky", "upper_leaky"]
