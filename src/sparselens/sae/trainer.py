"""Train TopK sparse autoencoders / transcoders on a subject's activations: ``sparselens sae
train``.

One :class:`~sparselens.sae.SparseCoder` per hookpoint, all fed by one capture pass of the
subject per (micro-)batch (:class:`~sparselens.sae.activations.ActivationSource`), or by rows of
an activation cache (:class:`~sparselens.sae.cache.ActivationCache`).

Optimisation (Gao et al. 2024, arXiv 2406.04093, §2 and App. A.2)
------------------------------------------------------------------
* Adam, one parameter group per hookpoint with lr ``2e-4 / sqrt(latents / 2^14)`` unless set;
  linear warm-up then decay, both counted in optimiser steps (sparsify counted batches, so its
  decay never completed under gradient accumulation).
* ``b_dec`` starts at the mean of the first global batch's targets (a transcoder's encoder bias
  is centred on its inputs' mean).
* Loss per step ``fvu + auxk_alpha * auxk + multi_topk_fvu / 8`` with **full-batch**
  denominators: each micro-batch (and rank) contributes its share
  ``sum_mb ||y - yhat||^2 / D`` with ``D`` the total variance of the whole global batch, so the
  shares add up to the one-batch loss. AuxK is normalised inside the coder by its micro-batch
  residual variance ``Var(e_mb)``; the trainer multiplies it by ``Var(e_mb) / Var(e_batch)``
  (``e`` is detached, so these are constants) to get the one-batch value. With
  ``micro_batches > 1`` that needs ``Var(e_batch)`` before the first backward: one extra no-grad
  forward per micro-batch while some latent is dead (the dead count is read on the host, as the
  coder's own AuxK does).
* Unit-norm decoder rows (SAEs): the gradient component parallel to each row is removed before
  the step and the rows are renormalised after it, so saved weights are unit-norm.
* Dead latents (:class:`~sparselens.sae.DeadLatentTracker`): tokens since each latent last fired
  (activation > ``fire_threshold``), updated once per optimiser step with the step's kept tokens,
  summed over ranks.

Distributed (``torchrun``, any backend; tests use 2 gloo processes)
------------------------------------------------------------------
Data parallel: ``batch_size`` sequences per step over all ranks, rank ``r`` taking its slice of
each global batch (:func:`~sparselens.sae.data.token_batches`). Each rank's loss is its share of
the global loss, so the gradients are all-reduced with SUM (one flat buffer per step) and every
rank applies the same update. Statistics (variances, b_dec init, dead counts, logged means) are
reduced across ranks. Rank 0 writes the run directory.

Logging, checkpoints, outputs
-----------------------------
``metrics.jsonl``: one record per hookpoint every ``log_every`` steps with the TRUE means over
the steps since the last record (sparsify divided by the log frequency and micro-steps as well).
The only host synchronisations of a step are those the data needs (dropping special tokens, the
coder's own input check and dead count); metrics are read at log points.
``checkpoints/``: coders, Adam state, trackers and metric accumulators every ``save_every``
steps (safetensors + json, atomic); ``resume=True`` continues bit for bit (batches are a function
of the step). At the end: ``final/<hookpoint>/{cfg.json, sae.safetensors}`` with provenance,
held-out evaluation (streaming float64 FVU on validation tokens, L0, dead and dense fractions),
``plots/``, ``summary.json`` and ``report.md`` (:mod:`sparselens.sae.train_report`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sparselens.core.distributed import global_sum, rank, world_size
from sparselens.sae.activations import ActivationSource
from sparselens.sae.checkpoint import save_sparse_coder
from sparselens.sae.data import load_tokens, resolve_corpus, token_batches
from sparselens.sae.dead_latents import DeadLatentTracker
from sparselens.sae.fvu import FVUAccumulator, total_variance
from sparselens.sae.sparse_coder import SparseCoder
from sparselens.sae.subject import Subject, load_subject
from sparselens.sae.train_config import SAETrainConfig
from sparselens.train.atomic import atomic_write_json, atomic_write_text
from sparselens.train.checkpoint import list_checkpoints, load_checkpoint
from sparselens.train.progress import progress_bar
from sparselens.train.rundir import RunDir, check_resumable

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "sae"
RESUMABLE_CHANGES = frozenset({"progress", "threads"})
MULTI_TOPK_WEIGHT = 1 / 8
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DENSE_THRESHOLD = 0.1
MicroBatch = dict[str, tuple[Tensor, Tensor]]


@dataclass
class HookpointState:
    """One hookpoint's coder, dead-latent tracker and metric accumulators."""

    name: str
    coder: SparseCoder
    tracker: DeadLatentTracker
    lr: float
    acc: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    """Sums since the last log point of (fvu, auxk, multi_topk_fvu), this rank's shares."""
    sae_seconds: float = 0.0

    @property
    def project_decoder(self) -> bool:
        cfg = self.coder.cfg
        return cfg.normalize_decoder and not cfg.transcode


