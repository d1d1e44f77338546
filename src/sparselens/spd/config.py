"""Settings of one SPD run (``sparselens spd run``): target, decomposition, losses, optimiser.

A :class:`SPDRunConfig` is a pydantic model (unknown keys are errors) that YAML files, the bundled
configs in ``sparselens/spd/configs/`` and CLI flags all map onto. The learning rate is a core
:class:`~sparselens.core.schedules.Schedule` (its ``kind``, ``start`` = peak and ``end`` = final
value give the decay) preceded by a linear warm-up over ``lr_warmup_frac * steps`` steps, the
reference ``spd`` convention (sheet §7.6):

    w = int(lr_warmup_frac * steps)
    lr(i) = start * i / w                                    for i < w
    lr(i) = lr.at((i - w) / max(steps - w - 1, 1))           otherwise

for 0-based steps ``i = 0 .. steps - 1``, so the last step runs at exactly ``end`` (the
``decay_steps - 1`` convention).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparselens.core.schedules import Schedule
from sparselens.spd.component_model import DecomposedModule
from sparselens.spd.losses import LossConfig

TargetName = Literal[
    "tms_5-2",
    "tms_5-2_id",
    "tms_40-10",
    "tms_40-10_id",
    "resid_mlp1",
    "resid_mlp2",
    "resid_mlp3",
    "minigpt",
]
TARGETS: tuple[str, ...] = (
    "tms_5-2",
    "tms_5-2_id",
    "tms_40-10",
    "tms_40-10_id",
    "resid_mlp1",
    "resid_mlp2",
    "resid_mlp3",
    "minigpt",
)
CI_FNS = ("mlp", "vector_mlp", "shared_mlp")


class FaithfulnessWarmup(BaseModel):
    """Before the main loop: ``steps`` AdamW steps on U and V only, minimising faithfulness
    (mean squared ``W - (VU)^T``), so that the components start near the target (sheet §7.4)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(0, ge=0, description="warm-up steps (0: none)")
    lr: float = Field(1e-3, gt=0, le=10, description="warm-up AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="warm-up AdamW weight decay")


def _lr_schedule(value: Any) -> Any:
    """A bare number is a constant learning rate."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"kind": "constant", "start": float(value)}
    return value


class SPDRunConfig(BaseModel):
    """Settings of one SPD run; YAML files and CLI flags map onto these fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    # what to decompose
    target: TargetName = Field(
        description="tms_5-2, tms_5-2_id, tms_40-10, tms_40-10_id (bundled verified targets), "
        "resid_mlp1/2/3 (trained on demand, cached) or minigpt (the bundled Mini-GPT)"
    )
    target_seed: int = Field(
        0, ge=0, lt=2**32, description="seed of an on-demand target (resid_mlp*)"
    )
    decomposition: list[DecomposedModule] | None = Field(
        None, description="modules to decompose (default: the target's standard set)"
    )
    C: int | None = Field(
        None, ge=1, le=2**20, description="components per module of the default decomposition"
    )
    ci_fn: Literal["mlp", "vector_mlp", "shared_mlp"] = Field(
        "mlp", description="causal-importance function"
    )
    ci_hidden: list[int] = Field([16], description="hidden widths of the CI function")
    losses: LossConfig = Field(
        description="loss coefficients and settings (importance minimality needs its coeff)"
    )
    # optimisation
    lr: Schedule = Field(
        default_factory=lambda: Schedule(kind="cosine", start=1e-3, end=0.0),
        description="learning-rate decay after the warm-up (a number: constant)",
    )
    lr_warmup_frac: float = Field(0.0, ge=0, lt=1, description="share of steps of linear warm-up")
    steps: int = Field(ge=1, le=10**9, description="optimiser steps")
    batch_size: int = Field(
        ge=1, le=2**24, description="samples (sequences for minigpt) per step, over all ranks"
    )
    faithfulness_warmup: FaithfulnessWarmup = Field(default_factory=FaithfulnessWarmup)
    # evaluation, logging, checkpoints
    eval_every: int = Field(1000, ge=1, description="steps between cheap evaluations")
    eval_batches: int = Field(5, ge=1, description="batches per cheap evaluation")
    eval_batch_size: int | None = Field(
        None, ge=1, le=2**24, description="batch size of evaluations (default: batch_size)"
    )
    final_eval_samples: int = Field(
        20000, ge=1, description="fresh samples (sequences for minigpt) of the final evaluation"
    )
    one_hot_magnitude: float = Field(
        0.75, gt=0, description="input magnitude of the one-hot CI evaluation (toys)"
    )
    log_every: int = Field(100, ge=1, description="steps between train-loss records")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of initialisation, batches and masks")
    threads: int = Field(1, ge=1, le=1024, description="torch CPU threads")
    dtype: Literal["float32"] = Field("float32", description="compute dtype (fp32 only)")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")
    compile_ci: bool = Field(
        False,
        description="run one-hidden-layer mlp CI functions compiled: the fused C++ kernels on "
        "CPU in fp32 (built once per machine), torch.compile elsewhere; falls back to eager",
    )

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number(cls, value: Any) -> Any:
        return _lr_schedule(value)

    @field_validator("ci_hidden")
    @classmethod
    def _hidden(cls, value: list[int]) -> list[int]:
        for h in value:
            if h < 1:
                raise ValueError(f"ci_hidden entries must be integers >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _check(self) -> SPDRunConfig:
        if self.lr.start <= 0 or self.lr.final < 0:
            raise ValueError(
                f"lr must start > 0 and end >= 0, got start={self.lr.start}, end={self.lr.final}"
            )
        if self.decomposition is not None:
            if not self.decomposition:
                raise ValueError("decomposition must list at least one module (or be omitted)")
            if self.C is not None:
                raise ValueError("C applies only to the default decomposition; set C per module")
        if self.target == "minigpt" and self.losses.output_loss != "kl":
            raise ValueError("losses.output_loss must be 'kl' for the minigpt target")
        if self.target != "minigpt" and self.losses.output_loss != "mse":
            raise ValueError(f"losses.output_loss must be 'mse' for the {self.target} target")
        return self

    # -- derived ----------------------------------------------------------------------------------
    @property
    def warmup_steps(self) -> int:
        """Steps of linear learning-rate warm-up, ``int(lr_warmup_frac * steps)``."""
        return int(self.lr_warmup_frac * self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based ``step`` (see the module docstring)."""
        return lr_at(self.lr, self.lr_warmup_frac, self.steps, step)

    @property
    def eval_bs(self) -> int:
        """The evaluation batch size."""
        return self.eval_batch_size or self.batch_size


def lr_at(schedule: Schedule, warmup_frac: float, steps: int, step: int) -> float:
    """Linear warm-up from 0 over ``int(warmup_frac * steps)`` steps, then ``schedule`` over the
    remaining steps with progress ``(step - w) / (decay_steps - 1)`` (reference ``spd``)."""
    w = int(warmup_frac * steps)
    if step < w:
        return schedule.start * step / w
    decay_steps = steps - w
    return schedule.at((step - w) / max(decay_steps - 1, 1))


# -- bundled configs --------------------------------------------------------------------------
CONFIG_NAMES = (
    "tms_5-2",
    "tms_5-2_id",
    "tms_40-10",
    "tms_40-10_id",
    "resid_mlp1",
    "resid_mlp2",
    "resid_mlp3",
    "resid_mlp3_reference",
    "minigpt_mlp",
)


def bundled_config_path(name: str) -> Path:
    """The YAML file of the bundled config ``name`` (one of :data:`CONFIG_NAMES`)."""
    if name not in CONFIG_NAMES:
        raise ValueError(
            f"config name must be one of {', '.join(CONFIG_NAMES)} or a YAML file; got {name!r}"
        )
    return Path(str(resources.files("sparselens.spd") / "configs" / f"{name}.yaml"))


def load_config(name_or_path: str | Path, **overrides: Any) -> SPDRunConfig:
    """A bundled config by name, or a YAML file, with top-level ``overrides`` applied."""
    from sparselens.train.config import load_yaml_mapping

    p = Path(name_or_path)
    if str(name_or_path) in CONFIG_NAMES:
        p = bundled_config_path(str(name_or_path))
    elif not p.is_file():
        if p.suffix in (".yaml", ".yml") or p.parent != Path("."):
            raise FileNotFoundError(f"config file {p}: no such file")
        bundled_config_path(str(name_or_path))  # raises the one-line "must be one of" error
    settings = load_yaml_mapping(p)
    settings.update(overrides)
    return SPDRunConfig.model_validate(settings)


def set_path(settings: dict[str, Any], dotted: str, value: Any) -> None:
    """``settings[a][b][c] = value`` for ``dotted = "a.b.c"`` (intermediate dicts created).

    An existing intermediate that is not a mapping is an error naming the key.
    """
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"setting name must be dot-separated keys, got {dotted!r}")
    node = settings
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif isinstance(child, BaseModel):
            child = node[k] = child.model_dump()
        elif not isinstance(child, dict):
            where = ".".join(keys[: i + 1])
            raise ValueError(f"{where} is not a group of settings, cannot set {dotted}")
        node = child
    node[keys[-1]] = value


__all__ = [
    "CI_FNS",
    "CONFIG_NAMES",
    "TARGETS",
    "FaithfulnessWarmup",
    "SPDRunConfig",
    "TargetName",
    "bundled_config_path",
    "load_config",
    "lr_at",
    "set_path",
]
