"""``sparselens.sae.cache``: shards hold exactly the live activations; the reader's seeded
shuffling buffer covers every row once per epoch, resumes exactly, splits ranks disjointly;
corrupt or incomplete caches are refused; training from a cache."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from sparselens.sae import SparseCoderConfig, load_sparse_coder
from sparselens.sae.activations import ActivationSource
from sparselens.sae.cache import ActivationCache, SAECacheConfig, write_cache
from sparselens.sae.data import load_tokens
from sparselens.sae.subject import load_subject
from sparselens.sae.train_config import SAETrainConfig
from sparselens.sae.trainer import train_sae

HPS = ["blocks.0.resid_post", "blocks.1.mlp"]


def small(**kw) -> SAECacheConfig:
    settings = dict(
        hookpoints=HPS, context_len=16, batch_size=8, tokens=16 * 40, shard_tokens=100,
        threads=1, progress=False,
    )  # fmt: skip
    settings.update(kw)
    return SAECacheConfig(**settings)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    write_cache(small(), out)
    return out


@pytest.fixture(scope="module")
def transcode_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "t"
    write_cache(small(hookpoints=["blocks.0.mlp"], transcode=True, dtype="float16"), out)
    return out


def test_shards_equal_live_rows_in_order(cache_dir: Path) -> None:
    """Concatenating the shards gives the live source's rows of windows 0, 1, 2, ... (specials
    dropped), aligned across hookpoints, with their token ids; the index records provenance."""
    subject = load_subject()
    windows = load_tokens(subject)[: 40 * 16].view(40, 16)
    src = ActivationSource(subject, HPS)
    live = [src(windows[i : i + 8]) for i in range(0, 40, 8)]
    cache = ActivationCache(cache_dir)
    idx = cache.index
    assert idx["subject"] == "minigpt" and idx["corpus"] == "verbs" and idx["dtype"] == "float32"
    assert idx["hookpoints"] == {h: {"d_in": 64, "d_out": 64} for h in HPS}
    assert idx["context_len"] == 16 and idx["windows"] == 40 and idx["positions"] == 640
    assert idx["special_token_ids"] == [0, 1, 2]
    shards = [cache.shard(i) for i in range(len(cache.shards))]
    assert len(shards) > 3 and all(
        s["tokens"].shape[0] == c for s, c in zip(shards, cache.counts, strict=True)
    )
    assert cache.counts[:-1].tolist() == [100] * (len(shards) - 1)  # exactly shard_tokens rows
    for h in HPS:
        got = torch.cat([s[f"{h}:x"] for s in shards])
        ref = torch.cat([rows[h][1] for rows in live])
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    toks = torch.cat([s["tokens"] for s in shards])
    assert toks.tolist() == [t for t in windows.reshape(-1).tolist() if t not in (0, 1, 2)]
    assert cache.rows == toks.numel()


def _key(row: torch.Tensor) -> tuple[float, ...]:
    return tuple(row[:8].tolist())


def _row_ids(cache: ActivationCache, batches) -> list[tuple[float, ...]]:
    """Rows as keys (their first features of both hookpoints; equal rows are equal activations,
    e.g. the same first token of two windows, so coverage is compared as multisets)."""
    return [
        _key(a) + _key(b)
        for batch in batches
        for a, b in zip(batch[HPS[0]][0], batch[HPS[1]][0], strict=True)
    ]


def test_reader_epoch_covers_every_row_once_and_resumes(cache_dir: Path) -> None:
    """One epoch (rows / batch batches) visits every row once; epoch 2 is another order;
    ``start_batch`` continues the same stream; ranks take disjoint halves of each global batch.

    Wrong variants caught: sampling rows with replacement; one order for every epoch; resuming
    without skipping; ranks reading the same rows."""
    cache = ActivationCache(cache_dir)
    stored = [{h: (cache.shard(i)[f"{h}:x"],) for h in HPS} for i in range(len(cache.shards))]
    every = sorted(_row_ids(cache, stored))
    b = cache.rows // 4
    stream = list(islice(cache.batches(HPS, batch_rows=b, seed=3), 12))
    epoch = sorted(_row_ids(cache, stream[:4]))
    assert all(r in every for r in epoch) and len(epoch) == 4 * b
    multiset = {r: every.count(r) for r in every}
    assert all(epoch.count(r) <= multiset[r] for r in epoch)  # no row twice within the epoch
    resumed = list(islice(cache.batches(HPS, batch_rows=b, seed=3, start_batch=7), 5))
    assert _row_ids(cache, resumed) == _row_ids(cache, stream[7:12])
    halves = [
        list(islice(cache.batches(HPS, batch_rows=b // 2, seed=3, rank=r, world_size=2), 3))
        for r in range(2)
    ]
    whole = list(islice(cache.batches(HPS, batch_rows=2 * (b // 2), seed=3), 3))
    for g in range(3):
        assert _row_ids(cache, [halves[0][g], halves[1][g]]) == _row_ids(cache, [whole[g]])
    one_epoch = list(islice(cache.batches(HPS, batch_rows=cache.rows, seed=3), 2))
    e0, e1 = _row_ids(cache, one_epoch[:1]), _row_ids(cache, one_epoch[1:])
    assert sorted(e0) == every == sorted(e1) and e0 != e1
    # rows of every hookpoint stay aligned through the shuffle
    first = one_epoch[0]
    for h in HPS:
        assert first[h][0].shape == (cache.rows, 64)


def test_shuffling_buffer_stays_within_buffer(cache_dir: Path) -> None:
    """With a one-shard buffer, a batch no larger than a shard comes from one shard, shuffled.

    Wrong variants caught: a global shuffle (rows from many shards) or no shuffle (rows in
    stored order)."""
    cache = ActivationCache(cache_dir)
    first_col = {
        float(v): i for i in range(len(cache.shards)) for v in cache.shard(i)[f"{HPS[0]}:x"][:, 0]
    }
    batch = next(cache.batches(HPS, batch_rows=50, seed=0, buffer_shards=1))
    vals = batch[HPS[0]][0][:, 0].tolist()
    shards = {first_col[v] for v in vals}
    assert len(shards) == 1
    stored = cache.shard(shards.pop())[f"{HPS[0]}:x"][:, 0].tolist()
    assert vals != stored[: len(vals)]


def test_transcoder_cache_holds_inputs_and_outputs(transcode_dir: Path) -> None:
    cache = ActivationCache(transcode_dir)
    assert cache.transcode and cache.dtype == torch.float16
    s = cache.shard(0)
    assert s["blocks.0.mlp:x"].dtype == torch.float16 and "blocks.0.mlp:y" in s
    batch = next(cache.batches(["blocks.0.mlp"], batch_rows=10, seed=0))
    x, y = batch["blocks.0.mlp"]
    assert x.shape == y.shape == (10, 64) and not torch.equal(x, y)


def test_corrupt_and_incomplete_caches(cache_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cache_dir, bad)
    shard = bad / "shards" / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0x55
    shard.write_bytes(bytes(blob))
    cache = ActivationCache(bad)
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors: does not match the SHA-256"):
        cache.shard(1)
    (bad / "index.json").unlink()
    with pytest.raises(ValueError, match="not a complete activation cache"):
        ActivationCache(bad)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ActivationCache(tmp_path / "nope")
    (bad / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a sparselens activation cache"):
        ActivationCache(bad)
    with pytest.raises(ValueError, match="matches no module"):
        ActivationCache(cache_dir).resolve(["blocks.3.*"])


def test_train_from_cache(cache_dir: Path, tmp_path: Path) -> None:
    """`train --cache`: coders for the cached hookpoints, provenance names the cache; a
    transcode setting that disagrees with the cache is refused."""
    cfg = SAETrainConfig(
        cache=str(cache_dir), hookpoints=["blocks.*"], context_len=16, batch_size=4,
        tokens=4 * 16 * 6, sae=SparseCoderConfig(num_latents=64, k=4), lr_warmup_steps=1,
        save_every=3, threads=1, eval_tokens=256, progress=False,
    )  # fmt: skip
    s = train_sae(cfg, tmp_path / "run")
    assert list(s["hookpoints"]) == HPS and s["source"] == "cache"
    prov = json.loads((tmp_path / "run" / "final" / HPS[1] / "cfg.json").read_text())
    assert prov["provenance"]["cache"] == str(cache_dir.resolve())
    assert s["hookpoints"][HPS[0]]["tokens_seen"] == 6 * 64
    load_sparse_coder(tmp_path / "run" / "final" / HPS[0])
    with pytest.raises(ValueError, match="written with transcode False"):
        train_sae(cfg.model_copy(update={"transcode": True}), tmp_path / "run2")
