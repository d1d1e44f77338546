"""Two-process gloo tests of ``sparselens.core.distributed.global_sum`` and the penalties.

Two ranks each get a different slice of one batch and evaluate ``ci_r = sigmoid(x_r @ theta)``
with the same ``theta``. For every penalty each rank's live loss must equal the single-process
loss on the concatenated batch; ``theta.grad`` averaged over ranks (what DDP does) must equal the
single-process gradient; and the gradient w.r.t. the local ``ci`` divided by the world size must
equal that slice of the single-process gradient. The ranks are spawned once per module (one torch
import each) and write their results to files; a failing or hanging child fails the tests.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from sparselens.core import distributed as D
from sparselens.core import penalties as P

# the spawned children import the worker by this name through the inherited sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dist_worker as W

WORLD = 2
TIMEOUT_S = 90.0
TOL = 1e-6


def _make_cases() -> dict[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(1234)
    d, c, t = 4, 6, 3

    def x(b: int, shift: float) -> Tensor:
        # different distributions per rank so the local and global statistics differ
        return torch.randn(b, t, d, generator=gen, dtype=torch.float64) + shift

    theta = torch.randn(d, c, generator=gen, dtype=torch.float64)
    return {
        "equal": {"xs": [x(3, 0.0), x(3, 1.5)], "theta": theta},
        "unequal": {"xs": [x(2, -1.0), x(5, 0.5)], "theta": theta},
        "empty_rank": {"xs": [x(4, 0.3), x(0, 0.0)], "theta": theta},
    }


CASES = _make_cases()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("gloo")
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
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(case: dict[str, Any], name: str) -> dict[str, Tensor]:
    """Reference: the same penalty on the concatenated batch in this (non-distributed) process."""
    assert not D.is_distributed()
    x = torch.cat(case["xs"], dim=0)
    return W.evaluate(x, case["theta"], name)


def _close(a: Tensor, b: Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def test_group_metadata(rank_results: list[dict[str, Any]]) -> None:
    for r, res in enumerate(rank_results):
        assert res["world_size"] == WORLD
        assert res["rank"] == r
        assert res["is_distributed"] is True


@pytest.mark.parametrize("case", sorted(CASES))
def test_global_count(rank_results: list[dict[str, Any]], case: str) -> None:
    total = sum(x.shape[0] * x.shape[1] for x in CASES[case]["xs"])
    for res in rank_results:
        assert int(res[f"{case}/count"]) == total


@pytest.mark.parametrize("case", sorted(CASES))
def test_raw_global_sum_forward_and_backward(rank_results: list[dict[str, Any]], case: str) -> None:
    """Rank r holds t = (r+1) and takes loss (r+1) * sum(global_sum(t)).

    Forward: 1 + 2 = 3 on both ranks. Backward sums the incoming gradients (1 and 2), so both
    ranks get 3. Fails for the identity backward (would give r+1) and for an all-reduce that
    averages (1.5).
    """
    for res in rank_results:
        assert torch.equal(res[f"{case}/raw_sum"], torch.full((3,), 3.0, dtype=torch.float64))
        assert torch.equal(res[f"{case}/raw_grad"], torch.full((3,), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(W.PENALTIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_live_loss_equals_single_process(
    rank_results: list[dict[str, Any]], case: str, name: str
) -> None:
    ref = _single_process(CASES[case], name)
    for r, res in enumerate(rank_results):
        got = res[f"{case}/{name}/loss"]
        assert _close(got, ref["loss"]), f"rank {r}: {float(got)} != {float(ref['loss'])}"


@pytest.mark.parametrize("name", sorted(W.PENALTIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_ddp_averaged_param_grad_equals_single_process(
    rank_results: list[dict[str, Any]], case: str, name: str
) -> None:
    ref = _single_process(CASES[case], name)
    assert float(ref["theta_grad"].abs().max()) > 1e-4  # the check is not vacuous
    for r, res in enumerate(rank_results):
        got = res[f"{case}/{name}/theta_grad"]
        assert _close(got, ref["theta_grad"]), (
            f"rank {r}: max err {(got - ref['theta_grad']).abs().max()}"
        )


@pytest.mark.parametrize("name", sorted(W.PENALTIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_local_ci_grad_is_slice_of_single_process_grad(
    rank_results: list[dict[str, Any]], case: str, name: str
) -> None:
    ref = _single_process(CASES[case], name)["ci_grad"]
    sizes = [x.shape[0] for x in CASES[case]["xs"]]
    slices = torch.split(ref, sizes, dim=0)
    for r, res in enumerate(rank_results):
        assert _close(res[f"{case}/{name}/ci_grad"], slices[r]), f"rank {r}"


@pytest.mark.parametrize("case", ["equal", "unequal"])
def test_local_only_variants_would_fail(case: str) -> None:
    """The data discriminate the known wrong variants.

    A rank that evaluates the frequency term on its local batch only, or the pre-PR #543 live
    loss (local mean, log of local sum x world size), gets a value different from the global one,
    so the live-loss test above would fail for them.
    """
    xs, theta = CASES[case]["xs"], CASES[case]["theta"]
    with torch.no_grad():
        glob = P.frequency_minimality(W.forward(torch.cat(xs), theta), 1.5, 64.0)
        for x in xs:
            ci = W.forward(x, theta)
            local = P.frequency_minimality(ci, 1.5, 64.0)
            assert abs(float(local - glob)) > 1e-3
            s = (ci + 1e-12).pow(1.5).reshape(-1, ci.shape[-1]).sum(0)
            m = s / ci.shape[:-1].numel()
            old_live = (m * torch.log2(1 + s * WORLD)).sum()
            n_glob = sum(xx.shape[:-1].numel() for xx in xs)
            ci_glob = W.forward(torch.cat(xs), theta)
            s_glob = (ci_glob + 1e-12).pow(1.5).reshape(-1, ci.shape[-1]).sum(0)
            old_exact = (s_glob / n_glob * torch.log2(1 + s_glob)).sum()
            assert abs(float(old_live - old_exact)) > 1e-3


def test_single_process_global_sum_is_identity() -> None:
    assert not D.is_distributed()
    assert D.world_size() == 1 and D.rank() == 0
    t = torch.randn(4, requires_grad=True)
    assert D.global_sum(t) is t
    assert int(D.global_count(7)) == 7
    assert D.global_count(7, dtype=torch.float64).dtype == torch.float64
