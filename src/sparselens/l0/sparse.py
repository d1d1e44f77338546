"""L0-regularised sparse linear regression on sparse design matrices (l0-python's
``SparseL0Linear``), rebuilt on :mod:`sparselens.core`.

``y_hat = X (w * z) + b`` with one Hard Concrete gate per feature (Louizos et al. 2018); the loss is
``mean((y - y_hat)^2) + lambda_reg * sum_j P(z_j != 0)`` (eq. 12). Fixes over l0-python 0.6.2:
gate noise from the model's own generator (``seed`` makes ``fit`` reproducible), a content-keyed
matrix cache, scipy sparse arrays / dense / torch inputs, ``warm_start`` (l0-python re-initialises
the weights on every ``fit``), logging instead of print, an explicit eval estimator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparselens.core.checks import check_finite, check_int, check_number
from sparselens.core.schedules import Schedule
from sparselens.l0._vector_gates import VectorGatesMixin, make_generator
from sparselens.l0.training import Callback, run_epochs, verbose_logger

logger = logging.getLogger(__name__)


class SparseL0Linear(VectorGatesMixin, nn.Module):
    """Sparse linear regression with L0 feature gates (l0-python API).

    ``inference`` (keyword-only) picks the eval gate: "median" (default), "paper", "mean", "hard".
    """

    def __init__(
        self,
        n_features: int,
        fit_intercept: bool = True,
        beta: float = 2 / 3,
        gamma: float = -0.1,
        zeta: float = 1.1,
        init_keep_prob: float = 0.5,
        device: str | torch.device = "cpu",
        seed: int | None = None,
        *,
        inference: str = "median",
    ) -> None:
        super().__init__()
        self._init_gate_args(n_features, beta, gamma, zeta, inference)
        n = self.n_features
        self.fit_intercept = bool(fit_intercept)
        self.device = torch.device(device)
        self.seed = None if seed is None else check_int("seed", seed)
        self.weight = nn.Parameter(torch.zeros(n, device=self.device))
        if self.fit_intercept:
            self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(1, device=self.device))
        else:
            self.register_parameter("bias", None)
        mu = self._keep_prob_logits(init_keep_prob, n, self.device)
        if self.seed is not None:
            self._generator = make_generator(self.seed, self.device)
        gen = self._generator if self.seed is not None else None
        noise = torch.randn(n, generator=gen, device=self.device)
        self.log_alpha = nn.Parameter(mu + 0.01 * noise)
        if self.seed is None:
            self._generator = make_generator(None, self.device)
        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def _cached_X_torch(self) -> Tensor | None:
        """l0-python compatibility: the cached design matrix as a torch sparse COO tensor."""
        return None if self._op_cache is None else self._convert_sparse_to_torch(self._op_cache)

    def forward(self, X: Any, deterministic: bool = False) -> Tensor:
        """``X (w * z) + b`` of shape ``(n_samples,)``; ``X`` of any supported matrix type."""
        op = self._operator(X, name="X")
        if op.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n_samples, {self.n_features}), got {op.shape}")
        z = self.get_deterministic_gates() if deterministic else self._sample_gates()
        out = op @ (self.weight * z)
        if self.bias is not None:
            out = out + self.bias
        return out

    def predict(self, X: Any) -> Tensor:
        """Deterministic predictions (eval gates), without gradient."""
        with torch.no_grad():
            return self.forward(X, deterministic=True)

    def get_sparsity(self) -> float:
        """Fraction of features whose eval gate is below 0.01 (l0-python's definition)."""
        with torch.no_grad():
            return float((self.get_deterministic_gates() < 0.01).float().mean())

    def get_selected_features(self, threshold: float = 0.01) -> Tensor:
        """Indices of features whose eval gate exceeds ``threshold``."""
        check_number("threshold", threshold, ge=0, le=1)
        with torch.no_grad():
            return torch.where(self.get_deterministic_gates() > threshold)[0]

    def fit(
        self,
        X_sparse: Any,
        y: Any,
        lambda_reg: float = 0.01,
        lr: float = 0.01,
        epochs: int = 1000,
        verbose: bool = False,
        verbose_freq: int = 100,
        *,
        warm_start: bool = False,
        progress: bool = False,
        callbacks: Sequence[Callback] | None = None,
        log_every: int = 1,
        beta_schedule: Schedule | None = None,
    ) -> SparseL0Linear:
        """Adam on ``mean((y - y_hat)^2) + lambda_reg * sum_j P(z_j != 0)``, full batch.

        Without ``warm_start`` the weights restart at N(0, 0.1) (model generator) and the bias at
        ``mean(y)``, as in l0-python; ``warm_start=True`` continues from the current state.
        """
        check_number("lambda_reg", lambda_reg, ge=0)
        check_number("lr", lr, gt=0)
        check_int("epochs", epochs, ge=0)
        check_int("verbose_freq", verbose_freq, ge=1)
        op = self._operator(X_sparse, name="X_sparse")
        if op.shape[1] != self.n_features:
            raise ValueError(
                f"X_sparse must have shape (n_samples, {self.n_features}), got {op.shape}"
            )
        y_t = torch.as_tensor(np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y))
        y_t = y_t.to(torch.float32).to(self.device)
        if y_t.shape != (op.shape[0],):
            raise ValueError(
                f"y must have shape ({op.shape[0]},) to match X_sparse, got {tuple(y_t.shape)}"
            )
        check_finite("y", y_t)
        if not warm_start or self._optimizer is None:
            with torch.no_grad():
                self.weight.normal_(0.0, 0.1, generator=self._generator)
                if self.bias is not None:
                    self.bias.fill_(float(y_t.mean()))
            params = [self.weight, self.log_alpha] + ([self.bias] if self.bias is not None else [])
            self._optimizer = torch.optim.Adam(params, lr=lr)
            self.epochs_done = 0
        else:
            for group in self._optimizer.param_groups:
                group["lr"] = lr

        def step() -> tuple[Tensor, dict[str, Tensor]]:
            mse = (y_t - self.forward(op)).pow(2).mean()
            l0 = self.get_l0_penalty()
            return mse + lambda_reg * l0, {"mse": mse, "l0_penalty": l0}

        def describe() -> dict[str, float]:
            with torch.no_grad():
                return {"n_active": int((self.get_deterministic_gates() > 0.01).sum())}

        self.epochs_done += run_epochs(
            self,
            phase="fit",
            optimizer=self._optimizer,
            step=step,
            epochs=epochs,
            epoch_offset=self.epochs_done,
            log_every=log_every,
            callbacks=callbacks,
            progress=progress,
            beta_schedule=beta_schedule,
            describe=describe,
            logger=verbose_logger(logger) if verbose else None,
            verbose_freq=verbose_freq if verbose else 0,
        )
        return self

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, fit_intercept={self.fit_intercept}, "
            f"beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}, "
            f"inference={self.inference!r}"
        )


__all__ = ["SparseL0Linear"]
