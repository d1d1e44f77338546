"""Plots, ``summary.json`` content and ``report.md`` of an SPD run.

Plots (``plots/``): ``losses.png`` (training loss terms and evaluation reconstruction errors
against the step, log scale), ``ci_l0.png`` (CI-L0 per layer over training),
``ci_one_hot_<layer>.png`` (toys: CI on one-hot inputs, columns permuted to the expected
pattern), ``component_norms.png`` (subcomponent norms per layer, sorted) and
``ci_histograms.png`` (lower-leaky CI values of the final evaluation, per layer) and, for a
ResidMLP ``mlp_out``, ``neurons_<layer>.png`` (one-hot neuron firing beside the CI per neuron)
and ``neuron_contributions.png`` (the target's against the W_in subcomponents', paper Figs 7, 10).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparselens.spd.config import SPDRunConfig
from sparselens.spd.evaluate import FinalEval
from sparselens.spd.metrics import permute_to_identity
from sparselens.train.rundir import save_figure

PAPER_TABLE1 = {  # Bushnaq et al. 2025, Table 1: ML2R (mean ± std over seeds); MMCS 1.000 for all
    "tms_5-2": "0.993 ± 0.002",
    "tms_40-10": "1.010 ± 0.007",
    "tms_5-2_id": "0.992 ± 0.010",
    "tms_40-10_id": "1.031 ± 0.001",
}


def _fname(layer: str) -> str:
    return layer.replace(".", "-").replace("*", "all")


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def plot_losses(path: Path, records: list[dict[str, Any]]) -> None:
    """Training loss terms and evaluation reconstruction errors against the step."""
    train = [r for r in records if r.get("phase") == "train"]
    evals = [r for r in records if r.get("phase") == "eval"]
    fig = _figure((11, 4.5))
    ax1, ax2 = fig.subplots(1, 2)
    keys = sorted({k for r in train for k in r if k.startswith("loss/")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if k in r and r[k] > 0]
        if pts:
            marker = "." if len(pts) < 30 else None
            ax1.plot(*zip(*pts, strict=True), lw=1, marker=marker, label=k.removeprefix("loss/"))
    ax1.set(xlabel="step", ylabel="loss term (mean over log interval)", yscale="log")
    ax1.set_title("training losses")
    rkeys = sorted({k for r in evals for k in r if k.startswith("recon/")})
    for k in rkeys:
        pts = [(r["step"], r[k]) for r in evals if k in r and r[k] > 0]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", ms=3, lw=1, label=k.removeprefix("recon/"))
    ax2.set(xlabel="step", ylabel="reconstruction error", yscale="log")
    ax2.set_title("evaluation: masks")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_ci_l0(path: Path, records: list[dict[str, Any]]) -> None:
    """CI-L0 per layer at every evaluation."""
    evals = [r for r in records if r.get("phase") == "eval"]
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    keys = sorted({k for r in evals for k in r if k.startswith("ci_l0/")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", ms=3, lw=1, label=k.removeprefix("ci_l0/"))
    ax.set(xlabel="step", ylabel="CI-L0 (mean # components with CI > 0.1)", title="CI-L0")
    ax.grid(True, alpha=0.3)
    if keys:
        ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_one_hot(path: Path, layer: str, ci: Tensor, kind: str) -> None:
    """CI on one-hot inputs (rows: input feature; columns: components, permuted)."""
    if kind == "identity" and ci.shape[1] >= ci.shape[0]:
        ci, _ = permute_to_identity(ci)
    else:
        ci = ci[:, torch.argsort(ci.sum(dim=0), descending=True, stable=True)]
    n, c = ci.shape
    fig = _figure((min(2 + 0.25 * c, 16), min(1.5 + 0.25 * n, 12)))
    ax = fig.subplots()
    im = ax.imshow(ci.cpu().numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
    fig.colorbar(im, ax=ax, shrink=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="component (permuted)", ylabel="input feature (one-hot)")
    ax.set_title(f"CI on one-hot inputs: {layer} ({kind} pattern)")
    save_figure(fig, path)


def plot_neurons(path: Path, layer: str, acts: Tensor, ci: Tensor) -> None:
    """ResidMLP ``mlp_out`` on one-hot inputs: which ReLU neurons fire (left) beside the CI of
    the subcomponent that reads each neuron (right); same rows (features) and columns (neurons)."""
    fig = _figure((12, 6))
    axes = fig.subplots(1, 2)
    fires = (acts.detach().cpu() > 0).float()
    for ax, m, title in (
        (axes[0], fires, "neuron fires (ReLU out > 0)"),
        (axes[1], ci.detach().cpu(), "CI of the subcomponent reading the neuron"),
    ):
        im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set(xlabel="neuron", ylabel="input feature (one-hot)", title=title)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(f"{layer}: does CI follow the neurons?")
    save_figure(fig, path)


def plot_contributions(path: Path, pairs: dict[str, tuple[Tensor, Tensor]]) -> None:
    """ResidMLP: each neuron's contribution to each feature in the target (x) against the same
    in the feature's best W_in subcomponent (y), one colour per layer, and y = x (Figs 7, 10)."""
    fig = _figure((6.5, 6.5))
    ax = fig.subplots()
    lo = hi = 0.0
    for layer, (target, spd) in pairs.items():
        x, y = target.detach().cpu().flatten(), spd.detach().cpu().flatten()
        ax.scatter(x.numpy(), y.numpy(), s=6, alpha=0.35, edgecolors="none", label=layer)
        lo = min(lo, float(x.min()), float(y.min()))
        hi = max(hi, float(x.max()), float(y.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set(xlabel="target model", ylabel="best W_in subcomponent")
    ax.set_title("neuron contributions per (feature, neuron)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_component_norms(path: Path, norms: dict[str, Tensor]) -> None:
    """Subcomponent norms per layer, sorted descending (non-negligible: > 0.1 x max)."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    for name, t in norms.items():
        v = torch.sort(t.detach().cpu(), descending=True).values.numpy()
        ax.plot(range(1, len(v) + 1), v, "o-", ms=3, lw=1, label=name)
    ax.set(xlabel="rank", ylabel="‖V_c‖ ‖U_c‖", yscale="log", title="subcomponent norms")
    ax.grid(True, alpha=0.3)
    if norms:
        ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_ci_histograms(path: Path, values: dict[str, Tensor]) -> None:
    """Histograms of the lower-leaky CI values of the final evaluation."""
    names = [n for n, v in values.items() if v.numel()]
    cols = max(1, min(len(names), 4))
    rows = max(1, math.ceil(len(names) / cols))
    fig = _figure((3.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.hist(values[name].cpu().numpy(), bins=50, range=(0.0, 1.0), log=True)
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("CI")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    save_figure(fig, path)


def write_plots(stage: Path, records: list[dict[str, Any]], final: FinalEval) -> list[str]:
    """All plots into ``stage/plots``; returns their paths relative to the run directory."""
    plots = stage / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    out = []
    plot_losses(plots / "losses.png", records)
    plot_ci_l0(plots / "ci_l0.png", records)
    out += ["plots/losses.png", "plots/ci_l0.png"]
    kinds = {p.module: p.kind for p in final.patterns}
    for layer, ci in final.one_hot.items():
        name = f"plots/ci_one_hot_{_fname(layer)}.png"
        plot_one_hot(stage / name, layer, ci, kinds.get(layer, "identity"))
        out.append(name)
    for layer, (acts, ci) in final.neurons.items():
        name = f"plots/neurons_{_fname(layer)}.png"
        plot_neurons(stage / name, layer, acts, ci)
        out.append(name)
    if final.contributions:
        plot_contributions(plots / "neuron_contributions.png", final.contributions)
        out.append("plots/neuron_contributions.png")
    plot_component_norms(plots / "component_norms.png", final.norms)
    plot_ci_histograms(plots / "ci_histograms.png", final.ci_values)
    out += ["plots/component_norms.png", "plots/ci_histograms.png"]
    return out


# -- summary and report -----------------------------------------------------------------------
def _g(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _pct(x: Any) -> str:
    """A probability as a percentage; '—' where it is undefined (NaN, or "nan" from JSON)."""
    if isinstance(x, float) and x == x:
        return f"{100 * x:.1f}%"
    return "—"


def report_markdown(config: SPDRunConfig, s: dict[str, Any], plots: list[str]) -> str:
    """``report.md``: setup, final metrics, plots."""
    m = s
    imp = config.losses.importance_minimality
    ckpt = s.get("checkpoint_step")
    where = "final components: `final/model.safetensors`"
    if ckpt is not None:
        where = f"evaluated at its checkpoint of step {ckpt} of {config.steps}"
    lines = [
        f"# SPD run: {config.target}" + (f" at step {ckpt}" if ckpt is not None else ""),
        "",
        f"Run directory: `{s['run_dir']}`; {where}.",
        "",
        "## Setup",
        "",
        "- decomposition: "
        + ", ".join(f"`{d['pattern']}` (C={d['C']})" for d in s["decomposition"]),
        f"- CI function `{config.ci_fn}` {config.ci_hidden}; output loss "
        f"`{config.losses.output_loss}`; delta component "
        f"{'on' if config.losses.use_delta_component else 'off'}",
        f"- losses: stochastic {config.losses.stochastic_recon:g}, layerwise "
        f"{config.losses.layerwise_recon:g}, subset {config.losses.subset_recon:g}, faithfulness "
        f"{config.losses.faithfulness:g}, PGD {config.losses.pgd.coeff:g}, importance "
        f"minimality `{imp.kind}` coeff {imp.coeff:g}",
        f"- Adam lr {config.lr.kind} {config.lr.start:g} → {config.lr.final:g} (warm-up "
        f"{config.warmup_steps} steps), {config.steps} steps of batch {config.batch_size}, "
        f"faithfulness warm-up {config.faithfulness_warmup.steps} steps; seed {config.seed}, "
        f"{config.threads} thread(s), world size {s['world_size']}",
        "",
        "## Result",
        "",
        f"Training {s['train_seconds']:.1f} s ({s['step_ms']:.2f} ms/step), whole run "
        f"{s['wall_seconds']:.1f} s.",
        "",
    ]
    if "mmcs" in m:
        paper = PAPER_TABLE1.get(str(config.target))
        ref = f"; paper Table 1: MMCS 1.000, ML2R {paper}" if paper else ""
        lines += [
            f"**MMCS {m['mmcs']:.5f}, ML2R {m['ml2r']:.4f}** (W_in = `{s['layers'][0]}`{ref})",
            "",
        ]
    lines += [
        "| layer | CI-L0 | non-negligible | active on one-hot inputs | MMCS | ML2R |",
        "|---|---|---|---|---|---|",
    ]
    for layer in s["layers"]:
        mm = m.get("mmcs_per_layer", {}).get(layer)
        ml = m.get("ml2r_per_layer", {}).get(layer)
        act = m.get("one_hot_active", {}).get(layer, "—")
        lines.append(
            f"| `{layer}` | {m['ci_l0'][layer]:.3f} | {m['non_negligible'][layer]} | {act} | "
            f"{_g(mm, 6) if mm is not None else '—'} | {_g(ml, 4) if ml is not None else '—'} |"
        )
    lines.append("")
    if "identity_ci_error" in m:
        clean = m.get("one_hot_clean", {})
        parts = [
            f"identity `{k}` {v}" + (f" ({clean[k]} clean inputs)" if k in clean else "")
            for k, v in m["identity_ci_error"].items()
        ]
        parts += [f"dense `{k}` {v}" for k, v in m["dense_ci_error"].items()]
        parts02 = [f"{v}" for v in m["identity_ci_error_0p2"].values()]
        parts02 += [f"{v}" for v in m["dense_ci_error_0p2"].values()]
        lines += [
            f"One-hot CI errors (tol 0.1): {', '.join(parts)}; total {m['ci_error_total']} "
            f"(tol 0.2: {' / '.join(parts02)}; total {m['ci_error_total_0p2']}).",
            "",
        ]
    for layer, g in m.get("mlp_out_neurons", {}).items():
        lines += [
            f"`{layer}`: {g['aligned']} non-negligible subcomponents read one ReLU neuron each "
            f"(>= 90% of |V_c|^2; {g['distinct_units']} distinct neurons); on one-hot inputs their "
            f"CI is > 0.1 in {_pct(g['on_when_firing'])} of the cases where that neuron fires and "
            f"{_pct(g['on_when_silent'])} where it is silent (on for "
            f"{_pct(g['firing_mass_on'])} of the firing neurons' activation).",
            "",
        ]
    for layer, c in m.get("neuron_contributions", {}).items():
        lines += [
            f"`{layer}` neuron contributions, each feature's best subcomponent against the target "
            f"(paper Figs 7, 10): slope {c['slope']:.3f}, R² about y = x {c['r2']:.3f}.",
            "",
        ]
    rec = m["recon"]
    lines += [
        "| mask | " + " | ".join(rec) + " |",
        "|---|" + "---|" * len(rec),
        f"| recon ({config.losses.output_loss}) | "
        + " | ".join(f"{v:.3g}" for v in rec.values())
        + " |",
        "",
        f"Importance minimality {m['importance_minimality']:.4g}; faithfulness (mean ΔW²) "
        f"{m['faithfulness']:.3g}.",
        "",
    ]
    if "lm" in m:
        lm = m["lm"]
        kinds = list(lm["ce"])
        lines += [
            f"Language model: target CE {lm['ce_target']:.4f} nats/token.",
            "",
            "| mask | " + " | ".join(kinds) + " |",
            "|---|" + "---|" * len(kinds),
            "| CE | " + " | ".join(f"{lm['ce'][k]:.4f}" for k in kinds) + " |",
            "| KL | " + " | ".join(f"{lm['kl'][k]:.4f}" for k in kinds) + " |",
            "| CE unrecovered | "
            + " | ".join(f"{lm['ce_unrecovered'][k]:.4f}" for k in kinds)
            + " |",
            "",
        ]
    lines += ["## Plots", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots]
    lines.append("")
    return "\n".join(lines)


__all__ = [
    "plot_ci_histograms",
    "plot_ci_l0",
    "plot_component_norms",
    "plot_contributions",
    "plot_losses",
    "plot_neurons",
    "plot_one_hot",
    "report_markdown",
    "write_plots",
]
