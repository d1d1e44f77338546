"""The ``sparselens calibrate`` job: choose a small set of survey records and weights so that
weighted totals match the targets (L0 gates as a support selector, then a refit on the selected
records, as in PolicyEngine's l0-paper; reference §4, §8).

Inputs: a matrix ``M`` (scipy ``.npz`` from ``scipy.sparse.save_npz``; rows = targets, columns =
records) and a CSV of targets (``name,value`` plus optional ``weight``, ``tolerance``, ``group``),
or neither, which selects the bundled synthetic survey (:mod:`sparselens.l0.synthetic`).

Outputs in the run directory (see :mod:`sparselens.train.rundir`): ``config.yaml``,
``manifest.json``, ``metrics.jsonl`` (phases ``fit``, ``bisection``, ``refit``),
``checkpoints/``, then, only once everything is computed, ``weights.csv``,
``target_errors.csv``, ``summary.json``, ``plots/{loss,relative_error,weights_hist}.png`` and
``report.md``.

Resume: the fit runs in chunks of ``checkpoint_every`` epochs with ``warm_start=True`` and saves
the model's :meth:`~SparseCalibrationWeights.fit_state_dict` after each chunk, so
``resume=True`` continues from the newest checkpoint and gives bit-identical weights. The refit
is short and deterministic and is rerun from the final fit checkpoint. With ``target_count`` the
bisection over ``lambda_l0`` is one indivisible step: a run killed during it restarts it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparselens.l0.synthetic import SyntheticSurvey, make_survey
from sparselens.train.atomic import atomic_write_json, atomic_write_text
from sparselens.train.config import load_yaml_mapping
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir, save_figure
from sparselens.train.seeding import seed_everything

logger = logging.getLogger(__name__)

_SYNTHETIC_FIELDS = ("synthetic_records", "synthetic_targets", "synthetic_density")
_RESUMABLE_CHANGES = frozenset({"progress"})
CSV_COLUMNS = ("name", "value", "weight", "tolerance", "group")


class CalibrateConfig(BaseModel):
    """Settings of one calibration run; YAML files and CLI flags map onto these fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    # data
    matrix: Path | None = Field(
        None,
        description="scipy .npz sparse matrix (scipy.sparse.save_npz): rows = targets, "
        "columns = records. Give with targets; leave both out for the synthetic survey.",
    )
    targets: Path | None = Field(
        None,
        description="CSV with header name,value and optional columns weight (>= 0), "
        "tolerance (>= 0, a residual band in the loss's units that counts as met) and group",
    )
    synthetic_records: int = Field(2000, ge=1, description="synthetic survey: households")
    synthetic_targets: int = Field(100, ge=1, description="synthetic survey: targets")
    synthetic_density: float = Field(
        0.1, gt=0, le=1, description="synthetic survey: share of non-zero matrix entries"
    )
    # gates and initialisation
    beta: float = Field(0.35, gt=0, description="Hard Concrete temperature (tau)")
    gamma: float = Field(-0.1, le=0, description="lower stretch limit of the gates")
    zeta: float = Field(1.1, ge=1, description="upper stretch limit of the gates")
    init_keep_prob: float = Field(0.999, gt=0, le=1, description="initial P(gate open)")
    init_weight: float | Literal["auto"] = Field(
        100.0,
        description="initial weight of every record (> 0), or 'auto' = sum(y) / sum(M), "
        "the constant weight whose totals match the targets in aggregate",
    )
    log_weight_jitter_sd: float = Field(
        0.05, ge=0, description="sd of the initial log-weight noise"
    )
    log_alpha_jitter_sd: float = Field(0.01, ge=0, description="sd of the initial gate-logit noise")
    # objective
    lambda_l0: float = Field(
        1e-4,
        ge=0,
        description="L0 penalty per expected non-zero record "
        "(with target_count: the bisection's starting value)",
    )
    target_count: int | None = Field(
        None,
        ge=1,
        description="find lambda_l0 by bisection so that this many records stay "
        "non-zero (the bisection reruns the fit; not resumable mid-way)",
    )
    budget_iters: int = Field(12, ge=1, description="bisection steps for target_count")
    lambda_l2: float = Field(0.0, ge=0, description="L2 penalty on the weights")
    loss_type: Literal["relative", "mse", "relative_epsilon"] = Field(
        "relative",
        description="relative: ((y - yhat) / (y + 1))^2; mse: (y - yhat)^2; "
        "relative_epsilon: ((y - yhat) / max(|y|, relative_floor))^2, weighted mean",
    )
    relative_floor: float = Field(
        1.0, gt=0, description="floor of |y| in relative_epsilon and in the reported errors"
    )
    use_groups: bool = Field(
        False,
        description="weight each target by 1 / size of its group (CSV column group; "
        "synthetic: the measure)",
    )
    # optimisation
    lr: float = Field(0.15, gt=0, description="Adam learning rate of the fit")
    epochs: int = Field(600, ge=0, description="fit epochs (full batch, one gate draw each)")
    refit_epochs: int = Field(
        300, ge=0, description="refit epochs on the selected records (0: none)"
    )
    refit_lr: float | None = Field(None, gt=0, description="refit learning rate; none: lr")
    inference: Literal["median", "paper", "mean", "hard"] = Field(
        "median", description="eval gate estimator; with 'mean' the support is the median's"
    )
    # run
    seed: int = Field(0, ge=0, lt=2**32, description="seed of every random number generator")
    checkpoint_every: int = Field(100, ge=1, description="epochs between fit checkpoints")
    log_every: int = Field(1, ge=1, description="epochs between metrics.jsonl records")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")

    @field_validator("init_weight", mode="before")
    @classmethod
    def _init_weight(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if isinstance(v, bool) or not (math.isfinite(x) and x > 0):
            raise ValueError(f"init_weight must be a finite number > 0 or 'auto', got {v!r}")
        return x

    @model_validator(mode="after")
    def _data_source(self) -> CalibrateConfig:
        if (self.matrix is None) != (self.targets is None):
            raise ValueError("matrix and targets must be given together (or neither: synthetic)")
        if self.matrix is not None:
            fields = type(self).model_fields
            given = [f for f in _SYNTHETIC_FIELDS if getattr(self, f) != fields[f].default]
            if given:
                raise ValueError(f"{given[0]} applies only to the synthetic survey (no matrix)")
        return self


# -- data ---------------------------------------------------------------------------------------
@dataclass
class CalibrationProblem:
    """A loaded calibration problem (``M``: targets x records, float64 CSR)."""

    M: sp.csr_array
    y: np.ndarray
    names: list[str]
    target_weights: np.ndarray | None = None
    tolerances: np.ndarray | None = None
    groups: np.ndarray | None = None
    group_names: list[str] | None = None
    survey: SyntheticSurvey | None = None

    @property
    def n_targets(self) -> int:
        return int(self.M.shape[0])

    @property
    def n_records(self) -> int:
        return int(self.M.shape[1])


def _parse_float(path: Path, line: int, column: str, text: str, *, nonneg: bool = False) -> float:
    s = text.strip()
    if not s:
        raise ValueError(f"targets file {path} line {line}: missing {column}")
    try:
        v = float(s)
    except ValueError:
        raise ValueError(
            f"targets file {path} line {line}: {column} {s!r} is not a number"
        ) from None
    if not math.isfinite(v):
        raise ValueError(f"targets file {path} line {line}: {column} must be finite, got {s}")
    if nonneg and v < 0:
        raise ValueError(f"targets file {path} line {line}: {column} must be >= 0, got {s}")
    return v


def read_targets_csv(path: str | Path) -> dict[str, Any]:
    """Read a targets CSV: ``{"names", "y", "weight", "tolerance", "groups", "group_names"}``
    (absent optional columns are None). Raises with one line naming the file and the problem."""
    p = Path(path)
    try:
        f = open(p, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"targets file {p}: no such file") from None
    except OSError as e:
        raise ValueError(f"targets file {p}: cannot read ({e.strerror or e})") from None
    with f:
        try:
            rows = list(csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"targets file {p}: not a readable CSV ({e})") from None
    if not rows:
        raise ValueError(f"targets file {p}: empty (expected a header name,value,...)")
    header = [h.strip().lower() for h in rows[0]]
    for col in header:
        if col not in CSV_COLUMNS:
            raise ValueError(
                f"targets file {p}: unknown column {col!r} (allowed: {', '.join(CSV_COLUMNS)})"
            )
    if len(set(header)) != len(header):
        raise ValueError(f"targets file {p}: duplicate column in header {','.join(header)}")
    for col in ("name", "value"):
        if col not in header:
            raise ValueError(
                f"targets file {p}: header must include {col!r} (got {','.join(header)})"
            )
    idx = {c: i for i, c in enumerate(header)}
    body = [(i + 2, r) for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    if not body:
        raise ValueError(f"targets file {p}: no targets (only a header)")
    names: list[str] = []
    y, weight, tol, glabels = [], [], [], []
    for line, r in body:
        if len(r) != len(header):
            raise ValueError(
                f"targets file {p} line {line}: {len(r)} fields, header has {len(header)}"
            )
        names.append(r[idx["name"]].strip())
        y.append(_parse_float(p, line, "value", r[idx["value"]]))
        if "weight" in idx:
            weight.append(_parse_float(p, line, "weight", r[idx["weight"]], nonneg=True))
        if "tolerance" in idx:
            tol.append(_parse_float(p, line, "tolerance", r[idx["tolerance"]], nonneg=True))
        if "group" in idx:
            g = r[idx["group"]].strip()
            if not g:
                raise ValueError(f"targets file {p} line {line}: missing group")
            glabels.append(g)
    groups = group_names = None
    if glabels:
        group_names = list(dict.fromkeys(glabels))
        lookup = {g: i for i, g in enumerate(group_names)}
        groups = np.array([lookup[g] for g in glabels], dtype=np.int64)
    return {
        "names": names,
        "y": np.array(y, dtype=np.float64),
        "weight": np.array(weight) if weight else None,
        "tolerance": np.array(tol) if tol else None,
        "groups": groups,
        "group_names": group_names,
    }


def read_matrix(path: str | Path) -> sp.csr_array:
    """Load a ``scipy.sparse.save_npz`` file as a float64 CSR array (rows = targets)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"matrix file {p}: no such file")
    try:
        M = sp.load_npz(p)
    except (PermissionError, IsADirectoryError) as e:
        raise ValueError(f"matrix file {p}: cannot read ({e.strerror or e})") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise ValueError(
            f"matrix file {p}: not a scipy sparse .npz from scipy.sparse.save_npz ({reason})"
        ) from None
    if M.ndim != 2:
        raise ValueError(f"matrix file {p}: must be 2-D (targets x records), got {M.ndim}-D")
    if M.dtype.kind not in "biuf":
        raise ValueError(f"matrix file {p}: must hold real numbers, got dtype {M.dtype}")
    M = sp.csr_array(M, dtype=np.float64)
    if not np.isfinite(M.data).all():
        bad = int(np.flatnonzero(~np.isfinite(M.data))[0])
        row = int(np.searchsorted(M.indptr, bad, side="right") - 1)
        raise ValueError(f"matrix file {p}: must be finite, found {M.data[bad]} in row {row}")
    if M.shape[1] == 0:
        raise ValueError(f"matrix file {p}: has no columns (records)")
    M.sum_duplicates()
    M.sort_indices()
    return M


def load_problem(config: CalibrateConfig) -> CalibrationProblem:
    """Load the files named in ``config`` (or build the synthetic survey) and check them."""
    if config.matrix is None or config.targets is None:
        s = make_survey(
            n_records=config.synthetic_records,
            n_targets=config.synthetic_targets,
            density=config.synthetic_density,
            seed=0,
        )
        problem = CalibrationProblem(
            M=s.M,
            y=s.y,
            names=list(s.target_names),
            groups=s.groups,
            group_names=list(s.group_names),
            survey=s,
        )
    else:
        M = read_matrix(config.matrix)
        t = read_targets_csv(config.targets)
        if M.shape[0] != len(t["y"]):
            raise ValueError(
                f"matrix file {config.matrix} has {M.shape[0]} rows but targets file "
                f"{config.targets} has {len(t['y'])} targets (matrix rows are targets)"
            )
        problem = CalibrationProblem(
            M=M,
            y=t["y"],
            names=t["names"],
            target_weights=t["weight"],
            tolerances=t["tolerance"],
            groups=t["groups"],
            group_names=t["group_names"],
        )
    if config.use_groups and problem.groups is None:
        raise ValueError(f"use_groups needs a 'group' column in targets file {config.targets}")
    if config.target_count is not None and config.target_count > problem.n_records:
        raise ValueError(
            f"target_count must be <= the number of records ({problem.n_records}), "
            f"got {config.target_count}"
        )
    if config.loss_type == "relative" and np.any(np.abs(problem.y + 1) < 1e-12):
        j = int(np.flatnonzero(np.abs(problem.y + 1) < 1e-12)[0])
        raise ValueError(
            f"target {problem.names[j]!r} is -1: loss_type 'relative' divides by y + 1; "
            "use loss_type relative_epsilon"
        )
    return problem


def initial_weight(config: CalibrateConfig, problem: CalibrationProblem) -> float:
    """``init_weight``, resolving ``'auto'`` to ``sum(y) / sum(M)``."""
    if config.init_weight != "auto":
        return float(config.init_weight)
    total = float(problem.M.sum())
    w0 = float(problem.y.sum()) / total if total != 0 else math.nan
    if not (math.isfinite(w0) and w0 > 0):
        raise ValueError(
            f"init_weight 'auto' needs sum(y) / sum(M) > 0, got {w0:g}; give a number instead"
        )
    return w0


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_info(config: CalibrateConfig, problem: CalibrationProblem) -> dict[str, Any]:
    info: dict[str, Any] = {
        "n_records": problem.n_records,
        "n_targets": problem.n_targets,
        "nnz": int(problem.M.nnz),
    }
    if config.matrix is None or config.targets is None:
        return {"source": "synthetic", **info}
    return {
        "source": "files",
        "matrix": str(config.matrix),
        "matrix_sha256": _file_sha256(config.matrix),
        "targets": str(config.targets),
        "targets_sha256": _file_sha256(config.targets),
        **info,
    }


# -- running ------------------------------------------------------------------------------------
def _resolved(config: CalibrateConfig) -> CalibrateConfig:
    update = {
        k: getattr(config, k).expanduser().resolve()
        for k in ("matrix", "targets")
        if getattr(config, k) is not None
    }
    return config.model_copy(update=update)


def _check_resume_config(saved: CalibrateConfig, given: CalibrateConfig) -> None:
    a, b = saved.model_dump(mode="json"), given.model_dump(mode="json")
    for key in a:
        if key not in _RESUMABLE_CHANGES and a[key] != b[key]:
            raise ValueError(
                f"{key} differs from the run's config.yaml (saved {a[key]!r}, given {b[key]!r}); "
                "a resumed run keeps its settings"
            )


def _error_stats(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {"mean": math.nan, "median": math.nan, "max": math.nan}
    return {"mean": float(err.mean()), "median": float(np.median(err)), "max": float(err.max())}


def _weight_stats(w: np.ndarray) -> dict[str, float | int]:
    nz = w[w > 0]
    s = float(w.sum())
    ss = float((w * w).sum())
    return {
        "nonzero": int(nz.size),
        "sum": s,
        "max": float(nz.max()) if nz.size else 0.0,
        "ess": s * s / ss if ss > 0 else 0.0,
    }


def run_calibration(
    config: CalibrateConfig,
    run_dir: str | Path,
    resume: bool = False,
    *,
    command: list[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume=True``, continue) a calibration in ``run_dir``; return the summary.

    ``on_checkpoint(epoch)`` is called after each fit checkpoint is on disk. Bad settings or
    inputs raise ValueError / FileNotFoundError before the run directory is created.
    """
    t_start = time.perf_counter()
    config = _resolved(config)
    run_path = Path(run_dir)
    if resume:
        cfg_file = run_path / RunDir.CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"cannot resume {run_path}: no {RunDir.CONFIG} there")
        saved = CalibrateConfig.model_validate(load_yaml_mapping(cfg_file))
        _check_resume_config(saved, config)
        if (run_path / "summary.json").is_file() and (run_path / RunDir.REPORT).is_file():
            logger.info("%s is already complete", run_path)
            return json.loads((run_path / "summary.json").read_text(encoding="utf-8"))
    problem = load_problem(config)
    w0 = initial_weight(config, problem)
    data = _data_info(config, problem)
    run = RunDir(run_path, resume=resume)
    if resume:
        old = run.read_manifest().get("data", {})
        for key in ("matrix_sha256", "targets_sha256"):
            if old.get(key) not in (None, data.get(key)):
                raise ValueError(f"{key.split('_')[0]} file changed since the run started")
    else:
        run.write_config(config)
    run.start(kind="calibrate", seed=config.seed, command=command, extra={"data": data})
    try:
        summary = _execute(config, problem, run, w0, on_checkpoint, t_start)
    except BaseException as e:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        try:
            run.finish(status, error=str(e) or type(e).__name__)
        except Exception:  # the manifest is best-effort here; keep the original error
            logger.debug("could not record status %s", status, exc_info=True)
        raise
    run.finish("completed", seconds_this_session=time.perf_counter() - t_start)
    return summary


def _advance(bar: Any, position: int) -> None:
    """Move a progress bar to ``position`` (rate-limited by tqdm; bisection trials restart)."""
    if position >= bar.n:
        bar.update(position - bar.n)
    else:
        bar.reset(total=bar.total)
        bar.update(position)


def _execute(
    config: CalibrateConfig,
    problem: CalibrationProblem,
    run: RunDir,
    w0: float,
    on_checkpoint: Callable[[int], None] | None,
    t_start: float,
) -> dict[str, Any]:
    import torch

    from sparselens.core.sparse_ops import SparseOperator
    from sparselens.l0.calibration import SparseCalibrationWeights, relative_errors

    seed_everything(config.seed)
    op = SparseOperator(problem.M, dtype=torch.float32)
    y = problem.y
    model = SparseCalibrationWeights(
        problem.n_records,
        beta=config.beta,
        gamma=config.gamma,
        zeta=config.zeta,
        init_keep_prob=config.init_keep_prob,
        init_weights=w0,
        log_weight_jitter_sd=config.log_weight_jitter_sd,
        log_alpha_jitter_sd=config.log_alpha_jitter_sd,
        seed=config.seed,
        inference=config.inference,
    )
    fit_kwargs: dict[str, Any] = {
        "lambda_l0": config.lambda_l0,
        "lambda_l2": config.lambda_l2,
        "lr": config.lr,
        "loss_type": config.loss_type,
        "target_groups": problem.groups if config.use_groups else None,
        "normalize_groups": True,
        "target_weights": problem.target_weights,
        "target_tolerances": problem.tolerances,
        "relative_floor": config.relative_floor,
        "log_every": config.log_every,
        "progress": False,
    }

    done, fit_seconds, fit_meta = 0, 0.0, {}
    latest = run.latest_checkpoint("fit") if run.resumed else None
    if latest is not None:
        state, done, fit_meta = run.load_checkpoint(latest)
        model.load_fit_state_dict(state)
        fit_seconds = float(fit_meta.get("fit_seconds", 0.0))
        if fit_meta.get("lambda_l0") is not None:
            model.lambda_l0_ = float(fit_meta["lambda_l0"])
        logger.info("resuming %s from epoch %d (%s)", run.path, done, latest.name)
    run.rewrite_metrics(model.history + list(fit_meta.get("bisection", [])))

    bar = progress_bar(config.epochs, "fit", enabled=config.progress, initial=done)

    def track(_model: Any, record: dict[str, Any]) -> None:
        _advance(bar, int(record["epoch"]))

    def checkpoint(step: int, seconds: float, extra: dict[str, Any] | None = None) -> None:
        meta = {
            "phase": "fit",
            "fit_seconds": seconds,
            "lambda_l0": model.lambda_l0_,
            **(extra or {}),
        }
        run.save_checkpoint(model.fit_state_dict(), step, meta=meta, prefix="fit")
        last = model.history[-1] if model.history else {}
        logger.info(
            "fit epoch %d/%d: loss %.4g, data loss %.4g, active %s",
            step,
            config.epochs,
            last.get("loss", math.nan),
            last.get("data_loss", math.nan),
            last.get("n_active", "-"),
        )
        if on_checkpoint is not None:
            on_checkpoint(step)

    fitted_here = False
    try:
        if config.target_count is not None and done < config.epochs:
            t0 = time.perf_counter()
            logger.info("bisection on lambda_l0 for %d records", config.target_count)
            model.fit(
                op,
                y,
                epochs=config.epochs,
                target_count=config.target_count,
                budget_iters=config.budget_iters,
                callbacks=[track],
                **fit_kwargs,
            )
            fitted_here = True
            fit_seconds += time.perf_counter() - t0
            trace = [
                {"phase": "bisection", "trial": i + 1, **t}
                for i, t in enumerate(model.budget_trace)
            ]
            run.rewrite_metrics(model.history + trace)
            done = config.epochs
            checkpoint(done, fit_seconds, {"bisection": trace})
            fit_meta = {"bisection": trace}
        while done < config.epochs:
            chunk = min(config.checkpoint_every, config.epochs - done)
            n_before = len(model.history)
            t0 = time.perf_counter()
            model.fit(op, y, epochs=chunk, warm_start=True, callbacks=[track], **fit_kwargs)
            fitted_here = True
            fit_seconds += time.perf_counter() - t0
            done += chunk
            run.append_metrics(model.history[n_before:])
            checkpoint(done, fit_seconds)
    finally:
        bar.close()
    if not fitted_here:
        # restores the loss settings that refit reuses; runs no epoch
        kwargs = dict(fit_kwargs, lambda_l0=model.lambda_l0_ or config.lambda_l0)
        model.fit(op, y, epochs=0, warm_start=True, **kwargs)

    with torch.no_grad():
        w_gated = model.get_weights(deterministic=True).double().cpu().numpy()
        yhat_before = model.predict(op).double().cpu().numpy()
        expected_l0 = float(model.get_l0_penalty())
    err_before = relative_errors(yhat_before, y, floor=config.relative_floor)
    n_selected = int(model.selected().numel())

    refit_seconds = 0.0
    n_fit_records = len(model.history)
    if config.refit_epochs > 0 and n_selected > 0:
        rbar = progress_bar(config.refit_epochs, "refit", enabled=config.progress)
        t0 = time.perf_counter()
        try:
            model.refit(
                op,
                y,
                epochs=config.refit_epochs,
                lr=config.refit_lr or config.lr,
                callbacks=[lambda _m, r: _advance(rbar, int(r["epoch"]))],
                log_every=config.log_every,
                progress=False,
            )
        finally:
            rbar.close()
        refit_seconds = time.perf_counter() - t0
        run.append_metrics(model.history[n_fit_records:])
        last = model.history[-1] if len(model.history) > n_fit_records else {}
        logger.info(
            "refit %d epochs on %d records: data loss %.4g",
            config.refit_epochs,
            n_selected,
            last.get("data_loss", math.nan),
        )
    elif config.refit_epochs > 0:
        logger.warning("no record selected: skipping the refit")

    with torch.no_grad():
        w_final = model.get_weights(deterministic=True).double().cpu().numpy()
        yhat_after = model.predict(op).double().cpu().numpy()
    err_after = relative_errors(yhat_after, y, floor=config.relative_floor)

    summary = _summary(
        config,
        problem,
        run,
        model,
        w_gated,
        w_final,
        err_before,
        err_after,
        n_selected,
        expected_l0,
        fit_seconds,
        refit_seconds,
        fit_meta,
    )
    summary["seconds_total"] = time.perf_counter() - t_start
    with run.staging() as stage:
        _write_weights(stage / "weights.csv", w_final, w_gated, problem)
        _write_target_errors(
            stage / "target_errors.csv", problem, yhat_before, yhat_after, err_before, err_after
        )
        _plots(stage / "plots", model.history, err_before, err_after, w_gated, w_final, problem)
        atomic_write_json(stage / "summary.json", summary)
        atomic_write_text(stage / RunDir.REPORT, _report(config, summary, problem))
    logger.info("wrote %s", run.path)
    return summary


def _summary(
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


def _num(x: float) -> str:
    return repr(float(x))


def _write_weights(
    path: Path, w: np.ndarray, w_gated: np.ndarray, problem: CalibrationProblem
) -> None:
    truth = problem.survey.w_true if problem.survey is not None else None
    lines = ["record,weight,gated_weight" + (",true_weight" if truth is not None else "")]
    for i in range(w.size):
        row = f"{i},{_num(w[i])},{_num(w_gated[i])}"
        lines.append(row + (f",{_num(truth[i])}" if truth is not None else ""))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_target_errors(
    path: Path,
    problem: CalibrationProblem,
    before: np.ndarray,
    after: np.ndarray,
    err_before: np.ndarray,
    err_after: np.ndarray,
) -> None:
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
def _plots(
    directory: Path,
    history: list[dict[str, Any]],
    err_before: np.ndarray,
    err_after: np.ndarray,
    w_gated: np.ndarray,
    w_final: np.ndarray,
    problem: CalibrationProblem,
) -> None:
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


def _report(config: CalibrateConfig, s: dict[str, Any], problem: CalibrationProblem) -> str:
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
    "CalibrateConfig",
    "CalibrationProblem",
    "load_problem",
    "read_matrix",
    "read_targets_csv",
    "run_calibration",
]
