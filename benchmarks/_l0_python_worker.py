"""Benchmark worker: fit one library's ``SparseCalibrationWeights`` and write a JSON report.

Started by ``benchmarks/calibration.py`` once per run, with the l0-python venv's interpreter for
``--library l0-python`` and the sparselens venv's for ``--library sparselens``, so that both
libraries pay the same process start, import and thread conditions. It needs only numpy, scipy,
torch and the library under test (never both libraries in one process).

Input: ``--problem DIR`` holding ``M.npz`` (``scipy.sparse.save_npz``) and ``y.npz`` (``y``);
the settings as a JSON string (``--settings``). Output: ``--out FILE`` (JSON). Only the calls
to ``fit`` and to the refit are timed (``time.perf_counter`` and ``time.process_time``), after
one throwaway Adam step so that torch's lazy imports stay out of the timings.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

LIBRARIES = ("l0-python", "sparselens")


def error_stats(y_hat: Any, y: np.ndarray) -> dict[str, float]:
    """Relative errors ``|y_hat - y| / |y|``: mean, median, max, and the signed mean."""
    yh = np.asarray(y_hat.detach().cpu() if isinstance(y_hat, torch.Tensor) else y_hat, float)
    signed = (yh - y) / np.abs(y)
    err = np.abs(signed)
    return {
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "max": float(err.max()),
        "signed_mean": float(signed.mean()),
    }


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def product_ms(library: str, M: sp.csr_matrix, model: Any, reps: int) -> float:
    """Median milliseconds of one forward + backward of the library's ``M @ w`` product alone."""
    n = M.shape[1]
    w = torch.rand(n, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if library == "sparselens":
        from sparselens.core.sparse_ops import SparseOperator

        op = SparseOperator(M)

        def once() -> None:
            (op @ w).sum().backward()
    else:
        coo = model._convert_sparse_to_torch(M)

        def once() -> None:
            torch.sparse.mm(coo, w.unsqueeze(1)).sum().backward()

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def warm_up() -> None:
    """One throwaway Adam step: torch imports its compiler stack lazily (~1 s) on the first
    optimiser, a one-off cost that both libraries would otherwise pay inside the timed fit."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    p.sum().backward()
    opt.step()


def run(library: str, problem: Path, s: dict[str, Any]) -> dict[str, Any]:
    """Fit (and optionally refit) on the stored problem; return timings, errors and counts."""
    torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(int(s["seed"]))  # l0-python draws its gates from the global RNG
    if library == "l0-python":
        from l0.calibration import SparseCalibrationWeights
    else:
        from sparselens.l0.calibration import SparseCalibrationWeights

    warm_up()
    M = sp.csr_matrix(sp.load_npz(problem / "M.npz"))
    y = np.load(problem / "y.npz")["y"]
    epochs = int(s["epochs"])
    model = SparseCalibrationWeights(
        n_features=M.shape[1],
        beta=s["beta"],
        init_keep_prob=s["init_keep_prob"],
        init_weights=s["init_weights"],
        log_weight_jitter_sd=s["log_weight_jitter_sd"],
        log_alpha_jitter_sd=s["log_alpha_jitter_sd"],
        seed=int(s["seed"]),
    )
    _, wall, cpu = _timed(
        lambda: model.fit(
            M,
            y,
            lambda_l0=s["lambda_l0"],
            lambda_l2=s["lambda_l2"],
            lr=s["lr"],
            epochs=epochs,
            loss_type=s["loss_type"],
        )
    )
    with torch.no_grad():
        y_hat = model.predict(M)
    out: dict[str, Any] = {
        "library": library,
        "version": importlib.metadata.version(library),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fit_s": wall,
        "fit_cpu_s": cpu,
        "ms_per_epoch": 1000.0 * wall / max(epochs, 1),
        "cpu_ms_per_epoch": 1000.0 * cpu / max(epochs, 1),
        "error": error_stats(y_hat, y),
        "nonzero": int(model.get_active_weights()["count"]),
    }
    refit_epochs = int(s["refit_epochs"])
    if refit_epochs > 0:
        if library == "sparselens":
            _, wall, cpu = _timed(lambda: model.refit(M, y, epochs=refit_epochs))
            with torch.no_grad():
                y_ref = model.predict(M)
        else:
            y_ref, wall, cpu = _timed(
                lambda: _l0_python_refit(SparseCalibrationWeights, model, M, y, s)
            )
        out["refit"] = {
            "epochs": refit_epochs,
            "s": wall,
            "cpu_s": cpu,
            "error": error_stats(y_ref, y),
        }
    if int(s["product_reps"]) > 0:
        out["product_ms"] = product_ms(library, M, model, int(s["product_reps"]))
    return out


def _l0_python_refit(
    cls: Any, model: Any, M: sp.csr_matrix, y: np.ndarray, s: dict[str, Any]
) -> Any:
    """Refit as the l0-paper does: ungated weights on the selected columns, from the gated ones."""
    with torch.no_grad():
        w = model.get_weights(deterministic=True).cpu().numpy()
    support = np.flatnonzero(w > 0)
    M_sel = sp.csr_matrix(M[:, support])
    sub = cls(
        n_features=support.size,
        init_weights=w[support],
        log_weight_jitter_sd=0.0,
        use_gates=False,
        seed=int(s["seed"]),
    )
    sub.fit(
        M_sel,
        y,
        lambda_l0=0.0,
        lambda_l2=0.0,
        lr=s["lr"],
        epochs=int(s["refit_epochs"]),
        loss_type=s["loss_type"],
    )
    with torch.no_grad():
        return sub.predict(M_sel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=LIBRARIES, required=True)
    p.add_argument("--problem", type=Path, required=True)
    p.add_argument("--settings", required=True, help="JSON object of model and fit settings")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    result = run(a.library, a.problem, json.loads(a.settings))
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
