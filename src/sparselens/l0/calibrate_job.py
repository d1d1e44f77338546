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

This module holds the settings and the run itself (fit, bisection, refit, checkpoints, resume);
:mod:`sparselens.l0.calibration_data` reads the inputs and
:mod:`sparselens.l0.calibration_report` writes the outputs.

Resume: the fit runs in chunks of ``checkpoint_every`` epochs with ``warm_start=True`` and saves
the model's :meth:`~SparseCalibrationWeights.fit_state_dict` after each chunk, so
``resume=True`` continues from the newest checkpoint and gives bit-identical weights. The refit
is short and deterministic and is rerun from the final fit checkpoint. With ``target_count`` the
bisection over ``lambda_l0`` is one indivisible step: a run killed during it restarts it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparselens.l0.calibration_data import (
    CSV_COLUMNS,
    CalibrationProblem,
    data_info,
    initial_weight,
    load_problem,
    read_matrix,
    read_targets_csv,
)
from sparselens.l0.calibration_report import (
    build_summary,
    render_report,
    write_plots,
    write_target_errors,
    write_weights,
)
from sparselens.train.atomic import atomic_write_json, atomic_write_text
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir, check_resumable
from sparselens.train.seeding import seed_everything

logger = logging.getLogger(__name__)

_SYNTHETIC_FIELDS = ("synthetic_records", "synthetic_targets", "synthetic_density")
_RESUMABLE_CHANGES = frozenset({"progress"})


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


# -- running ------------------------------------------------------------------------------------
def _resolved(config: CalibrateConfig) -> CalibrateConfig:
    update = {
        k: getattr(config, k).expanduser().resolve()
        for k in ("matrix", "targets")
        if getattr(config, k) is not None
    }
    return config.model_copy(update=update)


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
    if resume and (done := check_resumable(run_path, config, _RESUMABLE_CHANGES)) is not None:
        return done
    problem = load_problem(config)
    w0 = initial_weight(config, problem)
    data = data_info(config, problem)
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

    summary = build_summary(
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
        write_weights(stage / "weights.csv", w_final, w_gated, problem)
        write_target_errors(
            stage / "target_errors.csv", problem, yhat_before, yhat_after, err_before, err_after
        )
        write_plots(
            stage / "plots", model.history, err_before, err_after, w_gated, w_final, problem
        )
        atomic_write_json(stage / "summary.json", summary)
        atomic_write_text(stage / RunDir.REPORT, render_report(config, summary, problem))
    logger.info("wrote %s", run.path)
    return summary


# re-exported: the data side lives in sparselens.l0.calibration_data
__all__ = [
    "CSV_COLUMNS",
    "CalibrateConfig",
    "CalibrationProblem",
    "initial_weight",
    "load_problem",
    "read_matrix",
    "read_targets_csv",
    "run_calibration",
]
