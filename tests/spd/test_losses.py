"""SPD losses (sheet §5-§6, §14): every term against an explicit, sequential reference.

The batched single pass of :func:`compute_losses` is compared with 1 target pass + S full passes
+ S*L layerwise passes + ... run one at a time through ``model(x, masks=..., delta_masks=...,
routes=...)``, with masks drawn from an identically seeded generator in the order the code draws
them (per loss: every layer's ``U(0,1)`` mask sources, then every layer's delta masks, then the
subset routes -- for the layerwise loss only the replaced layer's; PGD last: its routes, then its
sources).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from sparselens.core.schedules import Schedule
from sparselens.spd.component_model import ComponentModel
from sparselens.spd.losses import (
    EVAL_KINDS,
    ImportanceMinimalityConfig,
    LossConfig,
    PGDConfig,
    compute_losses,
    eval_recon,
    faithfulness,
    importance_minimality,
    importance_terms,
    pgd_recon,
    recon_error,
    recon_errors,
)
from sparselens.spd.masks import uniform_k_subset_routes
from sparselens.spd.targets.io import load_bundled_target
from sparselens.spd.targets.tms import tms_decomposition
from sparselens.train.config import format_validation_error

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- models -------------------------------------------------------------------------------------
def _tms_model(C: int = 6) -> ComponentModel:
    target = load_bundled_target("tms_5-2")
    torch.manual_seed(0)
    return ComponentModel(target, tms_decomposition(target.cfg, C)).double()


class Toy(nn.Module):
    """Embedding -> residual Linear-ReLU-Linear -> Linear head (logits over 7 tokens)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(7, 5)
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 5, bias=False)
        self.head = nn.Linear(5, 7)

    def forward(self, tok: Tensor) -> Tensor:
        h = self.embed(tok)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def _toy_model(ci_fn: str = "mlp") -> ComponentModel:
    torch.manual_seed(2)
    mods = [{"pattern": "embed", "C": 4}, {"pattern": "fc1", "C": 3}, {"pattern": "fc2", "C": 5}]
    if ci_fn != "mlp":
        mods = mods[1:]
    return ComponentModel(Toy().double(), mods, ci_fn=ci_fn, ci_hidden=[4]).double()


def _tms_x(seed: int = 0, n: int = 6) -> Tensor:
    return torch.rand(n, 5, generator=_gen(seed), dtype=F64)


def _toy_x(seed: int = 0) -> Tensor:
    return torch.randint(0, 7, (3, 4), generator=_gen(seed))


# -- explicit references ------------------------------------------------------------------------
def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).sum() / pred.numel()


def _kl(pred: Tensor, target: Tensor) -> Tensor:
    """KL(softmax(target) || softmax(pred)) summed over vocab, mean over positions (F.kl_div)."""
    kl = F.kl_div(
        F.log_softmax(pred, -1), F.log_softmax(target, -1), log_target=True, reduction="none"
    )
    return kl.sum(-1).mean()


def _D(kind: str):
    return _mse if kind == "mse" else _kl


def _ref_importance(
    upper: dict[str, Tensor], cfg: ImportanceMinimalityConfig, progress: float
) -> tuple[Tensor, Tensor]:
    """Per layer, per component: mean over positions of v(g), summed over components AND layers;
    frequency term ``sum f log2(1 + a f)``."""
    imp = torch.zeros((), dtype=F64)
    freq = torch.zeros((), dtype=F64)
    a = cfg.reference_token_count or 1.0
    for g in upper.values():
        flat = g.reshape(-1, g.shape[-1])
        for c in range(flat.shape[1]):
            col = flat[:, c]
            if cfg.kind == "lp":
                v = (col + cfg.eps) ** cfg.p.at(progress)
                scale = 1.0
            else:
                gam = cfg.gamma.at(progress)
                v = col**2 / (col**2 + gam**2)
                scale = 1.0 + gam**2 if cfg.normalize_at_one else 1.0
            f = v.sum() / col.numel()
            imp = imp + scale * f
            freq = freq + f * torch.log2(1 + a * f)
    return imp, freq


def _ref_faithfulness(model: ComponentModel) -> Tensor:
    total, n = torch.zeros((), dtype=F64), 0
    for name in model.names:
        comp = model.component(name)
        delta = comp.target_weight - comp.weight()
        total = total + (delta**2).sum()
        n += delta.numel()
    return total / n


