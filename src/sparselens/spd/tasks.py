"""What an SPD run decomposes: the target model, its input distribution, its default decomposition.

:func:`load_task` turns a target name of :class:`~sparselens.spd.config.SPDRunConfig` into a
:class:`Task`:

* ``tms_5-2``, ``tms_5-2_id``, ``tms_40-10``, ``tms_40-10_id``: the bundled, verified TMS targets
  (``sparselens/data/spd_targets/``); inputs: each feature on w.p. p with value U[0, 1).
* ``resid_mlp1/2/3``: the paper's residual-MLP targets, trained on demand with the reference
  recipe (seconds to a minute) and cached under ``$SPARSELENS_CACHE`` (default
  ``~/.cache/sparselens``) in ``spd_targets/<name>-seed<seed>``.
* ``minigpt``: the bundled Mini-GPT (:func:`sparselens.lm.checkpoint.default_checkpoint`) on
  windows of its training corpus (the generated verbs corpus, training split); KL output loss.

``Task.sample(n, generator)`` draws ``n`` inputs (``n`` sequences for the LM) with one seeded
``torch.Generator`` whose state is the data position.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sparselens.spd.component_model import DecomposedModule

logger = logging.getLogger(__name__)

TaskKind = Literal["tms", "resid_mlp", "lm"]
TMS_TARGETS = ("tms_5-2", "tms_5-2_id", "tms_40-10", "tms_40-10_id")
RESID_TARGETS = {"resid_mlp1": 1, "resid_mlp2": 2, "resid_mlp3": 3}
DEFAULT_C = {
    "tms_5-2": 20,
    "tms_5-2_id": 20,
    "tms_40-10": 200,
    "tms_40-10_id": 200,
    "resid_mlp1": 100,
    "resid_mlp2": 400,
    "resid_mlp3": 500,
    "minigpt": 256,
}


@dataclass
class Task:
    """A frozen target, its data and the facts the evaluation needs."""

    name: str
    kind: TaskKind
    target: nn.Module
    sample: Callable[[int, torch.Generator], Tensor]
    default_decomposition: Callable[[int], list[DecomposedModule]]
    n_features: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None

    def decomposition(self, C: int | None = None) -> list[DecomposedModule]:
        """The standard decomposition with ``C`` components per module (default per target)."""
        return self.default_decomposition(C or DEFAULT_C[self.name])


def cache_dir() -> Path:
    """``$SPARSELENS_CACHE`` or ``~/.cache/sparselens``."""
    env = os.environ.get("SPARSELENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparselens"


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- TMS --------------------------------------------------------------------------------------
def _tms_task(name: str) -> Task:
    from sparselens.spd.targets import io
    from sparselens.spd.targets.tms import tms_batch, tms_decomposition

    path = io.bundled_targets_dir() / name
    model = _freeze(io.load_target(path))
    cfg = model.cfg

    def sample(n: int, generator: torch.Generator) -> Tensor:
        return tms_batch(n, cfg, generator)

    return Task(
        name=name,
        kind="tms",
        target=model,
        sample=sample,
        default_decomposition=lambda C: tms_decomposition(cfg, C),
        n_features=cfg.n_features,
        info={"target_path": str(path), "target_config": cfg.model_dump(mode="json")},
    )


# -- ResidMLP ---------------------------------------------------------------------------------
def resid_mlp_decomposition(n_layers: int, C: int) -> list[DecomposedModule]:
    """``layers.{i}.mlp_in`` and ``layers.{i}.mlp_out``, ``C`` components each."""
    out = []
    for i in range(n_layers):
        out.append(DecomposedModule(pattern=f"layers.{i}.mlp_in", C=C))
        out.append(DecomposedModule(pattern=f"layers.{i}.mlp_out", C=C))
    return out


def _resid_task(name: str, seed: int, saved: Path | None = None) -> Task:
    from sparselens.spd.targets.io import load_target, save_target
    from sparselens.spd.targets.resid_mlp import resid_mlp_batch, resid_mlp_preset, train_resid_mlp

    n_layers = RESID_TARGETS[name]
    cfg = resid_mlp_preset(n_layers)
    path = saved or cache_dir() / "spd_targets" / f"{name}-seed{seed}"
    model = None
    if saved is not None:
        model = load_target(saved)
        if model.cfg != cfg:
            raise ValueError(f"target {saved} is not a {name} target")
    elif path.exists():
        try:
            model = load_target(path)
            if model.cfg != cfg:
                logger.warning("cached target %s has another config; retraining", path)
                model = None
        except (ValueError, OSError) as e:
            logger.warning("cannot load cached target %s (%s); retraining", path, e)
            model = None
    trained = model is None
    if model is None:
        logger.info("training the %s target (seed %d) ...", name, seed)
        model = train_resid_mlp(cfg, seed=seed)
        save_target(model, path)
    model = _freeze(model)

    def sample(n: int, generator: torch.Generator) -> Tensor:
        return resid_mlp_batch(n, cfg, generator)

    info = {
        "target_path": str(path),
        "target_config": cfg.model_dump(mode="json"),
        "target_seed": seed,
        "target_trained_now": trained,
        "target_training": dict(getattr(model, "training_info", {}) or {}),
    }
    return Task(
        name=name,
        kind="resid_mlp",
        target=model,
        sample=sample,
        default_decomposition=lambda C: resid_mlp_decomposition(n_layers, C),
        n_features=cfg.n_features,
        info=info,
    )


# -- Mini-GPT ---------------------------------------------------------------------------------
def minigpt_decomposition(n_layers: int, C: int) -> list[DecomposedModule]:
    """Every block's ``mlp.fc_in`` and ``mlp.fc_out``, ``C`` components each."""
    out = []
    for i in range(n_layers):
        out.append(DecomposedModule(pattern=f"blocks.{i}.mlp.fc_in", C=C))
        out.append(DecomposedModule(pattern=f"blocks.{i}.mlp.fc_out", C=C))
    return out


