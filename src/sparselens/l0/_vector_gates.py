"""What SparseL0Linear and SparseCalibrationWeights share: one Hard Concrete gate per column,
parameterised by ``log_alpha`` with ``beta, gamma, zeta`` attributes (l0-python's names), a
per-model random generator, and a safe cache of the design matrix as a :class:`SparseOperator`.

All gate math is :mod:`sparselens.core.hard_concrete`; nothing is re-derived here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparselens.core import hard_concrete as hc
from sparselens.core.checks import check_choice, check_int, check_number, check_stretch
from sparselens.core.sparse_ops import SparseOperator, fingerprint, to_csr

KEEP_PROB_CLAMP = hc.KEEP_PROB_CLAMP
"""init_keep_prob is clamped into [1e-6, 1 - 1e-6] (l0-python clamps arrays but not scalars)."""


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A per-model generator: seeded by ``seed``, or by one draw of the global RNG when None
    (so ``torch.manual_seed`` still makes a seed-less model reproducible)."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    gen.manual_seed(int(seed))
    return gen


class VectorGatesMixin:
    """Hard Concrete gates over the ``n_features`` columns of a design matrix."""

    LOG_ALPHA_BOUND: float = hc.LOG_ALPHA_BOUND
    log_alpha: nn.Parameter
    beta: float
    gamma: float
    zeta: float
    inference: str
    device: torch.device

    def _init_gate_args(
        self, n_features: int, beta: float, gamma: float, zeta: float, inference: str
    ) -> None:
        self.n_features = check_int("n_features", n_features, ge=1)
        self.beta = check_number("beta", beta, gt=0.0)
        self.gamma, self.zeta = check_stretch(gamma, zeta)
        self.inference = check_choice("inference", inference, hc.ESTIMATORS)
        self._op_cache: SparseOperator | None = None

    @staticmethod
    def _keep_prob_logits(init_keep_prob: Any, n: int, device: torch.device) -> Tensor:
        """logit(p) for a scalar or (n,) array ``p``, clamped into [1e-6, 1 - 1e-6]."""
        if isinstance(init_keep_prob, int | float | np.integer | np.floating) and not isinstance(
            init_keep_prob, bool
        ):
            check_number("init_keep_prob", init_keep_prob, ge=0.0, le=1.0)
            p = torch.full((n,), float(init_keep_prob), device=device)
        else:
            p = torch.as_tensor(np.asarray(init_keep_prob), dtype=torch.float32, device=device)
            if p.shape != (n,):
                raise ValueError(
                    f"init_keep_prob array must have shape ({n},), got {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
                raise ValueError("init_keep_prob values must be finite probabilities in [0, 1]")
        return hc.keep_prob_logit(p)  # type: ignore[return-value]

    # -- gates (Louizos et al. 2018, eqs. 10-13) ----------------------------------------------
    def _sample_gates(self) -> Tensor:
        """A fresh gate draw, noise from the model's own generator."""
        return hc.rsample(self.log_alpha, self.beta, self.gamma, self.zeta, self._generator)

    def get_deterministic_gates(self, estimator: str | None = None) -> Tensor:
        """Eval gates by ``estimator`` (default: the model's ``inference``, "median")."""
        return hc.deterministic_gate(
            self.log_alpha, self.beta, self.gamma, self.zeta, estimator or self.inference
        )

    def get_l0_penalty(self) -> Tensor:
        """Expected number of non-zero gates, sum of P(z != 0) (eq. 12)."""
        return hc.prob_nonzero(self.log_alpha, self.beta, self.gamma, self.zeta).sum()

    # -- the design matrix ----------------------------------------------------------------------
    def _operator(
        self, M: Any, name: str = "M", dtype: torch.dtype = torch.float32
    ) -> SparseOperator:
        """``M`` as a cached :class:`SparseOperator`; the cache key is the matrix *content*.

        l0-python keyed its cache on shape + nnz, so a different matrix with the same pattern
        size silently reused the old values (its defect D1).
        """
        if isinstance(M, SparseOperator):
            return M
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        csr = to_csr(M, name=name, dtype=np_dtype)
        cached = self._op_cache
        if cached is not None and cached.dtype == dtype and cached.fingerprint == fingerprint(csr):
            return cached
        op = SparseOperator(csr, dtype=dtype, device=self.device)
        self._op_cache = op
        return op

    def _convert_sparse_to_torch(self, M: Any) -> Tensor:
        """l0-python compatibility: ``M`` as a float32 torch sparse COO tensor."""
        csr = self._operator(M).csr.tocoo()
        idx = torch.from_numpy(np.vstack([csr.row, csr.col]).astype(np.int64))
        return torch.sparse_coo_tensor(
            idx,
            torch.from_numpy(csr.data).float(),
            csr.shape,
            device=self.device,
            check_invariants=False,
        ).coalesce()

    def _generator_state(self) -> Tensor:
        return self._generator.get_state()

    _generator: torch.Generator
