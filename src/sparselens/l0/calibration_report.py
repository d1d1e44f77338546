"""Outputs of a calibration run: the summary (``summary.json``), ``weights.csv``,
``target_errors.csv``, the plots (``plots/{loss,relative_error,weights_hist}.png``) and
``report.md``. Numbers in the CSV files are written with ``repr`` so they read back exactly.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparselens.l0.calibration_data import CalibrationProblem
from sparselens.train.atomic import atomic_write_text
from sparselens.train.rundir import RunDir, save_figure

if TYPE_CHECKING:
    from sparselens.l0.calibrate_job import CalibrateConfig


# -- summary ------------------------------------------------------------------------------------
def _error_stats(err: np.ndarray) -> dict[str, float]:
    """Mean, median and max of the per-target relative errors (NaN when there are none)."""
    if err.size == 0:
        return {"mean": math.nan, "median": math.nan, "max": math.nan}
    return {"mean": float(err.mean()), "median": float(np.median(err)), "max": float(err.max())}


def _weight_stats(w: np.ndarray) -> dict[str, float | int]:
    """Non-zero count, sum, largest weight and Kish effective sample size of ``w``."""
    nz = w[w > 0]
    s = float(w.sum())
    ss = float((w * w).sum())
    return {
        "nonzero": int(nz.size),
        "sum": s,
        "max": float(nz.max()) if nz.size else 0.0,
        "ess": s * s / ss if ss > 0 else 0.0,
    }


def build_summary(
    config: CalibrateConfig,
    problem: CalibrationProblem,
    run: RunDir,
    model: Any,
    w_gated: np.ndarray,
    w_final: np.ndarray,
    err_before: np.ndarray,
    err_after: np.ndarray,
    n_selected: int,
    expected_l0: float,
    fit_seconds: float,
    refit_seconds: float,
    fit_meta: dict[str, Any],
) -> dict[str, Any]:
    """The run's ``summary.json`` (without ``seconds_total``, which the caller adds)."""
    refitted = config.refit_epochs > 0 and n_selected > 0
    out: dict[str, Any] = {
        "run_dir": str(run.path),
        "data": {
            "source": "synthetic" if problem.survey is not None else "files",
            "n_records": problem.n_records,
            "n_targets": problem.n_targets,
            "nnz": int(problem.M.nnz),
        },
        "lambda_l0": model.lambda_l0_,
        "target_count": config.target_count,
        "selected": n_selected,
        "fit": {
            "epochs": config.epochs,
            "seconds": fit_seconds,
            "expected_l0": expected_l0,
            "rel_error": _error_stats(err_before),
            **_weight_stats(w_gated),
        },
        "refit": {
            "epochs": config.refit_epochs if refitted else 0,
            "seconds": refit_seconds,
            "rel_error": _error_stats(err_after),
            **_weight_stats(w_final),
        },
        "nonzero": int((w_final > 0).sum()),
    }
    if problem.groups is not None and problem.group_names is not None:
        out["groups"] = [
            {
                "group": name,
                "targets": int((problem.groups == g).sum()),
                "rel_error_gated_mean": float(err_before[problem.groups == g].mean()),
                "rel_error_mean": float(err_after[problem.groups == g].mean()),
            }
            for g, name in enumerate(problem.group_names)
            if (problem.groups == g).any()
        ]
    if "bisection" in fit_meta:
        out["bisection"] = [
            {k: t[k] for k in ("lambda_l0", "count")} for t in fit_meta["bisection"]
        ]
    if problem.survey is not None:
        truth = problem.survey.w_true > 0
        chosen = w_final > 0
        hit = int((truth & chosen).sum())
        true_sum = float(problem.survey.w_true.sum())
        out["recovery"] = {
            "true_active": int(truth.sum()),
            "selected": int(chosen.sum()),
            "selected_true_active": hit,
            "recall": hit / max(int(truth.sum()), 1),
            "precision": hit / max(int(chosen.sum()), 1),
            "true_weight_sum": true_sum,
            "weight_sum": float(w_final.sum()),
            "weight_sum_ratio": float(w_final.sum()) / true_sum if true_sum else math.nan,
        }
    return out


# -- CSV files ----------------------------------------------------------------------------------
def _num(x: float) -> str:
    return repr(float(x))