def _ref_pgd(
    model: ComponentModel,
    x: Tensor,
    lower: dict[str, Tensor],
    target: Tensor,
    cfg: PGDConfig,
    kind: str,
    use_delta: bool,
    gen: torch.Generator,
) -> Tensor:
    """PGD written out: routes, then per-layer sources (delta channel LAST); sign ascent clamped
    to [0, 1] on ``g + (1-g) a`` with g detached; final loss with the live CI."""
    names = model.names
    batch = lower[names[0]].shape[:-1]
    routes = None
    if cfg.routing == "uniform_k_subset":
        r = uniform_k_subset_routes(batch, len(names), gen)
        routes = {k: r[..., i] for i, k in enumerate(names)}
    shape = (1,) * len(batch) if cfg.scope == "shared" else tuple(batch)
    src = {}
    for k in names:
        ch = lower[k].shape[-1] + int(use_delta)
        if cfg.init == "random":
            src[k] = torch.rand((*shape, ch), generator=gen, dtype=F64)
        else:
            src[k] = torch.full((*shape, ch), 1.0 if cfg.init == "ones" else 0.0, dtype=F64)

    def loss(a: dict[str, Tensor], g: dict[str, Tensor]) -> Tensor:
        masks, deltas = {}, {}
        for k in names:
            C = g[k].shape[-1]
            masks[k] = g[k] + (1 - g[k]) * a[k][..., :C]
            if use_delta:
                deltas[k] = a[k][..., C].expand(batch)
        pred = model(x, masks=masks, delta_masks=deltas if use_delta else None, routes=routes)
        return _D(kind)(pred, target)

    fixed = {k: v.detach() for k, v in lower.items()}
    for _ in range(cfg.n_steps):
        leaves = {k: a.detach().clone().requires_grad_(True) for k, a in src.items()}
        grads = torch.autograd.grad(loss(leaves, fixed), list(leaves.values()))
        src = {
            k: torch.clamp(leaves[k].detach() + cfg.step_size * torch.sign(gr), 0.0, 1.0)
            for k, gr in zip(leaves, grads, strict=True)
        }
    return loss(src, lower)


def _reference_losses(
    model: ComponentModel, x: Tensor, cfg: LossConfig, progress: float, seed: int
) -> tuple[Tensor, dict[str, Tensor]]:
    """One pass per variant, in the code's draw order."""
    gen = _gen(seed)
    D = _D(cfg.output_loss)
    target, inputs = model.target_output(x, cache_inputs=True)
    ci = model.causal_importance(inputs)
    names = model.names
    lower = {n: ci[n].lower for n in names}
    batch = lower[names[0]].shape[:-1]
    S, use_delta = cfg.n_mask_samples, cfg.use_delta_component

    def draw(layers: list[str] = names):
        u = {k: torch.rand((S, *lower[k].shape), generator=gen, dtype=F64) for k in layers}
        m = {k: lower[k] + (1 - lower[k]) * u[k] for k in layers}
        d = None
        if use_delta:
            d = {k: torch.rand((S, *batch), generator=gen, dtype=F64) for k in layers}
        return m, d

    def sel(d: dict[str, Tensor] | None, s: int, only: list[str]) -> dict[str, Tensor] | None:
        return None if d is None else {k: d[k][s] for k in only}

    terms: dict[str, Tensor] = {}
    if cfg.stochastic_recon > 0:
        m, d = draw()
        errs = [D(model(x, sel(m, s, names), sel(d, s, names)), target) for s in range(S)]
        terms["stochastic_recon"] = torch.stack(errs).mean()
    if cfg.layerwise_recon > 0:
        errs = []
        for j in names:
            m, d = draw([j])  # only layer j's masks are drawn
            for s in range(S):  # ONLY layer j replaced: the others run the original module
                errs.append(D(model(x, sel(m, s, [j]), sel(d, s, [j])), target))
        terms["layerwise_recon"] = torch.stack(errs).mean()
    if cfg.subset_recon > 0:
        m, d = draw()
        r = uniform_k_subset_routes((S, *batch), len(names), gen)
        errs = []
        for s in range(S):
            routes = {k: r[s, ..., i] for i, k in enumerate(names)}
            errs.append(D(model(x, sel(m, s, names), sel(d, s, names), routes), target))
        terms["subset_recon"] = torch.stack(errs).mean()
    if cfg.ci_masked_recon > 0:
        terms["ci_masked_recon"] = D(model(x, masks=lower), target)
    total = sum(getattr(cfg, k) * v for k, v in terms.items())
    icfg = cfg.importance_minimality
    imp, freq = _ref_importance({n: ci[n].upper for n in names}, icfg, progress)
    terms["importance_minimality"] = imp
    total = total + icfg.coeff * imp
    if icfg.frequency_coeff > 0:
        terms["frequency_minimality"] = freq
        total = total + icfg.frequency_coeff * freq
    if cfg.faithfulness > 0:
        terms["faithfulness"] = _ref_faithfulness(model)
        total = total + cfg.faithfulness * terms["faithfulness"]
    if cfg.pgd.coeff > 0:
        terms["pgd_recon"] = _ref_pgd(
            model, x, lower, target, cfg.pgd, cfg.output_loss, use_delta, gen
        )
        total = total + cfg.pgd.coeff * terms["pgd_recon"]
    return total, terms