# -- statistics over the global batch -----------------------------------------------------------
def _degenerate(centred: Tensor, raw: Tensor) -> Tensor:
    """:func:`sparselens.sae.fvu.total_variance`'s fallbacks (zero baseline, then 1)."""
    return torch.where(centred > 0, centred, torch.where(raw > 0, raw, torch.ones_like(raw)))


def batch_total_variance(parts: list[Tensor]) -> Tensor:
    """``sum ||y - ybar||^2`` over the rows of ``parts`` on every rank (``ybar`` the global mean).

    One process: :func:`~sparselens.sae.fvu.total_variance` of the concatenation (bit-equal to
    what the coder computes for the same batch). Several: two float64 all-reduces.
    """
    if world_size() == 1:
        return total_variance(torch.cat(parts))
    ref = parts[0]
    y = torch.cat(parts).double()
    head = global_sum(torch.cat([y.sum(0), y.new_tensor([y.shape[0]])]))
    mean = head[:-1] / head[-1].clamp_min(1)
    tail = global_sum(torch.stack([(y - mean).pow(2).sum(), y.pow(2).sum()]))
    return _degenerate(tail[0], tail[1]).to(ref.dtype)


def batch_mean(parts: list[Tensor]) -> Tensor:
    """Mean row of ``parts`` over all ranks, shape (1, d)."""
    y = torch.cat(parts)
    if world_size() == 1:
        return y.mean(0, keepdim=True)
    head = global_sum(torch.cat([y.double().sum(0), y.new_tensor([y.shape[0]]).double()]))
    return (head[:-1] / head[-1].clamp_min(1)).to(y.dtype).unsqueeze(0)


def global_rows(n_local: int, device: torch.device) -> int:
    """Rows over all ranks (a collective when distributed)."""
    if world_size() == 1:
        return n_local
    return int(global_sum(torch.tensor([n_local], dtype=torch.int64, device=device))[0])


# -- data -------------------------------------------------------------------------------------
def _split_rows(rows: MicroBatch, parts: int) -> list[MicroBatch]:
    if parts == 1:
        return [rows]
    split = {h: (x.tensor_split(parts), y.tensor_split(parts)) for h, (x, y) in rows.items()}
    return [{h: (xs[i], ys[i]) for h, (xs, ys) in split.items()} for i in range(parts)]


def live_batches(
    source: ActivationSource,
    tokens: Tensor,
    config: SAETrainConfig,
    start_batch: int,
) -> Iterator[list[MicroBatch]]:
    """Per optimiser step, this rank's micro-batches of ``(x, y)`` rows (one capture each)."""
    ws, r = world_size(), rank()
    it = token_batches(
        tokens,
        context_len=config.context_len,
        batch_size=config.batch_size // ws,
        seed=config.seed,
        start_batch=start_batch,
        rank=r,
        world_size=ws,
    )
    for batch in it:
        yield [source(chunk) for chunk in batch.chunk(config.micro_batches)]


