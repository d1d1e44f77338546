"""Activations cached on disk (``sparselens sae cache``) and read back through a shuffling buffer.

Writer (:func:`write_cache`): the train split of a corpus is cut into non-overlapping windows of
``context_len`` tokens, taken in order, ``batch_size`` at a time; one capture pass per batch
records every hookpoint (:class:`~sparselens.sae.activations.ActivationSource`, special tokens
dropped), and rows are written in shards of ``shard_tokens`` rows (the last one shorter)::

    <dir>/shards/shard-00000.safetensors   "<hookpoint>:x" (rows, d_in) [, "<hookpoint>:y"
                                           (rows, d_out) for transcoders], "tokens" (rows,)
    <dir>/index.json                       format, subject, corpus, hookpoints and widths, dtype,
                                           rows, and each shard's file, rows and SHA-256
    <dir>/config.yaml, manifest.json       as every run

Every shard holds the same token rows for all hookpoints, so they stay aligned. Each file is
written atomically and ``index.json`` last: a directory without it is an incomplete cache.

Reader (:class:`ActivationCache`): an endless, seeded row order. Epoch ``e`` visits the shards in
a permutation drawn from ``(seed, e)``, groups them ``buffer_shards`` at a time (the shuffling
buffer) and permutes the rows of each group with ``(seed, e, group)``; batches slice that row
sequence exactly as :func:`sparselens.sae.data.batch_indices` does for token windows, so batch
``g`` depends only on ``(seed, g, rank, world_size)``: ``start_batch`` resumes exactly and ranks
read disjoint rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from sparselens.lm.hooks import resolve_patterns
from sparselens.sae.data import batch_indices, load_tokens, resolve_corpus
from sparselens.train.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    safetensors_bytes,
    sha256_bytes,
    tensors_from_bytes,
)
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir

logger = logging.getLogger(__name__)

FORMAT = "sparselens.sae-cache/1"
INDEX = "index.json"
SHARDS = "shards"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SAECacheConfig(BaseModel):
    """Settings of ``sparselens sae cache``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    subject: str = Field("minigpt", min_length=1, description="as for `sae train`")
    corpus: str = Field("default", min_length=1, description="as for `sae train`")
    hookpoints: list[str] = Field(
        default_factory=lambda: ["blocks.0.resid_post"],
        min_length=1,
        description="module-name patterns (fnmatch)",
    )
    transcode: bool = Field(False, description="also store each module's input (transcoders)")
    context_len: int = Field(32, ge=1, le=2**20, description="tokens per sequence")
    batch_size: int = Field(64, ge=1, le=2**20, description="sequences per forward pass")
    tokens: int = Field(0, ge=0, description="positions to cache (0: the whole train split)")
    shard_tokens: int = Field(65_536, ge=1, description="rows per shard file")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="stored activation dtype"
    )
    exclude_special_tokens: bool = Field(True, description="drop BOS/EOS/PAD positions")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="held-out share (not cached)")
    threads: int = Field(2, ge=1, le=1024, description="torch CPU threads")
    progress: bool = Field(True, description="show a progress bar (only on a terminal)")


def _key(hookpoint: str, which: str) -> str:
    return f"{hookpoint}:{which}"


