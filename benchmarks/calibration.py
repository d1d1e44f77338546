"""Sparse calibration benchmark: sparselens vs l0-python 0.6.2, side by side in one run.

The problem (l0-python fact sheet §9), built deterministically from ``--seed``: 10,000 records x
200 targets with 200,000 non-zeros (values lognormal(1.5, 0.25)); a random half of the records
is active with lognormal(2, 1) weights and ``y = M @ w_true``. Both libraries fit it with
PolicyEngine's production settings (beta 0.35, keep 0.999, init weight 100, jitters 0.05/0.01,
lambda_l0 1e-4, lambda_l2 1e-12, lr 0.15, relative loss, 600 epochs, seed 0, 2 torch threads),
then refit 300 epochs on the selected support with the gates frozen.

Each fit runs in its own subprocess (``benchmarks/_l0_python_worker.py``): l0-python with a
separate venv (created once under ``.cache/bench-l0-python-venv``, or ``--l0-venv``), sparselens
with this interpreter. The runs alternate l0-python, sparselens, ... for ``--rounds`` rounds.
A markdown table goes to stdout, progress to stderr, everything to ``--output`` (JSON).

    python benchmarks/calibration.py                 # the full benchmark (minutes)
    python benchmarks/calibration.py --quick         # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from _peers import TORCH_PIN, ensure_venv, log, probe, run_worker

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("_l0_python_worker.py")
DEFAULT_VENV = REPO / ".cache" / "bench-l0-python-venv"
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "calibration.json"
L0_PIN = "l0-python==0.6.2"
LIBRARIES = ("l0-python", "sparselens")

# PolicyEngine's production settings (policyengine-us-data, "national" preset).
SETTINGS: dict[str, Any] = {
    "beta": 0.35,
    "init_keep_prob": 0.999,
    "init_weights": 100.0,
    "log_weight_jitter_sd": 0.05,
    "log_alpha_jitter_sd": 0.01,
    "lambda_l0": 1e-4,
    "lambda_l2": 1e-12,
    "lr": 0.15,
    "loss_type": "relative",
}


def make_problem(
    n_records: int, n_targets: int, density: float, seed: int
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """``(M, y, w_true)``: exactly ``density * m * n`` non-zeros, half the records active."""
    rng = np.random.default_rng(seed)
    nnz = round(density * n_targets * n_records)
    flat = np.sort(rng.choice(n_targets * n_records, size=nnz, replace=False))
    rows, cols = np.divmod(flat, n_records)
    vals = rng.lognormal(1.5, 0.25, size=nnz)
    M = sp.csr_matrix((vals, (rows, cols)), shape=(n_targets, n_records))
    w_true = np.zeros(n_records)
    active = rng.choice(n_records, size=n_records // 2, replace=False)
    w_true[active] = rng.lognormal(2.0, 1.0, size=active.size)
    y = M @ w_true
    if np.any(y <= 0):
        raise RuntimeError("a target has no active record; change --seed")
    return M, y, w_true


def _check(python: Path) -> dict[str, str] | None:
    """Versions of torch and l0-python in ``python``'s environment, or None if unusable."""
    return probe(
        python,
        "import json, importlib.metadata as m, torch, numpy, scipy, l0.calibration;"
        "print(json.dumps({'torch': torch.__version__, 'l0-python': m.version('l0-python')}))",
    )


def ensure_l0_venv(venv: Path) -> Path:
    """Reuse or create the l0-python venv (torch pinned to 2.13.0); return its interpreter."""
    python, found = ensure_venv(
        venv, "l0-python", [[TORCH_PIN, "numpy", "scipy"], [L0_PIN, TORCH_PIN]], _check
    )
    if not found["torch"].startswith("2.13.0") or found["l0-python"] != "0.6.2":
        raise RuntimeError(f"{venv}: need torch 2.13.0 and l0-python 0.6.2, found {found}")
    return python


