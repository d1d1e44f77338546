"""Stochastic masks, delta masks and uniform-k-subset routing (Bushnaq et al. 2025, §2.3; sheet §4).

* :func:`stochastic_masks`: ``m = g + (1 - g) u`` with ``u ~ U(0, 1)`` of ``g``'s shape, i.e.
  ``m ~ U(g, 1)`` reparametrised; ``n`` independent draws stacked on a new leading axis.
* :func:`delta_mask`: the delta component's mask, one ``U(0, 1)`` scalar per position (in effect
  the delta component has CI 0).
* :func:`uniform_k_subset_routes`: per position draw ``k ~ U{1..L}``, then a uniformly random
  k-subset of the ``L`` layers is replaced (the others keep the target's weights). The subset is
  the first ``k`` entries of a uniformly random permutation (ranks of i.i.d. uniform noise).

All draws take an optional ``torch.Generator`` and never synchronise with the host. Their noise
comes from :func:`uniform`: on CPU in float32 the vectorised counter-based generator of
:mod:`sparselens.spd.kernels` (keyed by the generator, so seeded runs and resumes reproduce),
otherwise ``torch.rand``. The two streams differ: the same seed draws other masks on a machine
where the kernels cannot be built (no C++ compiler; a warning says so).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparselens.core.checks import check_int
from sparselens.spd import kernels


def uniform(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``U[0, 1)`` noise of ``shape``: the fused kernel on CPU in float32, else ``torch.rand``."""
    dev = torch.get_default_device() if device is None else torch.device(device)
    on_cpu = dev.type == "cpu"
    if dtype == torch.float32 and on_cpu:
        out = kernels.uniform(shape, generator)
        if out is not None:
            return out
    return torch.rand(tuple(shape), generator=generator, dtype=dtype, device=device)


def stochastic_masks(ci: Tensor, n: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``g + (1 - g) u``, shape ``(n, *ci.shape)``."""
    n = check_int("n_mask_samples", n, ge=1)
    u = uniform((n, *ci.shape), generator, dtype=ci.dtype, device=ci.device)
    # n = 1 (the usual S): no broadcast, so the backward to ci needs no sum over the draws
    g = ci.unsqueeze(0) if n == 1 else ci
    return torch.addcmul(g, 1.0 - g, u)


def delta_mask(
    batch_shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The delta component's mask: ``U(0, 1)`` per position, shape ``batch_shape``."""
    return uniform(tuple(batch_shape), generator, dtype=dtype, device=device)


def uniform_k_subset_routes(
    batch_shape: tuple[int, ...] | torch.Size,
    n_layers: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean routes ``(*batch_shape, n_layers)``: per position ``k ~ U{1..L}`` layers, a
    uniformly random k-subset of them, are replaced."""
    L = check_int("n_layers", n_layers, ge=1)
    shape = tuple(batch_shape)
    k = torch.randint(1, L + 1, (*shape, 1), generator=generator, device=device)
    noise = uniform((*shape, L), generator, device=device)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # a uniformly random permutation per position
    return rank < k


__all__ = ["delta_mask", "stochastic_masks", "uniform", "uniform_k_subset_routes"]
