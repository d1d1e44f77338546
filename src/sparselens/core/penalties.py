"""Sparsity penalties: expected L0, L_p importance minimality, smooth-L0, frequency minimality.

``ci`` is a tensor of shape ``(..., C)``: every leading dimension indexes a token/position, the
last one the component. Every penalty on ``ci`` is finalised from per-component *global* means

    f_c = (sum over tokens of all ranks of v(ci)) / (token count of all ranks)

where the per-component sums and the local token count go through one autograd-aware
:func:`~sparselens.core.distributed.global_sum` *before* any nonlinearity. The value is therefore
the one for the concatenated all-rank batch (no Jensen bias from a local log), and under DDP the
optimiser sees the gradient of that global value. On a single process this is the plain mean.
:func:`component_means` and :func:`frequency_term` are the two building blocks.

Sums are formed in float32 for half-precision input (float32/float64 keep their dtype); the result
has that compute dtype. ``ci`` is checked to be finite (one host sync per call).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparselens.core import hard_concrete
from sparselens.core.checks import check_finite, check_number
from sparselens.core.distributed import global_sum, is_distributed

_LN2 = math.log(2.0)
_SMOOTH_L0_RATIO_BOUND = 1e15
"""|ci| / gamma is clamped here before squaring so float32 never overflows (phi is 1 - 1e-30)."""


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _check_ci(ci: Tensor, name: str = "ci", finite_check: bool = True) -> Tensor:
    """Validate ``ci`` and return it in the compute dtype. ``finite_check=False`` skips the NaN /
    inf scan, the one check that reads the tensor on the host (a training loop that checks its
    accumulated losses instead keeps its steps free of host synchronisation)."""
    if not isinstance(ci, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ci).__name__}")
    if not ci.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {ci.dtype}")
    if ci.dim() < 1 or ci.shape[-1] < 1:
        raise ValueError(
            f"{name} must have shape (..., C) with C >= 1 components, got {tuple(ci.shape)}"
        )
    if ci.numel() == 0 and not is_distributed():
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(ci.shape)}")
    if finite_check:
        check_finite(name, ci)
    return ci.to(_compute_dtype(ci))


def component_means(values: Tensor) -> Tensor:
    """Global per-component mean over tokens of ``values`` (shape ``(..., C)``), shape ``(C,)``.

    The per-component sums and the local token count are reduced across ranks in one
    autograd-aware all-reduce, then divided once: ``f_c = sum_r S_rc / sum_r N_r``. A 1-D input is
    one token. With no token on any rank the mean is defined as 0. No argument checks (callers
    validate); the sums and the count travel in ``values``'s dtype (the count is exact up to 2^24
    tokens per global batch in float32).
    """
    c = values.shape[-1]
    flat = values.reshape(-1, c)
    sums = flat.sum(dim=0)
    packed = torch.cat([sums, sums.new_full((1,), float(flat.shape[0]))])
    packed = global_sum(packed)
    return packed[:c] / packed[c].detach().clamp_min(1.0)


def frequency_term(means: Tensor, reference_token_count: float) -> Tensor:
    """``sum_c f_c log2(1 + a' f_c)`` for per-component global means ``f`` and ``a'`` > 0.

    The finalisation of param-decomp PR #543's ``FrequencyMinimalityLoss``; ``f = 0`` gives 0.
    """
    a = check_number("reference_token_count", reference_token_count, gt=0.0)
    return (means * torch.log1p(a * means)).sum() / _LN2


def expected_l0(
    log_alpha: Tensor,
    beta: float,
    gamma: float = hard_concrete.DEFAULT_GAMMA,
    zeta: float = hard_concrete.DEFAULT_ZETA,
) -> Tensor:
    """Expected number of non-zero Hard Concrete gates, ``sum P(z != 0)``.

    Louizos, Welling & Kingma (2018), eq. 12: ``sum_j sigmoid(log_alpha_j - beta log(-gamma/zeta))``
    (via :func:`sparselens.core.hard_concrete.prob_nonzero`). ``log_alpha`` is a parameter, the
    same on every rank, so no reduction across ranks is done.
    """
    probs = hard_concrete.prob_nonzero(log_alpha, beta, gamma, zeta)
    return probs.sum(dtype=_compute_dtype(probs))


def _check_p_eps(p: float, eps: float) -> None:
    check_number("p", p, gt=0.0)
    check_number("eps", eps, ge=0.0)


def lp_importance(ci: Tensor, p: float, eps: float = 1e-12, *, finite_check: bool = True) -> Tensor:
    """L_p importance minimality ``sum_c mean_tokens (ci + eps)^p``.

    Bushnaq et al. (2025), Stochastic Parameter Decomposition (arXiv 2506.20790), importance
    minimality loss (per-component sum over positions / position count, summed over components),
    with ``eps`` inside the power as in the reference ``spd`` code. ``ci >= 0`` is expected
    (negative entries with non-integer ``p`` give NaN).
    """
    _check_p_eps(p, eps)
    x = _check_ci(ci, finite_check=finite_check)
    return component_means((x + eps) ** p).sum()


def smooth_l0(
    ci: Tensor, gamma: float, normalize_at_one: bool = False, *, finite_check: bool = True
) -> Tensor:
    """Smooth-L0 (Geman-McClure) importance minimality ``sum_c mean_tokens ci^2/(ci^2+gamma^2)``.

    Geman & McClure (1987) robust penalty, as in param-decomp PR #852 (no eps).
    ``phi(0) = 0`` with gradient exactly 0 at 0; the gradient ``2 g gamma^2/(g^2+gamma^2)^2``
    peaks at ``3^1.5/(8 gamma)`` at ``g = gamma/sqrt(3)``. ``normalize_at_one`` multiplies by
    ``1 + gamma^2`` so that ``phi(1) = 1`` for every gamma (param-decomp PR #994).
    """
    g = check_number("gamma", gamma, gt=0.0)
    x = _check_ci(ci, finite_check=finite_check)
    out = component_means(_geman_mcclure(x, g)).sum()
    return out * (1.0 + g * g) if normalize_at_one else out


def _geman_mcclure(x: Tensor, gamma: float) -> Tensor:
    """``x^2 / (x^2 + gamma^2)`` elementwise, overflow-safe."""
    r = (x / gamma).clamp(-_SMOOTH_L0_RATIO_BOUND, _SMOOTH_L0_RATIO_BOUND)
    r2 = r * r
    return r2 / (1.0 + r2)


def smooth_l0_and_frequency(
    ci: Tensor,
    gamma: float,
    reference_token_count: float,
    normalize_at_one: bool = False,
    *,
    finite_check: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(smooth_l0, sum_c f_c log2(1 + a' f_c))`` with ``f_c`` the global mean of the
    Geman-McClure penalty, from one pass and one reduction (the smooth-L0 analogue of
    :func:`lp_and_frequency`; the frequency term is not rescaled by ``normalize_at_one``)."""
    g = check_number("gamma", gamma, gt=0.0)
    a = check_number("reference_token_count", reference_token_count, gt=0.0)
    x = _check_ci(ci, finite_check=finite_check)
    f = component_means(_geman_mcclure(x, g))
    imp = f.sum() * (1.0 + g * g) if normalize_at_one else f.sum()
    return imp, frequency_term(f, a)


def frequency_minimality(
    ci: Tensor, p: float, reference_token_count: float, eps: float = 1e-12
) -> Tensor:
    """Batch-invariant frequency minimality ``sum_c f_c log2(1 + a' f_c)``.

    param-decomp PR #543 (``FrequencyMinimalityLoss``): ``f_c`` is the global mean over tokens of
    ``(ci + eps)^p`` and ``a' = reference_token_count``. The same per-token firing gives the same
    value at any batch or world size. Migration from the older batch-dependent ("rolled") SPD
    loss ``sum_c [M_c + beta M_c log2(1 + S_c)]`` (``S_c`` the per-component sum over the batch,
    ``M_c = S_c/(B T)``): it equals ``lp_importance + beta * frequency_minimality(a' = B T)``
    exactly at that ``B T``.
    """
    a = check_number("reference_token_count", reference_token_count, gt=0.0)
    _check_p_eps(p, eps)
    x = _check_ci(ci)
    return frequency_term(component_means((x + eps) ** p), a)


def lp_and_frequency(
    ci: Tensor,
    p: float,
    reference_token_count: float,
    eps: float = 1e-12,
    *,
    finite_check: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(lp_importance, frequency_minimality)`` from one ``(ci + eps)^p`` pass and one reduction.

    The JAX port of param-decomp (PR #899) computes both terms this way; values equal the two
    separate calls.
    """
    a = check_number("reference_token_count", reference_token_count, gt=0.0)
    _check_p_eps(p, eps)
    x = _check_ci(ci, finite_check=finite_check)
    f = component_means((x + eps) ** p)
    return f.sum(), frequency_term(f, a)