def _range(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max ms per epoch per library, the l0-python / sparselens ratio, last errors."""
    out: dict[str, Any] = {}
    for lib in LIBRARIES:
        mine = [r for r in runs if r["library"] == lib]
        ms = [r["ms_per_epoch"] for r in mine]
        cpu = [r["cpu_ms_per_epoch"] for r in mine]
        last = mine[-1]
        errors_repeat = all(r["error"] == last["error"] for r in mine)
        out[lib] = {
            "version": last["version"],
            "ms_per_epoch": {"median": statistics.median(ms), "min": min(ms), "max": max(ms)},
            "cpu_ms_per_epoch_median": statistics.median(cpu),
            "product_ms_median": statistics.median(r["product_ms"] for r in mine)
            if "product_ms" in last
            else None,
            "error": last["error"],
            "nonzero": last["nonzero"],
            "refit": last.get("refit"),
            "refit_s": [r["refit"]["s"] for r in mine] if "refit" in last else None,
            "identical_across_rounds": errors_repeat and len({r["nonzero"] for r in mine}) == 1,
        }
    l0, sl = out["l0-python"], out["sparselens"]
    out["ratio_ms_per_epoch"] = l0["ms_per_epoch"]["median"] / sl["ms_per_epoch"]["median"]
    out["ratio_cpu_ms_per_epoch"] = l0["cpu_ms_per_epoch_median"] / sl["cpu_ms_per_epoch_median"]
    return out


def table(summary: dict[str, Any], runs: list[dict[str, Any]], n_true: int) -> str:
    """The markdown comparison table."""
    head = (
        "| library | ms/epoch, median (min–max) | ratio l0-python / sparselens "
        "| rel. err. mean / median / max (det.) | signed mean | non-zero "
        f"(truth {n_true:,}) | after refit: mean / max rel. err. | refit time |"
    )
    lines = [head, "|" + "---|" * 8]
    for lib in LIBRARIES:
        s = summary[lib]
        mine = [r for r in runs if r["library"] == lib]
        ms = _range([r["ms_per_epoch"] for r in mine], ".2f")
        ratio = f"**{summary['ratio_ms_per_epoch']:.1f}×**" if lib == "l0-python" else "1×"
        e = s["error"]
        err = f"{e['mean']:.2%} / {e['median']:.2%} / {e['max']:.2%}"
        if s["refit"] is None:
            ref_err = ref_t = "—"
        else:
            re_ = s["refit"]["error"]
            ref_err = f"{re_['mean']:.2e} / {re_['max']:.2e}"
            ref_t = _range(s["refit_s"], ".2f") + f" s ({s['refit']['epochs']} ep.)"
        lines.append(
            f"| {lib} {s['version']} | {ms} | {ratio} | {err} | {e['signed_mean']:+.2%} "
            f"| {s['nonzero']:,} | {ref_err} | {ref_t} |"
        )
    notes = [f"CPU-time ratio {summary['ratio_cpu_ms_per_epoch']:.1f}×"]
    if all(summary[lib]["product_ms_median"] is not None for lib in LIBRARIES):
        prod = ", ".join(f"{lib} {summary[lib]['product_ms_median']:.2f} ms" for lib in LIBRARIES)
        notes.append(f"`M @ w` forward + backward alone: {prod}")
    rounds = len(runs) // len(LIBRARIES)
    notes.append(f"{rounds} alternating round(s), errors from the last round")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + "."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="sparselens vs l0-python 0.6.2 on the sparse calibration benchmark."
    )
    p.add_argument("--epochs", type=int, default=None, help="fit epochs (600; --quick: 100)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (2; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="small problem (2,000 x 50) smoke run")
    p.add_argument("--refit-epochs", type=int, default=300, help="0 skips the refit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in both workers")
    p.add_argument("--product-reps", type=int, default=10, help="M@w timing repeats (0: skip)")
    p.add_argument("--l0-venv", type=Path, default=DEFAULT_VENV, help="reuse (or create) here")
    p.add_argument("--python", type=Path, default=Path(sys.executable), help="sparselens python")
    p.add_argument("--output", type=Path, default=None, help=f"JSON (default {DEFAULT_OUTPUT})")
    a = p.parse_args(argv)
    a.epochs = a.epochs if a.epochs is not None else (100 if a.quick else 600)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.quick else 2)
    if a.output is None:
        a.output = DEFAULT_OUTPUT.with_stem("calibration-quick") if a.quick else DEFAULT_OUTPUT
    if a.epochs < 1 or a.rounds < 1 or a.refit_epochs < 0 or a.threads < 1:
        p.error("--epochs, --rounds and --threads must be >= 1, --refit-epochs >= 0")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    shape = (2_000, 50) if a.quick else (10_000, 200)
    M, y, w_true = make_problem(*shape, density=0.10, seed=a.seed)
    n_true = int((w_true > 0).sum())
    log(f"problem: {M.shape[0]} targets x {M.shape[1]} records, {M.nnz:,} non-zeros")
    pythons = {"l0-python": ensure_l0_venv(a.l0_venv.resolve()), "sparselens": a.python}
    settings = {
        **SETTINGS,
        "epochs": a.epochs,
        "refit_epochs": a.refit_epochs,
        "seed": a.seed,
        "threads": a.threads,
        "product_reps": a.product_reps,
    }
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="sparselens-bench-") as d:
        tmp = Path(d)
        sp.save_npz(tmp / "M.npz", M)
        np.savez(tmp / "y.npz", y=y)
        for r in range(a.rounds):
            for lib in LIBRARIES:
                res = run_worker(
                    pythons[lib],
                    WORKER,
                    lib,
                    ["--problem", str(tmp), "--settings", json.dumps(settings)],
                    settings["threads"],
                    tmp / f"{lib}-{r}.json",
                )
                res["round"] = r
                runs.append(res)
                e = res["error"]
                msg = (
                    f"round {r + 1}/{a.rounds} {lib}: {res['ms_per_epoch']:.2f} ms/epoch "
                    f"(fit {res['fit_s']:.1f} s), mean rel. err {e['mean']:.3%}, "
                    f"non-zero {res['nonzero']:,}"
                )
                if "refit" in res:
                    msg += (
                        f", refit {res['refit']['s']:.1f} s -> {res['refit']['error']['mean']:.2e}"
                    )
                log(msg)
    summary = summarise(runs)
    md = table(summary, runs, n_true)
    result = {
        "benchmark": "sparse calibration, l0-python fact sheet §9",
        "command": " ".join(["python", "benchmarks/calibration.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "problem": {
            "targets": M.shape[0],
            "records": M.shape[1],
            "nnz": int(M.nnz),
            "true_nonzero": n_true,
            "true_weight_sum": float(w_true.sum()),
            "seed": a.seed,
        },
        "settings": settings,
        "summary": summary,
        "runs": runs,
        "table": md,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(result, indent=1) + "\n")
    print(md)
    log(f"results: {a.output}")


if __name__ == "__main__":
    main()
