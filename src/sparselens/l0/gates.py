"""Stand-alone Hard Concrete gates for selecting items: samples, features, or a mix with random
sampling (drop-in for ``l0.gates``).

Each gate is one :class:`~sparselens.l0.distributions.HardConcrete` per item (Louizos et al. 2018,
eq. 10 for the draws, eq. 12 for the expected count). Selection methods use the module's mode, as
in l0-python (sampled gates in training mode), unless ``deterministic=True`` asks for the eval
gates whatever the mode (l0-python's defect D20: repeated calls in training mode returned different
selections).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sparselens.core.checks import check_int, check_number
from sparselens.l0.distributions import HardConcrete

logger = logging.getLogger(__name__)


def _check_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


class L0Gate(nn.Module):
    """``size`` Hard Concrete gates, ``gates = HardConcrete(size)``.

    Args:
        size: number of items (>= 1).
        temperature: ``beta`` > 0. ``self.temperature`` reads and writes the gates' temperature,
            so the two never disagree.
        init_mean: initial keep probability in [0, 1] (clamped to ``[1e-6, 1 - 1e-6]``).
    """

    def __init__(self, size: int, temperature: float = 0.5, init_mean: float = 0.5) -> None:
        super().__init__()
        self.size = check_int("size", size, ge=1)
        self.init_mean = init_mean
        self.gates = HardConcrete(size, temperature=temperature, init_mean=init_mean)

    @property
    def temperature(self) -> float:
        """The gate temperature (that of ``self.gates``)."""
        return self.gates.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        check_number("temperature", value, gt=0.0)
        self.gates.temperature = value

    def get_gates(
        self, deterministic: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Gate values: sampled in training mode, eval gates in eval mode or if
        ``deterministic``; ``generator`` (optional) supplies the sampling noise."""
        if deterministic:
            return self.gates._deterministic_gates()
        if generator is not None and self.gates.training:
            return self.gates._sample_gates(generator)
        return self.gates()

    def apply_gates(self, x: Tensor, dim: int = 0) -> Tensor:
        """``x`` scaled by the gates along ``dim`` (``x.shape[dim]`` must equal ``size``)."""
        _check_tensor("x", x)
        if not -x.dim() <= dim < x.dim() or x.dim() == 0:
            raise ValueError(f"dim must be in [-{x.dim()}, {x.dim() - 1}], got {dim}")
        if x.shape[dim] != self.size:
            raise ValueError(f"x must have shape {self.size} along dim {dim}, got {tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[dim] = -1
        return x * self.get_gates().view(shape)

    def get_penalty(self) -> Tensor:
        """Expected number of open gates, ``sum P(z != 0)`` (eq. 12)."""
        return self.gates.get_penalty()

    def get_active_indices(
        self,
        threshold: float = 0.5,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Indices (LongTensor) of the items whose gate exceeds ``threshold``.

        Like l0-python this uses :meth:`get_gates`, so in training mode it is a random draw;
        ``deterministic=True`` uses the eval gates in either mode (fixes D20).
        """
        check_number("threshold", threshold)
        with torch.no_grad():
            gates = self.get_gates(deterministic, generator)
            return torch.where(gates > threshold)[0]


class SampleGate(L0Gate):
    """Gates over ``n_samples`` observations, started at ``init_mean = target_samples /
    n_samples``.

    ``target_samples`` may be 0 or ``n_samples``: the initial mean is then clamped to
    ``1e-6`` / ``1 - 1e-6`` (l0-python raised math domain / ZeroDivisionError, defect D6).
    """

    def __init__(self, n_samples: int, target_samples: int, temperature: float = 0.25) -> None:
        n = check_int("n_samples", n_samples, ge=1)
        check_number("target_samples", target_samples, ge=0.0, le=float(n))
        super().__init__(size=n, temperature=temperature, init_mean=target_samples / n)
        self.n_samples = n
        self.target_samples = target_samples

    def _check_rows(self, name: str, x: Tensor) -> None:
        _check_tensor(name, x)
        if x.dim() == 0 or x.shape[0] != self.n_samples:
            raise ValueError(
                f"{name} must have shape ({self.n_samples}, ...), got {tuple(x.shape)}"
            )

    def select_samples(self, data: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """``(data[idx], idx)`` for the active samples (gate > 0.5)."""
        self._check_rows("data", data)
        indices = self.get_active_indices(deterministic=deterministic)
        return data[indices.to(data.device)], indices

    def select_weighted_samples(
        self, data: Tensor, weights: Tensor, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(data[idx], (weights * gates)[idx], idx)`` where ``weights * gates > 1e-8``."""
        self._check_rows("data", data)
        self._check_rows("weights", weights)
        if weights.dim() != 1:
            raise ValueError(
                f"weights must have shape ({self.n_samples},), got {tuple(weights.shape)}"
            )
        gated = weights * self.get_gates(deterministic)
        indices = torch.where(gated > 1e-8)[0]
        return data[indices.to(data.device)], gated[indices], indices


class FeatureGate(L0Gate):
    """Gates over ``n_features`` columns, started at ``init_mean = min(max_features /
    n_features, 0.99)``.

    ``max_features`` only sets the initial mean (as in l0-python); pass
    ``enforce_max_features=True`` to :meth:`select_features` to keep at most ``max_features``
    columns (the most probable ones).
    """

    def __init__(self, n_features: int, max_features: int, temperature: float = 0.1) -> None:
        n = check_int("n_features", n_features, ge=1)
        check_int("max_features", max_features, ge=0)
        super().__init__(size=n, temperature=temperature, init_mean=min(max_features / n, 0.99))
        self.n_features = n
        self.max_features = max_features

    def select_features(
        self, data: Tensor, deterministic: bool = False, enforce_max_features: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(data[..., idx], idx)`` for the active features (gate > 0.5)."""
        _check_tensor("data", data)
        if data.dim() == 0 or data.shape[-1] != self.n_features:
            raise ValueError(
                f"data must have shape (..., {self.n_features}), got {tuple(data.shape)}"
            )
        indices = self.get_active_indices(deterministic=deterministic)
        if enforce_max_features and indices.numel() > self.max_features:
            prob = self.get_feature_importance()[indices]
            top = torch.topk(prob, self.max_features).indices
            indices = torch.sort(indices[top]).values
        return data[..., indices.to(data.device)], indices

    def select_features_with_names(
        self, data: Tensor, feature_names: Sequence[str], deterministic: bool = False
    ) -> tuple[Tensor, list[str]]:
        """``(data[..., idx], [feature_names[i] for i in idx])``."""
        if len(feature_names) != self.n_features:
            raise ValueError(
                f"feature_names must have {self.n_features} entries, got {len(feature_names)}"
            )
        selected, indices = self.select_features(data, deterministic)
        return selected, [feature_names[i] for i in indices.tolist()]

    def get_feature_importance(self) -> Tensor:
        """P(z != 0) per feature (no gradient)."""
        with torch.no_grad():
            return self.gates.get_active_prob()


class HybridGate(nn.Module):
    """Select ``target_items`` items: ``n_l0 = int(target * l0_fraction)`` by an L0
    :class:`SampleGate` and up to ``n_random = int(target * random_fraction)`` uniformly at random
    from the rest.

    ``target_items=None`` means ``int(0.2 * n_items)``; an explicit 0 is honoured (l0-python
    replaced any falsy value by the default). ``n_l0 = 0`` is allowed: the L0 gates then start
    closed (initial mean clamped to 1e-6, defect D6).
    """

    def __init__(
        self,
        n_items: int,
        l0_fraction: float = 0.25,
        random_fraction: float = 0.75,
        target_items: int | None = None,
        temperature: float = 0.25,
    ) -> None:
        super().__init__()
        n = check_int("n_items", n_items, ge=1)
        check_number("l0_fraction", l0_fraction, ge=0.0, le=1.0)
        check_number("random_fraction", random_fraction, ge=0.0, le=1.0)
        if l0_fraction + random_fraction > 1.0 + 1e-12:
            raise ValueError(
                "l0_fraction + random_fraction must be <= 1, got "
                f"{l0_fraction} + {random_fraction} = {l0_fraction + random_fraction:g}"
            )
        self.n_items = n
        self.l0_fraction = l0_fraction
        self.random_fraction = random_fraction
        if target_items is None:
            self.target_items = int(n * 0.2)
        else:
            self.target_items = check_int("target_items", target_items, ge=0, le=n)
        self.n_l0 = int(self.target_items * l0_fraction)
        self.n_random = int(self.target_items * random_fraction)
        self.l0_gate = SampleGate(n_samples=n, target_samples=self.n_l0, temperature=temperature)

    def select(
        self, data: Tensor, random_seed: int | None = None, deterministic: bool = False
    ) -> tuple[Tensor, Tensor, np.ndarray]:
        """``(data[idx], idx, kinds)``: sorted indices and, for each, ``"l0"`` or ``"random"``.

        The L0 part is :meth:`L0Gate.get_active_indices` (a draw in training mode unless
        ``deterministic``); the random part a random permutation of the other items.
        ``random_seed`` seeds a local ``torch.Generator`` for both, leaving the global RNG
        untouched (l0-python called ``torch.manual_seed``, defect D20). On CPU the selection is
        the same as l0-python's for the same seed.
        """
        _check_tensor("data", data)
        if data.dim() == 0 or data.shape[0] != self.n_items:
            raise ValueError(f"data must have shape ({self.n_items}, ...), got {tuple(data.shape)}")
        gate_gen: torch.Generator | None = None
        perm_gen: torch.Generator | None = None
        if random_seed is not None:
            seed = check_int("random_seed", random_seed)
            perm_gen = torch.Generator().manual_seed(seed)
            device = self.l0_gate.gates.qz_logits.device
            gate_gen = perm_gen if device.type == "cpu" else torch.Generator(device=device)
            if gate_gen is not perm_gen:
                gate_gen.manual_seed(seed)

        l0_idx = self.l0_gate.get_active_indices(
            deterministic=deterministic, generator=gate_gen
        ).cpu()
        available = torch.ones(self.n_items, dtype=torch.bool)
        available[l0_idx] = False
        candidates = torch.arange(self.n_items)[available]
        n_random = min(self.n_random, candidates.numel())
        if n_random > 0:
            rand_idx = candidates[torch.randperm(candidates.numel(), generator=perm_gen)[:n_random]]
        else:
            rand_idx = torch.empty(0, dtype=torch.long)

        indices, order = torch.sort(torch.cat([l0_idx, rand_idx]))
        kinds = np.array(["l0"] * l0_idx.numel() + ["random"] * rand_idx.numel(), dtype="<U6")
        kinds = kinds[order.numpy()]
        return data[indices.to(data.device)], indices, kinds

    def get_penalty(self) -> Tensor:
        """Expected number of open L0 gates, ``sum P(z != 0)`` (eq. 12)."""
        return self.l0_gate.get_penalty()
