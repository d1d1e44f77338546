"""One SPD run in a run directory: the ``sparselens spd run`` job.

:func:`run_spd` loads the target (:func:`~sparselens.spd.tasks.load_task`), builds the component
model and the trainer (:class:`~sparselens.spd.trainer.SPDTrainer`), runs the faithfulness
warm-up and the main loop with cheap evaluations, then the final evaluation, and writes the run
directory (:class:`~sparselens.train.rundir.RunDir`)::

    config.yaml  manifest.json  metrics.jsonl  checkpoints/   (while running; the last two
                                                              checkpoints are kept)
    target/                      (ResidMLP: the on-demand target this run decomposes)
    final/model.safetensors  plots/*.png  summary.json  report.md   (once complete)
    eval/step-<N>/               (``sparselens spd eval``: plots, summary.json, report.md of
                                  a checkpoint, see :func:`evaluate_checkpoint`)

``metrics.jsonl`` holds ``{"phase": "warmup", "step": 0, "faithfulness"}`` after the warm-up,
``{"phase": "train", "step", "lr", "loss/<term>"}`` every ``log_every`` steps (means over the
interval) and ``{"phase": "eval", "step", "recon/<mask>", "ci_l0/<layer>", ...}`` at step 0,
every ``eval_every`` steps and at the end. ``summary.json`` holds the final metrics by name
(``mmcs``, ``ml2r``, ``identity_ci_error``, ``dense_ci_error``, ``ci_l0`` per layer,
``non_negligible``, ``recon``, ``lm`` for the Mini-GPT, ...) and ``wall_seconds``,
``train_seconds``, ``step_ms``.

Exact resume: checkpoints (every ``checkpoint_every`` steps and at the end) hold the trainable
parameters, the Adam state, the global torch RNG, the data generator and every rank's mask
generator, and the loss accumulators; ``resume=True`` continues bit for bit (same threads and
machine). Under ``torch.distributed`` rank 0 writes the directory; every rank runs the same code.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sparselens.core import distributed as D
from sparselens.spd.component_model import ComponentModel, DecomposedModule
from sparselens.spd.config import SPDRunConfig
from sparselens.spd.evaluate import FinalEval, cheap_eval, final_eval
from sparselens.spd.report import report_markdown, write_plots
from sparselens.spd.targets.io import Target, save_target
from sparselens.spd.tasks import Task, load_task
from sparselens.spd.trainer import SPDTrainer, build_model
from sparselens.train.atomic import (
    atomic_write_json,
    atomic_write_text,
    load_safetensors,
    save_safetensors,
)
from sparselens.train.checkpoint import list_checkpoints, load_checkpoint
from sparselens.train.config import load_yaml_mapping
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir, check_resumable, read_metrics

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "spd"
FINAL_WEIGHTS = "final/model.safetensors"
TARGET_DIR = "target"
EVAL_DIR = "eval"
_RESUMABLE_CHANGES = frozenset({"progress"})


def _barrier() -> None:
    if D.world_size() > 1:
        dist.barrier()


def _load_task_once(config: SPDRunConfig, run_path: Path | None = None) -> Task:
    """Load the target; under DDP rank 0 first (it may train and cache it), then the others.

    A run directory's own copy of an on-demand target (``target/``) wins over the cache.
    """
    saved = run_path / TARGET_DIR if run_path is not None else None
    path = saved if saved is not None and saved.exists() else None

    def load() -> Task:
        return load_task(config.target, target_seed=config.target_seed, target_path=path)

    if D.world_size() == 1:
        return load()
    task = load() if D.rank() == 0 else None
    dist.barrier()
    return task or load()


def run_spd(
    config: SPDRunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    command: list[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run (or, with ``resume=True``, continue) the SPD run of ``config`` in ``run_dir``.

    Returns the summary (also written to ``summary.json``). ``on_checkpoint(step)`` is called on
    every rank after each checkpoint is on disk (tests stop runs there). Bad settings raise
    ValueError / FileNotFoundError before the run directory is created.
    """
    t_start = time.perf_counter()
    run_path = Path(run_dir).resolve()
    main = D.rank() == 0
    if resume and (done := check_resumable(run_path, config, _RESUMABLE_CHANGES)) is not None:
        return done
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # before the manifest records the hardware
    run: RunDir | None = None
    try:
        task = _load_task_once(config, run_path if resume else None)
        # the copy is taken before the component model takes the target's layers over
        target_copy = _target_copy(task) if main and not resume else None
        trainer = SPDTrainer(config, task)
        if main:
            run = RunDir(run_path, resume=resume)
            if not resume:
                run.write_config(config)
                if target_copy is not None:
                    save_target(target_copy, run_path / TARGET_DIR)
            run.start(
                kind="spd-run",
                seed=config.seed,
                command=command,
                extra={
                    "target": task.info,
                    "world_size": D.world_size(),
                    "decomposed_modules": list(trainer.model.names),
                },
            )
        _barrier()
        try:
            summary = _train(config, task, trainer, run, run_path, resume, on_checkpoint, t_start)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            if run is not None:
                try:
                    run.finish(status, error=str(e) or type(e).__name__)
                except Exception:  # best effort; keep the original error
                    logger.debug("could not record status %s", status, exc_info=True)
            raise
    finally:
        torch.set_num_threads(threads)
    if run is not None:
        run.finish("completed", seconds_this_session=time.perf_counter() - t_start)
    return summary


