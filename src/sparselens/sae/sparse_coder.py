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

BatchTopK (``activation="batchtopk"``, Bussmann et al. 2024, arXiv 2412.06410) keeps the N*k
largest activations of the batch in train mode and updates the 0-d buffer ``threshold`` (an EMA,
rate ``threshold_lr``, of the smallest positive selected activation, as SAELens); in eval mode it
is a JumpReLU ``a = ReLU(pre) * (pre > threshold)``, so inference is per token.

Kernels (:mod:`sparselens.sae.kernels`): the pre-activations are formed in row chunks without
autograd (no (N, M) buffer on CPU); one encoder backward covers the top-k ∪ aux ∪ 4k entries and
the dense dead-latent AuxK code and respects the ReLU mask; the main and AuxK decodes share one
backward. On CPU the AuxK path reads the dead count on the host (free there); elsewhere it stays
on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparselens.core.checks import check_finite, check_int
from sparselens.sae.config import SparseCoderConfig
from sparselens.sae.fvu import fvu as fvu_fn
from sparselens.sae.fvu import total_variance as total_variance_fn
from sparselens.sae.kernels import (
    LazyLayout,
    Selection,
    decode,
    encoder_grad,
    linear,
    topk_decode,
    topk_select,
)

#: AuxK runs densely over the dead sub-dictionary when num_dead <= this * k_aux.
DENSE_AUX_RATIO = 16

