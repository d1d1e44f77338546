"""Two-process gloo tests of SPD training under torch.distributed.

Both ranks run the same :func:`~sparselens.spd.run.run_spd` (rank 0 writes the run directory),
each on its half of every global batch. With deterministic loss terms (CI-masked recon,
faithfulness, importance minimality with the frequency term, whose global sums go through the
autograd-aware all-reduce) one step, and a whole 4-step run with checkpoints and evaluations,
must equal one process on the global batch. With stochastic terms (per-rank mask generators) the
ranks must still hold identical parameters after a step (gradients averaged).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from sparselens.core import distributed as D
from sparselens.spd.config import SPDRunConfig
from sparselens.spd.run import FINAL_WEIGHTS, run_spd
from sparselens.spd.tasks import load_task
from sparselens.spd.trainer import SPDTrainer
from sparselens.train.atomic import load_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _spd_worker as W

WORLD = 2
TIMEOUT_S = 120.0
TOL = 1e-6
BASE: dict[str, Any] = {
    "target": "tms_5-2",
    "decomposition": [
        {"pattern": "linear1", "C": 6},
        {"pattern": "linear2", "C": 6, "tied_to": "linear1"},
    ],
    "ci_hidden": [4],
    "batch_size": 32,
    "eval_every": 2,
    "eval_batches": 1,
    "log_every": 2,
    "checkpoint_every": 2,
    "final_eval_samples": 64,
    "faithfulness_warmup": {"steps": 2, "lr": 0.01},
    "lr": 0.01,
    "progress": False,
}
CASES: dict[str, dict[str, Any]] = {
    "deterministic": BASE
    | {
        "steps": 4,
        "losses": {
            "stochastic_recon": 0.0,
            "layerwise_recon": 0.0,
            "ci_masked_recon": 1.0,
            "faithfulness": 1.0,
            "importance_minimality": {
                "coeff": 1e-2,
                "frequency_coeff": 0.5,
                "reference_token_count": 64.0,
            },
        },
    },
    "stochastic": BASE | {"steps": 2, "losses": {"importance_minimality": {"coeff": 3e-3}}},
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("spd-gloo")
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=W.run, args=(r, WORLD, str(tmp / "init"), str(tmp), CASES), daemon=True)
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].terminate()
        procs[r].join(5)
    errors = {
        r: (tmp / f"rank{r}.err").read_text()
        for r in range(WORLD)
        if (tmp / f"rank{r}.err").exists()
    }
    if hung or errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(
            f"ranks failed: hung={hung}, exitcodes={[p.exitcode for p in procs]}\n"
            + "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items())
        )
    return tmp, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _single_step(name: str) -> tuple[dict[str, torch.Tensor], ...]:
    """(parameters before, parameters after, gradients) of one step in this process."""
    assert not D.is_distributed()
    config = SPDRunConfig.model_validate(CASES[name])
    t = SPDTrainer(config, load_task(config.target))
    t.faithfulness_warmup()
    start = t.trainable_state()
    t.train_step()
    grads = {n: p.grad.clone() for n, p in zip(t.param_names, t.params, strict=True)}
    return start, t.trainable_state(), grads


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_one_step_equals_one_process_on_the_global_batch(ranks):
    """Fails if gradients were summed instead of averaged over ranks (twice the step), if they
    were not reduced at all (each rank's own half-batch step) or if the importance-minimality
    sums were local (a different frequency term per rank)."""
    _, res = ranks
    start, ref, grads = _single_step("deterministic")
    assert _max_diff(start, ref) > 1e-3  # the step moves the parameters
    scale = max(float(g.abs().max()) for g in grads.values())
    assert scale > 1e-3
    for r in range(WORLD):
        assert _max_diff(res[r]["deterministic/grads"], grads) < TOL * scale, f"rank {r}"
        assert _max_diff(res[r]["deterministic/one_step"], ref) < TOL, f"rank {r}"


def test_whole_run_equals_one_process(ranks, tmp_path):
    out, res = ranks
    config = SPDRunConfig.model_validate(CASES["deterministic"])
    single = run_spd(config, tmp_path / "single")
    a = load_safetensors(out / "run-deterministic" / FINAL_WEIGHTS)
    b = load_safetensors(tmp_path / "single" / FINAL_WEIGHTS)
    assert _max_diff(a, b) < TOL
    for r in range(WORLD):
        s = res[r]["deterministic/summary"]
        assert s["world_size"] == WORLD
        assert s["mmcs"] == pytest.approx(single["mmcs"], abs=1e-5)
    assert (out / "run-deterministic" / "report.md").is_file()


def test_stochastic_ranks_stay_in_sync(ranks):
    """Per-rank masks differ, but averaged gradients keep the ranks' parameters identical."""
    _, res = ranks
    a, b = res[0]["stochastic/one_step"], res[1]["stochastic/one_step"]
    assert _max_diff(a, b) == 0.0
    _, single, _ = _single_step("stochastic")
    assert _max_diff(a, single) > 0.0  # other masks than one process: a different step
    assert res[0]["stochastic/log"] == res[1]["stochastic/log"]  # logged means are global
