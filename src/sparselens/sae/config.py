"""Configuration of a TopK sparse autoencoder or transcoder (:class:`SparseCoderConfig`).

Field names and defaults follow EleutherAI sparsify's ``SparseCoderConfig`` so that a sparsify
``cfg.json`` maps onto it; the AuxK and dead-latent fields add the settings of Gao et al. 2024,
"Scaling and evaluating sparse autoencoders" (arXiv 2406.04093, App. A.2): ``auxk_alpha`` 1/32,
``k_aux`` a power of two near ``d_in / 2``, dead = no activation above ``fire_threshold``
(1e-3, as OpenAI's ``sparse_autoencoder/train.py``) for ``dead_tokens`` (10M) tokens.
``activation="batchtopk"`` (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders", arXiv
2412.06410) keeps the N*k largest activations of a batch in training and, for inference, a
JumpReLU threshold: an EMA (rate ``threshold_lr``, 0.01 as SAELens) of the smallest positive
selected activation per batch.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SparseCoderConfig(BaseModel):
    """Settings of one :class:`~sparselens.sae.SparseCoder` (validated on construction)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    activation: Literal["topk", "batchtopk"] = Field(
        "topk", description="topk: k per token; batchtopk: N*k over the whole batch"
    )
    expansion_factor: int = Field(32, ge=1, description="num_latents = d_in * expansion_factor")
    num_latents: int = Field(0, ge=0, description="explicit number of latents (0: use expansion)")
    k: int = Field(32, ge=1, description="active latents per token")
    normalize_decoder: bool = Field(True, description="unit-norm decoder rows (not transcoders)")
    multi_topk: bool = Field(False, description="add the 4k reconstruction term (Gao et al.)")
    skip_connection: bool = Field(False, description="add x W_skip^T to the output")
    transcode: bool = Field(False, description="predict a module's output from its input")
    auxk_alpha: float = Field(1 / 32, ge=0.0, description="AuxK weight (Gao et al. App. A.2)")
    k_aux: int | None = Field(
        None, ge=1, description="AuxK latents per token; None: power of two near d_in / 2"
    )
    auxk_normalization: Literal["residual", "target"] = Field(
        "residual",
        description="AuxK denominator: residual = Var(e) (paper, OpenAI); "
        "target = Var(y) (sparsify compatibility)",
    )
    dead_tokens: int = Field(10_000_000, ge=1, description="tokens without firing => dead")
    fire_threshold: float = Field(1e-3, ge=0.0, description="a latent fires when its act > this")
    threshold_lr: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        description="batchtopk: EMA rate of the inference threshold (SAELens topk_threshold_lr)",
    )

    @model_validator(mode="after")
    def _k_fits(self) -> SparseCoderConfig:
        if self.num_latents and self.k > self.num_latents:
            raise ValueError(f"k must be <= num_latents ({self.num_latents}), got {self.k}")
        return self

    def resolve_num_latents(self, d_in: int) -> int:
        """``num_latents`` if set, else ``d_in * expansion_factor`` (sparsify's rule)."""
        return self.num_latents or d_in * self.expansion_factor

    def resolve_k_aux(self, d_in: int) -> int:
        """``k_aux`` if set, else the power of two nearest ``d_in / 2`` (512 for d_in = 768)."""
        if self.k_aux is not None:
            return self.k_aux
        return 2 ** max(0, round(math.log2(max(d_in / 2, 1.0))))
