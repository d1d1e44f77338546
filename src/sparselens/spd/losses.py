"""SPD losses (Bushnaq et al. 2025, §2.3-2.4, Alg. 1; sheet §5-§6), computed in one batched pass.

``total = sum_i coeff_i * loss_i`` over

* ``stochastic_recon``: ``D(f(x; every layer on components with m = g + (1-g)u, delta r), f(x))``
  averaged over ``n_mask_samples`` draws (paper beta_1);
* ``layerwise_recon``: the same with ONE layer replaced and the others on the target's weights,
  averaged over layers and draws (paper beta_2);
* ``subset_recon``: every position replaces a uniformly random k-subset of layers;
* ``ci_masked_recon``: masks ``m = g`` exactly, no delta component;
* ``importance_minimality``: ``sum_layers sum_c mean_positions (g_upper + eps)^p`` (or smooth-L0
  ``g^2/(g^2+gamma^2)``) from :mod:`sparselens.core.penalties`, with ``p``/``gamma`` annealed by
  a :class:`~sparselens.core.schedules.Schedule`, plus the batch-invariant frequency term
  ``frequency_coeff * sum f_c log2(1 + a' f_c)`` (param-decomp PR #543);
* ``faithfulness``: ``sum_l ||W_l - (V_l U_l)^T||_F^2 / sum_l numel(W_l)``;
* ``pgd_recon``: reconstruction under adversarial masks ``g + (1-g) a`` found by ``n_steps`` of
  sign ascent on the sources ``a`` (clamped to [0, 1]; the delta mask is the last channel).

``D`` is ``mse`` (mean over every output element) or ``kl``
(``KL(softmax(target) || softmax(pred))`` summed over the vocabulary, mean over positions).

Vectorisation: the target runs once (caching layer inputs, no grad), CI once, and every
reconstruction variant -- S stochastic draws, S*L layerwise ones, S subset ones, the CI-masked
one -- is stacked along the batch axis into ONE forward pass of the component model, instead of
the reference's 1 + S + S*L sequential passes. Nothing reads a tensor on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from torch.autograd.function import once_differentiable

from sparselens.core import distributed as D
from sparselens.core import penalties
from sparselens.core.schedules import Schedule
from sparselens.spd.component_model import BaseInput, ComponentModel
from sparselens.spd.masks import delta_mask, stochastic_masks, uniform, uniform_k_subset_routes

OutputLoss = Literal["mse", "kl"]
EVAL_KINDS = ("unmasked", "ci", "rounded", "stochastic", "zero", "random")


def _schedule(value: Any) -> Any:
    """A bare number is a constant schedule."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"kind": "constant", "start": float(value)}
    return value


class ImportanceMinimalityConfig(BaseModel):
    """Importance minimality on the upper-leaky CI (sheet §5.1-§5.3)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coeff: float = Field(ge=0, description="coefficient of the importance-minimality loss")
    kind: Literal["lp", "smooth_l0"] = Field("lp", description="lp or smooth_l0 (Geman-McClure)")
    p: Schedule = Field(
        default_factory=lambda: Schedule.constant(1.0), description="L_p exponent schedule"
    )
    eps: float = Field(1e-12, ge=0, description="added inside the power (reference: 1e-12)")
    gamma: Schedule = Field(
        default_factory=lambda: Schedule.constant(0.1), description="smooth-L0 scale schedule"
    )
    normalize_at_one: bool = Field(False, description="smooth-L0: scale so that phi(1) = 1")
    frequency_coeff: float = Field(0.0, ge=0, description="coefficient of the frequency term")
    reference_token_count: float | None = Field(
        None, gt=0, description="a' of the frequency term (positions; needed with its coeff)"
    )

    @field_validator("p", "gamma", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return _schedule(value)

    @model_validator(mode="after")
    def _check(self) -> ImportanceMinimalityConfig:
        for name in ("p", "gamma"):
            s: Schedule = getattr(self, name)
            if s.start <= 0 or s.final <= 0:
                raise ValueError(f"{name} must stay > 0, got start={s.start}, end={s.final}")
        if self.frequency_coeff > 0 and self.reference_token_count is None:
            raise ValueError("reference_token_count must be set (> 0) when frequency_coeff > 0")
        return self


class PGDConfig(BaseModel):
    """Adversarial reconstruction by sign ascent on the mask sources (sheet §6)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    coeff: float = Field(0.0, ge=0, description="coefficient of the PGD loss (0: off)")
    init: Literal["random", "ones", "zeroes"] = Field("random", description="source start")
    step_size: float = Field(1.0, gt=0, description="sign-ascent step")
    n_steps: int = Field(1, ge=1, le=10_000, description="ascent steps")
    scope: Literal["shared", "per_datapoint"] = Field(
        "shared", description="one source per layer (shared) or one per position"
    )
    routing: Literal["all", "uniform_k_subset"] = Field(
        "all", description="replace every layer or a random k-subset per position"
    )