def write_weights(
    path: Path, w: np.ndarray, w_gated: np.ndarray, problem: CalibrationProblem
) -> None:
    """``weights.csv``: one row per record (final, gated and, synthetic only, true weight)."""
    truth = problem.survey.w_true if problem.survey is not None else None
    lines = ["record,weight,gated_weight" + (",true_weight" if truth is not None else "")]
    for i in range(w.size):
        row = f"{i},{_num(w[i])},{_num(w_gated[i])}"
        lines.append(row + (f",{_num(truth[i])}" if truth is not None else ""))
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_target_errors(
    path: Path,
    problem: CalibrationProblem,
    before: np.ndarray,
    after: np.ndarray,
    err_before: np.ndarray,
    err_after: np.ndarray,
) -> None:
    """``target_errors.csv``: one row per target, estimates and errors before/after refit."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["name", "group", "target", "estimate_gated", "estimate", "rel_error_gated", "rel_error"]
    )
    for j in range(problem.n_targets):
        g = ""
        if problem.groups is not None and problem.group_names is not None:
            g = problem.group_names[int(problem.groups[j])]
        w.writerow(
            [
                problem.names[j],
                g,
                _num(problem.y[j]),
                _num(before[j]),
                _num(after[j]),
                _num(err_before[j]),
                _num(err_after[j]),
            ]
        )
    atomic_write_text(path, buf.getvalue())


# -- plots --------------------------------------------------------------------------------------
def write_plots(
    directory: Path,
    history: list[dict[str, Any]],
    err_before: np.ndarray,
    err_after: np.ndarray,
    w_gated: np.ndarray,
    w_final: np.ndarray,
    problem: CalibrationProblem,
) -> None:
    """``loss.png``, ``relative_error.png`` and ``weights_hist.png`` in ``directory``."""
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    fit = [r for r in history if r.get("phase") == "fit"]
    refit = [r for r in history if r.get("phase") == "refit"]

    # loss curves
    fig = Figure(figsize=(10, 4) if refit else (6, 4))
    axes = fig.subplots(1, 2 if refit else 1, squeeze=False)[0]
    ax = axes[0]
    if fit:
        ep = [r["epoch"] for r in fit]
        ax.plot(ep, [max(r["loss"], 1e-300) for r in fit], label="total loss")
        ax.plot(ep, [max(r["data_loss"], 1e-300) for r in fit], label="data loss")
        ax.legend()
    ax.set(title="fit (L0 gates)", xlabel="epoch", ylabel="loss", yscale="log")
    ax.grid(True, alpha=0.3)
    if refit:
        ax = axes[1]
        ax.plot(
            [r["epoch"] for r in refit],
            [max(r["data_loss"], 1e-300) for r in refit],
            color="C2",
            label="data loss",
        )
        ax.set(title="refit (selected records)", xlabel="epoch", ylabel="loss", yscale="log")
        ax.legend()
        ax.grid(True, alpha=0.3)
    save_figure(fig, directory / "loss.png")

    # per-target relative errors
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    order = np.argsort(err_before, kind="stable")
    positive = np.concatenate([err_before[err_before > 0], err_after[err_after > 0]])
    floor = float(positive.min()) / 10 if positive.size else 1e-12
    rank = np.arange(1, order.size + 1)
    ax.scatter(
        rank,
        np.maximum(err_before[order], floor),
        s=12,
        label=(f"gated weights (before refit): mean {err_before.mean():.3g}"),
    )
    ax.scatter(
        rank,
        np.maximum(err_after[order], floor),
        s=12,
        marker="x",
        label=(f"final weights (after refit): mean {err_after.mean():.3g}"),
    )
    ax.set(
        yscale="log",
        xlabel="target (sorted by error before refit)",
        ylabel="relative error |ŷ - y| / max(|y|, floor)",
        title=f"per-target relative error ({problem.n_targets} targets)",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    save_figure(fig, directory / "relative_error.png")

    # weight histogram
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    series = [("final weights", w_final[w_final > 0], "C0")]
    series.append(("gated weights (before refit)", w_gated[w_gated > 0], "C1"))
    if problem.survey is not None:
        wt = problem.survey.w_true
        series.append(("true weights", wt[wt > 0], "C2"))
    allw = np.concatenate([s[1] for s in series])
    if allw.size:
        lo, hi = float(allw.min()), float(allw.max())
        hi = hi * 1.01 if hi > lo else lo * 2
        bins = np.logspace(math.log10(lo), math.log10(hi), 40)
        for i, (label, w, color) in enumerate(series):
            if w.size:
                ax.hist(
                    w,
                    bins=bins,
                    histtype="stepfilled" if i == 0 else "step",
                    alpha=0.5 if i == 0 else 1.0,
                    color=color,
                    linewidth=1.5,
                    label=f"{label} ({w.size} non-zero)",
                )
        ax.legend(fontsize="small")
    ax.set(xscale="log", xlabel="weight", ylabel="records", title="non-zero weights")
    ax.grid(True, alpha=0.3)
    save_figure(fig, directory / "weights_hist.png")


# -- report -------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.4g} %" if math.isfinite(x) else "n/a"


def render_report(config: CalibrateConfig, s: dict[str, Any], problem: CalibrationProblem) -> str:
    """``report.md`` from the settings and the summary ``s``."""
    d, fit, refit = s["data"], s["fit"], s["refit"]
    src = (
        f"synthetic survey ({d['n_records']} households, {d['n_targets']} regional targets, "
        f"density {config.synthetic_density:g})"
        if d["source"] == "synthetic"
        else f"`{config.matrix}` + `{config.targets}`"
    )
    lam = s["lambda_l0"]
    groups = "on" if config.use_groups else "off"
    bisect = f" (bisection for {config.target_count} records)" if config.target_count else ""
    lines = [
        "# Sparse calibration",
        "",
        f"Run directory: `{s['run_dir']}`",
        "",
        "## Problem",
        "",
        f"- data: {src}",
        f"- records (columns): {d['n_records']}; targets (rows): {d['n_targets']}; "
        f"non-zeros: {d['nnz']} (density {d['nnz'] / (d['n_records'] * d['n_targets']):.3g})",
        "",
        "## Settings",
        "",
        f"- gates: beta {config.beta:g}, gamma {config.gamma:g}, zeta {config.zeta:g}, "
        f"init keep prob {config.init_keep_prob:g}, inference `{config.inference}`",
        f"- init weight {config.init_weight}, jitter sd log-weight "
        f"{config.log_weight_jitter_sd:g} / gate logit {config.log_alpha_jitter_sd:g}",
        f"- loss `{config.loss_type}` (floor {config.relative_floor:g}), lambda_l0 "
        f"{lam:.4g}{bisect}, lambda_l2 {config.lambda_l2:g}, groups {groups}",
        f"- fit: Adam lr {config.lr:g}, {config.epochs} epochs; refit: "
        f"{refit['epochs']} epochs, lr {config.refit_lr or config.lr:g}; seed {config.seed}",
        "",
        "## Result",
        "",
        f"- non-zero weights: **{s['nonzero']}** of {d['n_records']} records "
        f"({_pct(s['nonzero'] / d['n_records'])}); expected L0 after the fit "
        f"{fit['expected_l0']:.1f}",
        "",
        "| relative error | gated weights (before refit) | final weights (after refit) |",
        "|---|---|---|",
    ]
    for k in ("mean", "median", "max"):
        lines.append(f"| {k} | {_pct(fit['rel_error'][k])} | {_pct(refit['rel_error'][k])} |")
    lines += [
        "",
        "| weights | gated (before refit) | final |",
        "|---|---|---|",
        f"| non-zero | {fit['nonzero']} | {refit['nonzero']} |",
        f"| sum | {fit['sum']:.6g} | {refit['sum']:.6g} |",
        f"| max | {fit['max']:.6g} | {refit['max']:.6g} |",
        f"| effective sample size | {fit['ess']:.1f} | {refit['ess']:.1f} |",
        "",
        "Relative error = |ŷ − y| / max(|y|, relative_floor), ŷ = M·w with deterministic "
        f"(`{config.inference}`) gates.",
    ]
    if "groups" in s:
        lines += [
            "",
            "| group | targets | mean error before refit | mean error after refit |",
            "|---|---|---|---|",
        ]
        for g in s["groups"]:
            lines.append(
                f"| {g['group']} | {g['targets']} | {_pct(g['rel_error_gated_mean'])} "
                f"| {_pct(g['rel_error_mean'])} |"
            )
    if "bisection" in s:
        lines += [
            "",
            "Bisection on lambda_l0: "
            + ", ".join(f"{t['lambda_l0']:.3g} → {t['count']}" for t in s["bisection"]),
        ]
    if "recovery" in s:
        r = s["recovery"]
        lines += [
            "",
            "## Recovery of the known truth (synthetic survey)",
            "",
            f"- truly active records: {r['true_active']}; selected: {r['selected']}; "
            f"selected and truly active: {r['selected_true_active']} "
            f"(recall {_pct(r['recall'])}, precision {_pct(r['precision'])})",
            f"- sum of weights: {r['weight_sum']:.6g} vs true {r['true_weight_sum']:.6g} "
            f"(ratio {r['weight_sum_ratio']:.4f})",
        ]
    lines += [
        "",
        "## Timing",
        "",
        f"- fit {fit['seconds']:.2f} s, refit {refit['seconds']:.2f} s, "
        f"total {s['seconds_total']:.2f} s (this session)",
        "",
        "## Plots",
        "",
        "![loss](plots/loss.png)",
        "",
        "![relative error per target](plots/relative_error.png)",
        "",
        "![weight histogram](plots/weights_hist.png)",
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "build_summary",
    "render_report",
    "write_plots",
    "write_target_errors",
    "write_weights",
]
