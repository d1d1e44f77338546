"""Rank process for tests/distributed/test_sae_ddp.py (imported by spawned children).

Each rank joins a gloo group and runs :func:`sparselens.sae.trainer.train_sae` for every case on
one shared run directory per case (rank 0 writes it), then saves its own final coder weights,
dead counters and the first global batch it trained on to ``rank<r>.pt``. On any exception it
writes the traceback to ``rank<r>.err`` and exits non-zero.
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
        from sparselens.sae import trainer as T
        from sparselens.sae.train_config import SAETrainConfig

        seen: dict[str, list[torch.Tensor]] = {}
        real_step = T.train_step

        def spy(states, micro, optimizer, step, *, init_b_dec=False):
            if step == 1:
                seen.setdefault("first", []).extend(mb[states[0].name][1].clone() for mb in micro)
            return real_step(states, micro, optimizer, step, init_b_dec=init_b_dec)

        T.train_step = spy
        results: dict[str, Any] = {}
        for name, settings in cases.items():
            seen.clear()
            captured: dict[str, Any] = {}
            real_build = T._build_states

            def build(*a, _c=captured, _b=real_build, **kw):
                _c["states"] = _b(*a, **kw)
                return _c["states"]

            T._build_states = build
            config = SAETrainConfig.model_validate(settings)
            summary = T.train_sae(config, out / f"run-{name}")
            T._build_states = real_build
            states = captured["states"]
            results[name] = {
                "summary_empty": not summary,
                "weights": {
                    h.name: {k: v.detach().clone() for k, v in h.coder.state_dict().items()}
                    for h in states
                },
                "tokens_since_fired": {
                    h.name: h.tracker.tokens_since_fired.clone() for h in states
                },
                "tokens_seen": {h.name: int(h.tracker.tokens_seen) for h in states},
                "first_batch": torch.cat(seen["first"]),
            }
        torch.save(results, out / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
