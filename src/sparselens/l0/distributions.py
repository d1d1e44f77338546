"""The Hard Concrete gate as an ``nn.Module`` (drop-in for ``l0.distributions``).

Louizos, Welling & Kingma (ICLR 2018), "Learning Sparse Neural Networks through L0
Regularization", sec. 4. Every formula (sampling, eq. 10; eval gates; P(z != 0), eq. 12) is
:mod:`sparselens.core.hard_concrete`; this module only holds the parameter ``qz_logits``
(``log alpha``) and the knobs. With the default settings the float32 numbers, the global-RNG
consumption and the ``state_dict`` are identical to l0-python 0.6.2 (after its PRs #41/#42).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sparselens.core import hard_concrete as hc
from sparselens.core.checks import check_choice, check_int, check_number

logger = logging.getLogger(__name__)

INIT_MEAN_CLAMP = hc.KEEP_PROB_CLAMP
"""``init_mean`` is clamped into ``[1e-6, 1 - 1e-6]`` before taking its logit (fixes D6)."""


def init_logit(init_mean: float) -> float:
    """``logit(init_mean)`` with the clamp of :func:`sparselens.core.hard_concrete.keep_prob_logit`.

    l0-python raised ``ZeroDivisionError`` for ``init_mean = 1`` and "math domain error" for 0
    (its defect D6); inside the clamp the value is bit-identical to l0-python.
    """
    check_number("init_mean", init_mean, ge=0.0, le=1.0)
    return float(hc.keep_prob_logit(float(init_mean)))


class HardConcrete(nn.Module):
    """A tensor of Hard Concrete gates ``z`` in [0, 1] with learnable ``qz_logits = log alpha``.

    Args:
        input_dim: size of the first gate dimension (>= 1).
        output_dim: optional second dimension (>= 1); the gates are then ``(input_dim,
            output_dim)``, e.g. one per weight of a linear layer.
        temperature: ``beta`` > 0; lower is closer to binary.
        stretch: >= 0; the stretch interval is ``(gamma, zeta) = (-stretch, 1 + stretch)``.
            ``stretch = 0`` is the plain binary Concrete: gates are never exactly 0, so
            P(z != 0) = 1 and the L0 penalty is a constant (a warning is logged).
        init_mean: initial keep probability ``sigmoid(log alpha)`` in [0, 1] (clamped to
            ``[1e-6, 1 - 1e-6]``); ``None`` keeps the logits at 0. It is *not* the initial
            P(z != 0), which is ``sigmoid(log alpha - beta log(-gamma/zeta))``.
        inference: eval-mode estimator: ``"median"`` (default, l0-python's
            ``clamp(sigmoid(a/beta)(zeta-gamma)+gamma, 0, 1)``), ``"paper"`` (eq. 13, no beta),
            ``"mean"`` (exact E[z]) or ``"hard"`` (0/1 mask, 1 where the median is > 0).
        generator: optional ``torch.Generator`` for the sampling noise; ``None`` uses the global
            RNG exactly as l0-python does (one ``uniform_(eps, 1 - eps)`` of the gate shape).
    """

    LOG_ALPHA_BOUND: float = hc.LOG_ALPHA_BOUND
    """``qz_logits`` are clamped to ``[-20, 20]`` before any gate computation (read-only)."""
    _UNIFORM_EPS: float = hc.UNIFORM_EPS
    """Uniform noise is drawn in ``(1e-6, 1 - 1e-6)`` (read-only)."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int | None = None,
        temperature: float = 0.5,
        stretch: float = 0.1,
        init_mean: float | None = 0.5,
        *,
        inference: str = "median",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int("input_dim", input_dim, ge=1)
        if output_dim is None:
            self.gate_size: tuple[int, ...] = (int(input_dim),)
        else:
            self.gate_size = (int(input_dim), check_int("output_dim", output_dim, ge=1))
        check_number("temperature", temperature, gt=0.0)
        check_number("stretch", stretch, ge=0.0)
        if init_mean is not None:
            check_number("init_mean", init_mean, ge=0.0, le=1.0)
        self.inference = check_choice("inference", inference, hc.ESTIMATORS)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )

        self.qz_logits = nn.Parameter(torch.zeros(self.gate_size))
        self.temperature = temperature
        self.stretch = stretch
        self.gamma = -stretch
        self.zeta = 1.0 + stretch
        self.init_mean = init_mean
        self.generator = generator
        if stretch == 0:
            logger.warning(
                "HardConcrete(stretch=0): gates are never exactly 0, so P(z != 0) = 1 and the "
                "L0 penalty is constant; use stretch > 0 to learn sparsity"
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every logit to ``logit(init_mean)`` (no jitter); nothing when ``init_mean`` is
        None."""
        if self.init_mean is not None:
            with torch.no_grad():
                self.qz_logits.fill_(init_logit(self.init_mean))

    # -- gates ------------------------------------------------------------------------------------
    def forward(self, input_shape: Sequence[int] | None = None) -> Tensor:
        """Sampled gates in training mode, deterministic ``inference`` gates in eval mode.

        If ``input_shape`` has more dimensions than the gates, trailing singleton dimensions are
        appended so the gates broadcast (gates ``(20, 30)``, input ``(32, 20, 28, 28)`` ->
        ``(20, 30, 1, 1)``).
        """
        gates = self._sample_gates() if self.training else self._deterministic_gates()
        if input_shape is not None:
            if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
                raise TypeError(
                    f"input_shape must be a sequence of ints or None, got "
                    f"{type(input_shape).__name__}"
                )
            extra = len(input_shape) - gates.dim()
            if extra > 0:
                gates = gates.reshape(*gates.shape, *([1] * extra))
        return gates

    def _sample_gates(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw (eq. 10), one independent uniform per gate.

        Noise comes from ``generator``, else ``self.generator``, else the global RNG.
        """
        gen = self.generator if generator is None else generator
        return hc.rsample(self.qz_logits, self.temperature, self.gamma, self.zeta, gen)

    def _deterministic_gates(self, estimator: str | None = None) -> Tensor:
        """Eval gates by ``estimator`` (default ``self.inference``, i.e. the median)."""
        return hc.deterministic_gate(
            self.qz_logits, self.temperature, self.gamma, self.zeta, estimator or self.inference
        )

    def get_deterministic_gates(self, estimator: str | None = None) -> Tensor:
        """Eval gates regardless of the training flag; ``estimator`` as for ``inference``."""
        if estimator is not None:
            check_choice("estimator", estimator, hc.ESTIMATORS)
        return self._deterministic_gates(estimator)

    # -- penalty and statistics -------------------------------------------------------------------
    def get_active_prob(self) -> Tensor:
        """P(z != 0) per gate, ``sigmoid(a - beta log(-gamma/zeta))`` (eq. 12)."""
        return hc.prob_nonzero(self.qz_logits, self.temperature, self.gamma, self.zeta)

    def get_penalty(self) -> Tensor:
        """Expected L0 norm, ``sum P(z != 0)`` (eq. 12), a 0-d tensor."""
        return self.get_active_prob().sum()

    def get_sparsity(self) -> float:
        """Expected fraction of zero gates under the *training* distribution, 1 - mean P(z != 0).

        This is not the fraction of zero eval gates (see :meth:`get_num_active`).
        """
        with torch.no_grad():
            return 1.0 - self.get_active_prob().mean().item()

    @torch.no_grad()
    def get_num_active(self) -> int:
        """Number of gates with P(z != 0) > 0.5, which equals the number of non-zero median
        gates."""
        return int((self.get_active_prob() > 0.5).sum().item())

    def extra_repr(self) -> str:
        text = (
            f"gate_size={self.gate_size}, temperature={self.temperature}, "
            f"stretch={self.stretch}, init_mean={self.init_mean}"
        )
        if self.inference != "median":
            text += f", inference={self.inference!r}"
        return text
