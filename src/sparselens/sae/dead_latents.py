"""Dead- and dense-latent bookkeeping in tokens (Gao et al. 2024, arXiv 2406.04093, §2.4, A.2).

A latent *fires* on a token when its activation exceeds ``fire_threshold`` (1e-3, as OpenAI's
``sparse_autoencoder/train.py``); merely being selected does not count (sparsify counts a
zero-valued top-k pick as firing). A latent is *dead* once it has gone ``dead_tokens`` tokens
(10M in the paper) without firing. Counts and token totals are summed across ranks with
:func:`sparselens.core.distributed.global_sum`, so every rank holds the same state. All counters
are device tensors: :meth:`DeadLatentTracker.update` never synchronises with the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sparselens.core.checks import check_int, check_number
from sparselens.core.distributed import global_sum

if TYPE_CHECKING:
    from sparselens.sae.sparse_coder import SparseCoder


class DeadLatentTracker:
    """Tokens since each latent last fired, and firing counts for density statistics."""

    def __init__(
        self,
        num_latents: int,
        dead_tokens: int = 10_000_000,
        fire_threshold: float = 1e-3,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_latents = check_int("num_latents", num_latents, ge=1)
        self.dead_tokens = check_int("dead_tokens", dead_tokens, ge=1)
        self.fire_threshold = check_number("fire_threshold", fire_threshold, ge=0.0)
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.fire_counts = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=device)

    @classmethod
    def for_coder(cls, coder: SparseCoder) -> DeadLatentTracker:
        """A tracker sized and configured from ``coder`` (its ``cfg.dead_tokens`` etc.)."""
        cfg = coder.cfg
        return cls(coder.num_latents, cfg.dead_tokens, cfg.fire_threshold, device=coder.device)

    @torch.no_grad()
    def update(
        self, latent_acts: Tensor, latent_indices: Tensor, n_tokens: int | Tensor | None = None
    ) -> None:
        """Record one batch: ``latent_acts``/``latent_indices`` (..., k) from the forward.

        ``n_tokens`` (default: the number of rows, ``latent_acts.numel() // k``) is this rank's
        token count; pass it when rows were excluded upstream. Reduced across ranks.
        """
        if latent_acts.shape != latent_indices.shape:
            raise ValueError(
                f"latent_acts and latent_indices must have one shape, got "
                f"{tuple(latent_acts.shape)} and {tuple(latent_indices.shape)}"
            )
        dev = self.tokens_since_fired.device
        if n_tokens is None:
            k = latent_acts.shape[-1] if latent_acts.dim() else 1
            n_tokens = latent_acts.numel() // max(k, 1)
        n = torch.as_tensor(n_tokens, dtype=torch.int64, device=dev).reshape(())
        fired = (latent_acts.detach().reshape(-1) > self.fire_threshold).to(torch.int64)
        counts = torch.zeros(self.num_latents, dtype=torch.int64, device=dev)
        counts.index_add_(0, latent_indices.reshape(-1).to(dev), fired.to(dev))
        stats = global_sum(torch.cat([counts, n.reshape(1)]))
        counts, n = stats[:-1], stats[-1]
        self.fire_counts += counts
        self.tokens_seen += n
        self.tokens_since_fired = torch.where(
            counts > 0, torch.zeros_like(self.tokens_since_fired), self.tokens_since_fired + n
        )

    @property
    def dead_mask(self) -> Tensor:
        """Bool (num_latents,): True where no firing in the last ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    def fraction_dead(self) -> Tensor:
        """Share of dead latents (0-d float tensor)."""
        return self.dead_mask.float().mean()

    def firing_frequency(self) -> Tensor:
        """Per-latent share of tokens it fired on since the last :meth:`reset_density`."""
        return self.fire_counts.double() / self.tokens_seen.clamp_min(1).double()

    def fraction_dense(self, threshold: float = 0.1) -> Tensor:
        """Share of latents firing on more than ``threshold`` (10%) of tokens (0-d tensor)."""
        return (self.firing_frequency() > threshold).float().mean()

    def reset_density(self) -> None:
        """Start a new density window (dead counters are kept)."""
        self.fire_counts.zero_()
        self.tokens_seen.zero_()