def cache_batches(
    cache: Any, hookpoints: list[str], config: SAETrainConfig, start_batch: int, device: Any
) -> Iterator[list[MicroBatch]]:
    """Per optimiser step, this rank's micro-batches of cached rows (``batch_size *
    context_len`` rows per global step; special tokens were dropped when caching)."""
    ws = world_size()
    it = cache.batches(
        hookpoints,
        batch_rows=config.tokens_per_step // ws,
        seed=config.seed,
        start_batch=start_batch,
        rank=rank(),
        world_size=ws,
    )
    for rows in it:
        moved = {h: (x.to(device), y.to(device)) for h, (x, y) in rows.items()}
        yield _split_rows(moved, config.micro_batches)


# -- one optimiser step -------------------------------------------------------------------------
def _context(h: HookpointState, step: int) -> str:
    return f"hookpoint {h.name}, step {step}"


def _forward(h: HookpointState, step: int, x: Tensor, y: Tensor, **kw: Any) -> Any:
    try:
        return h.coder(x, y if h.coder.cfg.transcode else None, **kw)
    except ValueError as e:
        raise ValueError(f"{_context(h, step)}: {e}") from None


def train_step(
    states: list[HookpointState],
    micro: list[MicroBatch],
    optimizer: torch.optim.Optimizer,
    step: int,
    *,
    init_b_dec: bool = False,
) -> None:
    """One optimiser step of every coder on this rank's micro-batches (module doc)."""
    for h in states:
        t0 = time.perf_counter()
        coder, cfg = h.coder, h.coder.cfg
        xs = [mb[h.name][0].to(coder.dtype) for mb in micro]
        ys = [mb[h.name][1].to(coder.dtype) for mb in micro]
        n_local = sum(int(y.shape[0]) for y in ys)
        if global_rows(n_local, coder.device) == 0:
            raise ValueError(
                f"{_context(h, step)}: empty batch (every position was excluded; use longer "
                "sequences or keep special tokens)"
            )
        if init_b_dec:
            try:
                coder.init_b_dec(batch_mean(ys), inputs=batch_mean(xs) if cfg.transcode else None)
            except ValueError as e:
                raise ValueError(f"{_context(h, step)}: {e}") from None
        den = batch_total_variance(ys)
        dead = h.tracker.dead_mask if cfg.auxk_alpha > 0 else None
        rescale_aux = cfg.auxk_alpha > 0 and cfg.auxk_normalization == "residual"
        e_den: Tensor | None = None
        if rescale_aux and len(micro) > 1 and bool(h.tracker.dead_mask.any()):
            with torch.no_grad(), coder.threshold_kept():  # train-mode selection, EMA untouched
                es = [
                    (y - _forward(h, step, x, y, total_variance=den).sae_out) if y.shape[0] else y
                    for x, y in zip(xs, ys, strict=True)
                ]
            e_den = batch_total_variance(es)
        acts, idxs = [], []
        for x, y in zip(xs, ys, strict=True):
            if y.shape[0] == 0:
                if rescale_aux and e_den is None:
                    e_den = batch_total_variance([y])
                continue
            out = _forward(h, step, x, y, dead_mask=dead, total_variance=den)
            aux = out.auxk_loss
            if rescale_aux:
                e = (y - out.sae_out).detach()
                if e_den is None:  # one micro-batch: the residual of the whole (local) batch
                    e_den = batch_total_variance([e])
                aux = aux * (total_variance(e) / e_den)
            loss = out.fvu + cfg.auxk_alpha * aux
            if cfg.multi_topk:
                loss = loss + MULTI_TOPK_WEIGHT * out.multi_topk_fvu
            loss.backward()
            h.acc += torch.stack([out.fvu, aux, out.multi_topk_fvu]).detach().double()
            acts.append(out.latent_acts.detach())
            idxs.append(out.latent_indices)
        h.tracker.update(*_pad_cat(acts, idxs, coder), n_tokens=n_local)
        h.sae_seconds += time.perf_counter() - t0
    _all_reduce_grads(states)
    for h in states:
        if h.project_decoder:
            h.coder.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for h in states:
        if h.project_decoder:
            h.coder.set_decoder_norm_to_unit_norm()