def write_cache(
    config: SAECacheConfig, out: str | os.PathLike[str], *, command: list[str] | None = None
) -> dict[str, Any]:
    """Cache activations (module doc) into the new directory ``out``; return the index."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _write_cache(config, out, command)
    finally:
        torch.set_num_threads(threads)


def _write_cache(
    config: SAECacheConfig, out: str | os.PathLike[str], command: list[str] | None
) -> dict[str, Any]:
    from sparselens.sae.activations import ActivationSource
    from sparselens.sae.subject import load_subject

    t0 = time.perf_counter()
    subject = load_subject(config.subject)
    if config.context_len > subject.context_len:
        raise ValueError(
            f"context_len must be <= the subject's context length {subject.context_len}, "
            f"got {config.context_len}"
        )
    source = ActivationSource(
        subject,
        config.hookpoints,
        transcode=config.transcode,
        exclude_special_tokens=config.exclude_special_tokens,
    )
    widths = source.widths()
    corpus = resolve_corpus(subject, config.corpus)
    tokens = load_tokens(subject, corpus, split="train", val_fraction=config.val_fraction)
    t = config.context_len
    n_windows = tokens.numel() // t
    if config.tokens:
        n_windows = min(n_windows, -(-config.tokens // t))
    if n_windows == 0:
        raise ValueError(
            f"the train split holds {tokens.numel()} tokens, fewer than one window of "
            f"context_len {t}"
        )
    windows = tokens[: n_windows * t].view(n_windows, t)
    resolved = config.model_copy(
        update={"subject": subject.name, "corpus": corpus, "hookpoints": source.hookpoints}
    )
    run = RunDir(out)
    run.write_config(resolved)
    run.start(kind="sae-cache", seed=None, command=command)
    dtype = _DTYPES[config.dtype]
    shards: list[dict[str, Any]] = []
    pending: dict[str, list[Tensor]] = {}
    pending_rows = 0

    def flush(rows: int) -> None:
        """Write the first ``rows`` pending rows as the next shard; keep the rest pending."""
        nonlocal pending, pending_rows
        joined = {k: torch.cat(v) for k, v in pending.items()}
        tensors = {k: v[:rows].contiguous() for k, v in joined.items()}
        blob = safetensors_bytes(tensors, {"format": "pt"})
        name = f"{SHARDS}/shard-{len(shards):05d}.safetensors"
        atomic_write_bytes(run.path / name, blob)
        shards.append({"file": name, "rows": rows, "sha256": sha256_bytes(blob)})
        pending = {k: [v[rows:]] for k, v in joined.items()}
        pending_rows -= rows

    def add(key: str, value: Tensor) -> None:
        pending.setdefault(key, []).append(value)

    bar = progress_bar(n_windows, "sae cache", enabled=config.progress, unit="seq")
    try:
        run.update_manifest(status="running")
        for lo in range(0, n_windows, config.batch_size):
            batch = windows[lo : lo + config.batch_size]
            rows = source(batch)
            keep = source.keep_mask(batch)
            add("tokens", batch.reshape(-1)[keep])
            for name in source.hookpoints:
                x, y = rows[name]
                add(_key(name, "x"), x.detach().to("cpu", dtype))
                if config.transcode:
                    add(_key(name, "y"), y.detach().to("cpu", dtype))
            pending_rows += int(keep.sum())
            bar.update(batch.shape[0])
            while pending_rows >= config.shard_tokens:
                flush(config.shard_tokens)
        if pending_rows:
            flush(pending_rows)
    except BaseException as e:
        run.finish("interrupted" if isinstance(e, KeyboardInterrupt) else "failed", error=str(e))
        raise
    finally:
        bar.close()
    if not shards:
        run.finish("failed", error="no rows")
        raise ValueError("no activations to cache: every position is a special token")
    index = {
        "format": FORMAT,
        "subject": subject.name,
        "subject_kind": subject.kind,
        "corpus": corpus,
        "split": "train",
        "val_fraction": config.val_fraction,
        "context_len": t,
        "transcode": config.transcode,
        "exclude_special_tokens": config.exclude_special_tokens,
        "special_token_ids": list(source.specials),
        "hookpoints": {n: {"d_in": w.d_in, "d_out": w.d_out} for n, w in widths.items()},
        "dtype": config.dtype,
        "windows": n_windows,
        "positions": n_windows * t,
        "rows": sum(s["rows"] for s in shards),
        "shards": shards,
    }
    atomic_write_json(run.path / INDEX, index)
    run.finish("completed", seconds=time.perf_counter() - t0)
    return index


def _shard_order(n_shards: int, buffer_shards: int, counts: np.ndarray, offsets: np.ndarray):
    def order(num: int, seed: int, epoch: int) -> np.ndarray:
        perm = np.random.default_rng([seed, epoch]).permutation(n_shards)
        parts = []
        for j in range(0, n_shards, buffer_shards):
            group = perm[j : j + buffer_shards]
            rows = np.concatenate([offsets[s] + np.arange(counts[s]) for s in group])
            rng = np.random.default_rng([seed, epoch, j // buffer_shards + 1])
            parts.append(rows[rng.permutation(rows.size)])
        out = np.concatenate(parts)
        assert out.size == num
        return out

    return order


class ActivationCache:
    """A cache directory written by :func:`write_cache`; rows read in a seeded order."""

    def __init__(self, directory: str | os.PathLike[str], *, max_loaded_shards: int = 16) -> None:
        self.path = Path(directory)
        index_path = self.path / INDEX
        if not self.path.is_dir():
            raise FileNotFoundError(f"activation cache {self.path}: no such directory")
        if not index_path.is_file():
            raise ValueError(
                f"{self.path} is not a complete activation cache (no {INDEX}; was "
                "`sparselens sae cache` interrupted?)"
            )
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{index_path}: not valid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: not a sparselens activation cache index")
        try:
            self.shards: list[dict[str, Any]] = list(index["shards"])
            self.hookpoint_widths: dict[str, dict[str, int]] = dict(index["hookpoints"])
            self.dtype = _DTYPES[index["dtype"]]
            counts = [int(s["rows"]) for s in self.shards]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{index_path}: malformed index ({e!r})") from None
        if not self.shards or min(counts) < 1:
            raise ValueError(f"{index_path}: no shards with rows")
        self.index = index
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.rows = int(self.counts.sum())
        self._loaded: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._max_loaded = max_loaded_shards

    @property
    def hookpoints(self) -> list[str]:
        return list(self.hookpoint_widths)

    @property
    def transcode(self) -> bool:
        return bool(self.index.get("transcode", False))

    def resolve(self, patterns: Sequence[str] | str) -> list[str]:
        """Cached hookpoints matching the fnmatch ``patterns`` (one-line error if none)."""
        return resolve_patterns(self.hookpoints, patterns, field="hookpoints")

    def shard(self, i: int) -> dict[str, Tensor]:
        """The tensors of shard ``i`` (checksum verified; a few shards kept in memory)."""
        if i in self._loaded:
            self._loaded.move_to_end(i)
            return self._loaded[i]
        info = self.shards[i]
        path = self.path / info["file"]
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing shard of activation cache") from None
        if sha256_bytes(blob) != info.get("sha256"):
            raise ValueError(f"{path}: does not match the SHA-256 in {INDEX} (corrupt shard)")
        tensors = tensors_from_bytes(blob, path)
        self._loaded[i] = tensors
        while len(self._loaded) > self._max_loaded:
            self._loaded.popitem(last=False)
        return tensors

    def rows_at(self, idx: Tensor, hookpoints: Sequence[str]) -> dict[str, tuple[Tensor, Tensor]]:
        """``{hookpoint: (x, y)}`` of the global row indices ``idx`` (in that order)."""
        idx_np = idx.numpy()
        shard_of = np.searchsorted(self.offsets, idx_np, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        pieces: dict[str, list[Tensor]] = {}
        for s in np.unique(shard_of):
            sel = order[shard_of[order] == s]
            local = torch.from_numpy(idx_np[sel] - self.offsets[s])
            tensors = self.shard(int(s))
            for h in hookpoints:
                for which in ("x", "y") if self.transcode else ("x",):
                    key = _key(h, which)
                    if key not in tensors:
                        raise ValueError(f"{self.shards[s]['file']}: no tensor {key!r}")
                    pieces.setdefault(key, []).append(tensors[key].index_select(0, local))
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for h in hookpoints:
            x = torch.cat(pieces[_key(h, "x")]).index_select(0, inverse)
            y = torch.cat(pieces[_key(h, "y")]).index_select(0, inverse) if self.transcode else x
            out[h] = (x, y)
        return out

    def batches(
        self,
        hookpoints: Sequence[str],
        *,
        batch_rows: int,
        seed: int,
        start_batch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        buffer_shards: int = 8,
    ) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
        """Endless ``{hookpoint: (x, y)}`` batches of ``batch_rows`` rows (module doc)."""
        if batch_rows < 1 or buffer_shards < 1:
            raise ValueError("batch_rows and buffer_shards must be >= 1")
        order = _shard_order(len(self.shards), buffer_shards, self.counts, self.offsets)
        idx = batch_indices(
            self.rows,
            batch_size=batch_rows,
            seed=seed,
            start_batch=start_batch,
            rank=rank,
            world_size=world_size,
            order=order,
        )
        return (self.rows_at(i, list(hookpoints)) for i in idx)


__all__ = ["FORMAT", "ActivationCache", "SAECacheConfig", "write_cache"]