#: Use the device-side AuxK path (no host sync) on CPU too (it is the default elsewhere).
SYNC_FREE_AUX = False


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
        self.threshold: Tensor
        if cfg.activation == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), device=device, dtype=torch.float32))

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
        sq = torch.linalg.vector_norm(w, dim=1, keepdim=True).square_()
        coef = torch.linalg.vecdot(g, w).unsqueeze(1) / sq.clamp_min(torch.finfo(w.dtype).tiny)
        g.addcmul_(w, coef, value=-1.0)  # no (M, d) temporary

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
        """``x - b_dec`` (``x`` for a transcoder), without autograd."""
        with torch.no_grad():
            return x if self.cfg.transcode else x - self.b_dec

    def _b_pre(self) -> Tensor | None:
        return None if self.cfg.transcode else self.b_dec

    def _selection_mode(self) -> dict[str, Any]:
        """BatchTopK trains on the batch's top N*k and infers with the JumpReLU threshold."""
        if self.cfg.activation != "batchtopk":
            return {}
        if self.training:
            return {"batch": True}
        return {"threshold": self.threshold}

    @torch.no_grad()
    def _update_threshold(self, min_positive: Tensor | None) -> None:
        """EMA of the smallest positive selected activation (SAELens ``topk_threshold``,
        ``lr = threshold_lr``); a batch without positive activations leaves it unchanged."""
        if min_positive is None or not self.training:
            return
        lr = self.cfg.threshold_lr
        thr = self.threshold
        mp = min_positive.to(thr.dtype)
        thr.copy_(torch.where(torch.isfinite(mp), (1 - lr) * thr + lr * mp, thr))

    @contextmanager
    def threshold_kept(self) -> Iterator[None]:
        """Train-mode forwards inside leave the BatchTopK ``threshold`` as it was (for extra
        passes that must not count as training batches, e.g. a trainer's residual pre-pass)."""
        saved = self.threshold.clone() if self.cfg.activation == "batchtopk" else None
        try:
            yield
        finally:
            if saved is not None:
                with torch.no_grad():
                    self.threshold.copy_(saved)

    def encode(self, x: Tensor) -> EncoderOutput:
        """Encode (..., d_in) inputs to ``EncoderOutput`` of flattened (N, k) tensors.

        ``pre_acts`` is the dense (N, M) ReLU'd matrix (sparsify's field; no gradient). A
        BatchTopK coder selects the batch's top N*k in train mode (and updates ``threshold``)
        and applies the JumpReLU threshold in eval mode.
        """
        x2 = self._flat(x, "x")
        x_in = self._encoder_input(x2)
        pre = linear(x_in, self.W_enc, self.b_enc, relu=True)  # returned: form it once
        mode = self._selection_mode()
        sel = topk_select(x_in, self.W_enc, self.b_enc, self.cfg.k, pre=pre, **mode)
        self._update_threshold(sel.min_positive)
        acts, _ = encoder_grad(
            x2, self._b_pre(), self.W_enc, self.b_enc, x_in, sel.indices, sel.values
        )
        return EncoderOutput(acts, sel.indices, pre)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """``sum_j a_j W_dec[i_j] + b_dec`` for (N, k) acts and indices (no ``W_skip``)."""
        return topk_decode(top_indices, top_acts, self.W_dec) + self.b_dec

    def _skip(self, out: Tensor, x: Tensor) -> Tensor:
        return out if self.W_skip is None else out + F.linear(x, self.W_skip)

    def _aux_plan(self, dead_mask: Tensor | None, device: torch.device) -> _AuxPlan | None:
        """How AuxK runs this step: dense over the dead columns (``num_dead <= DENSE_AUX_RATIO
        * k_aux``; reference sheet §3.5: ~5x faster than the sparse path at k_aux = 256) or a
        masked sparse top-k_aux. On CPU the dead count is read on the host (free there); on
        other devices (or with ``SYNC_FREE_AUX``) it stays on the device: sparse path, scale as
        a tensor, no host sync."""
        cfg, m = self.cfg, self.num_latents
        if dead_mask is None or cfg.auxk_alpha <= 0:
            return None
        if (
            not isinstance(dead_mask, Tensor)
            or dead_mask.shape != (m,)
            or (dead_mask.dtype != torch.bool)
        ):
            raise ValueError(f"dead_mask must be a bool tensor of shape ({m},)")
        mask = dead_mask.to(device)
        if SYNC_FREE_AUX or device.type != "cpu":
            scale = (mask.sum().to(self.dtype) / self.k_aux).clamp(max=1.0)
            return _AuxPlan(None, mask, self.k_aux, scale)
        cols = mask.nonzero().squeeze(1)
        num_dead = cols.numel()
        if num_dead == 0:
            return None
        k_aux = min(self.k_aux, num_dead)
        scale_f = min(num_dead / self.k_aux, 1.0)
        if num_dead <= DENSE_AUX_RATIO * self.k_aux:
            return _AuxPlan(cols, None, k_aux, scale_f)
        return _AuxPlan(None, mask, k_aux, scale_f)

    def _encoder_grad(
        self,
        x: Tensor,
        x_in: Tensor,
        sel: Selection,
        cols: Tensor | None,
        layouts: tuple[LazyLayout, LazyLayout | None],
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """One encoder backward for the main, 4k and sparse AuxK sets and the dense AuxK code.

        Returns ``(acts, acts_4k, aux_acts, aux_z)`` (None where inactive). For TopK the top-k
        is the first k columns of the sorted top-4k, so the 4k set alone carries both.
        ``layouts`` (of ``sel.indices`` and ``sel.multi_indices``, shared with the decodes) are
        used when the encoder's index set is one of those alone.
        """
        sets: list[tuple[Tensor, Tensor]] = []
        if sel.multi_values is not None and sel.multi_indices is not None:
            sets.append((sel.multi_values, sel.multi_indices))
        nested = bool(sets) and self.cfg.activation == "topk"
        if not nested:
            sets.insert(0, (sel.values, sel.indices))
        if sel.aux_values is not None and sel.aux_indices is not None:
            sets.append((sel.aux_values, sel.aux_indices))
        values = sets[0][0] if len(sets) == 1 else torch.cat([v for v, _ in sets], 1)
        indices = sets[0][1] if len(sets) == 1 else torch.cat([i for _, i in sets], 1)
        shared = None
        if indices is sel.indices:
            shared = layouts[0]
        elif indices is sel.multi_indices:
            shared = layouts[1]
        out, aux_z = encoder_grad(
            x, self._b_pre(), self.W_enc, self.b_enc, x_in, indices, values, cols, sel.aux_z, shared
        )
        parts = out.split([v.shape[1] for v, _ in sets], dim=1)
        acts = parts[0][:, : sel.values.shape[1]]
        acts4 = None if sel.multi_values is None else parts[0 if nested else 1]
        aux_acts = parts[-1] if sel.aux_values is not None else None
        return acts, acts4, aux_acts, aux_z

    # ---- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | float | None = None,
        residual_variance: Tensor | float | None = None,
    ) -> ForwardOutput:
        """Encode ``x``, reconstruct ``y`` (default ``x``) and return the losses (module doc).

        ``x``, ``y``: (..., d_in), same leading shape; outputs are reshaped to (..., ·). With
        ``activation="batchtopk"`` rows have variable counts: ``latent_acts``/``latent_indices``
        are padded to the widest row with zero activations.
        ``dead_mask``: bool (num_latents,) from a :class:`~sparselens.sae.DeadLatentTracker`;
        AuxK is computed when it has a dead latent and ``auxk_alpha > 0``.
        ``total_variance``: denominator of the FVUs and of a ``"target"``-normalised AuxK
        (default: this batch's ``sum ||y - mean y||^2``). ``residual_variance``: denominator of a
        ``"residual"``-normalised AuxK (default: this batch's ``sum ||e - mean e||^2``). Under
        gradient accumulation pass the full batch's values of both, so that the micro-batch
        losses add up to the full batch's.
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
        plan = self._aux_plan(dead_mask, x2.device)
        k_multi = min(4 * cfg.k, m) if cfg.multi_topk else None
        sel = topk_select(
            x_in,
            self.W_enc,
            self.b_enc,
            cfg.k,
            k_multi=k_multi,
            aux_cols=None if plan is None else plan.cols,
            aux_mask=None if plan is None else plan.mask,
            k_aux=0 if plan is None else plan.k_aux,
            **self._selection_mode(),
        )
        self._update_threshold(sel.min_positive)

        cols = None if plan is None else plan.cols
        idx = sel.indices
        # one latent sort per index set, shared by the encoder and decoder backward
        layout = LazyLayout(idx, m)
        layout4 = None if sel.multi_indices is None else LazyLayout(sel.multi_indices, m)
        acts, acts4, aux_acts, aux_z = self._encoder_grad(x2, x_in, sel, cols, (layout, layout4))
        out, e_hat = decode(idx, acts, self.W_dec, cols, aux_z, layout)
        sae_out = self._skip(out + self.b_dec, x2)
        den = total_variance_fn(y2) if total_variance is None else total_variance
        fvu = fvu_fn(y2, sae_out, den)

        zero = sae_out.new_zeros(())
        auxk_loss = zero
        if plan is not None:
            e = (y2 - sae_out).detach()
            if e_hat is None:  # sparse AuxK path
                assert sel.aux_indices is not None and aux_acts is not None
                e_hat = topk_decode(sel.aux_indices, aux_acts, self.W_dec)
            if cfg.auxk_normalization == "target":
                aux_den = den
            else:
                aux_den = total_variance_fn(e) if residual_variance is None else residual_variance
            auxk_loss = plan.scale * fvu_fn(e, e_hat, aux_den)
            auxk_loss = torch.where(torch.isfinite(auxk_loss), auxk_loss, zero)

        multi_topk_fvu = zero
        if acts4 is not None and sel.multi_indices is not None:
            dec4 = decode(sel.multi_indices, acts4, self.W_dec, layout=layout4)[0]
            out4 = self._skip(dec4 + self.b_dec, x2)
            multi_topk_fvu = fvu_fn(y2, out4, den)

        return ForwardOutput(
            sae_out.reshape(*lead, self.d_in),
            acts.reshape(*lead, acts.shape[-1]),
            idx.reshape(*lead, idx.shape[-1]),
            fvu,
            auxk_loss,
            multi_topk_fvu,
        )


class _AuxPlan(NamedTuple):
    """AuxK for one forward: dense dead columns ``cols`` or a sparse ``mask``; latents per row;
    ``min(num_dead / k_aux, 1)`` (a float, or a 0-d tensor on the sync-free path)."""

    cols: Tensor | None
    mask: Tensor | None
    k_aux: int
    scale: float | Tensor
