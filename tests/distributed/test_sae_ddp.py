"""Two-process gloo data parallelism of ``sparselens sae train`` against one process.

Both ranks run :func:`~sparselens.sae.trainer.train_sae` on the same settings; each takes its
half of every global batch. After the run every rank must hold the coder weights, dead-latent
counters and token counts of ONE process trained on the same global batches (gradients
all-reduced, variances, b_dec init, AuxK residual variance and dead counts reduced), up to
float32 summation order. Cases: an SAE with AuxK active (latents die after 64 tokens) and a
transcoder with 2 micro-batches per rank and Multi-TopK.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from sparselens.core import distributed as D

# the spawned children import the worker by this name through the inherited sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sae_worker as W

WORLD = 2
TIMEOUT_S = 120.0
ATOL = {"sae": 2e-5, "transcoder_accum": 1e-9}
"""float32 (SAE case) and float64 (transcoder case: its b_dec gradient at step 1 is float noise,
which Adam scales up to O(lr), so float32 summation order would show through)."""

BASE: dict[str, Any] = {
    "batch_size": 8,
    "context_len": 16,
    "tokens": 8 * 16 * 6,
    "lr_warmup_steps": 1,
    "log_every": 2,
    "save_every": 3,
    "threads": 1,
    "eval_tokens": 256,
    "progress": False,
}
CASES: dict[str, dict[str, Any]] = {
    "sae": {**BASE, "sae": {"num_latents": 128, "k": 4, "dead_tokens": 64}},
    "transcoder_accum": {
        **BASE,
        "hookpoints": ["blocks.0.mlp"],
        "transcode": True,
        "micro_batches": 2,
        "dtype": "float64",
        "sae": {"num_latents": 96, "k": 4, "multi_topk": True, "dead_tokens": 64},
    },
}


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("sae-gloo")
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


def _single(name: str, out: Path, **update: Any) -> dict[str, Any]:
    """The same settings in this (non-distributed) process; records the first global batch."""
    from sparselens.sae import trainer as T
    from sparselens.sae.train_config import SAETrainConfig

    assert not D.is_distributed()
    got: dict[str, Any] = {}
    real_step, real_build = T.train_step, T._build_states

    def spy(states, micro, optimizer, step, *, init_b_dec=False):
        if step == 1:
            got["first"] = torch.cat([mb[states[0].name][1].clone() for mb in micro])
        return real_step(states, micro, optimizer, step, init_b_dec=init_b_dec)

    def build(*a, **kw):
        got["states"] = real_build(*a, **kw)
        return got["states"]

    T.train_step, T._build_states = spy, build
    try:
        settings = {**CASES[name], **update}
        T.train_sae(SAETrainConfig.model_validate(settings), out)
    finally:
        T.train_step, T._build_states = real_step, real_build
    states = got["states"]
    return {
        "weights": {h.name: dict(h.coder.state_dict()) for h in states},
        "tokens_since_fired": {h.name: h.tracker.tokens_since_fired for h in states},
        "tokens_seen": {h.name: int(h.tracker.tokens_seen) for h in states},
        "first_batch": got["first"],
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sae-single")
    return {name: _single(name, tmp / name) for name in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ranks_read_disjoint_halves_of_the_global_batch(rank_results, single, case) -> None:
    """Rank 0's rows then rank 1's rows are exactly the one-process first batch."""
    _, res = rank_results
    both = torch.cat([res[0][case]["first_batch"], res[1][case]["first_batch"]])
    assert torch.equal(both, single[case]["first_batch"])
    assert not torch.equal(res[0][case]["first_batch"][:10], res[1][case]["first_batch"][:10])


@pytest.mark.parametrize("case", sorted(CASES))
def test_weights_and_dead_counters_equal_one_process(rank_results, single, case) -> None:
    """Every rank ends with the one-process weights (to float32 summation order) and the same
    integer dead counters and token counts.

    Wrong variants caught: gradients not all-reduced (each rank would follow its own half),
    averaged instead of summed (each rank's loss is its share of the global loss: half the
    step), per-rank variances or dead counts (other FVU / AuxK / dead masks)."""
    _, res = rank_results
    ref = single[case]
    for r in range(WORLD):
        got = res[r][case]
        for hp, weights in ref["weights"].items():
            for name, t in weights.items():
                torch.testing.assert_close(
                    got["weights"][hp][name],
                    t,
                    rtol=0,
                    atol=ATOL[case],
                    msg=f"rank {r} {hp} {name}",
                )
            assert torch.equal(got["tokens_since_fired"][hp], ref["tokens_since_fired"][hp])
            assert got["tokens_seen"][hp] == ref["tokens_seen"][hp] > 0
    assert res[0][case]["summary_empty"] is False and res[1][case]["summary_empty"] is True


def test_comparison_is_not_vacuous(single, tmp_path: Path) -> None:
    """Training on one rank's half alone (what an unreduced rank does) ends far from the
    reference, and the reference moved far from its initialisation, both by >> ATOL."""
    half = _single("sae", tmp_path / "half", batch_size=4, tokens=4 * 16 * 6)
    hp = "blocks.0.resid_post"
    ref = single["sae"]["weights"][hp]
    diff = (half["weights"][hp]["encoder.weight"] - ref["encoder.weight"]).abs().max()
    assert float(diff) > 100 * ATOL["sae"]
    assert int((single["sae"]["tokens_since_fired"][hp] >= 64).sum()) > 0  # AuxK was active


def test_rank0_wrote_the_run(rank_results, single) -> None:
    """Rank 0 writes one run directory whose logged means match the one-process run."""
    tmp, _ = rank_results
    for case in CASES:
        run = tmp / f"run-{case}"
        assert (run / "report.md").is_file() and (run / "summary.json").is_file()
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs][:3] == [2, 4, 6]
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["data"]["world_size"] == 2 and manifest["status"] == "completed"
