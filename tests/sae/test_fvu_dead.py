"""FVU (batch and streaming) vs numpy, and the dead-latent tracker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparselens.sae import DeadLatentTracker, FVUAccumulator, fvu, total_variance


def _np_fvu(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def test_fvu_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    y, y_hat = rng.normal(size=(50, 7)) + 3, rng.normal(size=(50, 7))
    got = fvu(torch.from_numpy(y), torch.from_numpy(y_hat)).item()
    assert got == pytest.approx(_np_fvu(y, y_hat), rel=1e-12)
    tv = total_variance(torch.from_numpy(y)) * 4
    assert fvu(torch.from_numpy(y), torch.from_numpy(y_hat), tv).item() == pytest.approx(
        _np_fvu(y, y_hat) / 4, rel=1e-12
    )


def test_fvu_single_token_is_finite() -> None:
    """One token: the zero baseline ||y||^2 (sparsify divides by 0 and returns inf)."""
    y, y_hat = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]])
    assert fvu(y, y_hat).item() == pytest.approx(1 / 5)
    assert torch.isfinite(fvu(torch.zeros(1, 3), torch.ones(1, 3)))
    assert fvu(torch.ones(4, 3), torch.zeros(4, 3)).item() == 1.0  # constant batch: zero baseline
    assert fvu(torch.zeros(4, 3), torch.full((4, 3), 2.0)).item() == 48.0  # all zero: plain SSE


@settings(max_examples=40, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    shift=st.floats(-100, 100),
)
def test_streaming_fvu_equals_one_shot(cuts: list[int], seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    n = sum(cuts)
    y = (rng.normal(size=(n, 5)) * rng.uniform(0.1, 3, 5) + shift).astype(np.float32)
    y_hat = (y + rng.normal(size=(n, 5)) * 0.3).astype(np.float32)
    acc, halves = FVUAccumulator(), [FVUAccumulator(), FVUAccumulator()]
    s = 0
    for i, c in enumerate(cuts):
        yt, ht = torch.from_numpy(y[s : s + c]), torch.from_numpy(y_hat[s : s + c])
        acc.update(yt, ht)
        halves[i % 2].update(yt, ht)
        s += c
    y64, h64 = y.astype(np.float64), y_hat.astype(np.float64)
    expected = ((y64 - h64) ** 2).sum() / ((y64 - y64.mean(0)) ** 2).sum() if n > 1 else None
    if expected is None:
        expected = ((y64 - h64) ** 2).sum() / (y64**2).sum()
    assert acc.compute().item() == pytest.approx(expected, rel=1e-10)
    merged = halves[0].merge(halves[1])
    assert merged.compute().item() == pytest.approx(expected, rel=1e-10)
    assert acc.n == n and acc.all_reduce().compute().item() == pytest.approx(expected, rel=1e-10)


def test_accumulator_accepts_3d_and_rejects_empty() -> None:
    acc = FVUAccumulator()
    with pytest.raises(ValueError, match="empty"):
        acc.compute()
    y = torch.randn(2, 3, 4, dtype=torch.float64)
    acc.update(y, torch.zeros_like(y))
    assert acc.compute().item() == pytest.approx(
        _np_fvu(y.reshape(6, 4).numpy(), np.zeros((6, 4))), rel=1e-12
    )


def test_zero_valued_selection_does_not_fire() -> None:
    """Fails for sparsify, which counts every selected latent (even with activation 0) as fired."""
    tr = DeadLatentTracker(4, dead_tokens=3, fire_threshold=1e-3)
    idx = torch.tensor([[0, 1], [2, 1]])
    acts = torch.tensor([[0.5, 0.0], [1e-4, 0.0]])  # only latent 0 fires
    tr.update(acts, idx)
    assert tr.tokens_since_fired.tolist() == [0, 2, 2, 2]
    tr.update(acts[:1], idx[:1])
    assert tr.tokens_since_fired.tolist() == [0, 3, 3, 3]
    assert tr.dead_mask.tolist() == [False, True, True, True]
    assert tr.fraction_dead().item() == pytest.approx(0.75)


def test_dead_window_counts_tokens_not_steps() -> None:
    tr = DeadLatentTracker(3, dead_tokens=10)
    fire1 = (torch.tensor([[1.0]]), torch.tensor([[1]]))
    tr.update(*fire1, n_tokens=9)  # latent 1 fires; one step of 9 tokens
    assert not tr.dead_mask.any()
    tr.update(torch.zeros(1, 1), torch.tensor([[0]]), n_tokens=torch.tensor(1))
    assert tr.dead_mask.tolist() == [True, False, True]
    tr.update(torch.ones(3, 1), torch.tensor([[0], [0], [2]]))  # 3 rows = 3 tokens
    assert tr.tokens_since_fired.tolist() == [0, 4, 0]
    assert not tr.dead_mask.any()


def test_density_and_dense_fraction() -> None:
    tr = DeadLatentTracker(3, dead_tokens=100)
    idx = torch.tensor([[0, 1]] * 10)
    acts = torch.zeros(10, 2)
    acts[:, 0] = 1.0  # latent 0 fires on every token
    acts[0, 1] = 1.0  # latent 1 on 10% of them: not dense (> 10% needed)
    tr.update(acts, idx)
    torch.testing.assert_close(tr.firing_frequency(), torch.tensor([1.0, 0.1, 0.0]).double())
    assert tr.fraction_dense().item() == pytest.approx(1 / 3)
    tr.reset_density()
    assert tr.tokens_seen.item() == 0 and tr.tokens_since_fired.tolist() == [0, 0, 10]


def test_tracker_checks() -> None:
    with pytest.raises(ValueError, match="num_latents"):
        DeadLatentTracker(0)
    with pytest.raises(ValueError, match="shape"):
        DeadLatentTracker(3).update(torch.zeros(2, 2), torch.zeros(2, 3, dtype=torch.long))


_RANK_SCRIPT = """
import sys
from datetime import timedelta
import torch
import torch.distributed as dist
from sparselens.sae import DeadLatentTracker, FVUAccumulator

rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
data = torch.load(sys.argv[4])
tr = DeadLatentTracker(5, dead_tokens=4)
acc = FVUAccumulator()
for acts, idx, y, y_hat in data[rank]:
    tr.update(acts, idx)
    acc.update(y, y_hat)
acc.all_reduce()
torch.save({"since": tr.tokens_since_fired, "counts": tr.fire_counts, "seen": tr.tokens_seen,
            "fvu": acc.compute(), "n": acc.n}, out)
dist.destroy_process_group()
"""


def test_tracker_and_accumulator_reduce_across_two_ranks(tmp_path: object) -> None:
    """Two gloo ranks: both hold the single-process state of the union of their batches."""
    import subprocess
    import sys
    from pathlib import Path

    tmp = Path(str(tmp_path))
    g = torch.Generator().manual_seed(0)

    def batch(n: int, fire: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.tensor([[f] for f in fire])
        acts = torch.ones(n, 1)
        y = torch.randn(n, 3, generator=g, dtype=torch.float64) + 2
        return acts, idx, y, y + 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)

    data = [[batch(2, [0, 1]), batch(3, [1, 1, 1])], [batch(1, [2]), batch(2, [1, 1])]]
    torch.save(data, tmp / "data.pt")
    paths = [str(tmp / "init"), "", str(tmp / "data.pt")]
    procs = []
    for r in range(2):
        paths[1] = str(tmp / f"{r}.pt")
        cmd = [sys.executable, "-c", _RANK_SCRIPT, str(r), *paths]
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    res = [torch.load(tmp / f"{r}.pt") for r in range(2)]
    # single process over step 1 = batches (2 + 1 tokens), step 2 = (3 + 2 tokens)
    ref = DeadLatentTracker(5, dead_tokens=4)
    ref_acc = FVUAccumulator()
    for step in range(2):
        parts = [data[0][step], data[1][step]]
        ref.update(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        for p in parts:
            ref_acc.update(p[2], p[3])
    for r in res:
        assert r["since"].tolist() == ref.tokens_since_fired.tolist() == [5, 0, 5, 8, 8]
        assert r["counts"].tolist() == ref.fire_counts.tolist()
        assert int(r["seen"]) == 8 and r["n"] == 8
        assert r["fvu"].item() == pytest.approx(ref_acc.compute().item(), rel=1e-12)


def test_tracker_for_coder_feeds_forward_dead_mask() -> None:
    from sparselens.sae import SparseCoder, SparseCoderConfig

    sae = SparseCoder(4, SparseCoderConfig(num_latents=16, k=2, dead_tokens=5, k_aux=4))
    tr = DeadLatentTracker.for_coder(sae)
    assert (tr.num_latents, tr.dead_tokens, tr.fire_threshold) == (16, 5, 1e-3)
    x = torch.randn(6, 4)
    out = sae(x)
    tr.update(out.latent_acts, out.latent_indices)
    assert tr.dead_mask.any()
    assert sae(x, dead_mask=tr.dead_mask).auxk_loss > 0
