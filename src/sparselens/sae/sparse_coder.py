"""TopK sparse autoencoders and transcoders (:class:`SparseCoder`), sparsify-compatible.

Model (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093, eqs. 1-3):
``z = TopK(ReLU(W_enc (x - b_dec) + b_enc))``, ``yhat = W_dec^T z + b_dec (+ W_skip x)``; a
transcoder (``transcode=True``) predicts a module's output ``y`` from its input ``x`` and does not
subtract ``b_dec`` from ``x`` (sparsify #49). Parameter names and shapes are sparsify's
(reference sheet §1.3): ``encoder.weight`` (M, d), ``encoder.bias`` (M,), ``W_dec`` (M, d),
``b_dec`` (d,), optional ``W_skip`` (d, d), so a sparsify ``sae.safetensors`` state dict loads.

Losses returned by :meth:`SparseCoder.forward` (a trainer minimises
``fvu + auxk_alpha * auxk_loss + multi_topk_fvu / 8``):

* ``fvu``: :func:`sparselens.sae.fvu.fvu` of the batch (finite for one token).
* ``auxk_loss`` (App. A.2, OpenAI ``sparse_autoencoder/loss.py``): ``e = stopgrad(y - yhat)``; the
  top-``k_aux`` ReLU'd pre-activations among the *dead* latents reconstruct ``e`` as
  ``ehat = W_dec^T z_aux`` with **no** ``b_dec`` (sparsify <= 1.3.2 added it, #132/#134);
  ``auxk = min(num_dead / k_aux, 1) * ||e - ehat||^2 / ||e - mean(e)||^2`` (normalised by the
  residual's variance, as the paper and OpenAI; ``auxk_normalization="target"`` divides by the
  target's variance instead, as sparsify); NaN/inf -> 0. Its gradient reaches ``W_dec`` **and the
  encoder rows of the aux latents** (sparsify's fused backward drops the latter).
* ``multi_topk_fvu`` (Multi-TopK, Gao et al. 2024: L(k) + L(4k)/8): FVU of the 4k
  reconstruction (with ``W_skip``); the returned ``sae_out``/``latent_acts``/``latent_indices``
  stay the k versions.

One encoder backward covers the top-k ∪ aux ∪ 4k entries (:func:`~sparselens.sae.kernels.
encoder_select`) and respects the ReLU mask; decoding is an embedding-bag product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparselens.core.checks import check_finite, check_int
from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.fvu import fvu as fvu_fn
from sparselens.sae.fvu import total_variance as total_variance_fn
from sparselens.sae.kernels import encoder_select, preactivations, topk_decode

#: AuxK decodes densely over the dead sub-dictionary when num_dead <= this * k_aux.
DENSE_AUX_RATIO = 16


class EncoderOutput(NamedTuple):
    """Top activations and latent indices, each (N, k); ``pre_acts`` ReLU'd (N, M), no grad."""

    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor


class ForwardOutput(NamedTuple):
    """sparsify's six forward outputs; inactive losses are 0-d zeros."""

    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


