"""L_p vs smooth-L0 importance minimality: a coefficient sweep and its sparsity/faithfulness front.

Issue 5, "the seed question": which importance-minimality penalty (Bushnaq et al. 2025, eq. 6 /
sheet §5.1 L_p; sheet §5.3 smooth-L0 = Geman-McClure ``(1+gamma^2) g^2/(g^2+gamma^2)``) gives
the better trade-off between sparsity (CI-L0 at threshold 0.1, summed over the decomposed
layers) and faithfulness (reconstruction error of the stochastic- and CI-masked model; the KL for
the Mini-GPT), with and without the batch-invariant frequency term
``frequency_coeff * sum_c f_c log2(1 + a' f_c)`` (param-decomp PR #543, sheet §5.2)?

The grid is ``{lp, smooth_l0} x coefficients x {frequency term off, on}``:

* ``lp``: the bundled config's p schedule (TMS: p = 1 constant; Mini-GPT: p 2 -> 1 linear).
* ``smooth_l0``: gamma 1 -> 0.1 linear over the run, ``normalize_at_one`` (phi(1) = 1 at every
  gamma, so the coefficient is not silently ramped up while gamma anneals, sheet §5.3).
* frequency on: ``frequency_coeff = coeff`` and ``reference_token_count`` = positions per batch
  (``batch_size`` x sequence length), the migration of the old beta = 1 term (sheet §5.2).

Coefficient ranges (log-spaced, half a decade apart, shared by both penalties). L_p brackets the
bundled coefficient (TMS 3e-3, Mini-GPT 1e-3). Smooth-L0 was given its own range a priori and the
pilot moved it back onto L_p's. With ``normalize_at_one`` its per-value penalty
``phi(g) = (1+gamma^2) g^2/(g^2+gamma^2)`` is >= the L1 value ``g`` on all of ``[gamma^2, 1]``
(equal at g = 1, ~5x larger at g = gamma = 0.1): it prices a partly active component like a fully
active one, which argues for smaller coefficients. But its gradient
``2 g gamma^2 (1+gamma^2)/(g^2+gamma^2)^2`` peaks near g = gamma/sqrt(3) and falls off as
``2 gamma^2/g^3`` above it (0.16 at g = 0.5 once gamma = 0.1, against L1's constant 1), so it pushes
a half-on component down harder than L_p early in the anneal and more weakly late, which argues for
larger ones. The TMS pilot (1500 steps, no frequency term) settles it: smooth-L0 at 3e-3 gives
CI-L0 0.55 (ground truth 0.5) and at 3e-2 0.27 (over-sparse, 6x the recon error), the same knee as
L_p's bundled 3e-3. So both kinds share one grid, reaching a decade above the knee (over-sparse)
and a decade below it. The low end matters for the frequency term: with ``frequency_coeff = coeff``
and ``a' = B T`` it adds ``log2(1 + a' f)`` (~7.7 at TMS's f = 0.05, a' = 4096) times the base
term per component, i.e. it multiplies the effective coefficient by ~9 at the solution's firing
rate. Equal coefficients also give like-for-like points: a fully active component (g = 1) costs
``coeff`` under both penalties.

Each grid point is one :func:`sparselens.spd.run.run_spd` run in its own directory under
``--runs-dir`` (default ``OUT/runs``); a point whose ``summary.json`` exists is read back, an
interrupted one resumes from its last checkpoint, so rerunning the command continues the sweep.
Outputs in ``OUT``: ``sweep.json`` (settings + one record per point), ``sweep.md`` (table) and
``sweep_pareto.png`` (x = CI-L0, y = reconstruction error on a log scale, one colour per penalty,
one marker per frequency setting, lines through each series' Pareto frontier).

Run with ``nice -n 19`` on a shared machine; every run uses one torch thread.

    nice -n 19 .venv/bin/python scripts/spd_sparsity_sweep.py --target tms_5-2 --steps 1500 \\
        --out docs/spd_sweep_tms --runs-dir /tmp/spd_sweep_runs/tms
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sparselens.spd.config import SPDRunConfig, bundled_config_path
from sparselens.train.atomic import atomic_write_json, atomic_write_text
from sparselens.train.config import load_yaml_mapping
from sparselens.train.rundir import save_figure

KINDS = ("lp", "smooth_l0")
TARGETS = {"tms_5-2": "tms_5-2", "minigpt_mlp": "minigpt_mlp"}
# half-decade log grids (see the module docstring for the choice)
DEFAULT_COEFFS: dict[str, dict[str, list[float]]] = {
    "tms_5-2": {"lp": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "smooth_l0": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]},
    "minigpt_mlp": {"lp": [1e-3, 1e-2], "smooth_l0": [1e-3, 1e-2]},
}
QUICK_COEFFS: dict[str, dict[str, list[float]]] = {
    "tms_5-2": {"lp": [3e-3], "smooth_l0": [3e-3]},
    "minigpt_mlp": {"lp": [1e-3], "smooth_l0": [1e-3]},
}
DEFAULT_STEPS = {"tms_5-2": 1500, "minigpt_mlp": 300}
QUICK_STEPS = {"tms_5-2": 100, "minigpt_mlp": 10}
SMOOTH_L0_GAMMA = {"kind": "linear", "start": 1.0, "end": 0.1}
SERIES_STYLE = {  # (kind, frequency) -> colour, marker, line style
    ("lp", False): ("tab:blue", "o", "-"),
    ("lp", True): ("tab:cyan", "^", "--"),
    ("smooth_l0", False): ("tab:red", "s", "-"),
    ("smooth_l0", True): ("tab:orange", "D", "--"),
}

logger = logging.getLogger("spd_sparsity_sweep")


# -- grid and configs -------------------------------------------------------------------------
def positions_per_batch(config_name: str, batch_size: int) -> int:
    """``batch_size`` x sequence length of the target (1 for the toys): the frequency term's a'."""
    if config_name != "minigpt_mlp":
        return batch_size
    from sparselens.spd.tasks import load_task

    x = load_task("minigpt").sample(1, torch.Generator().manual_seed(0))
    return batch_size * int(x.shape[-1])


def point_name(kind: str, coeff: float, freq: bool) -> str:
    """Directory name of one grid point, e.g. ``lp_c0.003_nofreq``."""
    return f"{kind}_c{coeff:g}_{'freq' if freq else 'nofreq'}"


def point_config(
    base: dict[str, Any],
    kind: str,
    coeff: float,
    freq: bool,
    positions: int,
    steps: int,
    overrides: dict[str, Any],
) -> SPDRunConfig:
    """The bundled settings ``base`` with the importance minimality of this grid point."""
    settings = json.loads(json.dumps(base))  # deep copy
    imp = dict(settings["losses"]["importance_minimality"])
    imp["coeff"] = coeff
    if kind == "smooth_l0":
        imp["kind"] = "smooth_l0"
        imp.pop("p", None)
        imp["gamma"] = dict(SMOOTH_L0_GAMMA)
        imp["normalize_at_one"] = True
    elif kind != "lp":
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if freq:
        imp["frequency_coeff"] = coeff
        imp["reference_token_count"] = float(positions)
    settings["losses"]["importance_minimality"] = imp
    settings.update(steps=steps, progress=False, threads=1, **overrides)
    return SPDRunConfig.model_validate(settings)


def run_point(config: SPDRunConfig, run_dir: Path) -> tuple[dict[str, Any], bool]:
    """``(summary, ran_now)``: read a finished run back, resume an interrupted one, or run it."""
    from sparselens.spd.run import run_spd

    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text(encoding="utf-8")), False
    resume = (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a run that failed before writing its config
    return run_spd(config, run_dir, resume=resume), True


# -- metrics, frontier ------------------------------------------------------------------------
def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def point_record(
    kind: str, coeff: float, freq: bool, summary: dict[str, Any], lm: bool
) -> dict[str, Any]:
    """The numbers of one grid point that the sweep reports."""
    recon = summary.get("recon", {})
    rec: dict[str, Any] = {
        "name": point_name(kind, coeff, freq),
        "kind": kind,
        "coeff": coeff,
        "frequency": freq,
        "ci_l0": {k: _num(v) for k, v in summary.get("ci_l0", {}).items()},
        "ci_l0_total": sum(_num(v) for v in summary.get("ci_l0", {}).values()),
        "recon_stochastic": _num(recon.get("stochastic")),
        "recon_ci": _num(recon.get("ci")),
        "recon": {k: _num(v) for k, v in recon.items()},
        "non_negligible_total": sum(int(v) for v in summary.get("non_negligible", {}).values()),
        "wall_seconds": _num(summary.get("wall_seconds")),
        "step_ms": _num(summary.get("step_ms")),
    }
    if lm:
        kl = summary.get("lm", {}).get("kl", {})
        rec["kl_ci"] = _num(kl.get("ci"))
        rec["ce_unrecovered_ci"] = _num(summary.get("lm", {}).get("ce_unrecovered", {}).get("ci"))
    else:
        rec["mmcs"] = _num(summary.get("mmcs"))
        rec["ml2r"] = _num(summary.get("ml2r"))
        rec["identity_ci_error"] = summary.get("identity_ci_error", {})
        rec["ci_error_total"] = _num(summary.get("ci_error_total"))
    return rec


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when minimising both coordinates, by ascending x.

    A point is kept iff no other point is <= in both coordinates and < in one; NaN points are
    never kept. Ties (equal pairs) keep the first.
    """
    order = sorted(
        (i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))),
        key=lambda i: (points[i][0], points[i][1]),
    )
    front: list[int] = []
    best = math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def mark_frontiers(records: list[dict[str, Any]], metrics: Sequence[str]) -> None:
    """Per metric: ``front_<metric>`` (on the global frontier over every point) and
    ``series_front_<metric>`` (on the frontier of its own kind x frequency series)."""
    for m in metrics:
        pts = [(r["ci_l0_total"], r[m]) for r in records]
        glob = set(pareto_front(pts))
        for i, r in enumerate(records):
            r[f"front_{m}"] = i in glob
        for key in {(r["kind"], r["frequency"]) for r in records}:
            idx = [i for i, r in enumerate(records) if (r["kind"], r["frequency"]) == key]
            keep = {idx[j] for j in pareto_front([pts[i] for i in idx])}
            for i in idx:
                records[i][f"series_front_{m}"] = i in keep


