"""Toy models of superposition (Elhage et al. 2022) as SPD targets (SPD paper §4.1).

``out = ReLU(W_1^T [H] W_1 x + b)``: ``linear1`` (n_features -> n_hidden, no bias), an optional
frozen identity ``hidden_layers.0`` (n_hidden x n_hidden, the "+ID" variant) and ``linear2``, the
transpose of ``linear1`` as ONE tied parameter
(:class:`~sparselens.spd.components.TransposedLinear`) with its own bias. Data: each feature on
independently with probability p, value U[0, 1); the label is the input (importance 1).

Target recipe (reference, sheet §9): AdamW (wd 0.01), lr 5e-3 constant, 10k steps; 5-2: B 1024,
bias initialised like ``nn.Linear``; 40-10: B 8192, bias initialised to 0. The recipe is
seed-fragile, so :func:`train_verified_tms` retries seeds until :func:`represented_features` counts
every feature.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from sparselens.core.checks import check_choice, check_int, check_number
from sparselens.spd.component_model import DecomposedModule
from sparselens.spd.components import TransposedLinear
from sparselens.train.progress import progress_bar

Criterion = Literal["auto", "output", "column_norm"]


class TMSConfig(BaseModel):
    """Shape of a TMS target and its data distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_features: Annotated[int, Field(gt=0)]
    n_hidden: Annotated[int, Field(gt=0)]
    identity: bool = False
    feature_probability: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05


class TMSRecipe(NamedTuple):
    """Per-size training recipe and the representation check that suits it."""

    batch_size: int
    zero_bias_init: bool
    criterion: Literal["output", "column_norm"]


TMS_RECIPES: dict[tuple[int, int], TMSRecipe] = {
    (5, 2): TMSRecipe(batch_size=1024, zero_bias_init=False, criterion="output"),
    (40, 10): TMSRecipe(batch_size=8192, zero_bias_init=True, criterion="column_norm"),
}
"""Reference recipes by ``(n_features, n_hidden)``. A good 5-2 target answers 0.69-0.73 to a
one-hot 0.75 input (the output test); a good 40-10 target answers only 0.58-0.63 (interference
lowers its bias), so it is judged by its column norms instead (sheet §9)."""


TMS_TARGETS: dict[str, TMSConfig] = {
    "tms_5-2": TMSConfig(n_features=5, n_hidden=2),
    "tms_5-2_id": TMSConfig(n_features=5, n_hidden=2, identity=True),
    "tms_40-10": TMSConfig(n_features=40, n_hidden=10),
    "tms_40-10_id": TMSConfig(n_features=40, n_hidden=10, identity=True),
}
"""The paper's four TMS targets by name (bundled, verified, in ``sparselens/data/spd_targets``)."""


def tms_recipe(cfg: TMSConfig) -> TMSRecipe:
    """The recipe for ``cfg``'s size; other sizes get B 1024, default bias, the norm test."""
    return TMS_RECIPES.get(
        (cfg.n_features, cfg.n_hidden),
        TMSRecipe(batch_size=1024, zero_bias_init=False, criterion="column_norm"),
    )