def _minigpt_task() -> Task:
    from sparselens.lm.checkpoint import default_checkpoint, load_checkpoint, read_checkpoint_extra
    from sparselens.lm.corpora import load_corpus
    from sparselens.lm.train import TrainConfig, prepare_data

    directory = default_checkpoint()
    model, tokenizer = load_checkpoint(directory)
    model = _freeze(model)
    extra = read_checkpoint_extra(directory)
    ctx = model.config.context_len
    corpus = str(extra.get("corpus", "verbs"))
    corpus_seed = int(extra.get("corpus_seed", 0))
    text = load_corpus(corpus, seed=corpus_seed)
    data = prepare_data(
        TrainConfig(corpus=corpus, corpus_seed=corpus_seed, context_len=ctx), text, tokenizer
    )
    stream, starts = data.train, data.train_starts

    def sample(n: int, generator: torch.Generator) -> Tensor:
        pick = torch.randint(starts.numel(), (n,), generator=generator)
        return stream[starts[pick][:, None] + torch.arange(ctx)]

    n_layers = model.config.n_layers
    return Task(
        name="minigpt",
        kind="lm",
        target=model,
        sample=sample,
        default_decomposition=lambda C: minigpt_decomposition(n_layers, C),
        info={
            "target_path": str(directory),
            "target_config": model.config.model_dump(mode="json"),
            "corpus": corpus,
            "corpus_hash": data.corpus_hash,
            "train_tokens": int(stream.numel()),
        },
        tokenizer=tokenizer,
    )


def load_task(name: str, *, target_seed: int = 0, target_path: str | Path | None = None) -> Task:
    """The :class:`Task` of target ``name`` (see the module docstring).

    ``target_path``: load an on-demand (ResidMLP) target from there instead of the cache.
    """
    if name in TMS_TARGETS:
        return _tms_task(name)
    if name in RESID_TARGETS:
        return _resid_task(name, target_seed, Path(target_path) if target_path else None)
    if name == "minigpt":
        return _minigpt_task()
    choices = ", ".join([*TMS_TARGETS, *RESID_TARGETS, "minigpt"])
    raise ValueError(f"target must be one of {choices}; got {name!r}")


__all__ = [
    "DEFAULT_C",
    "Task",
    "cache_dir",
    "load_task",
    "minigpt_decomposition",
    "resid_mlp_decomposition",
]
