"""The Hard Concrete gate of Louizos, Welling & Kingma (ICLR 2018), "Learning Sparse Neural
Networks through L0 Regularization", sec. 4 (eqs. 9-12). One implementation for every caller.

Notation: ``a = log_alpha`` (clamped to ``[-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND]`` on every path,
gradient 0 outside), ``beta`` the temperature, ``gamma <= 0 < 1 <= zeta`` the stretch limits,
``L = log u - log(1-u)`` standard logistic noise.

* sample (eq. 10):  z = clamp(sigmoid((L + a)/beta) (zeta - gamma) + gamma, 0, 1)
* median:           clamp(sigmoid(a/beta) (zeta - gamma) + gamma, 0, 1)   (temperature-aware)
* paper_gate:       clamp(sigmoid(a) (zeta - gamma) + gamma, 0, 1)        (eq. 13, no beta)
* prob_nonzero:     P(z != 0) = sigmoid(a - beta log(-gamma/zeta))        (eq. 12)
* prob_one:         P(z == 1) = sigmoid(a - beta log((1-gamma)/(zeta-1)))
* mean:             E[z], by quadrature over the logistic noise (error < 1e-5)

Numeric guards: ``log_alpha`` is bounded, uniform noise is drawn in at least float32 inside
``(eps, 1-eps)`` with ``eps = 1e-6`` (so fp16/bf16 logits never see ``log(0)``), and results are
cast back to the input dtype.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from sparselens.core.checks import check_number, check_stretch

LOG_ALPHA_BOUND = 20.0
"""Bound on log_alpha before any gate computation (l0-python PR #42)."""

UNIFORM_EPS = 1e-6
"""Uniform noise lies in ``(eps, 1 - eps)``; 1e-8 underflows in fp16 (l0-python PR #42)."""

DEFAULT_GAMMA = -0.1
DEFAULT_ZETA = 1.1


KEEP_PROB_CLAMP = 1e-6
"""Initial keep probabilities are clamped into ``[1e-6, 1 - 1e-6]`` before their logit."""


def keep_prob_logit(p: float | Tensor) -> float | Tensor:
    """``log alpha = logit(p) = log(p / (1 - p))`` of an initial keep probability ``p`` in [0, 1].

    ``p`` is clamped into ``[1e-6, 1 - 1e-6]`` (``|logit| <= 13.8``) so that 0 and 1 give finite,
    still trainable logits. A float is computed in float64 (python ``math``), a tensor in its own
    dtype: both match l0-python bit for bit inside the clamp. ``sigmoid(log alpha) = p`` is *not*
    the initial P(z != 0) (see :func:`prob_nonzero`).
    """
    if isinstance(p, Tensor):
        if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
            raise ValueError("keep probabilities must be finite and in [0, 1]")
        q = p.to(_compute_dtype(p)).clamp(KEEP_PROB_CLAMP, 1 - KEEP_PROB_CLAMP)
        return torch.log(q / (1 - q)).to(p.dtype)  # half types: computed in float32
    q = check_number("keep probability", p, ge=0.0, le=1.0)
    q = min(max(q, KEEP_PROB_CLAMP), 1.0 - KEEP_PROB_CLAMP)
    return math.log(q / (1 - q))


def _check(beta: float, gamma: float, zeta: float) -> None:
    check_number("beta (temperature)", beta, gt=0.0)
    check_stretch(gamma, zeta)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half types, the input's own dtype for float32/float64."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def clamp_log_alpha(log_alpha: Tensor, bound: float = LOG_ALPHA_BOUND) -> Tensor:
    """Bound ``log_alpha`` to ``[-bound, bound]`` in the compute dtype (gradient 0 outside)."""
    return log_alpha.to(_compute_dtype(log_alpha)).clamp(-bound, bound)


def uniform_noise(
    like: Tensor,
    generator: torch.Generator | None = None,
    eps: float = UNIFORM_EPS,
) -> Tensor:
    """``u ~ U(eps, 1 - eps)`` with the shape and device of ``like``, in the compute dtype."""
    return torch.empty(like.shape, dtype=_compute_dtype(like), device=like.device).uniform_(
        eps, 1.0 - eps, generator=generator
    )


def _stretch(s: Tensor, gamma: float, zeta: float) -> Tensor:
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def rsample(
    log_alpha: Tensor,
    beta: float,
    gamma: float = DEFAULT_GAMMA,
    zeta: float = DEFAULT_ZETA,
    generator: torch.Generator | None = None,
    *,
    u: Tensor | None = None,
) -> Tensor:
    """Reparameterised sample of the gate (eq. 10), one independent draw per element.

    ``u`` may be given (uniform noise in ``(0, 1)``) to reuse a draw; otherwise it is drawn from
    ``generator`` (the global RNG when None).
    """
    _check(beta, gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    if u is None:
        u = uniform_noise(a, generator)
    else:
        u = u.to(a.dtype).clamp(UNIFORM_EPS, 1.0 - UNIFORM_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / beta)
    return _stretch(s, gamma, zeta).to(log_alpha.dtype)


def median(
    log_alpha: Tensor, beta: float, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA
) -> Tensor:
    """The median of the gate: ``clamp(sigmoid(a/beta)(zeta-gamma)+gamma, 0, 1)``.

    Logistic noise has median 0 and the transform is monotone, so this is exactly the median of
    ``z``. It is what l0-python (after PR #41) uses as its eval gate. It is *not* the mean.
    """
    _check(beta, gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    return _stretch(torch.sigmoid(a / beta), gamma, zeta).to(log_alpha.dtype)


def paper_gate(
    log_alpha: Tensor, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA
) -> Tensor:
    """Test-time gate of Louizos et al. (eq. 13): ``clamp(sigmoid(a)(zeta-gamma)+gamma, 0, 1)``.

    It ignores the temperature; it equals :func:`median` only at ``beta = 1``.
    """
    check_stretch(gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    return _stretch(torch.sigmoid(a), gamma, zeta).to(log_alpha.dtype)


def prob_nonzero(
    log_alpha: Tensor, beta: float, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA
) -> Tensor:
    """``P(z != 0) = sigmoid(a - beta log(-gamma/zeta))`` (eq. 12); 1 when ``gamma = 0``."""
    _check(beta, gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    if gamma == 0.0:
        return torch.ones_like(a).to(log_alpha.dtype) + 0.0 * a.to(log_alpha.dtype)
    return torch.sigmoid(a - beta * math.log(-gamma / zeta)).to(log_alpha.dtype)


def prob_one(
    log_alpha: Tensor, beta: float, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA
) -> Tensor:
    """``P(z == 1) = sigmoid(a - beta log((1-gamma)/(zeta-1)))``; 0 when ``zeta = 1``."""
    _check(beta, gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    if zeta == 1.0:
        return torch.zeros_like(a).to(log_alpha.dtype) + 0.0 * a.to(log_alpha.dtype)
    return torch.sigmoid(a - beta * math.log((1 - gamma) / (zeta - 1))).to(log_alpha.dtype)


def cdf(
    t: Tensor | float,
    log_alpha: Tensor,
    beta: float,
    gamma: float = DEFAULT_GAMMA,
    zeta: float = DEFAULT_ZETA,
) -> Tensor:
    """``P(z <= t)``: 0 below 0, ``sigmoid(beta logit((t-gamma)/(zeta-gamma)) - a)`` on [0, 1)."""
    _check(beta, gamma, zeta)
    a = clamp_log_alpha(log_alpha)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    v = ((t - gamma) / (zeta - gamma)).clamp(1e-300 if a.dtype == torch.float64 else 1e-30, 1)
    inner = torch.sigmoid(beta * (torch.log(v) - torch.log1p(-v)) - a)
    out = torch.where(
        t < 0, torch.zeros_like(inner), torch.where(t >= 1, torch.ones_like(inner), inner)
    )
    return out.to(log_alpha.dtype)


# -- exact mean by quadrature -------------------------------------------------------------------

_MEAN_TAIL = 40.0  # logistic density < 5e-18 beyond |L| > 40
_MEAN_PANELS = 24
_MEAN_NODES = 16
_MEAN_CHUNK = 1 << 15


@lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def mean(
    log_alpha: Tensor, beta: float, gamma: float = DEFAULT_GAMMA, zeta: float = DEFAULT_ZETA
) -> Tensor:
    """Exact expectation ``E[z]`` (absolute error < 1e-5), differentiable in ``log_alpha``.

    With ``l0 = beta log(-gamma/zeta) - a`` and ``l1 = beta log((1-gamma)/(zeta-1)) - a`` the
    gate is 0 for ``L <= l0``, 1 for ``L >= l1`` and smooth between, so
    ``E[z] = sigmoid(-l1) + integral_{l0}^{l1} (sigmoid((L+a)/beta)(zeta-gamma)+gamma) p(L) dL``
    with the logistic density ``p(L) = sigmoid(L) sigmoid(-L)``. The integral is computed in
    float64 by composite Gauss-Legendre quadrature.
    """
    _check(beta, gamma, zeta)
    out_dtype = log_alpha.dtype
    a_all = log_alpha.to(torch.float64).clamp(-LOG_ALPHA_BOUND, LOG_ALPHA_BOUND).reshape(-1)
    x, w = _gauss_legendre(_MEAN_NODES)
    x_t = torch.as_tensor(x, dtype=torch.float64, device=a_all.device)
    w_t = torch.as_tensor(w, dtype=torch.float64, device=a_all.device)
    pieces = [
        _mean_flat(a_all[i : i + _MEAN_CHUNK], beta, gamma, zeta, x_t, w_t)
        for i in range(0, max(a_all.numel(), 1), _MEAN_CHUNK)
    ]
    flat = torch.cat(pieces) if pieces else a_all
    return flat[: a_all.numel()].reshape(log_alpha.shape).to(out_dtype)


def _mean_flat(a: Tensor, beta: float, gamma: float, zeta: float, x: Tensor, w: Tensor) -> Tensor:
    # Without stretch (gamma = 0 or zeta = 1) the gate saturates only asymptotically: cut where
    # (L + a)/beta = -+_MEAN_TAIL (gate within 5e-18 of 0 or 1), so that the panels resolve the
    # transition at small beta (cutting at L = -+_MEAN_TAIL gave errors ~2e-3 at beta = 0.05).
    lo_const = beta * math.log(-gamma / zeta) if gamma < 0 else -_MEAN_TAIL * beta
    hi_const = beta * math.log((1 - gamma) / (zeta - 1)) if zeta > 1 else _MEAN_TAIL * beta
    l0 = (lo_const - a).clamp(-_MEAN_TAIL, _MEAN_TAIL)
    l1 = (hi_const - a).clamp(-_MEAN_TAIL, _MEAN_TAIL)
    upper_mass = torch.sigmoid(-(hi_const - a))
    # panels of [l0, l1]; nodes shape (n, panels * nodes)
    k = torch.arange(_MEAN_PANELS, dtype=torch.float64, device=a.device)
    width = (l1 - l0) / _MEAN_PANELS
    centers = l0[:, None] + (k[None, :] + 0.5) * width[:, None]
    nodes = (centers[:, :, None] + 0.5 * width[:, None, None] * x[None, None, :]).flatten(1)
    gate = torch.sigmoid((nodes + a[:, None]) / beta) * (zeta - gamma) + gamma
    density = torch.sigmoid(nodes) * torch.sigmoid(-nodes)
    weights = w.repeat(_MEAN_PANELS)[None, :] * 0.5 * width[:, None]
    return upper_mass + (gate * density * weights).sum(dim=1)


class HardConcreteDistribution:
    """A batch of Hard Concrete gates in the shape of ``torch.distributions``.

    ``rsample`` draws differentiable samples; ``mean``, ``median``, ``prob_nonzero`` (the expected
    L0 per gate), ``prob_one`` and ``cdf`` are exact.
    """

    def __init__(
        self,
        log_alpha: Tensor,
        beta: float,
        gamma: float = DEFAULT_GAMMA,
        zeta: float = DEFAULT_ZETA,
    ) -> None:
        _check(beta, gamma, zeta)
        self.log_alpha, self.beta, self.gamma, self.zeta = log_alpha, beta, gamma, zeta

    @property
    def batch_shape(self) -> torch.Size:
        return self.log_alpha.shape

    def rsample(
        self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        a = self.log_alpha.expand(*sample_shape, *self.log_alpha.shape)
        return rsample(a, self.beta, self.gamma, self.zeta, generator)

    def sample(
        self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    @property
    def mean(self) -> Tensor:
        return mean(self.log_alpha, self.beta, self.gamma, self.zeta)

    @property
    def median(self) -> Tensor:
        return median(self.log_alpha, self.beta, self.gamma, self.zeta)

    @property
    def prob_nonzero(self) -> Tensor:
        return prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta)

    @property
    def prob_one(self) -> Tensor:
        return prob_one(self.log_alpha, self.beta, self.gamma, self.zeta)

    def cdf(self, t: Tensor | float) -> Tensor:
        return cdf(t, self.log_alpha, self.beta, self.gamma, self.zeta)


ESTIMATORS = ("median", "paper", "mean", "hard")


def deterministic_gate(
    log_alpha: Tensor,
    beta: float,
    gamma: float = DEFAULT_GAMMA,
    zeta: float = DEFAULT_ZETA,
    estimator: str = "median",
) -> Tensor:
    """The eval gate named by ``estimator``.

    ``"median"`` (default, l0-python compatible), ``"paper"`` (eq. 13, no temperature),
    ``"mean"`` (exact ``E[z]``) or ``"hard"`` (a 0/1 mask: 1 where the median is non-zero).
    """
    if estimator == "median":
        return median(log_alpha, beta, gamma, zeta)
    if estimator == "paper":
        return paper_gate(log_alpha, gamma, zeta)
    if estimator == "mean":
        return mean(log_alpha, beta, gamma, zeta)
    if estimator == "hard":
        return (median(log_alpha, beta, gamma, zeta) > 0).to(log_alpha.dtype)
    raise ValueError(
        f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}; got {estimator!r}"
    )
