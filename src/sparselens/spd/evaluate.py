"""Evaluation of an SPD run: cheap metrics at eval points, a thorough one at the end.

Cheap (every ``eval_every`` steps, ``eval_batches`` fixed batches): reconstruction error under
unmasked / CI / rounded / stochastic / zero masks (:func:`~sparselens.spd.losses.eval_recon`),
CI-L0 per layer (threshold 0.1), importance minimality and faithfulness.

Final (``final_eval_samples`` fresh samples, sheet §8 and §12): the same plus random masks, CI
histograms, and

* toys: one-hot CI matrices (inputs ``magnitude * e_j``) per layer, IdentityCIError /
  DenseCIError at tolerance 0.1 and 0.2 (Hungarian matching), the subcomponents active on some
  one-hot input, the inputs of each identity-pattern matrix that already hold the pattern
  (``one_hot_clean``), subcomponent norms and the number of non-negligible subcomponents (norm >
  0.1 x the largest); for TMS MMCS / ML2R of every decomposed matrix against the target's
  columns (the paper's number is ``linear1``'s, W_in); for ResidMLP whether each ``mlp_out``
  subcomponent reads one ReLU neuron and is on when it fires (``mlp_out_neurons``), and the
  neuron contributions of each ``mlp_in`` (``neuron_contributions``, paper Figs 7 and 10);
* language models: next-token cross-entropy of the target and under CI / unmasked / rounded /
  zero / random masks, KL to the target, and CE unrecovered
  ``(CE_mask - CE_target) / (CE_zero - CE_target)``.

Which layers follow which one-hot pattern: TMS ``linear1`` / ``linear2`` identity, the hidden
identity ``hidden_layers.0`` dense with k = n_hidden (the identity splits into n_hidden
subcomponents, all co-active); ResidMLP every ``layers.i.mlp_in`` identity (one subcomponent
per feature in each layer: a feature's component spans the layers whose neurons compute it,
paper §4.3) and every ``layers.i.mlp_out`` dense with k = d_mlp (its share of the rank
n_layers x d_mlp block that spans the layers). Patterns are per matrix, as in the reference (one
pattern per module its glob matches); ``ci_error_total`` sums the matrices' errors.

Evaluations draw from their own generators (seeds ``seed + 1`` ..) inside
``torch.random.fork_rng``: they are reproducible and leave the training RNG streams untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sparselens.core.softmax import cross_entropy
from sparselens.spd import metrics as M
from sparselens.spd.component_model import ComponentModel
from sparselens.spd.config import SPDRunConfig
from sparselens.spd.losses import eval_recon, faithfulness, importance_minimality, recon_error
from sparselens.spd.tasks import Task

CI_THRESHOLD = 0.1
NEGLIGIBLE_FRAC = 0.1
CHEAP_KINDS = ("unmasked", "ci", "rounded", "stochastic", "zero")
FINAL_KINDS = ("unmasked", "ci", "rounded", "stochastic", "zero", "random")
LM_CE_KINDS = ("ci", "unmasked", "rounded", "zero", "random")
HIST_VALUES = 200_000
"""CI values kept per layer for the histograms of the final evaluation."""


@dataclass
class CIPattern:
    """One-hot CI pattern expected of one decomposed matrix."""

    module: str
    kind: Literal["identity", "dense"]
    k: int | None = None


def ci_patterns(task: Task, model: ComponentModel) -> list[CIPattern]:
    """The expected one-hot CI patterns of the decomposed layers (see the module docstring)."""
    names = list(model.names)
    cfg = task.info.get("target_config", {})
    if task.kind == "tms":
        return [
            CIPattern(n, "dense", int(cfg["n_hidden"]))
            if n.startswith("hidden_layers")
            else CIPattern(n, "identity")
            for n in names
        ]
    if task.kind == "resid_mlp":
        d_mlp = int(cfg["d_mlp"])
        return [
            CIPattern(n, "identity") if n.endswith("mlp_in") else CIPattern(n, "dense", d_mlp)
            for n in names
            if n.endswith(("mlp_in", "mlp_out"))
        ]
    return []


def _batches(task: Task, n: int, batch: int, gen: torch.Generator) -> Iterator[Tensor]:
    done = 0
    while done < n:
        b = min(batch, n - done)
        yield task.sample(b, gen)
        done += b


def _ci(model: ComponentModel, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
    out, inputs = model.target_output(x, cache_inputs=True)
    return out, model.causal_importance(inputs)


@torch.no_grad()
def cheap_eval(
    model: ComponentModel, task: Task, config: SPDRunConfig, progress: float
) -> dict[str, float]:
    """Recon errors, CI-L0 per layer, importance minimality, faithfulness (fixed batches)."""
    kind = config.losses.output_loss
    sums: dict[str, Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 2)
        gen = torch.Generator().manual_seed(config.seed + 1)
        for x in _batches(task, config.eval_batches * config.eval_bs, config.eval_bs, gen):
            vals: dict[str, Tensor] = {}
            rec = eval_recon(model, x, kinds=CHEAP_KINDS, output_loss=kind)
            vals.update({f"recon/{k}": v for k, v in rec.items()})
            _, ci = _ci(model, x)
            for name, c in ci.items():
                vals[f"ci_l0/{name}"] = M.ci_l0(c.lower, CI_THRESHOLD)
            upper = {name: c.upper for name, c in ci.items()}
            imp_cfg = config.losses.importance_minimality
            vals["importance_minimality"] = importance_minimality(upper, imp_cfg, progress)
            for k, v in vals.items():
                v = v.detach().to(torch.float64)
                sums[k] = sums[k] + v if k in sums else v
        out = {k: float(v) / config.eval_batches for k, v in sums.items()}
    out["ci_l0/total"] = sum(v for k, v in out.items() if k.startswith("ci_l0/"))
    out["faithfulness"] = float(faithfulness(model.weight_deltas()))
    if task.kind in ("tms", "resid_mlp"):
        assert task.n_features is not None
        one_hot = M.one_hot_ci(model, task.n_features, config.one_hot_magnitude)
        for label, err in pattern_errors(ci_patterns(task, model), one_hot, 0.1).items():
            out[f"ci_error/{label}"] = err
    if task.kind == "tms":
        comp = model.component(model.names[0])
        out["mmcs"], out["ml2r"] = M.mmcs_ml2r(comp.V, comp.U, _target_weight(comp))
    return out


def pattern_errors(
    patterns: list[CIPattern], one_hot: dict[str, Tensor], tol: float
) -> dict[str, int]:
    """IdentityCIError / DenseCIError of each pattern's one-hot CI, by module; patterns with
    fewer components than they need are left out."""
    out = {}
    for pat in patterns:
        ci = one_hot[pat.module]
        if pat.kind == "identity":
            if ci.shape[1] >= ci.shape[0]:
                out[pat.module] = M.identity_ci_error(ci, tol=tol)
        elif pat.k is not None and ci.shape[1] >= pat.k:
            out[pat.module] = M.dense_ci_error(ci, pat.k, tol=tol)
    return out


@dataclass
class FinalEval:
    """Numbers of the final evaluation (``metrics``, JSON-able) and arrays for the plots."""

    metrics: dict[str, Any]
    one_hot: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)
    ci_values: dict[str, Tensor] = field(default_factory=dict)
    patterns: list[CIPattern] = field(default_factory=list)
    neurons: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """ResidMLP ``mlp_out``: one-hot ReLU neuron activations and CI per neuron, both (n, d_mlp)."""
    contributions: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """ResidMLP ``mlp_in``: neuron contributions of the target and of each feature's best
    subcomponent, both (n_features, d_mlp) (``metrics.neuron_contributions``)."""


def _target_weight(comp: Any) -> Tensor:
    w = getattr(comp, "target_weight", None)
    if isinstance(w, Tensor):
        return w.detach()
    return (comp.weight() + comp.weight_delta()).detach()


@torch.no_grad()
def final_eval(model: ComponentModel, task: Task, config: SPDRunConfig) -> FinalEval:
    """The thorough evaluation at the end of a run (see the module docstring)."""
    kind = config.losses.output_loss
    n_total = config.final_eval_samples
    sums: dict[str, float] = {}
    hist: dict[str, list[Tensor]] = {n: [] for n in model.names}
    kept = dict.fromkeys(model.names, 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 4)
        gen = torch.Generator().manual_seed(config.seed + 3)
        for x in _batches(task, n_total, config.eval_bs, gen):
            w = x.shape[0] / n_total
            vals: dict[str, Tensor] = {}
            rec = eval_recon(model, x, kinds=FINAL_KINDS, output_loss=kind)
            vals.update({f"recon/{k}": v for k, v in rec.items()})
            out, ci = _ci(model, x)
            for name, c in ci.items():
                vals[f"ci_l0/{name}"] = M.ci_l0(c.lower, CI_THRESHOLD)
                if kept[name] < HIST_VALUES:
                    flat = c.lower.detach().reshape(-1)[: HIST_VALUES - kept[name]]
                    hist[name].append(flat.clone())
                    kept[name] += flat.numel()
            upper = {name: c.upper for name, c in ci.items()}
            vals["importance_minimality"] = importance_minimality(
                upper, config.losses.importance_minimality, 1.0
            )
            if task.kind == "lm":
                vals.update(_lm_ce(model, x, out, ci))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + w * float(v)
    metrics: dict[str, Any] = {
        "recon": {k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith("recon/")},
        "ci_l0": {k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith("ci_l0/")},
        "importance_minimality": sums["importance_minimality"],
        "faithfulness": float(faithfulness(model.weight_deltas())),
    }
    metrics["ci_l0_total"] = sum(metrics["ci_l0"].values())
    if task.kind == "lm":
        metrics["lm"] = _lm_summary(sums)
    norms = {}
    for name in model.names:
        comp = model.component(name)
        norms[name] = M.subcomponent_norms(comp.V, comp.U)
    metrics["subcomponent_norms"] = {
        n: sorted((float(v) for v in t), reverse=True) for n, t in norms.items()
    }
    metrics["non_negligible"] = {
        n: M.count_non_negligible(t, NEGLIGIBLE_FRAC) for n, t in norms.items()
    }
    result = FinalEval(
        metrics=metrics,
        norms=norms,
        ci_values={n: torch.cat(v) if v else torch.zeros(0) for n, v in hist.items()},
    )
    if task.kind in ("tms", "resid_mlp"):
        _toy_metrics(model, task, config, result)
    return result


def _toy_metrics(
    model: ComponentModel, task: Task, config: SPDRunConfig, result: FinalEval
) -> None:
    assert task.n_features is not None
    inputs = M.one_hot_inputs(model, task.n_features, config.one_hot_magnitude)
    one_hot = M.one_hot_ci(model, task.n_features, inputs=inputs)
    result.one_hot = one_hot
    patterns = ci_patterns(task, model)
    result.patterns = patterns
    kinds = {p.module: p.kind for p in patterns}
    m = result.metrics
    m["one_hot_active"] = {n: M.count_active(c, CI_THRESHOLD) for n, c in one_hot.items()}
    m["one_hot_clean"] = {
        p.module: M.clean_inputs(one_hot[p.module], CI_THRESHOLD)
        for p in patterns
        if p.kind == "identity"
    }
    for tol, suffix in ((0.1, ""), (0.2, "_0p2")):
        errs = pattern_errors(patterns, one_hot, tol)
        m[f"identity_ci_error{suffix}"] = {k: v for k, v in errs.items() if kinds[k] == "identity"}
        m[f"dense_ci_error{suffix}"] = {k: v for k, v in errs.items() if kinds[k] == "dense"}
        m[f"ci_error_total{suffix}"] = sum(errs.values())
    if task.kind == "tms":
        mm: dict[str, dict[str, float]] = {"mmcs": {}, "ml2r": {}}
        for name in model.names:
            comp = model.component(name)
            mmcs, ml2r = M.mmcs_ml2r(comp.V, comp.U, _target_weight(comp))
            mm["mmcs"][name], mm["ml2r"][name] = mmcs, ml2r
        m["mmcs_per_layer"], m["ml2r_per_layer"] = mm["mmcs"], mm["ml2r"]
        first = model.names[0]
        m["mmcs"], m["ml2r"] = mm["mmcs"][first], mm["ml2r"][first]
    if task.kind == "resid_mlp":
        outs = [n for n in model.names if n.endswith("mlp_out")]
        if outs:
            m["mlp_out_neurons"] = _neuron_gating(model, inputs, outs, result)
        m["neuron_contributions"] = _contributions(model, task, result)


def _neuron_gating(
    model: ComponentModel, inputs: dict[str, Tensor], names: list[str], result: FinalEval
) -> dict[str, dict[str, float | int]]:
    """Per ResidMLP ``mlp_out``: how many non-negligible subcomponents read a single ReLU neuron
    (share >= 0.9) and whether their one-hot CI is on exactly when that neuron fires
    (``inputs``: the layers' inputs on the one-hot target inputs)."""
    out = {}
    for name in names:
        comp = model.component(name)
        keep = M.non_negligible(result.norms[name], NEGLIGIBLE_FRAC)
        ci = result.one_hot[name]
        r = M.unit_gated_ci(ci, inputs[name], comp.V, keep=keep, tol=CI_THRESHOLD)
        out[name] = r._asdict()
        result.neurons[name] = (inputs[name], M.ci_per_unit(ci, comp.V, keep=keep))
    return out


def _contributions(
    model: ComponentModel, task: Task, result: FinalEval
) -> dict[str, dict[str, float]]:
    """Per decomposed ResidMLP ``mlp_in``: slope and R^2 of its best subcomponents' neuron
    contributions against the target's (the paper's Figs 7 and 10); the layer's ``W_out`` on the
    SPD side is its components' implied weight where it is decomposed, else the target's."""
    out = {}
    for name in model.names:
        if not name.endswith("mlp_in"):
            continue
        out_name = name[: -len("mlp_in")] + "mlp_out"
        w_in = task.target.get_submodule(name).weight  # the target's (slot modules keep it)
        w_out = task.target.get_submodule(out_name).weight
        w_out_spd = model.component(out_name).weight() if out_name in model.names else w_out
        comp = model.component(name)
        r = M.neuron_contributions(task.target.W_E, w_in, w_out, comp.V, comp.U, w_out_spd)
        out[name] = {"slope": r.slope, "r2": r.r2}
        result.contributions[name] = (r.target, r.spd)
    return out


def _lm_ce(
    model: ComponentModel, x: Tensor, target_logits: Tensor, ci: dict[str, Any]
) -> dict[str, Tensor]:
    """Next-token CE (first token of each window not predicted) and KL under each mask kind."""
    nxt = x[:, 1:]
    vals = {"ce/target": cross_entropy(target_logits[:, :-1], nxt)}
    for kind in LM_CE_KINDS:
        masks = {}
        for name, c in ci.items():
            g = c.lower
            if kind == "ci":
                masks[name] = g
            elif kind == "unmasked":
                masks[name] = torch.ones_like(g)
            elif kind == "rounded":
                masks[name] = (g > 0).to(g.dtype)
            elif kind == "zero":
                masks[name] = torch.zeros_like(g)
            else:
                masks[name] = torch.rand_like(g)
        pred = model(x, masks=masks)
        vals[f"ce/{kind}"] = cross_entropy(pred[:, :-1], nxt)
        vals[f"kl/{kind}"] = recon_error(pred, target_logits, "kl")
    return vals


def ce_unrecovered(ce: float, ce_target: float, ce_zero: float) -> float:
    """Share of the CE gap to the all-zero-mask model left unrecovered (sheet §8):
    ``(CE - CE_target) / (CE_zero - CE_target)``; 0 = the target's CE, 1 = as bad as zero masks.
    NaN when the zero-mask CE equals the target's."""
    span = ce_zero - ce_target
    return (ce - ce_target) / span if span != 0 else float("nan")


def _lm_summary(sums: dict[str, float]) -> dict[str, Any]:
    ce_t = sums["ce/target"]
    ce = {k: sums[f"ce/{k}"] for k in LM_CE_KINDS}
    kl = {k: sums[f"kl/{k}"] for k in LM_CE_KINDS}
    unrec = {k: ce_unrecovered(ce[k], ce_t, ce["zero"]) for k in LM_CE_KINDS}
    return {"ce_target": ce_t, "ce": ce, "kl": kl, "ce_unrecovered": unrec}


__all__ = [
    "CHEAP_KINDS",
    "CIPattern",
    "FinalEval",
    "ce_unrecovered",
    "cheap_eval",
    "ci_patterns",
    "final_eval",
    "pattern_errors",
]