class LossConfig(BaseModel):
    """Loss coefficients and settings of an SPD run."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    stochastic_recon: float = Field(1.0, ge=0, description="stochastic reconstruction coeff")
    layerwise_recon: float = Field(1.0, ge=0, description="layerwise reconstruction coeff")
    subset_recon: float = Field(0.0, ge=0, description="k-subset reconstruction coeff")
    ci_masked_recon: float = Field(0.0, ge=0, description="CI-masked reconstruction coeff")
    faithfulness: float = Field(0.0, ge=0, description="faithfulness (mean delta^2) coeff")
    importance_minimality: ImportanceMinimalityConfig
    pgd: PGDConfig = Field(default_factory=PGDConfig)
    n_mask_samples: int = Field(1, ge=1, le=1024, description="mask draws per stochastic loss")
    output_loss: OutputLoss = Field("mse", description="mse (toys) or kl (language models)")
    use_delta_component: bool = Field(True, description="add the delta component under masks")

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        recon = (
            self.stochastic_recon,
            self.layerwise_recon,
            self.subset_recon,
            self.ci_masked_recon,
            self.pgd.coeff,
        )
        if not any(c > 0 for c in recon):
            raise ValueError(
                "at least one reconstruction loss coefficient (stochastic_recon, layerwise_recon, "
                "subset_recon, ci_masked_recon, pgd.coeff) must be > 0"
            )
        return self


# -- reconstruction error ---------------------------------------------------------------------
class _SoftmaxKL(torch.autograd.Function):
    """``KL(p || softmax(pred))`` over the last axis, ``p = exp(log_t)`` broadcast over ``pred``.

    ``sum_k p_k (log p_k - log_softmax(pred)_k)``; the backward is the closed form
    ``(softmax(pred) sum_k p_k - p) g`` in place on one buffer instead of autograd's passes
    through the difference, the product and ``log_softmax``'s backward. No gradient to ``log_t``
    (the frozen target's log-probabilities).
    """

    @staticmethod
    def forward(ctx: Any, pred: Tensor, log_t: Tensor) -> Tensor:
        p = log_t.exp()
        log_q = torch.log_softmax(pred, dim=-1)
        ctx.save_for_backward(log_q, p)
        return (p * (log_t - log_q)).sum(-1)  # not a difference of sums (small KLs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        log_q, p = ctx.saved_tensors
        grad = log_q.exp().mul_(p.sum(-1, keepdim=True)).sub_(p)
        return grad.mul_(g.unsqueeze(-1)), None


def recon_errors(pred: Tensor, target: Tensor, kind: OutputLoss) -> Tensor:
    """Per-variant error of ``pred`` (``(V, *target.shape)``) against ``target``, shape ``(V,)``.

    ``mse``: mean over every output element; ``kl``: ``KL(softmax(target) || softmax(pred))``
    summed over the last (vocabulary) axis, mean over positions. ``kl`` treats ``target`` as a
    constant (the frozen target's output): no gradient reaches it.
    """
    if pred.shape[1:] != target.shape:
        raise ValueError(
            f"pred must have shape (V, {', '.join(map(str, target.shape))}), got "
            f"{tuple(pred.shape)}"
        )
    if kind == "mse":
        return (pred - target).square().flatten(1).mean(1)
    if kind == "kl":
        kl = _SoftmaxKL.apply(pred, torch.log_softmax(target.detach(), dim=-1))
        return kl.flatten(1).mean(1)
    raise ValueError(f"output_loss must be one of mse, kl; got {kind!r}")


def recon_error(pred: Tensor, target: Tensor, kind: OutputLoss) -> Tensor:
    """:func:`recon_errors` of a single prediction (same shape as ``target``), a 0-d tensor."""
    return recon_errors(pred.unsqueeze(0), target, kind)[0]


# -- importance minimality, faithfulness -------------------------------------------------------
def importance_terms(
    upper: Mapping[str, Tensor],
    cfg: ImportanceMinimalityConfig,
    progress: float,
    *,
    finite_check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(importance minimality, frequency term or None)`` summed over layers (not averaged:
    adding layers must not change the cost of one component), at training ``progress``.
    ``finite_check=False`` skips the penalties' NaN / inf scan of the CI (a host read)."""
    imp: Tensor | None = None
    freq: Tensor | None = None
    with_freq = cfg.frequency_coeff > 0
    a = cfg.reference_token_count or 1.0
    for ci in upper.values():
        if cfg.kind == "lp":
            p = cfg.p.at(progress)
            if with_freq:
                i, f = penalties.lp_and_frequency(ci, p, a, cfg.eps, finite_check=finite_check)
            else:
                i, f = penalties.lp_importance(ci, p, cfg.eps, finite_check=finite_check), None
        else:
            g = cfg.gamma.at(progress)
            if with_freq:
                i, f = penalties.smooth_l0_and_frequency(
                    ci, g, a, cfg.normalize_at_one, finite_check=finite_check
                )
            else:
                i, f = (
                    penalties.smooth_l0(ci, g, cfg.normalize_at_one, finite_check=finite_check),
                    None,
                )
        imp = i if imp is None else imp + i
        if f is not None:
            freq = f if freq is None else freq + f
    if imp is None:
        raise ValueError("importance minimality needs the CI of at least one layer")
    return imp, freq


def importance_minimality(
    upper: Mapping[str, Tensor], cfg: ImportanceMinimalityConfig, progress: float
) -> Tensor:
    """The importance-minimality term (without its coefficient and the frequency term)."""
    if cfg.frequency_coeff > 0:
        cfg = cfg.model_copy(update={"frequency_coeff": 0.0})
    return importance_terms(upper, cfg, progress)[0]


def faithfulness(weight_deltas: Mapping[str, Tensor]) -> Tensor:
    """``sum_l ||Delta W_l||_F^2 / sum_l numel(Delta W_l)`` (mean squared weight delta)."""
    if not weight_deltas:
        raise ValueError("faithfulness needs at least one weight delta")
    total = sum(d.square().sum() for d in weight_deltas.values())
    n = sum(d.numel() for d in weight_deltas.values())
    return total / n  # type: ignore[return-value]


# -- the batched variant pass ------------------------------------------------------------------
class _Variants:
    """Per-layer mask / delta / route chunks of reconstruction variants stacked on one axis.

    A layer without a mask in a chunk runs the original module on that chunk's rows (the
    layerwise loss's other layers): it is left out of the component products there
    (``model(..., rows=...)``).
    """

    def __init__(self, names: Sequence[str], batch: torch.Size, use_delta: bool) -> None:
        self.names = list(names)
        self.batch = batch
        self.use_delta = use_delta
        self.masks: dict[str, list[Tensor | None]] = {n: [] for n in names}
        self.deltas: dict[str, list[Tensor | None]] = {n: [] for n in names}
        self.routes: dict[str, list[Tensor | None]] = {n: [] for n in names}
        self.groups: list[tuple[str, int, int]] = []  # (term, first variant, count)
        self.count = 0

    def add(
        self,
        term: str,
        n: int,
        masks: Mapping[str, Tensor],
        deltas: Mapping[str, Tensor] | None,
        routes: Mapping[str, Tensor | None],
    ) -> None:
        """``n`` variants: per replaced layer masks ``(n, *batch, C)`` (a layer not in ``masks``
        runs the original module), delta masks ``(n, *batch)`` (None: no delta component,
        ``r = 0``), routes ``(n, *batch)`` bool or None (all positions replaced)."""
        self.groups.append((term, self.count, n))
        self.count += n
        for name in self.names:
            self.masks[name].append(masks.get(name))
            self.deltas[name].append(deltas.get(name) if deltas is not None else None)
            self.routes[name].append(routes.get(name))

    def run(
        self,
        model: ComponentModel,
        x: Tensor,
        target: Tensor,
        kind: OutputLoss,
        base: BaseInput | None = None,
    ) -> Tensor:
        """Per-variant reconstruction errors, shape ``(count,)``, from one forward pass
        (``base``: the first decomposed layer's input for one copy of ``x``)."""
        v, n_rows = self.count, self.batch[0]  # the layers' first axis: B, or B*T if flattened
        masks: dict[str, Tensor] = {}
        deltas: dict[str, Tensor] = {}
        routes: dict[str, Tensor] = {}
        rows: dict[str, Tensor] = {}
        for name in self.names:
            on = [i for i, m in enumerate(self.masks[name]) if m is not None]
            if not on:
                continue
            groups = [self.groups[i] for i in on]
            masks[name] = torch.cat([m for m in self.masks[name] if m is not None]).flatten(0, 1)
            d_chunks = [self.deltas[name][i] for i in on]
            if self.use_delta or any(d is not None for d in d_chunks):  # a missing chunk: r = 0
                parts = [
                    d if d is not None else masks[name].new_zeros((g[2], *self.batch))
                    for d, g in zip(d_chunks, groups, strict=True)
                ]
                deltas[name] = torch.cat(parts).flatten(0, 1)
            r_chunks = [self.routes[name][i] for i in on]
            if any(r is not None for r in r_chunks):
                parts = [
                    r
                    if r is not None
                    else torch.ones((g[2], *self.batch), dtype=torch.bool, device=x.device)
                    for r, g in zip(r_chunks, groups, strict=True)
                ]
                routes[name] = torch.cat(parts).flatten(0, 1)
            if len(on) < len(self.groups):
                rows[name] = torch.cat(
                    [
                        torch.arange(g[1] * n_rows, (g[1] + g[2]) * n_rows, device=x.device)
                        for g in groups
                    ]
                )
        x_rep = x.repeat(v, *([1] * (x.dim() - 1))) if v > 1 else x
        pred = model(x_rep, masks=masks, delta_masks=deltas, routes=routes, rows=rows, base=base)
        return recon_errors(pred.unflatten(0, (v, x.shape[0])), target, kind)


def _batch_shape(lower: Mapping[str, Tensor]) -> torch.Size:
    shapes = {tuple(g.shape[:-1]) for g in lower.values()}
    if len(shapes) != 1:
        raise ValueError(f"decomposed layers must share one batch shape, got {sorted(shapes)}")
    return next(iter(lower.values())).shape[:-1]


def compute_losses(
    model: ComponentModel,
    x: Tensor,
    cfg: LossConfig,
    *,
    progress: float,
    generator: torch.Generator | None = None,
    finite_check: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total loss and each term's (unweighted, detached) value; one batched pass.

    ``progress`` (step / steps) drives the ``p`` / ``gamma`` schedules; ``generator`` draws every
    mask, delta mask, route and PGD start. ``finite_check`` scans the CI for NaN / inf (a host
    read; the trainer instead checks its accumulated losses when it logs them).
    """
    target, inputs = model.target_output(x, cache_inputs=True)
    acts: dict[str, Tensor] = {}
    ci = model.causal_importance(inputs, acts_out=acts)
    lower = {n: c.lower for n, c in ci.items()}
    batch = _batch_shape(lower)
    names = model.names
    S, use_delta = cfg.n_mask_samples, cfg.use_delta_component
    dtype = next(iter(lower.values())).dtype

    def draw(
        n: int, layers: Sequence[str] = names
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        masks = {k: stochastic_masks(lower[k], n, generator) for k in layers}
        deltas = None
        if use_delta:
            deltas = {k: delta_mask((n, *batch), generator, dtype=dtype) for k in layers}
        return masks, deltas

    var = _Variants(names, batch, use_delta)
    if cfg.stochastic_recon > 0:
        m, d = draw(S)
        var.add("stochastic_recon", S, m, d, {})
    if cfg.layerwise_recon > 0:
        for j in names:  # only layer j replaced (and only its masks drawn)
            m, d = draw(S, [j])
            var.add("layerwise_recon", S, m, d, {})
    if cfg.subset_recon > 0:
        m, d = draw(S)
        r = uniform_k_subset_routes((S, *batch), len(names), generator)
        var.add("subset_recon", S, m, d, {k: r[..., i] for i, k in enumerate(names)})
    if cfg.ci_masked_recon > 0:
        var.add("ci_masked_recon", 1, {k: lower[k].unsqueeze(0) for k in names}, None, {})

    terms: dict[str, Tensor] = {}
    total = torch.zeros((), dtype=dtype)
    if var.count:
        first = model.first_layer  # None if the first layer reached is called repeatedly
        base = None
        if first is not None and inputs[first].shape[0] > 0:
            base = BaseInput(first, inputs[first], acts.get(first))
        errs = var.run(model, x, target, cfg.output_loss, base)
        chunks: dict[str, list[Tensor]] = {}  # layerwise adds one group per layer
        for term, start, n in var.groups:
            chunks.setdefault(term, []).append(errs[start : start + n])
        for term, parts in chunks.items():
            value = torch.cat(parts).mean()
            terms[term] = value
            total = total + getattr(cfg, term) * value
    imp_cfg = cfg.importance_minimality
    upper = {n: c.upper for n, c in ci.items()}
    imp, freq = importance_terms(upper, imp_cfg, progress, finite_check=finite_check)
    terms["importance_minimality"] = imp
    total = total + imp_cfg.coeff * imp
    if freq is not None:
        terms["frequency_minimality"] = freq
        total = total + imp_cfg.frequency_coeff * freq
    if cfg.faithfulness > 0:
        faith = faithfulness(model.weight_deltas())
        terms["faithfulness"] = faith
        total = total + cfg.faithfulness * faith
    if cfg.pgd.coeff > 0:
        adv = pgd_recon(
            model, x, lower, target, cfg.pgd, cfg.output_loss, use_delta, generator=generator
        )
        terms["pgd_recon"] = adv
        total = total + cfg.pgd.coeff * adv
    return total, {k: v.detach() for k, v in terms.items()}


# -- PGD ----------------------------------------------------------------------------------------
def pgd_recon(
    model: ComponentModel,
    x: Tensor,
    lower: Mapping[str, Tensor],
    target: Tensor,
    cfg: PGDConfig,
    output_loss: OutputLoss = "mse",
    use_delta_component: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reconstruction under adversarial masks ``g + (1 - g) a`` (sheet §6).

    Sources ``a`` per layer have ``C`` (+1 for the delta mask, last) channels and shape
    ``(1, ..., 1, C+1)`` (``shared``: one per layer, broadcast; under torch.distributed drawn on
    rank 0 and ascended on the all-reduced gradient) or ``(*batch, C+1)`` (``per_datapoint``).
    ``n_steps`` times ``a <- clamp(a + step_size * sign(grad_a loss), 0, 1)`` -- with the model's
    parameters and the CI held fixed, so the inner steps build no graph through them -- then one
    final forward, differentiable in the components and CI, with ``a`` a constant.
    """
    names = model.names
    batch = _batch_shape(lower)
    g0 = next(iter(lower.values()))
    shape = (1,) * len(batch) if cfg.scope == "shared" else tuple(batch)
    routes = None
    if cfg.routing == "uniform_k_subset":
        r = uniform_k_subset_routes(batch, len(names), generator)
        routes = {k: r[..., i] for i, k in enumerate(names)}
    sources: dict[str, Tensor] = {}
    for k in names:
        ch = lower[k].shape[-1] + (1 if use_delta_component else 0)
        if cfg.init == "random":
            a = uniform((*shape, ch), generator, dtype=g0.dtype)
        else:
            a = torch.full((*shape, ch), 1.0 if cfg.init == "ones" else 0.0, dtype=g0.dtype)
        sources[k] = a
    shared_dist = cfg.scope == "shared" and D.world_size() > 1
    if shared_dist:
        for a in sources.values():
            dist.broadcast(a, src=0)

    def loss(src: Mapping[str, Tensor], g: Mapping[str, Tensor]) -> Tensor:
        masks, deltas = {}, {} if use_delta_component else None
        for k in names:
            c = g[k].shape[-1]
            masks[k] = g[k] + (1 - g[k]) * src[k][..., :c]
            if deltas is not None:
                deltas[k] = src[k][..., c].expand(batch)
        pred = model(x, masks=masks, delta_masks=deltas, routes=routes)
        return recon_error(pred, target, output_loss)

    fixed = {k: v.detach() for k, v in lower.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        for _ in range(cfg.n_steps):
            leaves = {k: a.requires_grad_(True) for k, a in sources.items()}
            grads = torch.autograd.grad(loss(leaves, fixed), list(leaves.values()))
            if shared_dist:
                flat = torch.cat([gr.reshape(-1) for gr in grads])
                dist.all_reduce(flat)
                grads = flat.split([gr.numel() for gr in grads])
            sources = {
                k: (a.detach() + cfg.step_size * gr.reshape(a.shape).sign()).clamp_(0.0, 1.0)
                for (k, a), gr in zip(leaves.items(), grads, strict=True)
            }
    finally:
        for p in params:
            p.requires_grad_(True)
    return loss(sources, lower)


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def eval_recon(
    model: ComponentModel,
    x: Tensor,
    kinds: Sequence[str] = EVAL_KINDS,
    output_loss: OutputLoss = "mse",
    use_delta_component: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Reconstruction error under each mask kind, from one batched pass:

    ``unmasked`` (m = 1), ``ci`` (m = g), ``rounded`` (m = [g > 0]), ``zero`` (m = 0),
    ``random`` (m ~ U(0,1)) -- all without the delta component -- and ``stochastic``
    (m = g + (1-g)u, with the delta component if ``use_delta_component``).
    """
    for k in kinds:
        if k not in EVAL_KINDS:
            raise ValueError(f"kinds must be among {', '.join(EVAL_KINDS)}; got {k!r}")
    target, inputs = model.target_output(x, cache_inputs=True)
    lower = {n: c.lower for n, c in model.causal_importance(inputs).items()}
    batch = _batch_shape(lower)
    names = model.names
    var = _Variants(names, batch, use_delta=use_delta_component)
    for kind in kinds:
        deltas = None
        if kind == "unmasked":
            masks = {k: torch.ones_like(g) for k, g in lower.items()}
        elif kind == "ci":
            masks = dict(lower)
        elif kind == "rounded":
            masks = {k: (g > 0).to(g.dtype) for k, g in lower.items()}
        elif kind == "zero":
            masks = {k: torch.zeros_like(g) for k, g in lower.items()}
        elif kind == "random":
            masks = {k: uniform(g.shape, generator, dtype=g.dtype) for k, g in lower.items()}
        else:
            masks = {k: stochastic_masks(g, 1, generator)[0] for k, g in lower.items()}
            if use_delta_component:
                deltas = {
                    k: delta_mask((1, *batch), generator, dtype=g.dtype) for k, g in lower.items()
                }
        var.add(kind, 1, {k: m.unsqueeze(0) for k, m in masks.items()}, deltas, {})
    errs = var.run(model, x, target, output_loss)
    return {term: errs[start] for term, start, _ in var.groups}


__all__ = [
    "EVAL_KINDS",
    "ImportanceMinimalityConfig",
    "LossConfig",
    "PGDConfig",
    "compute_losses",
    "eval_recon",
    "faithfulness",
    "importance_minimality",
    "importance_terms",
    "pgd_recon",
    "recon_error",
    "recon_errors",
]