def _target_copy(task: Task) -> Target | None:
    """A copy of an on-demand (ResidMLP) target, to keep in the run directory; None otherwise."""
    return copy.deepcopy(task.target) if task.kind == "resid_mlp" else None


def _train(
    config: SPDRunConfig,
    task: Task,
    trainer: SPDTrainer,
    run: RunDir | None,
    run_path: Path,
    resume: bool,
    on_checkpoint: Callable[[int], None] | None,
    t_start: float,
) -> dict[str, Any]:
    main = run is not None
    prev_train_s = prev_wall_s = 0.0
    ckpts = list_checkpoints(run_path / "checkpoints", CHECKPOINT_PREFIX) if resume else []
    resumed_from = None
    if ckpts:
        state, step, meta = load_checkpoint(ckpts[-1][1])
        trainer.load_state_dict(state)
        prev_train_s = float(meta.get("train_seconds", 0.0))
        prev_wall_s = float(meta.get("wall_seconds", 0.0))
        resumed_from = step
        logger.info("resuming %s from step %d", run_path, step)
    records: list[dict[str, Any]] = []
    if main:
        keep = [] if resumed_from is None else run.read_metrics()
        run.rewrite_metrics([r for r in keep if r.get("step", 0) <= (resumed_from or 0)])
    if resumed_from is None:
        warm = trainer.faithfulness_warmup()
        if warm is not None:
            records.append({"phase": "warmup", "step": 0, "faithfulness": warm})
        records.append({"phase": "eval", "step": 0, **cheap_eval(trainer.model, task, config, 0.0)})
        if main:
            run.append_metrics(records)
    train_s = 0.0
    bar = progress_bar(
        config.steps, f"spd {config.target}", enabled=config.progress and main,
        initial=trainer.step,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        while trainer.step < config.steps:
            lr = trainer.config.lr_at(trainer.step)
            trainer.train_step()
            s = trainer.step
            records = []
            if s % config.log_every == 0 or s == config.steps:
                logs = trainer.pop_log()
                records.append(
                    {"phase": "train", "step": s, "lr": lr}
                    | {f"loss/{k}": v for k, v in logs.items()}
                )
                bar.set_postfix(loss=f"{logs.get('total', float('nan')):.3g}", refresh=False)
            if s % config.eval_every == 0 or s == config.steps:
                train_s += time.perf_counter() - t0
                ev = cheap_eval(trainer.model, task, config, s / config.steps)
                records.append({"phase": "eval", "step": s, **ev})
                logger.info(
                    "step %d/%d: stochastic recon %.3g, CI-L0 %.3f",
                    s, config.steps, ev.get("recon/stochastic", float("nan")),
                    ev["ci_l0/total"],
                )  # fmt: skip
                t0 = time.perf_counter()
            if main and records:
                run.append_metrics(records)
            bar.update(1)
            if s % config.checkpoint_every == 0 or s == config.steps:
                train_s += time.perf_counter() - t0
                trainer.check_finite()  # never checkpoint NaN weights (a collective under DDP)
                state = trainer.state_dict()  # a collective under DDP
                if main:
                    wall = prev_wall_s + time.perf_counter() - t_start
                    meta = {"train_seconds": prev_train_s + train_s, "wall_seconds": wall}
                    run.save_checkpoint(state, s, meta=meta, prefix=CHECKPOINT_PREFIX)
                _barrier()
                if on_checkpoint is not None:
                    on_checkpoint(s)
                t0 = time.perf_counter()
    finally:
        bar.close()
    train_s += time.perf_counter() - t0 if trainer.step > (resumed_from or 0) else 0.0

    final = final_eval(trainer.model, task, config)
    summary = _summary(
        run_path, config, trainer.model, trainer.decomposition, trainer.world, final,
        train_s=prev_train_s + train_s, steps_done=config.steps,
        wall_s=prev_wall_s + time.perf_counter() - t_start,
    )  # fmt: skip
    if main:
        assert run is not None
        with run.staging() as stage:
            save_safetensors(stage / FINAL_WEIGHTS, trainer.trainable_state())
            summary["wall_seconds"] = prev_wall_s + time.perf_counter() - t_start
            _write_results(stage, run.read_metrics(), final, config, summary)
        logger.info("wrote %s", run.path)
    return summary


def _summary(
    run_path: Path,
    config: SPDRunConfig,
    model: ComponentModel,
    decomposition: Sequence[DecomposedModule],
    world: int,
    final: FinalEval,
    *,
    train_s: float,
    steps_done: int,
    wall_s: float,
) -> dict[str, Any]:
    """``summary.json``'s content: the run's setup, the final metrics and the times."""
    return {
        "run_dir": str(run_path),
        "target": config.target,
        "layers": list(model.names),
        "decomposition": [d.model_dump(mode="json") for d in decomposition],
        "steps": config.steps,
        "batch_size": config.batch_size,
        "world_size": world,
        **final.metrics,
        "train_seconds": train_s,
        "step_ms": 1000.0 * train_s / max(steps_done, 1),
        "wall_seconds": wall_s,
    }


def _write_results(
    dest: Path,
    records: list[dict[str, Any]],
    final: FinalEval,
    config: SPDRunConfig,
    summary: dict[str, Any],
) -> None:
    """Plots, ``summary.json`` and ``report.md`` into ``dest``."""
    plots = write_plots(dest, records, final)
    atomic_write_json(dest / "summary.json", _json_safe(summary))
    atomic_write_text(dest / RunDir.REPORT, report_markdown(config, summary, plots))


def _json_safe(x: Any) -> Any:
    """NaN / inf as strings, so that summary.json is strict JSON."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def load_run(run_dir: str | Path) -> tuple[ComponentModel, SPDRunConfig, Task]:
    """The trained component model of a completed run (its target, config and final weights)."""
    run_path = Path(run_dir)
    weights = run_path / FINAL_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no final weights (is the run complete?)")
    model, _, config, task = _model_with(run_path, load_safetensors(weights), str(weights))
    return model, config, task


def _model_with(
    run_path: Path, state: dict[str, torch.Tensor], source: str
) -> tuple[ComponentModel, list[DecomposedModule], SPDRunConfig, Task]:
    """The run's component model (its decomposition, config and target) with the trainable
    ``state``."""
    config = SPDRunConfig.model_validate(load_yaml_mapping(run_path / RunDir.CONFIG))
    task = _load_task_once(config, run_path)
    with torch.random.fork_rng(devices=[]):
        model, decomposition = build_model(config, task)
    params = dict(model.named_parameters())
    if set(state) != {n for n, p in params.items() if p.requires_grad}:
        raise ValueError(f"{source} does not fit the run's decomposition")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    return model, decomposition, config, task


def evaluate_checkpoint(
    run_dir: str | Path,
    step: int | None = None,
    out: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The final evaluation of a run's checkpoint (the latest, or ``step``: the run keeps its
    last two) -- metrics, ``summary.json``, ``report.md`` and plots into ``out`` (default
    ``<run_dir>/eval/step-<step>``; never the run directory's own files) -- while the run goes
    on or after it stopped, on ``threads`` intra-op threads (default: the run's).

    Only reads the run directory outside ``out``. Returns the summary.
    """
    run_path = Path(run_dir).resolve()
    if not (run_path / RunDir.CONFIG).is_file():
        raise FileNotFoundError(f"{run_path}: not an SPD run directory (no {RunDir.CONFIG})")
    evals = run_path / EVAL_DIR
    if out is not None:
        dest = Path(out).resolve()
        if dest.is_relative_to(run_path) and not dest.is_relative_to(evals):
            raise ValueError(f"out must be outside the run directory or under {evals}, got {dest}")
    state, step, meta, ckpt = _read_checkpoint(run_path, step)
    dest = Path(out).resolve() if out is not None else evals / f"step-{step}"
    before = torch.get_num_threads()
    try:
        model, decomposition, config, task = _model_with(run_path, state["model"], str(ckpt))
        torch.set_num_threads(threads if threads is not None else config.threads)
        final = final_eval(model, task, config)
    finally:
        torch.set_num_threads(before)
    summary = {
        **_summary(
            run_path, config, model, decomposition, len(state["rng"]["masks"]), final,
            train_s=float(meta.get("train_seconds", 0.0)), steps_done=step,
            wall_s=float(meta.get("wall_seconds", 0.0)),
        ),
        "checkpoint_step": step,
        "eval_dir": str(dest),
    }  # fmt: skip
    records = [r for r in read_metrics(run_path / RunDir.METRICS) if r.get("step", 0) <= step]
    _write_results(dest, records, final, config, summary)
    return summary


def _read_checkpoint(
    run_path: Path, step: int | None
) -> tuple[dict[str, Any], int, dict[str, Any], Path]:
    """``(state, step, meta, path)`` of the checkpoint of ``step`` (None: the latest). A running
    run may prune a listed checkpoint before it is read: the latest is then listed again."""
    for attempt in range(3):
        ckpts = dict(list_checkpoints(run_path / "checkpoints", CHECKPOINT_PREFIX))
        if not ckpts:
            raise FileNotFoundError(f"{run_path / 'checkpoints'}: no checkpoint yet")
        want = max(ckpts) if step is None else step
        if want not in ckpts:
            raise ValueError(
                f"step must be one of the kept checkpoints {sorted(ckpts)}, got {step}"
            )
        try:
            state, got, meta = load_checkpoint(ckpts[want])
            return state, got, meta, ckpts[want]
        except (FileNotFoundError, ValueError):
            if ckpts[want].exists() or attempt == 2:
                raise
            if step is not None:
                raise ValueError(
                    f"step {step}: the running run pruned that checkpoint (it keeps its last "
                    "two); pick a newer one"
                ) from None
    raise AssertionError("unreachable")


__all__ = ["CHECKPOINT_PREFIX", "FINAL_WEIGHTS", "evaluate_checkpoint", "load_run", "run_spd"]