def _pad_cat(acts: list[Tensor], idxs: list[Tensor], coder: SparseCoder) -> tuple[Tensor, Tensor]:
    """Concatenate per-micro-batch (rows, k_i) codes; BatchTopK widths differ, so pad with zero
    activations (a zero never counts as firing)."""
    if not acts:
        empty = torch.zeros(0, 1, device=coder.device)
        return empty, empty.long()
    width = max(a.shape[1] for a in acts)
    if any(a.shape[1] != width for a in acts):
        acts = [torch.nn.functional.pad(a, (0, width - a.shape[1])) for a in acts]
        idxs = [torch.nn.functional.pad(i, (0, width - i.shape[1])) for i in idxs]
    return torch.cat(acts), torch.cat(idxs)


def _all_reduce_grads(states: list[HookpointState]) -> None:
    """Sum every coder gradient over ranks (each rank's loss is its share of the global one)."""
    if world_size() == 1:
        return
    params = [p for h in states for p in h.coder.parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_on_tokens(
    states: list[HookpointState],
    source: ActivationSource,
    tokens: Tensor,
    config: SAETrainConfig,
) -> dict[str, dict[str, Any]]:
    """Held-out statistics per hookpoint over the non-overlapping windows of ``tokens``
    (at most ``eval_tokens`` positions): dataset FVU (streaming float64), L0 (mean latents with a
    non-zero activation per token), per-latent firing frequency (activation > fire_threshold)."""
    t = config.context_len
    n_win = tokens.numel() // t
    if config.eval_tokens:
        n_win = min(n_win, max(1, config.eval_tokens // t))
    if n_win == 0:
        raise ValueError(
            f"the validation split holds {tokens.numel()} tokens, fewer than one window of "
            f"context_len {t}; raise val_fraction"
        )
    windows = tokens[: n_win * t].view(n_win, t)
    acc = {h.name: FVUAccumulator() for h in states}
    l0 = {h.name: torch.zeros((), dtype=torch.float64) for h in states}
    fired = {h.name: torch.zeros(h.coder.num_latents, dtype=torch.int64) for h in states}
    n = 0
    for lo in range(0, n_win, config.batch_size):
        rows = source(windows[lo : lo + config.batch_size])
        for h in states:
            x, y = rows[h.name]
            if y.shape[0] == 0:
                continue
            out = h.coder(x, y if h.coder.cfg.transcode else None)
            acc[h.name].update(y, out.sae_out)
            a = out.latent_acts.cpu()
            l0[h.name] += (a != 0).sum(-1).double().sum()
            on = (a > h.coder.cfg.fire_threshold).long().reshape(-1)
            fired[h.name].index_add_(0, out.latent_indices.cpu().reshape(-1), on)
        n += int(rows[states[0].name][1].shape[0])
    if n == 0:
        raise ValueError("every validation position is a special token; nothing to evaluate")
    out: dict[str, dict[str, Any]] = {}
    for h in states:
        freq = fired[h.name].double() / n
        out[h.name] = {
            "fvu": float(acc[h.name].compute()),
            "l0": float(l0[h.name] / n),
            "val_tokens": n,
            "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
            "never_fired_fraction": float((fired[h.name] == 0).double().mean()),
            "firing_frequency": freq,
        }
    return out


# -- setup and the run --------------------------------------------------------------------------
def _init_distributed(device: str) -> bool:
    """Join the process group ``torchrun`` describes (env WORLD_SIZE > 1); True if created."""
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", 1)) > 1
    ):
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        return True
    return False


def _build_states(
    config: SAETrainConfig, widths: dict[str, tuple[int, int]], device: torch.device
) -> list[HookpointState]:
    """One coder per hookpoint, initialised from ``config.seed`` in hookpoint order."""
    states = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        for name, (d_in, d_out) in widths.items():
            if config.transcode and d_in != d_out:
                raise ValueError(
                    f"hookpoint {name}: a transcoder needs equal input and output widths, got "
                    f"input {d_in} and output {d_out}"
                )
            try:
                coder = SparseCoder(d_in, config.sae, device=device, dtype=DTYPES[config.dtype])
            except ValueError as e:
                raise ValueError(f"hookpoint {name} (width {d_in}): sae.{e}") from None
            coder.train()
            lr = config.lr_for(coder.num_latents)
            tracker = DeadLatentTracker.for_coder(coder)
            acc = torch.zeros(3, dtype=torch.float64, device=coder.device)
            states.append(HookpointState(name, coder, tracker, lr, acc))
    return states


def _make_optimizer(states: list[HookpointState], config: SAETrainConfig) -> torch.optim.Adam:
    groups = [{"params": list(h.coder.parameters()), "lr": h.lr, "base_lr": h.lr} for h in states]
    return torch.optim.Adam(
        groups, lr=states[0].lr, betas=(config.beta1, config.beta2), eps=config.eps
    )


def _state(states: list[HookpointState], opt: torch.optim.Optimizer, acc: Tensor) -> dict[str, Any]:
    return {
        "coders": {h.name: h.coder.state_dict() for h in states},
        "trackers": {
            h.name: {
                "tokens_since_fired": h.tracker.tokens_since_fired,
                "fire_counts": h.tracker.fire_counts,
                "tokens_seen": h.tracker.tokens_seen,
            }
            for h in states
        },
        "optimizer": opt.state_dict(),
        "acc": acc,
        "sae_seconds": [h.sae_seconds for h in states],
    }


def _restore(
    path: Path, states: list[HookpointState], opt: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    try:
        state, step, meta = load_checkpoint(path)
        for i, h in enumerate(states):
            h.coder.load_state_dict(state["coders"][h.name])
            tr = state["trackers"][h.name]
            for key in ("tokens_since_fired", "fire_counts", "tokens_seen"):
                cur = getattr(h.tracker, key)
                if tuple(tr[key].shape) != tuple(cur.shape):
                    raise ValueError(f"tracker {key} has shape {tuple(tr[key].shape)}")
                setattr(h.tracker, key, tr[key].to(cur.device, cur.dtype))
            if rank() == 0:
                h.acc = state["acc"][i].to(h.acc.device, torch.float64).clone()
            h.sae_seconds = float(state["sae_seconds"][i])
        opt.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__
        raise ValueError(f"cannot resume from checkpoint {path}: {msg}") from None
    return step, meta


def prepare(config: SAETrainConfig) -> tuple[SAETrainConfig, Subject, Any]:
    """Load the subject (and cache) and resolve ``config``: subject name, corpus, hookpoint
    names, cache path. Returns ``(resolved config, subject, cache or None)``."""
    cache = None
    if config.cache is not None:
        from sparselens.sae.cache import ActivationCache

        cache = ActivationCache(Path(config.cache).expanduser())
        idx = cache.index
        if bool(idx.get("transcode")) != config.transcode:
            raise ValueError(
                f"transcode is {config.transcode} but the cache {cache.path} was written with "
                f"transcode {idx.get('transcode')}"
            )
        if int(idx["context_len"]) != config.context_len:
            raise ValueError(
                f"context_len ({config.context_len}) must equal the cache's ({idx['context_len']})"
            )
        subject = load_subject(idx["subject"])
        hookpoints = cache.resolve(config.hookpoints)
        corpus = str(idx["corpus"])
        update = {"cache": str(cache.path.resolve())}
    else:
        subject = load_subject(config.subject)
        hookpoints = ActivationSource(subject, config.hookpoints).hookpoints
        corpus = resolve_corpus(subject, config.corpus)
        update = {}
    if config.context_len > subject.context_len:
        raise ValueError(
            f"context_len must be <= the subject's context length {subject.context_len}, got "
            f"{config.context_len}"
        )
    resolved = config.model_copy(
        update={"subject": subject.name, "corpus": corpus, "hookpoints": hookpoints, **update}
    )
    return resolved, subject, cache


def train_sae(
    config: SAETrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    *,
    command: list[str] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train (or, with ``resume=True``, continue) the run in ``run_dir``; return the summary.

    ``on_checkpoint(step)`` runs after each checkpoint is on disk (tests stop runs there). Bad
    settings raise a one-line ValueError / FileNotFoundError before anything is written.
    """
    t_start = time.perf_counter()
    created_group = _init_distributed(config.device)
    try:
        return _run(config, Path(run_dir), resume, command, on_checkpoint, t_start)
    finally:
        if created_group:
            dist.destroy_process_group()


def _run(
    config: SAETrainConfig,
    run_path: Path,
    resume: bool,
    command: list[str] | None,
    on_checkpoint: Callable[[int], None] | None,
    t_start: float,
) -> dict[str, Any]:
    ws, is_main = world_size(), rank() == 0
    if config.batch_size % (ws * config.micro_batches):
        raise ValueError(
            f"batch_size ({config.batch_size}) must be divisible by world size x micro_batches "
            f"({ws} x {config.micro_batches})"
        )
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch.cuda.is_available() is False")
    config, subject, cache = prepare(config)
    if resume and (done_summary := check_resumable(run_path, config, RESUMABLE_CHANGES)):
        return done_summary
    device = torch.device(config.device)
    if config.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    subject.model.to(device)
    source = ActivationSource(
        subject,
        config.hookpoints,
        transcode=config.transcode,
        exclude_special_tokens=config.exclude_special_tokens,
    )
    if cache is not None:
        widths = {
            h: (int(cache.hookpoint_widths[h]["d_in"]), int(cache.hookpoint_widths[h]["d_out"]))
            for h in config.hookpoints
        }
        train_tokens = None
    else:
        widths = {h: (w.d_in, w.d_out) for h, w in source.widths().items()}
        train_tokens = load_tokens(
            subject, config.corpus, split="train", val_fraction=config.val_fraction
        )
    val_tokens = load_tokens(subject, config.corpus, split="val", val_fraction=config.val_fraction)
    states = _build_states(config, widths, device)
    opt = _make_optimizer(states, config)

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    run: RunDir | None = None
    try:
        if is_main:
            run = RunDir(run_path, resume=resume)
            if not resume:
                run.write_config(config)
            info = {
                "hookpoints": {h: {"d_in": a, "d_out": b} for h, (a, b) in widths.items()},
                "world_size": ws,
                "train_tokens": None if train_tokens is None else int(train_tokens.numel()),
                "val_tokens": int(val_tokens.numel()),
            }
            run.start(kind="sae-train", seed=config.seed, command=command, extra={"data": info})
        if ws > 1:
            dist.barrier()
        try:
            summary = _train(
                config,
                subject,
                source,
                cache,
                train_tokens,
                val_tokens,
                states,
                opt,
                run,
                run_path,
                on_checkpoint,
                t_start,
            )
        except BaseException as e:
            if run is not None:
                status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
                try:
                    run.finish(status, error=str(e) or type(e).__name__)
                except Exception:
                    logger.debug("could not record status %s", status, exc_info=True)
            raise
    finally:
        torch.set_num_threads(threads)
    if run is not None:
        run.finish("completed", seconds_this_session=time.perf_counter() - t_start)
    return summary


def _train(
    config: SAETrainConfig,
    subject: Subject,
    source: ActivationSource,
    cache: Any,
    train_tokens: Tensor | None,
    val_tokens: Tensor,
    states: list[HookpointState],
    opt: torch.optim.Optimizer,
    run: RunDir | None,
    run_path: Path,
    on_checkpoint: Callable[[int], None] | None,
    t_start: float,
) -> dict[str, Any]:
    from sparselens.sae import train_report

    ws, is_main = world_size(), rank() == 0
    steps = config.steps
    done, train_seconds = 0, 0.0
    found = list_checkpoints(run_path / "checkpoints", CHECKPOINT_PREFIX)
    if found and (run is None or run.resumed):
        latest = found[-1][1]
        done, meta = _restore(latest, states, opt)
        train_seconds = float(meta.get("train_seconds", 0.0))
        logger.info("resuming %s from step %d (%s)", run_path, done, latest.name)
    if run is not None:
        run.rewrite_metrics([r for r in run.read_metrics() if r.get("step", 0) <= done])
    acc_steps = int(done % config.log_every) if done < steps else 0
    if cache is not None:
        batches = cache_batches(cache, config.hookpoints, config, done, states[0].coder.device)
    else:
        assert train_tokens is not None
        batches = live_batches(source, train_tokens, config, done)

    def reduced_acc() -> Tensor:
        stacked = torch.stack([h.acc for h in states])
        return global_sum(stacked) if ws > 1 else stacked

    bar = progress_bar(steps, "sae train", enabled=config.progress and is_main, initial=done)
    t0 = time.perf_counter()
    try:
        for step in range(done + 1, steps + 1):
            factor = config.lr_factor(step)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            micro = next(batches)
            train_step(states, micro, opt, step, init_b_dec=step == 1)
            acc_steps += 1
            bar.update(1)
            if step % config.log_every == 0 or step == steps:
                sums = reduced_acc().tolist()
                records = []
                for h, (fvu, aux, multi) in zip(states, sums, strict=True):
                    records.append(
                        {
                            "phase": "train",
                            "step": step,
                            "hookpoint": h.name,
                            "tokens": int(h.tracker.tokens_seen),
                            "lr": h.lr * factor,
                            "fvu": fvu / acc_steps,
                            "auxk": aux / acc_steps,
                            "multi_topk_fvu": multi / acc_steps,
                            "dead_fraction": float(h.tracker.fraction_dead()),
                            "steps_averaged": acc_steps,
                        }
                    )
                    h.acc.zero_()
                acc_steps = 0
                if run is not None:
                    run.append_metrics(records)
                bar.set_postfix(fvu=f"{records[0]['fvu']:.4f}", refresh=False)
            if step % config.save_every == 0 or step == steps:
                train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                acc = reduced_acc()
                if run is not None:
                    state = _state(states, opt, acc)
                    run.save_checkpoint(
                        state, step, meta={"train_seconds": train_seconds}, prefix=CHECKPOINT_PREFIX
                    )
                if ws > 1:
                    dist.barrier()
                if on_checkpoint is not None:
                    on_checkpoint(step)
    finally:
        bar.close()
    train_seconds += time.perf_counter() - t0
    if not is_main:
        return {}
    assert run is not None
    for h in states:
        h.coder.eval()
    evals = evaluate_on_tokens(states, source, val_tokens, config)
    summary = train_report.summarise(config, subject, states, evals, run, train_seconds, t_start)
    with run.staging() as stage:
        for h in states:
            prov = train_report.provenance(config, subject, h, summary["hookpoints"][h.name])
            save_sparse_coder(h.coder, stage / "final" / h.name, provenance=prov)
        train_report.plots(stage / "plots", run.read_metrics(), states, evals)
        atomic_write_json(stage / "summary.json", summary)
        atomic_write_text(stage / RunDir.REPORT, train_report.report(config, summary))
    logger.info("wrote %s", run.path)
    return summary


__all__ = [
    "CHECKPOINT_PREFIX",
    "HookpointState",
    "batch_mean",
    "batch_total_variance",
    "evaluate_on_tokens",
    "live_batches",
    "prepare",
    "train_sae",
    "train_step",
]