def _trainable(model: ComponentModel) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _compare_with_reference(model, x, cfg, progress=0.3, seed=5) -> dict[str, Tensor]:
    total, terms = compute_losses(model, x, cfg, progress=progress, generator=_gen(seed))
    ref_total, ref_terms = _reference_losses(model, x, cfg, progress, seed)
    assert set(terms) == set(ref_terms)
    for k, v in ref_terms.items():
        torch.testing.assert_close(terms[k], v.detach(), rtol=1e-9, atol=1e-13, msg=k)
        assert not terms[k].requires_grad
    torch.testing.assert_close(total, ref_total, rtol=1e-9, atol=1e-13)
    params = _trainable(model)
    g_code = torch.autograd.grad(total, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref_total, params, allow_unused=True)
    for p, a, b in zip(params, g_code, g_ref, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    return terms


def _cfg(**kw) -> LossConfig:
    kw.setdefault("importance_minimality", {"coeff": 3e-3})
    return LossConfig.model_validate(kw)


# -- compute_losses vs sequential reference -----------------------------------------------------
@pytest.mark.parametrize("S", [1, 2])
def test_compute_losses_tms_matches_sequential_reference(S: int) -> None:
    """Every recon term, imp-min, faithfulness and PGD, and the gradient of the total.

    Catches: layerwise with the other layers on their unmasked components or masks (the
    reference runs them on the original module), mixed-up variant order when stacking S > 1
    draws, delta masks drawn / applied to the wrong layer, averaging imp-min over layers."""
    cfg = _cfg(
        stochastic_recon=1.0,
        layerwise_recon=0.7,
        subset_recon=0.5,
        ci_masked_recon=0.3,
        faithfulness=2.0,
        n_mask_samples=S,
        pgd={"coeff": 0.4, "init": "random", "n_steps": 2, "step_size": 0.3},
        importance_minimality={"coeff": 0.1, "p": 0.8},
    )
    model = _tms_model()
    terms = _compare_with_reference(model, _tms_x(), cfg)
    assert set(terms) == {
        "stochastic_recon",
        "layerwise_recon",
        "subset_recon",
        "ci_masked_recon",
        "importance_minimality",
        "faithfulness",
        "pgd_recon",
    }


def test_compute_losses_toy_kl_with_embedding_and_subset_pgd() -> None:
    """KL output loss on a token model (embedding + 2 linears, 3-D masks), per-datapoint PGD
    with k-subset routing, smooth-L0 with the frequency term."""
    cfg = _cfg(
        stochastic_recon=1.0,
        layerwise_recon=1.0,
        subset_recon=1.0,
        ci_masked_recon=0.5,
        n_mask_samples=2,
        output_loss="kl",
        pgd={
            "coeff": 1.0,
            "init": "random",
            "scope": "per_datapoint",
            "routing": "uniform_k_subset",
        },
        importance_minimality={
            "coeff": 0.01,
            "kind": "smooth_l0",
            "gamma": {"kind": "linear", "start": 1.0, "end": 0.1},
            "normalize_at_one": True,
            "frequency_coeff": 0.2,
            "reference_token_count": 50.0,
        },
    )
    terms = _compare_with_reference(_toy_model(), _toy_x(), cfg, progress=0.5)
    assert "frequency_minimality" in terms


class Twice(nn.Module):
    """``lin`` is called twice per forward (weight sharing), then ``out``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.lin(torch.relu(self.lin(x)))))


class Flat(nn.Module):
    """Flattens ``(B, T, d)`` to ``(B*T, d)`` before its decomposed layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(torch.relu(self.a(x.reshape(-1, x.shape[-1]))))
        return h.reshape(x.shape)


@pytest.mark.parametrize("use_delta", [True, False])
def test_compute_losses_module_called_twice(use_delta: bool) -> None:
    """A decomposed module called twice per forward (its cached input is the last call's).
    Catches the batched pass reusing that cached input for the module's FIRST call."""
    model = ComponentModel(
        Twice().double(), [{"pattern": "lin", "C": 3}, {"pattern": "out", "C": 3}]
    ).double()
    x = torch.randn(5, 4, generator=_gen(6), dtype=F64)
    cfg = _cfg(stochastic_recon=1.0, layerwise_recon=1.0, use_delta_component=use_delta)
    _compare_with_reference(model, x, cfg)
    assert model.first_layer is None  # lin was reached first, and twice


@pytest.mark.parametrize("use_delta", [True, False])
def test_compute_losses_flattened_batch(use_delta: bool) -> None:
    """Decomposed layers that see a ``(B*T, d)`` input while the model takes ``(B, T, d)``.
    Catches layerwise rows counted in units of the model input's first axis (B) instead of
    the layers' (B*T)."""
    model = ComponentModel(Flat().double(), [{"pattern": "a", "C": 3}, {"pattern": "b", "C": 4}])
    model = model.double()
    x = torch.randn(4, 3, 5, generator=_gen(7), dtype=F64)
    cfg = _cfg(
        stochastic_recon=1.0, layerwise_recon=0.5, subset_recon=0.5, use_delta_component=use_delta
    )
    _compare_with_reference(model, x, cfg)
    assert model.first_layer == "a"


@pytest.mark.parametrize("ci_fn", ["vector_mlp", "shared_mlp"])
def test_compute_losses_without_delta_and_other_ci_fns(ci_fn: str) -> None:
    cfg = _cfg(
        layerwise_recon=1.0,
        stochastic_recon=0.5,
        use_delta_component=False,
        pgd={"coeff": 1.0, "init": "ones", "scope": "shared", "n_steps": 1},
        importance_minimality={
            "coeff": 0.1,
            "p": 2.0,
            "frequency_coeff": 0.5,
            "reference_token_count": 12,
        },
    )
    _compare_with_reference(_toy_model(ci_fn), _toy_x(1), cfg)


def test_layerwise_keeps_other_layers_on_original_weights() -> None:
    """The layerwise term equals the mean over layers of single-layer replacement, and differs
    from the variant that keeps the other layers on their masked/unmasked components."""
    model = _tms_model()
    x = _tms_x(3)
    cfg = _cfg(stochastic_recon=0.0, layerwise_recon=1.0)
    _, terms = compute_losses(model, x, cfg, progress=0.0, generator=_gen(0))
    target, inputs = model.target_output(x, cache_inputs=True)
    lower = {n: c.lower for n, c in model.causal_importance(inputs).items()}
    gen = _gen(0)
    errs, wrong = [], []
    ones = {k: torch.ones_like(g) for k, g in lower.items()}
    for j in model.names:
        u_j = torch.rand((1, *lower[j].shape), generator=gen, dtype=F64)[0]  # layer j's only
        d_j = torch.rand((1, *lower[j].shape[:-1]), generator=gen, dtype=F64)[0]
        m_j = lower[j] + (1 - lower[j]) * u_j
        errs.append(_mse(model(x, {j: m_j}, {j: d_j}), target))
        wrong.append(_mse(model(x, {**ones, j: m_j}, {j: d_j}), target))  # others on comps
    torch.testing.assert_close(terms["layerwise_recon"], torch.stack(errs).mean().detach())
    gap = float(torch.stack(wrong).mean().detach()) - float(terms["layerwise_recon"])
    assert abs(gap) > 1e-4


# -- normalisations -----------------------------------------------------------------------------
def test_recon_errors_mse_is_mean_over_all_elements() -> None:
    """Catches a sum (or a per-sample sum) instead of the mean over every output element."""
    g = _gen(0)
    target = torch.randn(4, 3, 5, generator=g, dtype=F64)
    pred = torch.randn(2, 4, 3, 5, generator=g, dtype=F64)
    got = recon_errors(pred, target, "mse")
    assert got.shape == (2,)
    for v in range(2):
        want = (
            sum(
                float((pred[v, i, j, k] - target[i, j, k]) ** 2)
                for i in range(4)
                for j in range(3)
                for k in range(5)
            )
            / 60
        )
        assert float(got[v]) == pytest.approx(want, rel=1e-12)
    assert float(recon_error(target + 1.0, target, "mse")) == pytest.approx(1.0, rel=1e-12)


def test_recon_errors_kl_sums_vocab_and_averages_positions() -> None:
    """Catches the mean over the vocabulary (a factor vocab smaller) and the reversed KL."""
    g = _gen(1)
    target = torch.randn(3, 4, 6, generator=g, dtype=F64)
    pred = torch.randn(2, 3, 4, 6, generator=g, dtype=F64)
    got = recon_errors(pred, target, "kl")
    for v in range(2):
        total = 0.0
        for b in range(3):
            for t in range(4):
                p = torch.softmax(target[b, t], -1)
                q = torch.softmax(pred[v, b, t], -1)
                total += float((p * (p.log() - q.log())).sum())
        assert float(got[v]) == pytest.approx(total / 12, rel=1e-10)
        reverse = _kl(target, pred[v])
        assert float(got[v]) != pytest.approx(float(reverse), rel=1e-3)
    assert float(recon_error(target, target, "kl")) == pytest.approx(0.0, abs=1e-14)


def test_recon_errors_kl_gradient() -> None:
    """The KL's gradient in ``pred`` (a fused backward, ``(softmax(pred) sum(p) - p) g``) equals
    autograd through ``F.kl_div`` and passes gradcheck; the frozen target gets none. Catches a
    backward that ignores the incoming per-variant weight ``g`` or uses ``softmax(target)`` in
    place of ``softmax(pred)``."""
    g = _gen(2)
    target = torch.randn(3, 4, 6, generator=g, dtype=F64)
    pred = torch.randn(2, 3, 4, 6, generator=g, dtype=F64, requires_grad=True)
    w = torch.rand(2, generator=g, dtype=F64)
    target.requires_grad_(True)
    loss = (recon_errors(pred, target, "kl") * w).sum()
    got, g_target = torch.autograd.grad(loss, (pred, target), allow_unused=True)
    assert g_target is None
    target = target.detach()
    ref = sum(w[v] * _kl(pred[v], target) for v in range(2))
    (want,) = torch.autograd.grad(ref, pred)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    assert torch.autograd.gradcheck(lambda p: recon_errors(p, target, "kl"), (pred,))


def test_recon_errors_bad_input() -> None:
    with pytest.raises(ValueError, match=r"^pred must have shape \(V, 3, 2\), got \(2, 3, 3\)"):
        recon_errors(torch.zeros(2, 3, 3), torch.zeros(3, 2), "mse")
    with pytest.raises(ValueError, match=r"^output_loss must be one of mse, kl"):
        recon_errors(torch.zeros(1, 3), torch.zeros(3), "ce")  # type: ignore[arg-type]


def test_importance_minimality_summed_over_layers() -> None:
    """Catches averaging over layers: two identical layers give twice one layer's value."""
    ci = torch.rand(5, 3, 4, generator=_gen(2), dtype=F64)
    cfg = ImportanceMinimalityConfig(coeff=1.0, p=0.7)
    one = importance_minimality({"a": ci}, cfg, 0.0)
    two = importance_minimality({"a": ci, "b": ci}, cfg, 0.0)
    torch.testing.assert_close(two, 2 * one, rtol=1e-14, atol=0)
    ref, _ = _ref_importance({"a": ci}, cfg, 0.0)
    torch.testing.assert_close(one, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_p_and_gamma_schedules_anneal(progress: float) -> None:
    """p anneals linearly 2 -> 1 between progress 0.2 and 0.8 (constant outside); so does gamma.
    Catches a schedule read at the wrong progress or ignored (constant p)."""
    ci = torch.rand(6, 5, generator=_gen(3), dtype=F64) * 1.5
    p_sched = Schedule(kind="linear", start=2.0, end=1.0, start_frac=0.2, end_frac=0.8)
    p = 2.0 - min(max((progress - 0.2) / 0.6, 0.0), 1.0)
    cfg = ImportanceMinimalityConfig(coeff=1.0, p=p_sched, eps=0.0)
    want = sum(float(ci[:, c].pow(p).mean()) for c in range(5))
    assert float(importance_minimality({"l": ci}, cfg, progress)) == pytest.approx(want, rel=1e-12)
    g_sched = Schedule(kind="linear", start=1.0, end=0.1, start_frac=0.2, end_frac=0.8)
    gam = 1.0 - 0.9 * min(max((progress - 0.2) / 0.6, 0.0), 1.0)
    cfg = ImportanceMinimalityConfig(coeff=1.0, kind="smooth_l0", gamma=g_sched)
    phi = ci**2 / (ci**2 + gam**2)
    want = float(phi.mean(0).sum())
    assert float(importance_minimality({"l": ci}, cfg, progress)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kind", ["lp", "smooth_l0"])
def test_importance_terms_frequency(kind: str) -> None:
    """Frequency term ``sum_layers sum_c f log2(1 + a' f)`` with f the same per-component mean as
    the penalty; ``importance_minimality`` drops it."""
    ups = {
        "a": torch.rand(4, 3, 5, generator=_gen(4), dtype=F64),
        "b": torch.rand(4, 3, 2, generator=_gen(5), dtype=F64),
    }
    cfg = ImportanceMinimalityConfig(
        coeff=1.0,
        kind=kind,
        p=1.3,
        gamma=0.3,
        normalize_at_one=True,
        frequency_coeff=0.5,
        reference_token_count=40.0,
    )
    imp, freq = importance_terms(ups, cfg, 0.0)
    ref_imp, ref_freq = _ref_importance(ups, cfg, 0.0)
    torch.testing.assert_close(imp, ref_imp, rtol=1e-12, atol=0)
    assert freq is not None
    torch.testing.assert_close(freq, ref_freq, rtol=1e-12, atol=0)
    torch.testing.assert_close(importance_minimality(ups, cfg, 0.0), ref_imp, rtol=1e-12, atol=0)
    no_freq = cfg.model_copy(update={"frequency_coeff": 0.0})
    assert importance_terms(ups, no_freq, 0.0)[1] is None
    with pytest.raises(ValueError, match="at least one layer"):
        importance_terms({}, cfg, 0.0)


def test_batch_size_invariance_of_imp_min_and_ci_masked_recon() -> None:
    """Duplicating the batch changes neither imp-min, the frequency term nor CI-masked recon.
    Catches sums over positions (instead of means) and a frequency term using the batch's
    token count instead of ``reference_token_count``."""
    model = _toy_model()
    cfg = _cfg(
        stochastic_recon=0.0,
        layerwise_recon=0.0,
        ci_masked_recon=1.0,
        importance_minimality={
            "coeff": 0.1,
            "frequency_coeff": 1.0,
            "reference_token_count": 30.0,
            "p": 0.6,
        },
    )
    x = _toy_x(2)
    _, a = compute_losses(model, x, cfg, progress=0.0)
    _, b = compute_losses(model, torch.cat([x, x, x]), cfg, progress=0.0)
    for k in ("importance_minimality", "frequency_minimality", "ci_masked_recon"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-15, msg=k)


def test_faithfulness_is_pooled_mean_of_squared_deltas() -> None:
    """``sum ||dW||^2 / total numel``. Catches the mean of per-layer means (layers of different
    sizes) and the plain sum."""
    d1 = torch.full((2, 3), 1.0, dtype=F64)
    d2 = torch.full((4, 5), 2.0, dtype=F64)
    got = float(faithfulness({"a": d1, "b": d2}))
    assert got == pytest.approx((6 * 1 + 20 * 4) / 26, rel=1e-14)
    assert got != pytest.approx((1 + 4) / 2)
    model = _toy_model()
    torch.testing.assert_close(
        faithfulness(model.weight_deltas()), _ref_faithfulness(model), rtol=1e-12, atol=0
    )
    with pytest.raises(ValueError, match="at least one weight delta"):
        faithfulness({})


# -- PGD ----------------------------------------------------------------------------------------
def _lower_and_target(model: ComponentModel, x: Tensor):
    target, inputs = model.target_output(x, cache_inputs=True)
    ci = model.causal_importance(inputs)
    return {n: c.lower for n, c in ci.items()}, target


@pytest.mark.parametrize(
    ("init", "scope", "routing", "use_delta", "steps"),
    [
        ("random", "shared", "all", True, 1),
        ("random", "per_datapoint", "uniform_k_subset", True, 3),
        ("ones", "per_datapoint", "all", False, 2),
        ("zeroes", "shared", "all", True, 1),
    ],
)
def test_pgd_matches_explicit_reference(init, scope, routing, use_delta, steps) -> None:
    """Value and gradient (into U, V and the CI functions) equal the written-out PGD.

    Catches sign *descent*, a missing clamp, ``max(g, a)`` instead of ``g + (1-g) a``, the delta
    source taken from the first channel, and per-datapoint / shared source shapes swapped (a
    different number of random draws)."""
    model = _tms_model()
    x = _tms_x(4)
    cfg = PGDConfig(
        coeff=1.0, init=init, scope=scope, routing=routing, n_steps=steps, step_size=0.4
    )
    lower, target = _lower_and_target(model, x)
    got = pgd_recon(model, x, lower, target, cfg, "mse", use_delta, generator=_gen(9))
    params = _trainable(model)
    assert all(p.grad is None for p in params)  # the inner steps touch no parameter gradient
    want = _ref_pgd(model, x, lower, target, cfg, "mse", use_delta, _gen(9))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    ga = torch.autograd.grad(got, params, allow_unused=True, retain_graph=True)
    gb = torch.autograd.grad(want, params, allow_unused=True)
    for a, b in zip(ga, gb, strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_pgd_one_step_by_hand() -> None:
    """One sign-ascent step of size 1 from a known random start (shared sources drawn per layer
    in order, the delta mask the LAST channel) on TMS: a source becomes 1 where the gradient of
    the loss at the start is positive, 0 where it is negative (and stays where it was at a zero
    gradient), so the loss goes up. Catches descent (the complement) and a missing clamp. Also:
    requires_grad is restored afterwards."""
    model = _tms_model()
    x = _tms_x(5)
    lower, target = _lower_and_target(model, x)
    g = {k: v.detach() for k, v in lower.items()}
    n = x.shape[0]
    gen = _gen(12)
    a0 = {k: torch.rand((1, 7), generator=gen, dtype=F64).requires_grad_() for k in model.names}

    def loss(a: dict[str, Tensor]) -> Tensor:
        masks = {k: g[k] + (1 - g[k]) * a[k][:, :6] for k in model.names}
        deltas = {k: a[k][0, 6].expand(n) for k in model.names}
        return _mse(model(x, masks, deltas), target)

    start = loss(a0)
    grads = torch.autograd.grad(start, list(a0.values()))
    a1 = {
        k: torch.where(gr > 0, 1.0, torch.where(gr < 0, 0.0, a0[k].detach()))
        for k, gr in zip(model.names, grads, strict=True)
    }
    flat = torch.cat([gr.reshape(-1) for gr in grads])
    assert (flat > 0).any() and (flat < 0).any()  # a non-trivial ascent direction
    with torch.no_grad():
        want = loss(a1)
    cfg = PGDConfig(coeff=1.0, init="random", n_steps=1, step_size=1.0)
    got = pgd_recon(model, x, lower, target, cfg, "mse", True, generator=_gen(12))
    torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=0)
    assert float(got.detach()) > float(start.detach())
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("components.", "ci_fns.")), name


def test_pgd_final_loss_reaches_components_and_ci_fns() -> None:
    """The final forward is differentiable in U, V (every layer) and the CI functions."""
    model = _toy_model()
    tok = _toy_x(3)
    lower, target = _lower_and_target(model, tok)
    cfg = PGDConfig(coeff=1.0, n_steps=2, step_size=0.2)
    pgd_recon(model, tok, lower, target, cfg, "kl", generator=_gen(0)).backward()
    for name in model.names:
        comp = model.component(name)
        assert comp.U.grad.abs().sum() > 0 and comp.V.grad.abs().sum() > 0, name
        grads = [p.grad for p in model.ci_fn(name).parameters()]
        assert any(gr is not None and gr.abs().sum() > 0 for gr in grads), name
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("components.", "ci_fns.")), name


def test_pgd_restores_requires_grad_after_error() -> None:
    model = _tms_model()
    x = _tms_x(6)
    lower, target = _lower_and_target(model, x)
    bad = {k: v[:, :2] for k, v in lower.items()}  # wrong C: the forward raises
    with pytest.raises(ValueError, match="must have shape"):
        pgd_recon(model, x, bad, target, PGDConfig(coeff=1.0))
    assert all(p.requires_grad for p in model.components.parameters())
    assert all(p.requires_grad for p in model.ci_fns.parameters())


# -- eval ---------------------------------------------------------------------------------------
def _exact_factorisation(model: ComponentModel) -> None:
    """Set linear1's V U = W^T exactly (SVD, zero-padded to C); linear2 is tied to it."""
    comp = model.component("linear1")
    W = comp.target_weight.detach()  # (2, 5)
    Q, S, Ph = torch.linalg.svd(W.T, full_matrices=False)  # W^T = Q diag(S) Ph
    r = S.numel()
    with torch.no_grad():
        comp.V.zero_()
        comp.U.zero_()
        comp.V[:, :r] = Q * S
        comp.U[:r] = Ph


def test_eval_recon_kinds_match_reference() -> None:
    """Each kind against one explicit pass, with the generator consumed in the kinds' order."""
    model = _tms_model()
    x = _tms_x(7)
    got = eval_recon(model, x, generator=_gen(3))
    assert list(got) == list(EVAL_KINDS)
    lower, target = _lower_and_target(model, x)
    gen = _gen(3)
    with torch.no_grad():
        want = {
            "unmasked": _mse(model(x, {k: torch.ones_like(g) for k, g in lower.items()}), target),
            "ci": _mse(model(x, lower), target),
            "rounded": _mse(model(x, {k: (g > 0).double() for k, g in lower.items()}), target),
        }
        m = {
            k: g + (1 - g) * torch.rand((1, *g.shape), generator=gen, dtype=F64)[0]
            for k, g in lower.items()
        }
        d = {k: torch.rand((1, x.shape[0]), generator=gen, dtype=F64)[0] for k in lower}
        want["stochastic"] = _mse(model(x, m, d), target)
        want["zero"] = _mse(model(x, {k: torch.zeros_like(g) for k, g in lower.items()}), target)
        rnd = {k: torch.rand(g.shape, generator=gen, dtype=F64) for k, g in lower.items()}
        want["random"] = _mse(model(x, rnd), target)
    for k in EVAL_KINDS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14, msg=k)
        assert not got[k].requires_grad


