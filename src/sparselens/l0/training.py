"""The epoch loop shared by ``SparseL0Linear.fit``, ``SparseCalibrationWeights.fit`` and
``.refit``: optimiser step, optional temperature / learning-rate schedules, a loss history,
callbacks (returning ``True`` stops early), a tqdm progress bar and ``logging`` output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sparselens.core.schedules import Schedule

Callback = Callable[[Any, dict[str, Any]], Any]


def verbose_logger(logger: logging.Logger) -> logging.Logger:
    """Make ``verbose=True`` visible when the application configured no logging at all."""
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return logger


def run_epochs(
    model: Any,
    *,
    phase: str,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], tuple[Tensor, dict[str, Tensor]]],
    epochs: int,
    epoch_offset: int = 0,
    total_epochs: int | None = None,
    log_every: int = 1,
    callbacks: Sequence[Callback] | None = None,
    progress: bool = False,
    beta_schedule: Schedule | None = None,
    lr_schedule: Schedule | None = None,
    describe: Callable[[], dict[str, float]] | None = None,
    logger: logging.Logger | None = None,
    verbose_freq: int = 0,
) -> int:
    """Run ``epochs`` optimiser steps; return how many ran (fewer if a callback stopped it).

    ``step()`` computes ``(loss, parts)`` for one fresh gate draw. Every ``log_every`` epochs a
    record ``{"phase", "epoch", "loss", **parts, **describe()}`` is appended to
    ``model.history`` and passed to each callback. Schedules are evaluated at progress
    ``(i + 1) / total_epochs`` for the i-th epoch of this call (default: this call's epochs), so a
    schedule spans each call, a warm-started call included, and the last epoch uses its end value.
    """
    total = total_epochs or epochs
    bar = tqdm(total=epochs, desc=phase, disable=not progress, leave=False, dynamic_ncols=True)
    ran = 0
    try:
        for i in range(epochs):
            epoch = epoch_offset + i
            progress = (i + 1) / total  # schedules span this call and reach their end value
            if beta_schedule is not None:
                model.beta = beta_schedule.at(progress)
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule.at(progress)
            loss, parts = step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ran += 1
            bar.update(1)
            last = i == epochs - 1
            if log_every and ((epoch + 1) % log_every == 0 or last):
                record: dict[str, Any] = {"phase": phase, "epoch": epoch + 1}
                record["loss"] = float(loss.detach())
                record.update({k: float(v.detach()) for k, v in parts.items()})
                if describe is not None:
                    record.update(describe())
                model.history.append(record)
                if progress:
                    bar.set_postfix(
                        loss=f"{record['loss']:.3g}", active=record.get("n_active", "-")
                    )
                if logger is not None and verbose_freq and (epoch + 1) % verbose_freq == 0:
                    logger.info(
                        "%s epoch %d: %s",
                        phase,
                        epoch + 1,
                        ", ".join(
                            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in record.items()
                            if k not in ("phase", "epoch")
                        ),
                    )
                stop = False
                for cb in callbacks or ():
                    stop = (cb(model, record) is True) or stop
                if stop:
                    break
    finally:
        bar.close()
    return ran
