"""Settings of ``sparselens sae train`` (:class:`SAETrainConfig`), validated on construction.

The defaults train one TopK SAE on the bundled Mini-GPT's residual stream after block 0
(``blocks.0.resid_post``, width 64) over the verbs corpus in a few minutes on 2 CPU cores. The
learning rate defaults to Gao et al.'s scaling ``2e-4 / sqrt(num_latents / 2^14)`` (arXiv
2406.04093, §2.3/App. A; sparsify's Adam default); warm-up and decay count optimiser steps.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparselens.core.schedules import Schedule
from sparselens.sae.config import SparseCoderConfig

DEFAULT_HOOKPOINT = "blocks.0.resid_post"


DEMO_CODER: dict[str, int] = {"expansion_factor": 16, "k": 8, "dead_tokens": 200_000}
"""Sparse-coder settings of the default run where they differ from SparseCoderConfig's: 16 x 64
= 1024 latents on the bundled model, k = 8, dead after 200k tokens (Gao et al.'s 10M scaled to
a run of 10M tokens)."""


def demo_coder_config() -> SparseCoderConfig:
    """The sparse coder of the default run (:data:`DEMO_CODER`)."""
    return SparseCoderConfig(**DEMO_CODER)


def gao_lr(num_latents: int) -> float:
    """``2e-4 / sqrt(num_latents / 2^14)`` (Gao et al. 2024: lr proportional to 1/sqrt(n))."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


class SAETrainConfig(BaseModel):
    """One ``sparselens sae train`` run; YAML files and CLI flags map onto these fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    # what to train on
    subject: str = Field(
        "minigpt",
        min_length=1,
        description="'minigpt' (bundled), a Mini-GPT checkpoint directory or a Hugging Face "
        "causal LM directory (local only)",
    )
    corpus: str = Field(
        "default",
        min_length=1,
        description="'default' (verbs for Mini-GPT, else the Shakespeare slice), 'verbs', "
        "'shakespeare', 'shakespeare-slice' or a UTF-8 .txt file",
    )
    hookpoints: list[str] = Field(
        default_factory=lambda: [DEFAULT_HOOKPOINT],
        min_length=1,
        description="module-name patterns (fnmatch), e.g. 'blocks.*.resid_post'",
    )
    transcode: bool = Field(
        False, description="train transcoders: read each module's input, predict its output"
    )
    cache: str | None = Field(
        None, description="train on activations cached by `sparselens sae cache` in this directory"
    )
    sae: SparseCoderConfig = Field(
        default_factory=demo_coder_config,
        description="the sparse coder's settings; in a mapping, unset fields take the demo "
        "defaults (expansion_factor 16, k 8, dead_tokens 200000), then SparseCoderConfig's",
    )
    # batches and budget
    context_len: int = Field(32, ge=1, le=2**20, description="tokens per sequence")
    batch_size: int = Field(
        32, ge=1, le=2**20, description="sequences per optimiser step, over all ranks"
    )
    micro_batches: int = Field(
        1, ge=1, le=2**16, description="gradient-accumulation chunks per step and rank"
    )
    tokens: int = Field(
        10_000_000, ge=1, description="token budget (sequence positions, excluded ones included)"
    )
    exclude_special_tokens: bool = Field(
        True, description="drop BOS/EOS/PAD positions before the sparse coder"
    )
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of the corpus held out")
    eval_tokens: int = Field(
        131_072, ge=0, description="validation positions evaluated at the end (0: all)"
    )
    # optimisation
    lr: float | None = Field(
        None, gt=0, le=1, description="Adam learning rate (none: 2e-4 / sqrt(latents / 2^14))"
    )
    lr_warmup_steps: int | None = Field(
        None, ge=0, description="optimiser steps of linear warm-up (none: min(50, steps // 10))"
    )
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay after warm-up, to min_lr_ratio * lr at the last step"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a share of lr")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon")
    # run
    seed: int = Field(0, ge=0, lt=2**32, description="seed of initialisation and data order")
    threads: int = Field(2, ge=1, le=1024, description="torch CPU threads")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model and coders run")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="parameter dtype of the sparse coders"
    )
    log_every: int = Field(25, ge=1, description="optimiser steps between metric records")
    save_every: int = Field(500, ge=1, description="optimiser steps between checkpoints")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")

    @field_validator("hookpoints", mode="before")
    @classmethod
    def _one_pattern(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("sae", mode="before")
    @classmethod
    def _demo_defaults(cls, v: object) -> object:
        """A partial mapping (YAML ``sae: {k: 8}``, ``--sae.k 8``) keeps the demo defaults."""
        return {**DEMO_CODER, **v} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self) -> SAETrainConfig:
        if self.transcode != self.sae.transcode:
            if "transcode" in self.sae.model_fields_set:
                raise ValueError(
                    f"transcode ({self.transcode}) and sae.transcode ({self.sae.transcode}) "
                    "disagree; set transcode only"
                )
            self.sae = self.sae.model_copy(update={"transcode": self.transcode})
        if any(not p.strip() for p in self.hookpoints):
            raise ValueError("hookpoints entries must be non-empty patterns")
        if self.tokens < self.tokens_per_step:
            raise ValueError(
                f"tokens must be >= batch_size * context_len = {self.tokens_per_step} (one "
                f"optimiser step), got {self.tokens}"
            )
        if self.lr_warmup_steps is not None and self.lr_warmup_steps > self.steps:
            raise ValueError(
                f"lr_warmup_steps must be <= the number of optimiser steps ({self.steps} = "
                f"tokens // (batch_size * context_len)), got {self.lr_warmup_steps}"
            )
        if self.batch_size % self.micro_batches:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by micro_batches "
                f"({self.micro_batches})"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        """Sequence positions per optimiser step (all ranks)."""
        return self.batch_size * self.context_len

    @property
    def steps(self) -> int:
        """Optimiser steps: ``tokens // (batch_size * context_len)``."""
        return self.tokens // self.tokens_per_step

    @property
    def warmup_steps(self) -> int:
        """``lr_warmup_steps``, or ``min(50, steps // 10)`` when unset."""
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return min(50, self.steps // 10)

    def lr_for(self, num_latents: int) -> float:
        """Peak learning rate of a coder with ``num_latents`` latents."""
        return self.lr if self.lr is not None else gao_lr(num_latents)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimiser step ``step`` (1-based): linear warm-up over
        ``lr_warmup_steps``, then ``lr_decay`` to ``min_lr_ratio`` at the last step."""
        total, warm = self.steps, self.warmup_steps
        if step <= warm:
            return Schedule(kind="linear", start=0.0, end=1.0, end_frac=warm / total).at_step(
                step, total
            )
        if self.lr_decay == "constant":
            return 1.0
        decay = Schedule(
            kind=self.lr_decay, start=1.0, end=self.min_lr_ratio, start_frac=warm / total
        )
        return decay.at_step(step, total)


__all__ = ["DEFAULT_HOOKPOINT", "DEMO_CODER", "SAETrainConfig", "demo_coder_config", "gao_lr"]
