"""Rank process for tests/distributed/test_spd_ddp.py (imported by spawned children).

Each rank joins a gloo group and runs :func:`sparselens.spd.run.run_spd` on one shared run
directory (rank 0 writes it), then saves its own final trainable parameters and summary to
``rank<r>.pt``. On any exception it writes the traceback to ``rank<r>.err`` and exits non-zero.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def run(rank: int, world: int, init_file: str, out_dir: str, cases: dict[str, Any]) -> None:
    """Entry point of one rank (``torch.multiprocessing`` target)."""
    out = Path(out_dir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        from sparselens.spd.config import SPDRunConfig
        from sparselens.spd.run import run_spd
        from sparselens.spd.tasks import load_task
        from sparselens.spd.trainer import SPDTrainer

        results: dict[str, Any] = {}
        for name, settings in cases.items():
            config = SPDRunConfig.model_validate(settings)
            summary = run_spd(config, out / f"run-{name}")
            results[f"{name}/summary"] = {
                k: summary[k] for k in ("world_size", "mmcs", "ci_l0") if k in summary
            }
            # one trainer step by hand: this rank's state right after it
            t = SPDTrainer(config, load_task(config.target))
            t.faithfulness_warmup()
            t.train_step()
            results[f"{name}/one_step"] = t.trainable_state()
            results[f"{name}/grads"] = {
                n: p.grad.clone() for n, p in zip(t.param_names, t.params, strict=True)
            }
            results[f"{name}/log"] = t.pop_log()
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