def test_eval_zero_is_bias_only_and_exact_factorisation_is_lossless() -> None:
    """Zero masks, no delta: TMS outputs relu(b) (catches a delta term left on under 'zero').
    With V U = W^T exactly, the unmasked error and faithfulness are ~0."""
    model = _tms_model()
    x = _tms_x(8)
    target, _ = model.target_output(x)
    b = model.target.linear2.bias
    res = eval_recon(model, x, kinds=["zero", "unmasked"])
    want = ((torch.relu(b).expand_as(target) - target) ** 2).mean()
    torch.testing.assert_close(res["zero"], want, rtol=1e-12, atol=0)
    assert float(res["unmasked"]) > 1e-4  # random components
    _exact_factorisation(model)
    res = eval_recon(model, x, kinds=["unmasked"])
    assert float(res["unmasked"]) < 1e-25
    assert float(faithfulness(model.weight_deltas()).detach()) < 1e-28


def test_eval_recon_kl_and_bad_kind() -> None:
    model = _toy_model()
    tok = _toy_x(4)
    res = eval_recon(model, tok, kinds=["ci", "zero"], output_loss="kl")
    lower, target = _lower_and_target(model, tok)
    with torch.no_grad():
        torch.testing.assert_close(res["ci"], _kl(model(tok, lower), target), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"^kinds must be among unmasked, ci, .*; got 'half'"):
        eval_recon(model, tok, kinds=["half"])


