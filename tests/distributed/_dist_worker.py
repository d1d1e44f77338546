"""Rank process for tests/distributed/test_global_sum.py (imported by spawned children).

Each rank joins a gloo group, evaluates every penalty on its own slice of the batch with a shared
parameter ``theta`` and writes, per (case, penalty): the live loss, ``theta.grad`` all-reduced and
divided by the world size (what DDP does), and the gradient w.r.t. its local ``ci`` divided by
the world size. On any exception it writes the traceback to ``rank<r>.err`` and exits non-zero.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from sparselens.core import distributed as D
from sparselens.core import penalties as P


def _lp_plus_freq(ci: Tensor) -> Tensor:
    lp, freq = P.lp_and_frequency(ci, p=0.8, reference_token_count=16.0)
    return lp + 0.5 * freq


def _everything(ci: Tensor) -> Tensor:
    return (
        P.lp_importance(ci, p=0.7)
        + 0.3 * P.smooth_l0(ci, gamma=0.2, normalize_at_one=True)
        + 2.0 * P.frequency_minimality(ci, p=2.0, reference_token_count=5.0)
    )


PENALTIES: dict[str, Callable[[Tensor], Tensor]] = {
    "lp_importance": lambda ci: P.lp_importance(ci, p=0.7),
    "lp_importance_p2": lambda ci: P.lp_importance(ci, p=2.0, eps=0.0),
    "smooth_l0": lambda ci: P.smooth_l0(ci, gamma=0.3),
    "smooth_l0_normalized": lambda ci: P.smooth_l0(ci, gamma=0.05, normalize_at_one=True),
    "frequency_minimality": lambda ci: P.frequency_minimality(
        ci, p=1.5, reference_token_count=64.0
    ),
    "lp_and_frequency": _lp_plus_freq,
    "everything": _everything,
}


def forward(x: Tensor, theta: Tensor) -> Tensor:
    """Causal importances ``sigmoid(x @ theta)``, shape ``x.shape[:-1] + (C,)``."""
    return torch.sigmoid(x @ theta)


def evaluate(x: Tensor, theta0: Tensor, name: str) -> dict[str, Tensor]:
    """Loss, d loss / d theta and d loss / d ci for one penalty on this process's data."""
    theta = theta0.clone().requires_grad_(True)
    ci = forward(x, theta)
    ci.retain_grad()
    loss = PENALTIES[name](ci)
    loss.backward()
    assert theta.grad is not None and ci.grad is not None
    return {"loss": loss.detach(), "theta_grad": theta.grad.clone(), "ci_grad": ci.grad.clone()}


def run(
    rank: int, world: int, init_file: str, out_dir: str, cases: dict[str, dict[str, object]]
) -> None:
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
        results: dict[str, object] = {
            "world_size": D.world_size(),
            "rank": D.rank(),
            "is_distributed": D.is_distributed(),
        }
        for case_name, case in cases.items():
            xs = case["xs"]
            assert isinstance(xs, list)
            x: Tensor = xs[rank]
            theta0 = case["theta"]
            assert isinstance(theta0, Tensor)
            n_local = x.shape[:-1].numel()
            results[f"{case_name}/count"] = D.global_count(n_local)
            # the raw collective: forward sums, backward sums the incoming gradients
            t = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
            s = D.global_sum(t)
            (s * float(rank + 1)).sum().backward()
            results[f"{case_name}/raw_sum"] = s.detach()
            results[f"{case_name}/raw_grad"] = t.grad
            for name in PENALTIES:
                r = evaluate(x, theta0, name)
                g = r["theta_grad"]
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                results[f"{case_name}/{name}/loss"] = r["loss"]
                results[f"{case_name}/{name}/theta_grad"] = g / world
                results[f"{case_name}/{name}/ci_grad"] = r["ci_grad"] / world
        torch.save(results, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