# -- outputs ----------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    """NaN / inf as null, so that sweep.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def _fmt(x: Any, spec: str = ".3g") -> str:
    x = _num(x)
    return "nan" if math.isnan(x) else format(x, spec)


def markdown_table(records: list[dict[str, Any]], lm: bool, metrics: Sequence[str]) -> str:
    """One row per grid point; ``*`` marks the global Pareto frontier of each recon column."""
    head = ["kind", "freq", "coeff", "CI-L0 total"]
    head += ["KL stoch", "KL ci", "CE unrec. ci"] if lm else ["recon stoch", "recon ci"]
    head += [] if lm else ["MMCS", "ML2R", "non-negl.", "CI err"]
    head += ["wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(records, key=lambda r: (r["kind"], r["frequency"], r["coeff"])):

        def star(m: str, r: dict[str, Any] = r) -> str:
            return _fmt(r[m]) + (" *" if r.get(f"front_{m}") else "")

        row = [r["kind"], "on" if r["frequency"] else "off", f"{r['coeff']:g}"]
        row.append(_fmt(r["ci_l0_total"], ".3f"))
        row += [star(m) for m in metrics]
        if lm:
            row.append(_fmt(r["ce_unrecovered_ci"]))
        else:
            row += [_fmt(r["mmcs"], ".4f"), _fmt(r["ml2r"], ".3f")]
            row += [str(r["non_negligible_total"]), _fmt(r["ci_error_total"], "g")]
        row.append(_fmt(r["wall_seconds"], ".0f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _tick_125(value: float, _pos: object = None) -> str:
    """A log-axis minor tick's label: the number at 2 and 5 x 10^k, else nothing."""
    if value <= 0:
        return ""
    lead = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:g}" if lead in (2, 5) else ""


def plot_pareto(
    records: list[dict[str, Any]],
    metrics: Sequence[tuple[str, str]],
    path: Path,
    title: str,
    ground_truth_l0: float | None,
) -> None:
    """One panel per ``(metric, label)``: every point, and lines along each series' frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.8), squeeze=False)
    positive = [r[m] for r in records for m, _ in metrics if r[m] > 0]
    floor = min(positive) / 3 if positive else 1e-12
    l0s = [r["ci_l0_total"] for r in records if r["ci_l0_total"] > 0]
    log_x = bool(l0s) and max(l0s) > 8 * min(l0s)
    for ax, (m, label) in zip(axes[0], metrics, strict=True):
        for (kind, freq), (colour, marker, ls) in SERIES_STYLE.items():
            rs = [r for r in records if r["kind"] == kind and r["frequency"] == freq]
            if not rs:
                continue
            xs = [r["ci_l0_total"] for r in rs]
            ys = [max(r[m], floor) if not math.isnan(r[m]) else math.nan for r in rs]
            name = f"{kind}, freq {'on' if freq else 'off'}"
            ax.scatter(
                xs,
                ys,
                c=colour,
                marker=marker,
                s=46,
                label=name,
                zorder=3,
                edgecolors="k",
                linewidths=0.5,
            )
            front = pareto_front(list(zip(xs, ys, strict=True)))
            if len(front) > 1:
                ax.plot(
                    [xs[i] for i in front], [ys[i] for i in front], ls, c=colour, lw=1.4, zorder=2
                )
            for r, x, y in zip(rs, xs, ys, strict=True):
                if not (math.isnan(x) or math.isnan(y)):
                    ax.annotate(
                        f"{r['coeff']:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=6.5,
                        color=colour,
                    )
        if ground_truth_l0 is not None:
            ax.axvline(ground_truth_l0, color="grey", ls=":", lw=1, label="ground-truth CI-L0")
        ax.set_yscale("log")
        if log_x:
            ax.set_xscale("log")
            # plain numbers at 1, 2 and 5 x 10^k (matplotlib's default minor labels overlap)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(_tick_125))
        ax.set_xlabel("CI-L0 at 0.1 (sum over layers)" + (", log" if log_x else ""))
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7.5)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def ground_truth_ci_l0(config_name: str, n_layers: int) -> float | None:
    """Expected active features per position summed over layers (TMS: layers x n x p)."""
    if not config_name.startswith("tms"):
        return None
    from sparselens.spd.tasks import load_task

    cfg = load_task(config_name).target.cfg
    return n_layers * cfg.n_features * cfg.feature_probability


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=sorted(TARGETS), default="tms_5-2")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default per target)")
    ap.add_argument(
        "--coeffs",
        type=float,
        nargs="+",
        default=None,
        help="L_p coefficients (default: per target, see the docstring)",
    )
    ap.add_argument(
        "--smooth-l0-coeffs",
        type=float,
        nargs="+",
        default=None,
        help="smooth-L0 coefficients (default: per target, see the docstring)",
    )
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--frequency", nargs="+", choices=("off", "on"), default=["off", "on"])
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--runs-dir", type=Path, default=None, help="run directories (OUT/runs)")
    ap.add_argument(
        "--final-eval-samples",
        type=int,
        default=None,
        help="samples of each run's final evaluation (default: the config's)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one coefficient per kind, few steps, small final eval",
    )
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    for flag in ("coeffs", "smooth_l0_coeffs"):
        vals = getattr(args, flag) or []
        if any(not (c > 0 and math.isfinite(c)) for c in vals):
            ap.error(f"--{flag.replace('_', '-')} must be finite and > 0, got {vals}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    name = TARGETS[args.target]
    lm = name == "minigpt_mlp"
    grid = QUICK_COEFFS[name] if args.quick else DEFAULT_COEFFS[name]
    coeffs = {
        "lp": args.coeffs or grid["lp"],
        "smooth_l0": args.smooth_l0_coeffs or grid["smooth_l0"],
    }
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)[name]
    overrides: dict[str, Any] = {}
    if args.final_eval_samples is not None:
        overrides["final_eval_samples"] = args.final_eval_samples
    elif args.quick:
        overrides["final_eval_samples"] = 64 if lm else 2000
    if steps < 500:  # evaluate / checkpoint at the end only for short runs
        overrides.update(eval_every=steps, checkpoint_every=steps)
    out: Path = args.out
    runs_dir: Path = args.runs_dir or out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)

    base = load_yaml_mapping(bundled_config_path(name))
    positions = positions_per_batch(name, int(base["batch_size"]))
    points = [
        (kind, c, freq == "on")
        for kind in args.kinds
        for freq in args.frequency
        for c in coeffs[kind]
    ]
    logger.info("%s: %d points, %d steps each, a' = %d", name, len(points), steps, positions)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    layers: list[str] = []
    for n, (kind, c, freq) in enumerate(points, 1):
        cfg = point_config(base, kind, c, freq, positions, steps, overrides)
        run_dir = runs_dir / point_name(kind, c, freq)
        summary, ran = run_point(cfg, run_dir)
        layers = list(summary.get("layers", layers))
        rec = point_record(kind, c, freq, summary, lm)
        rec["run_dir"] = str(run_dir)
        records.append(rec)
        logger.info(
            "[%d/%d] %s%s: CI-L0 %.3f, recon stoch %.3g, ci %.3g (%.0f s)",
            n,
            len(points),
            rec["name"],
            "" if ran else " (done before)",
            rec["ci_l0_total"],
            rec["recon_stochastic"],
            rec["recon_ci"],
            rec["wall_seconds"],
        )
    sweep_s = time.perf_counter() - t0

    metrics = ["recon_stochastic", "recon_ci"]
    mark_frontiers(records, metrics)
    gt = ground_truth_ci_l0(name, len(layers)) if layers else None
    yname = "KL" if lm else "MSE"
    plot_metrics = [
        ("recon_stochastic", f"stochastic-mask recon ({yname}, log)"),
        ("recon_ci", f"CI-masked recon ({yname}, log)"),
    ]
    title = (
        f"SPD {name}: L_p vs smooth-L0 importance minimality, {steps} steps/run "
        f"(frequency term a' = {positions})"
    )
    png = out / "sweep_pareto.png"
    plot_pareto(records, plot_metrics, png, title, gt)

    settings = {
        "config": name,
        "steps": steps,
        "coeffs": coeffs,
        "kinds": args.kinds,
        "frequency": args.frequency,
        "lp_p": base["losses"]["importance_minimality"].get("p"),
        "smooth_l0": {"gamma": SMOOTH_L0_GAMMA, "normalize_at_one": True},
        "frequency_on": {"frequency_coeff": "= coeff", "reference_token_count": positions},
        "overrides": overrides,
        "layers": layers,
        "ground_truth_ci_l0": gt,
        "ci_threshold": 0.1,
        "sweep_seconds_this_invocation": sweep_s,
        "sum_run_wall_seconds": sum(r["wall_seconds"] for r in records),
        "torch": torch.__version__,
    }
    doc = _json_safe({"settings": settings, "points": records})
    atomic_write_json(out / "sweep.json", doc, indent=1)  # _json_safe: strict JSON
    md = [
        f"# SPD sparsity sweep: {name}",
        "",
        f"{len(records)} runs x {steps} steps; L_p p = "
        f"{json.dumps(settings['lp_p'])}; smooth-L0 gamma 1 -> 0.1 linear, normalize_at_one; "
        f"frequency on: frequency_coeff = coeff, a' = {positions} positions/batch. CI-L0 at 0.1 "
        f"summed over {len(layers)} layers"
        + (f" (ground truth {gt:g})" if gt is not None else "")
        + f"; recon = {yname}. `*` = on the Pareto frontier (min CI-L0, min recon) over all "
        f"points. Sum of run wall times {settings['sum_run_wall_seconds']:.0f} s.",
        "",
        markdown_table(records, lm, metrics),
        f"![Pareto frontier]({png.name})",
        "",
    ]
    atomic_write_text(out / "sweep.md", "\n".join(md))
    logger.info("wrote %s, %s, %s (%.0f s)", out / "sweep.json", out / "sweep.md", png, sweep_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
