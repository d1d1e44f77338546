"""Stable softmax, log-softmax and entropy of tempered logits, for numpy arrays and torch tensors.

Temperature scales the *logits*: ``q = softmax(z / tau)``, computed as
``z/tau - logsumexp(z/tau)`` after subtracting the row maximum. The post-softmax power form
``softmax(z) ** (1/tau)`` is never used: it is unnormalised and cannot recover tail mass that
underflowed to 0 (z = [0, -800], tau = 10: the tail is 1.8e-35, the power form gives 0).

Rows may hold ``-inf`` (masked tokens, probability 0); a row with NaN, ``+inf`` or only ``-inf``
raises ``ValueError`` naming the row. Entropy uses ``0 log 0 = 0``.
"""

from __future__ import annotations

import math
from typing import TypeVar, overload

import numpy as np
import torch
from torch import Tensor

from sparselens.core.checks import check_choice, check_number

Array = TypeVar("Array", np.ndarray, Tensor)

_LOG2 = math.log(2.0)


def check_logits(logits: np.ndarray | Tensor, name: str = "logits") -> None:
    """Raise if any row (last axis) holds NaN or +inf, or is entirely -inf."""
    if isinstance(logits, Tensor):
        x = logits.detach()
        if x.dim() == 0:
            raise ValueError(f"{name} must have at least 1 dimension (the vocabulary)")
        bad = torch.isnan(x) | (x == math.inf)
        dead = (x == -math.inf).all(dim=-1)
        if bool(bad.any()):
            row = int(bad.reshape(-1, x.shape[-1]).any(dim=-1).nonzero()[0])
            raise ValueError(f"{name} row {row} contains NaN or +inf")
        if bool(dead.any()):
            row = int(dead.reshape(-1).nonzero()[0])
            raise ValueError(f"{name} row {row} is all -inf: no token can be drawn")
        return
    x = np.asarray(logits)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension (the vocabulary)")
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    bad = np.isnan(x) | (x == np.inf)
    if bad.any():
        row = int(np.flatnonzero(bad.reshape(-1, x.shape[-1]).any(axis=-1))[0])
        raise ValueError(f"{name} row {row} contains NaN or +inf")
    dead = (x == -np.inf).all(axis=-1)
    if np.any(dead):
        row = int(np.flatnonzero(np.reshape(dead, -1))[0])
        raise ValueError(f"{name} row {row} is all -inf: no token can be drawn")


def _check_tau(tau: float) -> float:
    return check_number("tau", tau, gt=0.0)


@overload
def log_softmax(logits: np.ndarray, tau: float = 1.0) -> np.ndarray: ...
@overload
def log_softmax(logits: Tensor, tau: float = 1.0) -> Tensor: ...
def log_softmax(logits: np.ndarray | Tensor, tau: float = 1.0) -> np.ndarray | Tensor:
    """``log softmax(z / tau)`` over the last axis, stable (max subtracted, log-sum-exp)."""
    tau = _check_tau(tau)
    check_logits(logits)
    if isinstance(logits, Tensor):
        z = logits if logits.is_floating_point() else logits.double()
        z = (z - z.amax(dim=-1, keepdim=True)) / tau  # max first: z / tau may overflow
        return z - torch.logsumexp(z, dim=-1, keepdim=True)
    z = np.asarray(logits, dtype=np.float64 if np.asarray(logits).dtype.kind in "iu" else None)
    with np.errstate(over="ignore"):  # max first: z / tau may overflow; (z - max) / tau -> -inf
        z = (z - z.max(axis=-1, keepdims=True)) / tau
    with np.errstate(under="ignore"):
        lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z - lse


@overload
def softmax(logits: np.ndarray, tau: float = 1.0) -> np.ndarray: ...
@overload
def softmax(logits: Tensor, tau: float = 1.0) -> Tensor: ...
def softmax(logits: np.ndarray | Tensor, tau: float = 1.0) -> np.ndarray | Tensor:
    """``softmax(z / tau)`` over the last axis, from :func:`log_softmax` (exact zeros at -inf)."""
    lp = log_softmax(logits, tau)
    if isinstance(lp, Tensor):
        return lp.exp()
    with np.errstate(under="ignore"):
        return np.exp(lp)


@overload
def entropy(logits: np.ndarray, tau: float = 1.0, unit: str = "bits") -> np.ndarray: ...
@overload
def entropy(logits: Tensor, tau: float = 1.0, unit: str = "bits") -> Tensor: ...
def entropy(
    logits: np.ndarray | Tensor, tau: float = 1.0, unit: str = "bits"
) -> np.ndarray | Tensor:
    """Shannon entropy of ``softmax(z / tau)`` per row, in ``"bits"`` or ``"nats"``.

    ``H = -sum_i q_i log q_i`` with ``0 log 0 = 0`` (masked ``-inf`` entries contribute 0).
    """
    check_choice("unit", unit, ("bits", "nats"))
    lp = log_softmax(logits, tau)
    scale = 1.0 / _LOG2 if unit == "bits" else 1.0
    if isinstance(lp, Tensor):
        q = lp.exp()
        terms = torch.where(q > 0, q * lp, torch.zeros_like(lp))
        return 0.0 - terms.sum(dim=-1) * scale
    with np.errstate(under="ignore", invalid="ignore"):
        q = np.exp(lp)
        terms = np.where(q > 0, q * lp, 0.0)
    return 0.0 - terms.sum(axis=-1) * scale


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy (nats) from raw logits ``(..., V)`` and targets ``(...)``."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return torch.nn.functional.cross_entropy(
        x.reshape(-1, x.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
    )