class TMSModel(nn.Module):
    """``ReLU(linear2(hidden(linear1(x))))`` with ``linear2.weight = linear1.weight.T`` (tied)."""

    def __init__(self, cfg: TMSConfig) -> None:
        super().__init__()
        if not isinstance(cfg, TMSConfig):
            raise TypeError(f"cfg must be a TMSConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.linear1 = nn.Linear(cfg.n_features, cfg.n_hidden, bias=False)
        self.hidden_layers: nn.ModuleList | None = None
        if cfg.identity:
            hidden = nn.Linear(cfg.n_hidden, cfg.n_hidden, bias=False)
            with torch.no_grad():
                hidden.weight.copy_(torch.eye(cfg.n_hidden))
            hidden.weight.requires_grad_(False)
            self.hidden_layers = nn.ModuleList([hidden])
        self.linear2 = TransposedLinear(self.linear1, bias=True)
        bound = 1.0 / math.sqrt(cfg.n_hidden)  # nn.Linear(n_hidden, n_features)'s bias init
        with torch.no_grad():
            self.linear2.bias.uniform_(-bound, bound)
        self.training_info: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        if self.hidden_layers is not None:
            for layer in self.hidden_layers:
                h = layer(h)
        return F.relu(self.linear2(h))


def tms_batch(
    n: int,
    cfg: TMSConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` inputs (n, n_features): each feature on with probability p, value U[0, 1)."""
    n = check_int("n", n, ge=1)
    shape = (n, cfg.n_features)
    values = torch.rand(shape, generator=generator, device=device)
    on = torch.rand(shape, generator=generator, device=device) < cfg.feature_probability
    return values.mul_(on)


def tms_decomposition(cfg: TMSConfig, C: int) -> list[DecomposedModule]:
    """The paper's TMS decomposition: ``linear1``, ``linear2`` (the transpose of ``linear1``'s
    components) and, for the identity variant, ``hidden_layers.0``; ``C`` components each."""
    c = check_int("C", C, ge=1)
    mods = [DecomposedModule(pattern="linear1", C=c)]
    if cfg.identity:
        mods.append(DecomposedModule(pattern="hidden_layers.0", C=c))
    mods.append(DecomposedModule(pattern="linear2", C=c, tied_to="linear1"))
    return mods


@torch.no_grad()
def feature_outputs(model: TMSModel, magnitude: float = 0.75) -> Tensor:
    """``out_j`` for the one-hot input ``magnitude * e_j``, for every feature j (n_features,)."""
    mag = check_number("magnitude", magnitude, gt=0.0)
    n = model.cfg.n_features
    x = mag * torch.eye(n, device=model.linear1.weight.device)
    return model(x).diagonal()


@torch.no_grad()
def column_norms(model: TMSModel) -> Tensor:
    """``||W_j||`` of each feature's column of ``W = linear1.weight`` (n_features,)."""
    return model.linear1.weight.norm(dim=0)


def represented_features(
    model: TMSModel,
    magnitude: float = 0.75,
    tol: float = 0.1,
    *,
    criterion: Criterion = "auto",
    rel_norm: float = 0.5,
) -> int:
    """How many features the target represents.

    ``output``: ``|out_j(magnitude e_j) - magnitude| < tol`` (the reference's "well preserved").
    ``column_norm``: ``||W_j|| > rel_norm * max_k ||W_k||`` (no dead or shrunken column).
    ``auto``: the criterion of :func:`tms_recipe` for the model's size (output for 5-2, column
    norm for 40-10, whose good targets answer only 0.58-0.63 to x = 0.75).
    """
    crit = check_choice("criterion", criterion, ("auto", "output", "column_norm"))
    if crit == "auto":
        crit = tms_recipe(model.cfg).criterion
    if crit == "output":
        t = check_number("tol", tol, gt=0.0)
        mag = check_number("magnitude", magnitude, gt=0.0)
        return int(((feature_outputs(model, mag) - mag).abs() < t).sum())
    r = check_number("rel_norm", rel_norm, gt=0.0, lt=1.0)
    norms = column_norms(model)
    return int((norms > r * norms.max()).sum())


@torch.no_grad()
def init_tms_(model: TMSModel, generator: torch.Generator, *, zero_bias: bool = False) -> None:
    """``nn.Linear``'s default initialisation drawn from ``generator``: ``linear1.weight`` ~
    U(+-1/sqrt(n_features)), ``linear2.bias`` ~ U(+-1/sqrt(n_hidden)) (or 0)."""
    cfg = model.cfg
    w, b = model.linear1.weight, model.linear2.bias
    bw, bb = 1.0 / math.sqrt(cfg.n_features), 1.0 / math.sqrt(cfg.n_hidden)
    w.copy_(torch.rand(w.shape, generator=generator).mul_(2 * bw).sub_(bw))
    if zero_bias:
        b.zero_()
    else:
        b.copy_(torch.rand(b.shape, generator=generator).mul_(2 * bb).sub_(bb))


def train_tms(
    cfg: TMSConfig,
    *,
    seed: int,
    steps: int = 10_000,
    batch_size: int | None = None,
    lr: float = 5e-3,
    weight_decay: float = 0.01,
    zero_bias_init: bool | None = None,
    threads: int | None = 1,
    progress: bool = False,
) -> TMSModel:
    """Train a :class:`TMSModel` with the reference recipe; return it in eval mode.

    Loss ``mean((x - out)^2)``; AdamW on the one tied weight and the bias (the hidden identity is
    frozen). ``batch_size``/``zero_bias_init`` default to :func:`tms_recipe`. ``seed`` seeds one
    generator that draws the initialisation (:func:`init_tms_`) and then the data stream; the
    global RNG is left untouched. ``threads`` (default 1)
    sets torch's intra-op threads for the duration. ``model.training_info`` records the recipe,
    the final loss and the wall time.
    """
    recipe = tms_recipe(cfg)
    s = check_int("seed", seed, ge=0)
    n_steps = check_int("steps", steps, ge=1)
    bs = check_int("batch_size", recipe.batch_size if batch_size is None else batch_size, ge=1)
    lr = check_number("lr", lr, gt=0.0)
    wd = check_number("weight_decay", weight_decay, ge=0.0)
    zero_bias = recipe.zero_bias_init if zero_bias_init is None else bool(zero_bias_init)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(check_int("threads", threads, ge=1))
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            model = TMSModel(cfg)
        gen = torch.Generator().manual_seed(s)
        init_tms_(model, gen, zero_bias=zero_bias)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        bar = progress_bar(n_steps, f"tms {cfg.n_features}-{cfg.n_hidden} target", enabled=progress)
        model.train()
        loss = torch.zeros(())
        for _ in range(n_steps):
            x = tms_batch(bs, cfg, gen)
            loss = F.mse_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        bar.close()
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    model.training_info = {
        "recipe": "tms",
        "seed": s,
        "steps": n_steps,
        "batch_size": bs,
        "lr": lr,
        "lr_schedule": "constant",
        "weight_decay": wd,
        "zero_bias_init": zero_bias,
        "final_loss": float(loss.detach()),
        "train_seconds": round(time.perf_counter() - t0, 3),
    }
    return model


def train_verified_tms(
    cfg: TMSConfig,
    *,
    seeds: Iterable[int],
    criterion: Criterion = "auto",
    magnitude: float = 0.75,
    tol: float = 0.1,
    **train_kwargs: Any,
) -> TMSModel:
    """Train with each seed in turn; return the first target representing every feature.

    ``train_kwargs`` go to :func:`train_tms`. ``model.training_info`` gains the seeds tried and
    each one's represented-feature count. Raises RuntimeError when no seed works.
    """
    tried: list[dict[str, int]] = []
    for seed in seeds:
        model = train_tms(cfg, seed=seed, **train_kwargs)
        n = represented_features(model, magnitude, tol, criterion=criterion)
        tried.append({"seed": int(seed), "represented": n})
        if n == cfg.n_features:
            crit = tms_recipe(cfg).criterion if criterion == "auto" else criterion
            model.training_info.update({"criterion": crit, "represented": n, "seeds_tried": tried})
            return model
    if not tried:
        raise ValueError("seeds must name at least one seed")
    summary = ", ".join(f"seed {t['seed']}: {t['represented']}" for t in tried)
    raise RuntimeError(
        f"no seed gave a TMS {cfg.n_features}-{cfg.n_hidden} target representing all "
        f"{cfg.n_features} features ({summary}); try more seeds"
    )


__all__ = [
    "TMS_RECIPES",
    "TMS_TARGETS",
    "TMSConfig",
    "TMSModel",
    "TMSRecipe",
    "column_norms",
    "feature_outputs",
    "init_tms_",
    "represented_features",
    "tms_batch",
    "tms_decomposition",
    "tms_recipe",
    "train_tms",
    "train_verified_tms",
]