class SparseCoder(nn.Module):
    """TopK / BatchTopK sparse autoencoder or transcoder of width ``d_in`` (see module doc)."""

    def __init__(
        self,
        d_in: int,
        cfg: SparseCoderConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.d_in = check_int("d_in", d_in, ge=1)
        self.cfg = cfg = cfg if cfg is not None else SparseCoderConfig()
        m = cfg.resolve_num_latents(d_in)
        if cfg.k > m:
            raise ValueError(f"k must be <= num_latents ({m}), got {cfg.k}")
        self.k_aux = cfg.resolve_k_aux(d_in)
        self.encoder = nn.Linear(d_in, m, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        if cfg.transcode:
            self.W_dec = nn.Parameter(torch.zeros_like(self.encoder.weight.data))
        else:
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
            if cfg.normalize_decoder:
                self.set_decoder_norm_to_unit_norm()
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=self.W_dec.dtype))
        self.W_skip: nn.Parameter | None = (
            nn.Parameter(torch.zeros(d_in, d_in, device=device, dtype=self.W_dec.dtype))
            if cfg.skip_connection
            else None
        )

    @property
    def num_latents(self) -> int:
        """Number of latents M."""
        return self.encoder.weight.shape[0]

    @property
    def W_enc(self) -> Tensor:
        """Encoder weight (M, d_in) (``encoder.weight``)."""
        return self.encoder.weight

    @property
    def b_enc(self) -> Tensor:
        """Encoder bias (M,) (``encoder.bias``)."""
        return self.encoder.bias

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # ---- initialisation and decoder constraint ------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, data: Tensor, inputs: Tensor | None = None) -> None:
        """Set ``b_dec`` to the mean of ``data`` (..., d_in): the target (``x`` for an SAE).

        For a transcoder, pass its ``inputs`` as well to centre the pre-activations as sparsify's
        trainer does: ``b_enc = -W_enc mean(inputs)``.
        """
        self.b_dec.copy_(self._flat(data, "data").mean(0).to(self.dtype))
        if inputs is not None:
            mu = self._flat(inputs, "inputs").mean(0).to(self.dtype)
            self.encoder.bias.copy_(-(self.W_enc @ mu))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every ``W_dec`` row to unit L2 norm (``row / (||row|| + eps)``, as sparsify)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of each ``W_dec.grad`` row its part along the row: ``g -= <g, w> w / |w|^2``.

        Call after ``backward`` and before the optimiser step (Gao et al. 2024, OpenAI
        ``unit_norm_decoder_grad_adjustment_``); renormalise after the step.
        """
        g = self.W_dec.grad
        if g is None:
            raise ValueError("W_dec.grad is None: call backward() before projecting the gradient")
        w = self.W_dec.data
        sq = w.pow(2).sum(1, keepdim=True)
        coef = (g * w).sum(1, keepdim=True) / sq.clamp_min(torch.finfo(w.dtype).tiny)
        g.sub_(coef * w)

    # ---- encode / decode ----------------------------------------------------------------------

    def _flat(self, t: Tensor, name: str) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2 or t.shape[-1] != self.d_in:
            raise ValueError(
                f"{name} must have shape (..., {self.d_in}) with a token dimension, "
                f"got {tuple(t.shape)}"
            )
        if t.numel() == 0:
            raise ValueError(f"{name} must hold at least one token, got shape {tuple(t.shape)}")
        check_finite(name, t)
        return t.reshape(-1, self.d_in).to(self.dtype)

    def _encoder_input(self, x: Tensor) -> Tensor:
        return x if self.cfg.transcode else x - self.b_dec

    def _select(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor | None]:
        """Indices (N, k') of the active latents and, for BatchTopK, a keep mask (N, k').

        BatchTopK keeps the N*k largest pre-activations of the batch; rows are padded to the
        widest row and the padding is masked out (its activation multiplied by 0).
        """
        if self.cfg.activation == "topk":
            return pre.topk(k, dim=1, sorted=False).indices, None
        n, m = pre.shape
        flat = pre.reshape(-1).topk(min(n * k, n * m), sorted=False).indices
        mask = torch.zeros(n * m, dtype=torch.bool, device=pre.device)
        mask[flat] = True
        mask = mask.view(n, m)
        k_row = max(int(mask.sum(1).max()), 1)  # host sync: BatchTopK rows vary in width
        idx = pre.masked_fill(~mask, float("-inf")).topk(k_row, dim=1, sorted=False).indices
        return idx, mask.gather(1, idx)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Encode (..., d_in) inputs to ``EncoderOutput`` of flattened (N, k) tensors."""
        x2 = self._flat(x, "x")
        x_in = self._encoder_input(x2)
        pre = preactivations(x_in, self.W_enc, self.b_enc)
        idx, keep = self._select(pre, self.cfg.k)
        acts = encoder_select(x_in, self.W_enc, self.b_enc, idx, pre)
        if keep is not None:
            acts = acts * keep
        return EncoderOutput(acts, idx, pre.clamp_min_(0.0))

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """``sum_j a_j W_dec[i_j] + b_dec`` for (N, k) acts and indices (no ``W_skip``)."""
        return topk_decode(top_indices, top_acts, self.W_dec) + self.b_dec

    def _skip(self, out: Tensor, x: Tensor) -> Tensor:
        return out if self.W_skip is None else out + F.linear(x, self.W_skip)

    def _decode_aux(
        self, aux_idx: Tensor, aux_local: Tensor, dead_idx: Tensor, aux_acts: Tensor
    ) -> Tensor:
        """``ehat = W_dec^T z_aux`` without ``b_dec`` (sparsify #134).

        With few dead latents (``num_dead <= DENSE_AUX_RATIO * k_aux``) this is a dense GEMM over
        the dead sub-dictionary (``index_select`` of its rows; reference sheet §3.5: ~5x faster
        than the sparse path at k_aux = 256), else the embedding-bag decode.
        """
        if dead_idx.numel() <= DENSE_AUX_RATIO * aux_idx.shape[1]:
            z = aux_acts.new_zeros(aux_acts.shape[0], dead_idx.numel())
            z = z.scatter(1, aux_local, aux_acts)
            return z @ self.W_dec.index_select(0, dead_idx)
        return topk_decode(aux_idx, aux_acts, self.W_dec)

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | float | None = None,
    ) -> ForwardOutput:
        """Encode ``x``, reconstruct ``y`` (default ``x``) and return the losses (module doc).

        ``x``, ``y``: (..., d_in), same leading shape; outputs are reshaped to (..., ·). With
        ``activation="batchtopk"`` rows have variable counts: ``latent_acts``/``latent_indices``
        are padded to the widest row with zero activations.
        ``dead_mask``: bool (num_latents,) from a :class:`~sparselens.sae.DeadLatentTracker`;
        AuxK is computed when it has a dead latent and ``auxk_alpha > 0`` (one host sync for the
        dead count). ``total_variance``: denominator of the FVUs (default: this batch's).
        """
        lead = x.shape[:-1]
        x2 = self._flat(x, "x")
        if y is None:
            y2 = x2
        else:
            if y.shape != x.shape:
                raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {y.shape}")
            y2 = self._flat(y, "y")
        cfg, m = self.cfg, self.num_latents
        x_in = self._encoder_input(x2)
        pre = preactivations(x_in, self.W_enc, self.b_enc)

        idx, keep = self._select(pre, cfg.k)
        sets = [idx]
        aux_idx = aux_local = dead_idx = None
        num_dead = None
        if dead_mask is not None and cfg.auxk_alpha > 0:
            if dead_mask.shape != (m,) or dead_mask.dtype != torch.bool:
                raise ValueError(f"dead_mask must be a bool tensor of shape ({m},)")
            dead_idx = dead_mask.to(pre.device).nonzero().squeeze(1)
            if dead_idx.numel() > 0:
                num_dead = dead_idx.numel()
                k_aux = min(self.k_aux, num_dead)
                j = pre.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False).indices
                aux_idx, aux_local = dead_idx[j], j
                sets.append(aux_idx)
        if cfg.multi_topk:
            sets.append(pre.topk(min(4 * cfg.k, m), dim=1, sorted=False).indices)
        widths = [s.shape[1] for s in sets]
        all_acts = encoder_select(x_in, self.W_enc, self.b_enc, torch.cat(sets, 1), pre)
        acts_split = list(all_acts.split(widths, dim=1))

        acts = acts_split[0]
        if keep is not None:
            acts = acts * keep
        sae_out = self._skip(self.decode(acts, idx), x2)
        den = total_variance_fn(y2) if total_variance is None else total_variance
        fvu = fvu_fn(y2, sae_out, den)

        zero = sae_out.new_zeros(())
        auxk_loss = zero
        if aux_idx is not None and aux_local is not None and dead_idx is not None:
            assert num_dead is not None
            e = (y2 - sae_out).detach()
            e_hat = self._decode_aux(aux_idx, aux_local, dead_idx, acts_split[1])
            aux_den = total_variance_fn(e) if cfg.auxk_normalization == "residual" else den
            scale = min(num_dead / self.k_aux, 1.0)
            auxk_loss = scale * fvu_fn(e, e_hat, aux_den)
            auxk_loss = torch.where(torch.isfinite(auxk_loss), auxk_loss, zero)

        multi_topk_fvu = zero
        if cfg.multi_topk:
            out4 = self._skip(self.decode(acts_split[-1], sets[-1]), x2)
            multi_topk_fvu = fvu_fn(y2, out4, den)

        return ForwardOutput(
            sae_out.reshape(*lead, self.d_in),
            acts.reshape(*lead, acts.shape[-1]),
            idx.reshape(*lead, idx.shape[-1]),
            fvu,
            auxk_loss,
            multi_topk_fvu,
        )