# -- config validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "data", "start"),
    [
        (
            ImportanceMinimalityConfig,
            {"coeff": 1, "frequency_coeff": 0.1},
            "reference_token_count must be set",
        ),
        (ImportanceMinimalityConfig, {"coeff": 1, "p": 0}, "p must stay > 0"),
        (
            ImportanceMinimalityConfig,
            {"coeff": 1, "p": {"kind": "linear", "start": 2, "end": -1}},
            "p must stay > 0",
        ),
        (ImportanceMinimalityConfig, {"coeff": 1, "gamma": 0}, "gamma must stay > 0"),
        (ImportanceMinimalityConfig, {"coeff": -1}, "coeff must be >= 0"),
        (
            ImportanceMinimalityConfig,
            {"coeff": 1, "reference_token_count": 0},
            "reference_token_count must be > 0",
        ),
        (ImportanceMinimalityConfig, {"coeff": 1, "kind": "l1"}, "kind must be one of"),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1}, "stochastic_recon": 0, "layerwise_recon": 0},
            "at least one reconstruction loss coefficient (stochastic_recon, layerwise_recon",
        ),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1, "frequency_coeff": 1}},
            "importance_minimality: reference_token_count must be set",
        ),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1}, "n_mask_samples": 0},
            "n_mask_samples must be an integer >= 1",
        ),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1}, "output_loss": "ce"},
            "output_loss must be one of",
        ),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1}, "faithfulness": float("nan")},
            "faithfulness must be a finite number",
        ),
        (
            LossConfig,
            {"importance_minimality": {"coeff": 1}, "pgd": {"step_size": 0}},
            "pgd.step_size must be",
        ),
        (LossConfig, {}, "importance_minimality is required"),
        (PGDConfig, {"n_steps": 0}, "n_steps must be an integer >= 1"),
        (PGDConfig, {"init": "gauss"}, "init must be one of"),
        (PGDConfig, {"scope": "batch"}, "scope must be one of"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(model, data, start: str) -> None:
    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    msg = format_validation_error(e.value, model)
    assert msg.startswith(start), msg
    assert "\n" not in msg


def test_config_defaults_and_numbers_as_schedules() -> None:
    cfg = LossConfig.model_validate({"importance_minimality": {"coeff": 1e-3, "p": 2}})
    assert cfg.importance_minimality.p.at(0.7) == 2.0
    assert (cfg.stochastic_recon, cfg.layerwise_recon, cfg.n_mask_samples) == (1.0, 1.0, 1)
    assert cfg.use_delta_component and cfg.output_loss == "mse" and cfg.pgd.coeff == 0.0
    only_pgd = LossConfig.model_validate(
        {
            "importance_minimality": {"coeff": 1},
            "stochastic_recon": 0,
            "layerwise_recon": 0,
            "pgd": {"coeff": 1},
        }
    )
    assert only_pgd.pgd.coeff == 1.0
    assert math.isclose(ImportanceMinimalityConfig(coeff=0, gamma=0.5).gamma.at(0.3), 0.5)
